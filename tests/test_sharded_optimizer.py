"""``ShardedAdam`` (crosscoder.training.sharded_optimizer) on two real gloo processes against one process's torch
Adam fed the summed gradients, with its collectives through gloo (processes on two hosts, as far as the context says)
and through the shared-memory exchange (on one host): the same parameters after every step (Adam is elementwise:
bitwise where no clipping scales; to rounding where it scales: the norm is summed in another order and the factor
divides), a change made to a parameter between steps (the SAE's renormalisation) seen by the update, each process
holding half the moments, and the state saved in one process's layout and loaded back."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosscoder.config import TrainConfig
from crosscoder.distributed import Distributed
from crosscoder.training.sharded_optimizer import ShardedAdam, shards_optimizer

SHAPES = [(6, 2, 4), (6,), (3, 5)]  # split evenly over 2 processes, twice; (3, 5) has 15 values: updated whole
STEPS = 4


def parameters() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def local_gradients(step: int, rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def renormalise(params: list[torch.nn.Parameter], rows: slice = slice(None)) -> None:
    """A constraint applied between steps, in place, to ``rows`` (where the SAE renormalises its decoder rows): halving
    them — unlike a renormalisation, not idempotent, so a row of the shared parameters that both processes constrained
    would show."""
    with torch.no_grad():
        params[0][rows].mul_(0.5)


def _worker(rank: int, folder: str, port: int, max_norm: float, local_world_size: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        context = Distributed(rank=rank, world_size=2, local_world_size=local_world_size)
        choices = [shards_optimizer(TrainConfig(shard_optimizer=choice), context) for choice in ("auto", "yes", "no")]
        params = parameters()
        optimizer = ShardedAdam(params, context, lr=0.1, betas=(0.9, 0.999))
        history, stored = [], []
        for step in range(STEPS):
            optimizer.zero_grad()
            for parameter, gradient in zip(params, local_gradients(step, rank), strict=True):
                parameter.grad = gradient.clone()
            local = [parameter.grad for parameter in params]
            optimizer.reduce_gradients()
            # past the reduction each sharded parameter's grad is the next backward's storage: with the exchange, its
            # place in this process's row (where the next reduce-scatter reads it), else the local gradient
            exchange = optimizer.exchange
            stored += [
                params[index].grad.data_ptr() == (exchange.storage(place) if exchange else local[index]).data_ptr()
                for place, index in enumerate(optimizer.split)
            ]
            # processes sharing the parameters each renormalise the rows they wrote (read-modify-write in place)
            rows = optimizer.written_rows(len(params[0]))
            optimizer.step(optimizer.clip_factor(max_norm), lambda rows=rows: renormalise(params, rows))
            history.append([parameter.detach().clone() for parameter in params])
        moments = [optimizer.inner.state[piece]["exp_avg"].numel() for piece in optimizer.slices]
        in_segment = exchange is not None and params[0].data_ptr() == exchange.parameter(0).data_ptr()
        state = optimizer.state_dict()
        optimizer.unshare()  # after training: a change one process makes is its own
        with torch.no_grad():
            params[0].add_(float(rank))
        dist.barrier()
        private = torch.equal(params[0], history[-1][0] + rank)
        reloaded = ShardedAdam(parameters(), context, lr=0.1, betas=(0.9, 0.999))
        reloaded.load_state_dict(state)
        torch.save(
            {
                "history": history,
                "moments": moments,
                "state": state,
                "reloaded": reloaded.state_dict(),
                "choices": choices,
                "shared_memory": exchange is not None,
                "in_segment": in_segment,
                "written": (rows.start, rows.stop),
                "private": private,
                "stored": stored,
            },
            Path(folder) / f"rank{rank}.pt",
        )
        dist.barrier()  # every process done with the group before any leaves it (else, rarely, gloo aborts)
    finally:
        dist.destroy_process_group()


def run_two_processes(folder: Path, max_norm: float, local_world_size: int) -> list[dict]:
    with socket.socket() as probe:  # a free port: bind to 0 and read it back
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(str(folder), port, max_norm, local_world_size), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


def one_process(max_norm: float) -> tuple[list[list[torch.Tensor]], dict]:
    params = parameters()
    optimizer = torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.999), fused=True)
    history = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for parameter, first, second in zip(params, local_gradients(step, 0), local_gradients(step, 1), strict=True):
            parameter.grad = first + second
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        renormalise(params)
        history.append([parameter.detach().clone() for parameter in params])
    return history, optimizer.state_dict()


HOSTS = pytest.mark.parametrize("local_world_size", [1, 2], ids=["gloo", "shared_memory"])


@HOSTS
def test_sharded_adam_on_two_processes_updates_as_one_adam_on_the_summed_gradients(tmp_path, local_world_size):
    ranks = run_two_processes(tmp_path, max_norm=1e9, local_world_size=local_world_size)  # no clipping: bitwise
    history, state = one_process(max_norm=1e9)
    for rank in ranks:
        for step, (got, expected) in enumerate(zip(rank["history"], history, strict=True)):
            for index, (a, b) in enumerate(zip(got, expected, strict=True)):
                assert torch.equal(a, b), (step, index)
    # auto on gloo: where the processes share a host, whose memory carries the collectives
    one_host = local_world_size == 2
    assert [rank["choices"] for rank in ranks] == [[one_host, True, False]] * 2
    assert [rank["shared_memory"] for rank in ranks] == [one_host] * 2
    # sharing a host, the processes train one copy of the split parameters, each writing its own rows, until unshared
    assert [rank["in_segment"] for rank in ranks] == [one_host] * 2
    assert [rank["written"] for rank in ranks] == ([(0, 3), (3, 6)] if one_host else [(0, 6), (0, 6)])
    assert all(rank["private"] for rank in ranks)
    assert all(all(rank["stored"]) and len(rank["stored"]) == 2 * STEPS for rank in ranks)
    # each process holds half of each evenly split parameter's moments, all of the other one's
    assert [rank["moments"] for rank in ranks] == [[24, 3, 15], [24, 3, 15]]
    for rank in ranks:  # saved in one process's layout: the one-process Adam's state
        for index, moments in state["state"].items():
            for key, value in moments.items():
                assert torch.equal(rank["state"]["state"][index][key], value), (index, key)
                assert torch.equal(rank["reloaded"]["state"][index][key], value), (index, key)


@HOSTS
def test_sharded_adam_clips_to_the_global_norm_of_the_summed_gradients(tmp_path, local_world_size):
    ranks = run_two_processes(tmp_path, max_norm=0.5, local_world_size=local_world_size)
    history, _ = one_process(max_norm=0.5)
    for rank in ranks:
        for got, expected in zip(rank["history"], history, strict=True):
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
