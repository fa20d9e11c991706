"""What one training step keeps for the next (CPU; docs/methods.md §4.2): its large temporaries, the candidate bound of
the next BatchTopK selection, and the parameters' gradients, whose storage the next backward writes into.

On CPU a fresh allocation of a temporary or a gradient is paged in (and zeroed by the kernel) on every step: at the
paper's width (d = 2 × 2,304, F = 73,728) the two [dict_size, n_sources · d_model] gradients are 2.7 GB of fresh pages
a step. Kept and handed back, they are written in place instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class StepBuffers:
    """The large temporaries of a training step (the scaled encoder and the whole score matrix when the matrix is
    formed, the dead latents' columns), kept from one step to the next, and the gradients lent to the next backward.
    Tensors a step returns (``TrainingOutput.scores``, ``dead_columns``) alias them and are overwritten by the next
    step."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._gradients: dict[int, torch.Tensor] = {}
        self.candidate_bound: float | None = None
        """A lower bound for the next BatchTopK selection's candidates: this step's threshold lowered by
        ``CANDIDATE_MARGIN`` (the selection is exact whatever it is)."""

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer ``name`` with this shape and ``like``'s dtype and device (allocated when they change)."""
        tensor = self._tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != like.dtype or tensor.device != like.device:
            tensor = self._tensors[name] = like.new_empty(shape)
        return tensor

    def release(self, name: str) -> None:
        """Free the buffer ``name`` (the whole score matrix after a step that needed it)."""
        self._tensors.pop(name, None)

    def keep_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Take the parameters' gradients (each ``grad`` becomes None, as ``zero_grad(set_to_none=True)`` leaves it)
        and hold them for ``gradient_storage`` until ``drop_gradients``: called between a step's forward and its
        backward."""
        for parameter in parameters:
            if parameter.grad is not None:
                self._gradients[id(parameter)] = parameter.grad
                parameter.grad = None

    def gradient_storage(self, parameter: torch.nn.Parameter, shape: torch.Size) -> Callable[[], torch.Tensor | None]:
        """What a sparse backward calls once for the storage of ``parameter``'s gradient, seen as ``shape`` (a view of
        the parameter's, e.g. ``W_dec.flatten(1)``): the kept gradient, which this object then forgets (so autograd
        takes the tensor as the new ``grad`` without a copy), or None when none is kept or it does not fit."""

        def take() -> torch.Tensor | None:
            kept = self._gradients.pop(id(parameter), None)
            fits = kept is not None and kept.is_contiguous() and kept.dtype == parameter.dtype
            return kept.view(shape) if fits and kept.numel() == parameter.numel() else None

        return take

    def drop_gradients(self) -> None:
        """Free the kept gradients no backward took (called after the backward)."""
        self._gradients.clear()
