"""The per-step schedules of training (docs/methods.md §3): learning rate, L1 coefficient λ and BatchTopK k."""

from __future__ import annotations

from crosscoder.config import TrainConfig


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the learning rate: linear warm-up, then constant, with an optional linear decay to 0 over the
    final ``decay_fraction`` of the steps. The steps are the config's: a run resumed with a lower ``num_tokens``
    follows the schedule of its new total from the step after the resume (the first step uses the learning rate the
    checkpoint recorded), which drops the rate there if that step lies inside the new decay window."""
    factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    total = config.total_steps
    decay_start = total * (1 - config.decay_fraction)
    if config.decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total - step) / (total - decay_start))
    return factor


def l1_coefficient(config: TrainConfig, step: int) -> float:
    """λ, ramped linearly from 0 over ``l1_warmup_steps``."""
    if config.l1_warmup_steps <= 0:
        return config.l1_coefficient
    return config.l1_coefficient * min(1.0, step / config.l1_warmup_steps)


def current_k(config: TrainConfig, step: int) -> int:
    """k, annealed linearly from ``k_max`` to ``k`` over ``k_anneal_steps``."""
    if config.k_max is None or step >= config.k_anneal_steps:
        return config.k
    return round(config.k_max - (config.k_max - config.k) * step / config.k_anneal_steps)
