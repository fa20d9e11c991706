"""Data-parallel training with ``torchrun`` (DESIGN §7): NCCL on GPU, gloo on CPU, and the same code path in a
single process.

The global batch (``TrainConfig.batch_size``) is split evenly across ranks; each rank reads its own share.
Gradients are averaged, and the BatchTopK selection runs over the *global* batch by all-reducing the radix-select
histograms, so N ranks × B/N tokens train the same dictionary as one process with B tokens (up to the order of
floating-point sums). Rank 0 logs, checkpoints (with every rank's data position) and saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor (identity in a single process)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's [rows, ...] tensor along dim 0, in rank order (equal row counts)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def local_batch_size(self, global_batch_size: int) -> int:
        if global_batch_size % self.world_size:
            raise ValueError(
                f"batch_size={global_batch_size} does not split evenly over {self.world_size} processes: use a "
                "multiple of the number of processes"
            )
        return global_batch_size // self.world_size


def init_distributed(device: str) -> Distributed:
    """Join the ``torchrun`` process group named by the environment (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    NCCL when training on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Distributed(rank, world_size, local_rank)


def rank_device(device: str, context: Distributed) -> str:
    """Each rank's device: ``cuda:LOCAL_RANK`` when training on CUDA with several processes."""
    if context.enabled and device.startswith("cuda"):
        return f"cuda:{context.local_rank}"
    return device
