"""Watching a run: held-out validation with the inference threshold, and the non-finite guard."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from crosscoder.config import TrainConfig
from crosscoder.distributed import Distributed
from crosscoder.errors import NonFiniteError, OutOfMemoryError
from crosscoder.metrics import ReconstructionStats, active_counts
from crosscoder.training.trainee import Trainee


@torch.no_grad()
def validate(
    trainee: Trainee,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    context: Distributed | None = None,
) -> dict[str, float]:
    """FVE (total, per source), L0 and dead fraction on held-out batches with the inference threshold (every
    process passes the same batches; with latent sharding each decodes its latents and the parts are summed).
    ``dead_fraction`` here is the share of latents that never fired on these batches."""
    dictionary, stats = trainee.dictionary, ReconstructionStats()
    sharded = context is not None and context.latent_parallel
    for x in batches:
        x_normalized = dictionary.normalize(dictionary.input_from_pair(x.to(device)))
        codes = dictionary.select_with_threshold(dictionary.activations_normalized(x_normalized))
        x_hat = dictionary.decode_normalized(codes)
        if sharded:  # every process added b_dec to its part: sum the parts without it, then add it once
            x_hat = context.all_reduce(x_hat - dictionary.b_dec) + dictionary.b_dec
        stats.update(x_normalized, x_hat, active_counts(codes))
    if sharded:
        stats.gather_latents(context.all_gather_rows)
    metrics = stats.summary()
    metrics["dead_fraction"] = float((stats.latent_frequencies() == 0).double().mean())
    return metrics


class FiniteGuard:
    """Records, without host syncs, the first step whose batch or loss was not finite; ``check`` raises."""

    def __init__(self, device: torch.device, context: Distributed, config: TrainConfig) -> None:
        self.first_bad: dict[str, torch.Tensor] = {}
        self.device, self.context, self.config = device, context, config

    def watch(self, what: str, bad: torch.Tensor, step: int) -> None:
        """Note ``step`` if ``bad`` (0-d bool) and nothing was noted for ``what`` (``"batch"`` or a dictionary's
        name) before."""
        first = self.first_bad.setdefault(what, torch.full((), -1, dtype=torch.long, device=self.device))
        first.copy_(torch.where((first < 0) & bad, step, first))

    def check(self, last_checkpoint: Path | None) -> None:
        """Raise on every process if any process saw a non-finite batch or loss (a collective call)."""
        for what, first in self.first_bad.items():
            if self.context.enabled:  # every process raises together, naming the first bad step of any
                seen = torch.where(first >= 0, first, torch.iinfo(torch.long).max).view(1)
                torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MIN)
                bad_step = -1 if int(seen) == torch.iinfo(torch.long).max else int(seen)
            else:
                bad_step = int(first)
            if bad_step < 0:
                continue
            if what == "batch":
                raise NonFiniteError(
                    f"the batch at step {bad_step} contains NaN or Inf; training stopped and "
                    f"{self._kept(last_checkpoint)}. Fix the data (for example drop outlier tokens), then "
                    f"{self._start_again()}"
                )
            raise self.diverged(what, bad_step, last_checkpoint)

    def diverged(self, name: str, step: int, last_checkpoint: Path | None) -> NonFiniteError:
        """The error for a dictionary whose loss became NaN/Inf on finite batches: its training diverged."""
        return NonFiniteError(
            f"the {name} loss became NaN/Inf at step {step} on finite batches: training diverged, most likely because "
            f"the learning rate is too high for this data (--lr {self.config.lr:g}); training stopped and "
            f"{self._kept(last_checkpoint)}. Lower the learning rate (or lengthen --warmup-steps), then "
            f"{self._start_again()}"
        )

    @staticmethod
    def _kept(last_checkpoint: Path | None) -> str:
        return f"the last good checkpoint {last_checkpoint} is intact" if last_checkpoint else "no checkpoint exists"

    def _start_again(self) -> str:
        # a resume would repeat the same steps exactly, and the settings that fix them differ from the checkpoint's
        return f"start a new run (another --run-name, or move the run folder {self.config.run_dir} aside)"


@contextmanager
def out_of_memory_advice(config: TrainConfig, what: str) -> Iterator[None]:
    """Turn an allocation failure (CUDA out of memory, or the CPU allocator refusing) while doing ``what`` into one
    message saying the size that was asked for and what to lower; any other error passes through."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        text = str(error)
        cpu_refused = "can't allocate memory" in text or "DefaultCPUAllocator" in text
        if not (isinstance(error, torch.OutOfMemoryError) or cpu_refused):
            raise
        asked = re.search(r"allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", text)
        size = f" (an allocation of {asked.group(1)} failed)" if asked else ""
        raise OutOfMemoryError(
            f"out of memory while {what}{size} with --batch-size {config.batch_size} and dict_size "
            f"{config.dict_size or f'{config.expansion_factor} × d_model'}: the score matrix, where it is formed whole "
            f"(on a GPU), takes batch_size × dict_size × 4 bytes; try --batch-size {max(config.batch_size // 4, 1)} "
            "or fewer latents"
        ) from error
