"""Exclusivity of crosscoder latents from decoder weights alone (docs/methods.md §6).

``Δnorm_j = ½ ((‖d_j^chat‖ − ‖d_j^base‖) / max(‖d_j^chat‖, ‖d_j^base‖) + 1)``: 1 = chat-only, 0 = base-only.
Norms are taken in the dictionary's normalised space (the decoder as trained, each source scaled to
E‖x‖ = √d_model), so a difference in the two models' activation scales does not make latents look exclusive.
"""

from __future__ import annotations

import torch

from crosscoder.dictionary import DedicatedCrossCoder, SparseDictionary
from crosscoder.errors import ConfigError

CHAT_ONLY, BASE_ONLY, SHARED, OTHER = "chat-only", "base-only", "shared", "other"


def _decoders(crosscoder: SparseDictionary, base: int, chat: int) -> tuple[torch.Tensor, torch.Tensor]:
    if crosscoder.n_sources < 2:
        raise ConfigError(
            f"exclusivity needs a crosscoder with at least two sources, got a {type(crosscoder).__name__} with "
            f"{crosscoder.n_sources}: it is defined between the base and the chat decoders"
        )
    for name, index in (("base", base), ("chat", chat)):
        if not 0 <= index < crosscoder.n_sources:
            raise ConfigError(f"{name} source index {index} is out of range for {crosscoder.n_sources} sources")
    decoder = crosscoder.W_dec.detach()
    return decoder[:, base], decoder[:, chat]


def relative_norm_difference(crosscoder: SparseDictionary, base: int = 0, chat: int = 1) -> torch.Tensor:
    """Δnorm per latent: [dict_size] in [0, 1] (NaN for a latent with no decoder in either source)."""
    base_rows, chat_rows = _decoders(crosscoder, base, chat)
    base_norm, chat_norm = base_rows.norm(dim=-1), chat_rows.norm(dim=-1)
    return 0.5 * ((chat_norm - base_norm) / torch.maximum(chat_norm, base_norm) + 1)


def decoder_cosine(crosscoder: SparseDictionary, base: int = 0, chat: int = 1) -> torch.Tensor:
    """``cos(d_j^base, d_j^chat)`` per latent: [dict_size]."""
    base_rows, chat_rows = _decoders(crosscoder, base, chat)
    return torch.nn.functional.cosine_similarity(base_rows, chat_rows, dim=-1)


def latent_classes(delta_norm: torch.Tensor) -> list[str]:
    """chat-only (Δnorm > 0.9), base-only (< 0.1), shared (|Δnorm − 0.5| < 0.1), else other."""
    classes = []
    for value in delta_norm.tolist():
        if value > 0.9:
            classes.append(CHAT_ONLY)
        elif value < 0.1:
            classes.append(BASE_ONLY)
        elif abs(value - 0.5) < 0.1:
            classes.append(SHARED)
        else:
            classes.append(OTHER)
    return classes


def class_counts(crosscoder: SparseDictionary, classes: list[str]) -> dict[str, dict]:
    """``{"counts": {class: latents}}`` and, for a dedicated-feature crosscoder, ``"by_partition": {partition:
    {class: latents}}`` (docs/methods.md §12.2): how many of its structural partitions' latents Δnorm classes where.
    classes: [dict_size] from ``latent_classes``."""
    summary: dict[str, dict] = {"counts": _counts(classes)}
    if isinstance(crosscoder, DedicatedCrossCoder):
        summary["by_partition"] = {name: _counts(classes[rows]) for name, rows in crosscoder.partitions().items()}
    return summary


def _counts(classes: list[str]) -> dict[str, int]:
    return {label: classes.count(label) for label in sorted(set(classes))}
