"""The sharded optimizer's parameters and gradient reduce-scatter in one shared-memory segment, for data-parallel
processes on one host over gloo (docs/architecture.md §7).

gloo moves every byte through a local TCP socket: on this project's 2-core CPU machine its all-reduce of 134 MB of
gradients took 81-118 ms of CPU and its reduce-scatter plus all-gather 3.1× that. Processes on one host can instead
read one another's memory. The segment holds N rows of gradients (one per process) and one copy of the parameters,
which every process trains in place of its own:

- each process forms its gradients in its own row (the storage its next backward writes into, ``storage``;
  gradients formed elsewhere are copied in) and, after a barrier, sums its own 1/N chunk of every parameter, its
  gradient's and the others' rows' (the reduce-scatter, in rank order: the additions of one process summing the N
  gradients), then updates that chunk of the shared parameters in place;
- a second barrier (``published``) then leaves every process the whole updated parameters — nothing is copied back
  (the all-gather is gone) — and frees the rows for the next backward.

The segment holds N + 1 parameters' worth of values: as many as the N processes' gradients plus one copy of the
parameters, which then take no memory of their own (N − 1 copies fewer than private parameters). Timed inside the
training step at B = 4,096, F = 16,384 on this project's CPU machine (2 processes of one thread each): with private
parameters the all-gather took about 20 ms a step (this process's updated slices written into its row, ~12 ms, then
the other's copied out, ~8 ms) and two barriers; shared, neither is left. The sum also forms the clipping norm's
squares of the rows it writes (``row_sums.sum_rows``): sum, squares and the norm's all-reduce 11 ms against 16 ms
with a pass of their own. 2-process data parallelism went from 94.9% of what two uncommunicating processes reach to
97.8-98.4% (README, bench/scaling.py).

The segment is a file in ``/dev/shm`` that every process maps and process 0 unlinks as soon as all have mapped it,
so nothing is left behind once training runs, however it ends. Its pages are reserved when it is created
(``posix_fallocate``): a ``/dev/shm`` too small for it (a container's default 64 MB) fails there, and the processes
fall back to gloo's collectives with a warning that says how to give them room, instead of dying of SIGBUS mid-run.
"""

from __future__ import annotations

import mmap
import os
import secrets
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from crosscoder.distributed import Distributed
from crosscoder.kernels.row_sums import sum_rows

SHARED_MEMORY = Path("/dev/shm")


class SharedMemoryExchange:
    """Parameters of ``sizes`` values in rows of ``widths`` values (the rows of each divisible by N) shared by the N
    processes of ``context``, all on this host, and their gradients' reduce-scatter, through ``segment`` [N + 1,
    sum(sizes)] of their dtype: one row of gradients per process, then the parameters. Build it with
    ``open_exchange``; ``reduce_scatter`` and ``published`` are collective calls (every process calls them, in the
    same order, alternately)."""

    def __init__(self, segment: torch.Tensor, sizes: list[int], widths: list[int], context: Distributed) -> None:
        self.context, self.rows, self.values, self.widths = context, segment[:-1], segment[-1], widths
        self.chunks = [_chunks(sum(sizes[:index]), size, context.world_size) for index, size in enumerate(sizes)]
        self.places = [slice(sum(sizes[:index]), sum(sizes[: index + 1])) for index in range(len(sizes))]

    def parameter(self, index: int) -> torch.Tensor:
        """Parameter ``index``'s values [size_index], the same memory in every process: a process writes only its own
        chunk of them, between ``reduce_scatter`` and ``published``; every process reads them whole after."""
        return self.values[self.places[index]]

    def storage(self, index: int) -> torch.Tensor:
        """Parameter ``index``'s place in this process's row [size_index]: where a local gradient can be formed so
        that ``reduce_scatter`` reads it there instead of copying it in (the next backward's storage, writable again
        once ``published`` returns)."""
        return self.rows[self.context.rank, self.places[index]]

    def reduce_scatter(
        self, gradients: list[torch.Tensor | None], into: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """``into[i]`` [size_i / N] ← this process's chunk of the sum over processes of ``gradients[i]`` [any shape,
        size_i values, contiguous], added in rank order; both None for a parameter without a gradient (on every process
        alike). Returns each sum's rows' squared norms (float64 [rows], ``row_sums.sum_rows``: formed in the same pass;
        None for None), which the clipping norm sums. Each process writes to its row only the chunks the others sum,
        and nothing where the gradient was formed in its place in the row (``storage``). The rows are read until
        every process has called ``published``: no process writes them again before."""
        rank, row = self.context.rank, self.rows[self.context.rank]
        for index, (chunks, gradient) in enumerate(zip(self.chunks, gradients, strict=True)):
            if gradient is not None and gradient.data_ptr() != self.storage(index).data_ptr():  # else already there
                for peer, (shared, local) in enumerate(chunks):
                    if peer != rank:
                        row[shared].copy_(gradient.reshape(-1)[local])
        dist.barrier()  # every row written
        squares: list[torch.Tensor | None] = []
        for chunks, gradient, out, width in zip(self.chunks, gradients, into, self.widths, strict=True):
            if out is None:
                squares.append(None)
                continue
            shared, local = chunks[rank]
            terms = [
                gradient.reshape(-1)[local] if peer == rank else self.rows[peer, shared]
                for peer in range(self.context.world_size)
            ]
            squares.append(sum_rows([term.view(-1, width) for term in terms], out.view(-1, width)))
        return squares

    def published(self) -> None:
        """Wait until every process has updated its chunks of the parameters (and read the rows it sums): then the
        parameters are whole in every process, and the rows free for the next backward."""
        dist.barrier()


def _chunks(start: int, size: int, world: int) -> list[tuple[slice, slice]]:
    """A parameter's N chunks, each as (its place in a row, its place within the parameter), for
    the parameter at ``start`` of a row."""
    chunk = size // world
    places = [slice(peer * chunk, (peer + 1) * chunk) for peer in range(world)]
    return [(slice(start + place.start, start + place.stop), place) for place in places]


def open_exchange(
    parameters: list[torch.Tensor], context: Distributed, directory: Path = SHARED_MEMORY
) -> SharedMemoryExchange | None:
    """The exchange for ``parameters`` (on the CPU, of one dtype, the rows of each splitting evenly over the processes;
    equal in every process) when every process of ``context`` runs on this host and ``directory`` holds its segment, its
    shared parameters holding process 0's values; else None (a warning says why). A collective call: every process
    gets the same answer."""
    if not context.single_host:
        return None
    sizes, dtype = [parameter.numel() for parameter in parameters], parameters[0].dtype
    nbytes = (context.world_size + 1) * sum(sizes) * dtype.itemsize
    name, problem = None, None
    if context.rank == 0:
        name, problem = _create(directory, nbytes)
    name, problem = context.all_gather_objects((name, problem))[0]
    segment = None
    if name is not None:
        try:
            segment = _map(directory / name, nbytes, dtype)
        except OSError as error:
            problem = f"process {context.rank} could not map {directory / name}: {error}"
    if segment is not None and context.rank == 0:  # before the check below, which every process passes after
        shared = segment[-sum(sizes) :]
        torch.cat([parameter.detach().reshape(-1) for parameter in parameters], out=shared)
    everyone = context.every_process(segment is not None)  # every process has mapped it (or given up)
    if context.rank == 0 and name is not None:
        (directory / name).unlink()
    if not everyone:
        if context.rank == 0:
            warnings.warn(
                f"the sharded optimizer exchanges gradients through gloo's reduce-scatter and all-gather, slower "
                f"than through shared memory: {problem or 'another process could not map the segment'}. Give "
                f"{directory} at least {nbytes / 2**20:.0f} MiB free (docker: --shm-size) or train with "
                "--shard-optimizer no",
                stacklevel=2,
            )
        return None
    widths = [parameter[0].numel() if parameter.dim() > 1 else 1 for parameter in parameters]
    return SharedMemoryExchange(segment.view(context.world_size + 1, sum(sizes)), sizes, widths, context)


def _create(directory: Path, nbytes: int) -> tuple[str | None, str | None]:
    """A new file of ``nbytes`` reserved bytes in ``directory``: (its name, None), or (None, why not)."""
    name = f"crosscoder-exchange-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        descriptor = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        return None, f"could not create a file in {directory}: {error}"
    try:
        os.posix_fallocate(descriptor, 0, nbytes)
    except OSError as error:
        (directory / name).unlink()
        return None, f"{directory} has no room for {nbytes / 2**20:.0f} MiB: {error}"
    finally:
        os.close(descriptor)
    return name, None


def _map(path: Path, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """The file's ``nbytes`` mapped shared, as values of ``dtype``."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        memory = mmap.mmap(descriptor, nbytes)  # MAP_SHARED; the mapping outlives the descriptor
    finally:
        os.close(descriptor)
    return torch.frombuffer(memory, dtype=dtype)
