"""Multi-process training with ``torchrun`` (docs/architecture.md §7): NCCL on GPU, gloo on CPU, and the same code
path in a single process.

The global batch (``TrainConfig.batch_size``) is split evenly across ranks; each rank reads (or streams) its own
share. Data parallel: each rank trains whole dictionaries on its share, gradients are averaged, and the BatchTopK
selection runs over the *global* batch by all-reducing the radix-select histograms. Latent sharding: the shares are
all-gathered into the global batch and each rank trains its own slice of every dictionary's latents on it. Either
way N ranks × B/N tokens train the same dictionary as one process with B tokens (up to the order of floating-point
sums). Rank 0 logs, checkpoints (with every rank's data position) and saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from crosscoder.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    shard_latents: bool = False
    local_world_size: int = 1
    """Processes on this process's host (torchrun's LOCAL_WORLD_SIZE)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def single_host(self) -> bool:
        """Every process runs on this host (so they can share memory)."""
        return self.local_world_size == self.world_size

    @property
    def data_parallel(self) -> bool:
        """Processes split the batch (and hold whole dictionaries)."""
        return self.enabled and not self.shard_latents

    @property
    def latent_parallel(self) -> bool:
        """Processes split the latents (and see the same batch)."""
        return self.enabled and self.shard_latents

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor (identity in a single process)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> dist.Work:
        """Start summing ``tensor`` over ranks in place; ``wait()`` on the returned work before reading it."""
        return dist.all_reduce(tensor, async_op=True)

    def reduce_scatter_into(self, out: torch.Tensor, flat: torch.Tensor, *, async_op: bool = False) -> dist.Work | None:
        """This rank's ``1/N`` chunk (in rank order) of the sum over ranks of ``flat`` [N · m] into ``out`` [m]."""
        return _reduce_scatter_single(out, flat, async_op=async_op)

    def all_gather_into(self, out: torch.Tensor, piece: torch.Tensor, *, async_op: bool = False) -> dist.Work | None:
        """Every rank's ``piece`` [m] into ``out`` [N · m], in rank order."""
        return _all_gather_single(out, piece, async_op=async_op)

    def every_process(self, condition: bool) -> bool:
        """Whether ``condition`` holds on every process (so that all stop together instead of one hanging)."""
        if not self.enabled:
            return condition
        flag = torch.tensor([int(condition)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

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
        gathered = tensor.new_empty(self.world_size * tensor.shape[0], *tensor.shape[1:])
        _all_gather_single(gathered, tensor.contiguous())
        return gathered

    def global_batch(self, share: torch.Tensor) -> torch.Tensor:
        """The batch the dictionaries train on from this rank's share: latent sharding trains every rank's latents
        on the whole global batch (the shares all-gathered, in rank order); data parallel keeps the share."""
        return self.all_gather_rows(share) if self.latent_parallel else share

    def local_batch_size(self, global_batch_size: int) -> int:
        """Rows of each global batch this rank reads."""
        if not self.enabled:
            return global_batch_size
        if global_batch_size % self.world_size:
            raise ConfigError(
                f"batch_size={global_batch_size} does not split evenly over {self.world_size} processes: use a "
                "multiple of the number of processes"
            )
        return global_batch_size // self.world_size


# torch ≥ 2.13 names them all_gather_single and reduce_scatter_single (their former names, all_gather_into_tensor and
# reduce_scatter_tensor, warn there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def init_distributed(device: str) -> Distributed:
    """Join the ``torchrun`` process group named by the environment (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    NCCL when training on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. The context splits the batch;
    ``dataclasses.replace(context, shard_latents=True)`` splits the latents instead (``TrainConfig.parallelism``).
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
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Distributed(rank, world_size, local_rank, local_world_size=local_world_size)


def shutdown_distributed() -> None:
    """Leave the process group (if any) before the interpreter exits: a process that exits with the group's
    threads still running aborts ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, context: Distributed) -> str:
    """Each rank's device: ``cuda:LOCAL_RANK`` when training on CUDA with several processes."""
    if context.enabled and device.startswith("cuda"):
        return f"cuda:{context.local_rank}"
    return device


class SumOverProcesses(torch.autograd.Function):
    """Sum of every process's partial tensor (latent sharding: partial reconstructions). The loss computed on the
    sum is the same on every process, so the gradient reaching each partial is that loss's gradient: identity."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, context: Distributed) -> torch.Tensor:  # type: ignore[override]
        return context.all_reduce(partial.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class SumGradientsOverProcesses(torch.autograd.Function):
    """Identity on a replicated tensor whose gradient each process only partly computes (latent sharding: the SAE's
    ``b_dec``, through the encoder input ``x − b_dec``, feeds every process's latents): the backward sums the parts."""

    @staticmethod
    def forward(ctx, replicated: torch.Tensor, context: Distributed) -> torch.Tensor:  # type: ignore[override]
        ctx.context = context
        return replicated.view_as(replicated)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.context.all_reduce(grad.clone()), None
