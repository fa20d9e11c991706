"""What one training step keeps for the next (CPU; docs/methods.md §4.2): its large temporaries, the candidate bound of
the next BatchTopK selection, and the parameters' gradients, whose storage the next backward writes into.

On CPU a fresh allocation of a temporary or a gradient is paged in (and zeroed by the kernel) on every step: at the
paper's width (d = 2 × 2,304, F = 73,728) the two [dict_size, n_sources · d_model] gradients are 2.7 GB of fresh pages
a step. Kept and handed back, they are written in place instead; AuxK's share of them is added into the same tensors
(``SharedGradient``) instead of arriving as two more dense tensors for autograd to sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from crosscoder.kernels.row_projection import project_out_rows
from crosscoder.kernels.sparse_codes import SparseCodes
from crosscoder.kernels.sparse_decode import (
    AlongWeight,
    entry_dot,
    latent_scatter_rows,
    latent_scatter_sum,
    row_squared_norms,
)


class SharedGradient:
    """One parameter's gradient in one training step, from the sparse backward of the step's forward (``primary``)
    and those of AuxK's decode of the dead latents (``secondary``), each a ``WeightGradient`` of
    ``crosscoder.kernels``. The primary writes its sums into the previous step's gradient when the step kept it (else
    a new tensor) and adds the rows a secondary left (AuxK's backward runs first: autograd runs the later-built
    nodes first), returning the whole gradient; a secondary leaves its non-zero rows — its dead latents' — and returns
    None. A secondary that runs after the primary returns its own dense gradient, which autograd adds (slower, the
    same sum)."""

    def __init__(self, storage: Callable[[], torch.Tensor | None]) -> None:
        self._storage = storage
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._primary_done = False
        self.gradient_address: int | None = None
        """Where the gradient the primary returned starts (``data_ptr``; None before it ran): no reference to it is
        held, so that autograd may take it as the parameter's ``grad`` without a copy."""
        self.row_squares: torch.Tensor | None = None
        """On CPU, [rows] float64: each row's squared L2 norm of the primary's gradient as it left it, summed in the
        C sweep that formed it (``latent_scatter_sum``'s ``squares``) — for the clipping norm; None where unknown (off
        CPU, before the primary, or after a secondary added a dense gradient of its own)."""

    def primary(
        self, values: torch.Tensor, codes: SparseCodes, table: torch.Tensor, along: AlongWeight | None = None
    ) -> torch.Tensor:
        squares = table.new_empty(codes.dict_size, dtype=torch.float64) if table.device.type == "cpu" else None
        gradient = latent_scatter_sum(values, codes, table, self._storage(), along, squares)
        for latents, rows in self._rows:
            gradient.index_add_(0, latents, rows)
        if squares is not None and self._rows:  # the rows AuxK added to: their squares again
            latents = torch.cat([latents for latents, _ in self._rows]).unique()
            squares.index_copy_(0, latents, row_squared_norms(gradient.index_select(0, latents)))
        self._rows.clear()
        self._primary_done = True
        self.gradient_address, self.row_squares = gradient.data_ptr(), squares
        return gradient

    def secondary(
        self, values: torch.Tensor, codes: SparseCodes, table: torch.Tensor, along: AlongWeight | None = None
    ) -> torch.Tensor | None:
        if self._primary_done:
            self.row_squares = None  # autograd adds this dense gradient to the primary's
            return latent_scatter_sum(values, codes, table, along=along)
        if along is not None and along.dots is not None:
            along.dots.copy_(entry_dot(codes, table, along.weight))
        latents, rows = latent_scatter_rows(values, codes, table)
        if along is not None and along.project:  # projected as the primary projects its sums
            project_out_rows(along.weight.index_select(0, latents), rows)
        self._rows.append((latents, rows))
        return None

    def check_complete(self) -> None:
        """Raise if a secondary's rows are still waiting for a primary that never ran (a backward that did not reach
        the step's forward): its gradient would be lost."""
        if self._rows:
            raise RuntimeError(
                "AuxK's share of a weight gradient waits for the backward of the training forward, which did not run: "
                "backpropagate the whole training loss (crosscoder.training.training_loss)"
            )


INPUT = "input"
"""The name of the buffer a step's input is formed in (``StepBuffers.input``)."""


class StepBuffers:
    """The large temporaries of a training step (the normalised input, the whole score matrix when the matrix is
    formed, the dead latents' columns), kept from one step to the next, and the gradients lent to the next backward.
    Tensors a step returns (``TrainingOutput.scores``, ``dead_columns``) alias them and are overwritten by the next
    step."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._gradients: dict[int, torch.Tensor] = {}
        self._wanted: set[int] = set()  # the parameters this step's ``shared_gradient`` calls named
        self.candidate_bound: float | None = None
        """A lower bound for the next BatchTopK selection's candidates: this step's threshold lowered by
        ``CANDIDATE_MARGIN`` (the selection is exact whatever it is)."""

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer ``name`` with this shape and ``like``'s dtype and device (allocated when they change)."""
        tensor = self._tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != like.dtype or tensor.device != like.device:
            tensor = self._tensors[name] = like.new_empty(shape)
        return tensor

    def input(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer a step's normalised input is formed in ([batch, n_sources, d_model]): scratch that the step
        may overwrite (``is_input``) — the SAE's x̃ − b_dec is written over x̃."""
        return self.get(INPUT, shape, like)

    def is_input(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the ``input`` buffer (or a view of all of it)."""
        kept = self._tensors.get(INPUT)
        return kept is not None and tensor.data_ptr() == kept.data_ptr() and tensor.numel() == kept.numel()

    def release(self, name: str) -> None:
        """Free the buffer ``name`` (the whole score matrix after a step that needed it)."""
        self._tensors.pop(name, None)

    def keep_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Take the gradients of those of ``parameters`` that this step's forward asked a ``shared_gradient`` for
        (each ``grad`` becomes None, as ``zero_grad(set_to_none=True)`` leaves it) and hold them for it until
        ``drop_gradients``: called between a step's forward and its backward."""
        for parameter in parameters:
            if parameter.grad is not None and id(parameter) in self._wanted:
                self._gradients[id(parameter)] = parameter.grad
                parameter.grad = None

    def shared_gradient(self, parameter: torch.nn.Parameter, shape: torch.Size) -> SharedGradient:
        """This step's ``SharedGradient`` of ``parameter`` seen as ``shape`` (a view of the parameter's, e.g.
        ``W_dec.flatten(1)``), writing into the gradient kept for it, if any, when its primary runs. The kept tensor
        is then forgotten here, so that autograd takes it as the new ``grad`` without a copy."""
        self._wanted.add(id(parameter))

        def storage() -> torch.Tensor | None:
            kept = self._gradients.pop(id(parameter), None)
            fits = kept is not None and kept.is_contiguous() and kept.dtype == parameter.dtype
            return kept.view(shape) if fits and kept.numel() == parameter.numel() else None

        return SharedGradient(storage)

    def drop_gradients(self) -> None:
        """Free the kept gradients no backward took (called after the backward) and forget this step's requests."""
        self._gradients.clear()
        self._wanted.clear()
