"""The shared-memory exchange (crosscoder.training.shared_memory_exchange) among three real gloo processes: the
shared parameters start as process 0's; the reduce-scatter gives each process its chunk of the sum in rank order,
with the squared norms of the summed rows, step after step (each followed by every process writing its chunk of the
shared parameters), whether the gradients were formed elsewhere or in the process's own row; once published, every
process reads every process's chunks; the segment's file is gone once every process has mapped it; and where the
segment cannot be made every process falls back (None) with one warning that names the folder and the fix."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosscoder.distributed import Distributed
from crosscoder.kernels.sparse_decode import row_squared_norms
from crosscoder.training.shared_memory_exchange import open_exchange

WORLD = 3
SHAPES = [(6, 4), (3,), (9, 2)]  # each splits evenly over 3 processes
STEPS = 3


def local_gradients(step: int, rank: int) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    gradients: list[torch.Tensor | None] = [torch.randn(shape, generator=generator) for shape in SHAPES]
    gradients[1] = None  # a parameter without a gradient (on every process alike)
    return gradients


def _worker(rank: int, folder: str, port: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        context = Distributed(rank=rank, world_size=WORLD, local_world_size=WORLD)
        parameters = [torch.full(shape, -1.0 - rank) for shape in SHAPES]  # equal in training; here told apart
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exchange = open_exchange(parameters, context, Path(directory))
        dist.barrier()  # process 0 has unlinked the segment
        left_behind = sorted(path.name for path in Path(directory).glob("*")) if Path(directory).is_dir() else []
        result = {"warnings": [str(warning.message) for warning in caught], "left_behind": left_behind}
        if exchange is not None:
            shared = [exchange.parameter(index).view(shape) for index, shape in enumerate(SHAPES)]
            result["initial"] = [parameter.clone() for parameter in shared]
            sums, seen, squares = [], [], []
            for step in range(STEPS):  # as a training step: the gradients summed, then the updated slices shared
                into = [None if shape == (3,) else torch.empty(torch.Size(shape).numel() // WORLD) for shape in SHAPES]
                gradients = local_gradients(step, rank)
                if step % 2:  # formed in the process's own row (the next backward's storage): read there, not copied
                    gradients = [
                        None if gradient is None else exchange.storage(index).view_as(gradient).copy_(gradient)
                        for index, gradient in enumerate(gradients)
                    ]
                squares.append(exchange.reduce_scatter(gradients, into))
                sums.append(into)
                for parameter in shared:  # the update: this process's chunk only
                    parameter.view(-1).chunk(WORLD)[rank].fill_(10.0 * step + rank)
                exchange.published()
                seen.append([parameter.clone() for parameter in shared])
            result.update(sums=sums, seen=seen, squares=squares)
        result["exchange"] = exchange is not None
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        dist.barrier()  # every process done with the group before any leaves it (else, rarely, gloo aborts)
    finally:
        dist.destroy_process_group()


def run(folder: Path, directory: Path) -> list[dict]:
    with socket.socket() as probe:  # a free port: bind to 0 and read it back
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(str(folder), port, str(directory)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


def test_the_exchange_shares_parameters_and_reduce_scatters_among_three_processes(tmp_path):
    segments = tmp_path / "segments"
    segments.mkdir()
    ranks = run(tmp_path, segments)
    assert all(rank["exchange"] and not rank["warnings"] for rank in ranks)
    assert all(rank["left_behind"] == [] for rank in ranks)  # unlinked once every process had mapped it
    for step in range(STEPS):
        gradients = [local_gradients(step, rank) for rank in range(WORLD)]
        for index in range(len(SHAPES)):
            if gradients[0][index] is None:
                assert all(rank["sums"][step][index] is None and rank["squares"][step][index] is None for rank in ranks)
                continue
            total = gradients[0][index] + gradients[1][index] + gradients[2][index]  # in rank order
            for number, (rank, rows) in enumerate(zip(ranks, total.chunk(WORLD), strict=True)):
                assert torch.equal(rank["sums"][step][index], rows.reshape(-1)), (step, index, number)
                # the clipping norm's squares of the summed rows, formed with the sum
                assert torch.equal(rank["squares"][step][index], row_squared_norms(rows.reshape(len(rows), -1)))
    for rank in ranks:
        assert all(torch.all(parameter == -1.0) for parameter in rank["initial"])  # process 0's values
        for step in range(STEPS):  # every process's chunk, as written before the publication
            for parameter in rank["seen"][step]:
                for peer, chunk in enumerate(parameter.reshape(-1).chunk(WORLD)):
                    assert torch.all(chunk == 10.0 * step + peer), (step, peer)


def test_without_room_for_the_segment_every_process_falls_back_with_one_warning(tmp_path):
    missing = tmp_path / "no-such-folder"
    ranks = run(tmp_path, missing)
    assert [rank["exchange"] for rank in ranks] == [False] * WORLD
    assert [len(rank["warnings"]) for rank in ranks] == [1, 0, 0]
    message = ranks[0]["warnings"][0]
    assert str(missing) in message and "--shm-size" in message and "--shard-optimizer no" in message


def test_processes_on_several_hosts_do_not_share_memory():
    two_hosts = Distributed(rank=0, world_size=4, local_world_size=2)
    assert open_exchange([torch.zeros(4)], two_hosts) is None  # no collective called: none is initialised
