"""Adam sharded over data-parallel processes (docs/architecture.md §7, ZeRO stage 2): each of N processes keeps
Adam's moments for, and updates, 1/N of every parameter whose rows split evenly (its rows — the latents of a
latent-major parameter — in rank order); the gradients are reduce-scattered (each process receives the sum of its
rows only) and the updated rows all-gathered into every process's parameters. The other parameters (rows that do not
split) are all-reduced and updated whole on every process, as before.

Per step and process this moves the same bytes as all-reducing every gradient (an all-reduce is a reduce-scatter
then an all-gather) but runs Adam over 1/N of the parameters and holds 1/N of its moments. The collectives of all
parameters are issued together and awaited once, so they overlap one another (and, on a GPU, the update).

On gloo with every process on one host, the processes share the split parameters and exchange their gradients
through shared memory instead (``crosscoder.training.shared_memory_exchange``): each updates its rows of the one
copy in place, so nothing is all-gathered. gloo's own reduce-scatter and all-gather took 3.1× its all-reduce on this
project's CPU machine, more than the halved Adam saves, while the shared memory takes less than the all-reduce
alone. Used under data parallelism when ``TrainConfig.shard_optimizer`` says so (``shards_optimizer``): by default
on NCCL, and on gloo when the processes share a host.

Checkpoints hold Adam's state in the layout of one process (``state_dict`` gathers it; ``load_state_dict`` takes
this process's slices), so a checkpoint does not depend on how its run was parallelised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from crosscoder.config import TrainConfig
from crosscoder.distributed import Distributed
from crosscoder.training.clipping import clip_factor, global_norm, step_clipped
from crosscoder.training.shared_memory_exchange import open_exchange

MOMENTS = ("exp_avg", "exp_avg_sq")


def shards_optimizer(config: TrainConfig, context: Distributed) -> bool:
    """Whether this run's data-parallel processes shard Adam (``TrainConfig.shard_optimizer``; ``auto``: on NCCL,
    and on gloo when every process runs on this host, where the shared-memory exchange carries the collectives)."""
    if not context.data_parallel or config.shard_optimizer == "no":
        return False
    return config.shard_optimizer == "yes" or torch.distributed.get_backend() == "nccl" or context.single_host


class ShardedAdam:
    """Adam over ``parameters`` (each on every process, equal there), sharded over the processes of ``context``.

    Call ``reduce_gradients`` after the backward (local gradients of loss / N), then ``clip_factor`` and ``step``.
    ``inner`` is the torch Adam over this process's slices (the learning-rate schedule drives it). Past
    ``reduce_gradients`` a sharded parameter's ``grad`` is storage for the next backward (``StepBuffers`` lends it),
    not a gradient: its place in the shared-memory exchange's row, where the next reduce-scatter reads it without a
    copy, or, without the exchange (NCCL; gloo across hosts), the local gradient. With the exchange the sharded
    parameters' values live in shared memory from construction on (``shared``), until ``unshare``."""

    def __init__(
        self, parameters: list[torch.nn.Parameter], context: Distributed, lr: float, betas: tuple[float, float]
    ) -> None:
        self.parameters, self.context = list(parameters), context
        world = context.world_size
        self.sharded = [parameter.dim() > 0 and len(parameter) % world == 0 for parameter in self.parameters]
        self.split = [index for index, sharded in enumerate(self.sharded) if sharded]  # the sharded ones' positions
        shared = torch.distributed.get_backend() == "gloo" and bool(self.split)
        self.exchange = open_exchange([self.parameters[index] for index in self.split], context) if shared else None
        if self.exchange is not None:  # every process trains the one copy (process 0's values)
            for place, index in enumerate(self.split):
                self.parameters[index].data = self.exchange.parameter(place).view_as(self.parameters[index])
        # views into the parameters: a change the dictionary makes to them (the SAE's renormalisation) is Adam's too
        self.slices = [
            parameter.detach().view(-1).chunk(world)[context.rank] if sharded else parameter
            for parameter, sharded in zip(self.parameters, self.sharded, strict=True)
        ]
        self.inner = torch.optim.Adam(self.slices, lr=lr, betas=betas, fused=True)
        # the slices' summed gradients, written in place every step: a fresh allocation's first touch costs more than
        # the sum itself on this project's CPU machine (page faults)
        self.reduced = [
            torch.empty_like(piece) if sharded else None
            for piece, sharded in zip(self.slices, self.sharded, strict=True)
        ]
        # by position in ``split``: the squared norms of the summed rows, where the exchange formed them with the sum
        self.row_squares: list[torch.Tensor | None] = [None] * len(self.split)

    @property
    def shared(self) -> bool:
        """Whether the processes share the sharded parameters' memory (the shared-memory exchange)."""
        return self.exchange is not None

    def written_rows(self, count: int) -> slice:
        """The rows of a parameter of ``count`` rows that this process's ``step`` writes where the processes share
        the parameters and its rows split: its own, in rank order; else all of them (each process updates its own
        copy whole, or all-gathers the others' rows into it)."""
        if not self.shared or count % self.context.world_size:
            return slice(0, count)
        size = count // self.context.world_size
        return slice(self.context.rank * size, (self.context.rank + 1) * size)

    def unshare(self) -> None:
        """Give every parameter memory of its own again (a copy of the shared values) and drop the exchange: for use
        after training (a process that then changes a dictionary in place changes its own). Stepping ends here."""
        if self.exchange is None:
            return
        for index in self.split:
            parameter = self.parameters[index]
            parameter.data = parameter.data.clone()
            parameter.grad = None  # its storage was in the segment
        self.exchange, self.row_squares = None, [None] * len(self.split)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters:
            parameter.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    def reduce_gradients(self) -> None:
        """Sum the processes' gradients: each sharded parameter's slice into its slice's ``grad`` (reduce-scatter:
        through the shared-memory exchange when there is one), the others in place (all-reduce); the collectives
        issued at once, then awaited."""
        handles, local = [], []  # the local gradients stay referenced until their collectives are done
        for parameter, piece, reduced in zip(self.parameters, self.slices, self.reduced, strict=True):
            if reduced is not None:  # sharded (its local gradient None where it has none, on every process alike)
                local.append(parameter.grad)
                piece.grad = None if parameter.grad is None else reduced
                if parameter.grad is not None and self.exchange is None:
                    handles.append(self.context.reduce_scatter_into(piece.grad, parameter.grad.view(-1), async_op=True))
                parameter.grad = None  # past the reduction only the slice's sum is a gradient (storage: below)
            elif parameter.grad is not None:
                handles.append(self.context.all_reduce_async(parameter.grad))
        if self.exchange is not None:
            self.row_squares = self.exchange.reduce_scatter(local, [self.slices[index].grad for index in self.split])
        for handle in handles:
            handle.wait()
        # the storage the next backward writes the local gradients into (StepBuffers takes each parameter's grad):
        # their places in the exchange's row, read there by the next reduce-scatter, or the local gradients
        for place, (index, gradient) in enumerate(zip(self.split, local, strict=True)):
            if gradient is not None:
                parameter = self.parameters[index]
                parameter.grad = gradient if self.exchange is None else self.exchange.storage(place).view_as(parameter)

    def clip_factor(self, max_norm: float) -> torch.Tensor | None:
        """The factor that scales the reduced gradients to a global norm of at most ``max_norm`` (``clipping``'s:
        the slices' squares summed over processes — their rows' squares from the reduce-scatter where it formed them
        — the whole parameters' counted once); None: nothing to scale."""
        known = dict(zip(self.split, self.row_squares, strict=True))
        sliced, summed, whole = [], [], []
        for index, (piece, sharded) in enumerate(zip(self.slices, self.sharded, strict=True)):
            if piece.grad is None:
                continue
            if not sharded:
                whole.append(piece.grad)
            elif known[index] is not None:
                summed.append(known[index].sum())
            else:
                sliced.append(_as_rows(piece.grad, self.parameters[index]))
        if not sliced and not summed and not whole:
            return None
        return clip_factor(global_norm(sliced, whole, self.context, known_sharded_squares=summed), max_norm)

    @torch.no_grad()
    def step(self, clip: torch.Tensor | None = None, constraint: Callable[[], None] | None = None) -> None:
        """Adam on this process's slices (and the whole parameters) with their gradients scaled by ``clip`` (see
        ``clipping.step_clipped``), then ``constraint`` (the dictionary's ``after_optimizer_step`` on the rows
        ``written_rows`` names), then every process's slices in every process's parameters: shared, once every
        process has written its own; else all-gathered (before the constraint, which then sees whole parameters)."""
        step_clipped(self.inner, clip)
        if self.exchange is not None:
            if constraint is not None:
                constraint()
            self.exchange.published()
            return
        parameters = [self.parameters[index].detach() for index in self.split]
        inputs = [self.slices[index].clone() for index in self.split]  # an input must not alias its output
        handles = [
            self.context.all_gather_into(parameter.view(-1), piece, async_op=True)
            for parameter, piece in zip(parameters, inputs, strict=True)
        ]
        for handle in handles:  # the inputs stay referenced until done
            handle.wait()
        if constraint is not None:
            constraint()

    def state_dict(self) -> dict[str, Any]:
        """Adam's state as one process's Adam over the whole parameters would hold it (a collective call)."""
        state = self.inner.state_dict()
        gathered = {}
        for index, moments in state["state"].items():
            parameter, sharded = self.parameters[int(index)], self.sharded[int(index)]
            gathered[index] = {
                key: self._gather(value).view_as(parameter) if sharded and key in MOMENTS else value
                for key, value in moments.items()
            }
        return {"state": gathered, "param_groups": state["param_groups"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load Adam's state in one process's layout (``state_dict``'s), keeping this process's slices."""
        sliced = {}
        for index, moments in state["state"].items():
            sharded = self.sharded[int(index)]
            sliced[index] = {
                key: self._slice(value) if sharded and key in MOMENTS else value for key, value in moments.items()
            }
        self.inner.load_state_dict({"state": sliced, "param_groups": state["param_groups"]})

    def _gather(self, piece: torch.Tensor) -> torch.Tensor:
        return self.context.all_gather_rows(piece.contiguous())

    def _slice(self, whole: torch.Tensor) -> torch.Tensor:
        return whole.reshape(-1).chunk(self.context.world_size)[self.context.rank].clone()


def _as_rows(piece: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """This process's slice of ``parameter``'s flattened values (``piece``, 1-d: whole rows) as those rows (the
    clipping norm sums each row's squares in float32: the same rows as one process's)."""
    return piece.view(-1, *parameter.shape[1:])
