"""Gradient clipping to a global norm (docs/methods.md §3.6): the norm (``global_norm``: accurate where torch's one
reduction is not, and the same whether a backward summed a gradient's rows or a pass reads them), the factor, and
the optimizer step that applies the factor where it costs least.

``torch.nn.utils.clip_grad_norm_`` multiplies every gradient by the factor, a pass over all of them (read and write)
before Adam reads them again. A fused torch Adam can take the factor instead: it divides each gradient by its
``grad_scale`` as it reads it (the attribute ``torch.amp.GradScaler`` sets to unscale gradients), so ``step_clipped``
hands it ``1 / factor`` and the pass is gone — 97 ms of a 3.2 s step at the paper's width on this project's CPU
machine. The gradient Adam uses is then ``g / fl(1 / factor)`` instead of ``g · factor``: equal to rounding (within
an ulp or two), not bit for bit. Other optimizers get the multiply.
"""

from __future__ import annotations

import math

import torch

from crosscoder.distributed import Distributed
from crosscoder.kernels.sparse_decode import row_squared_norms


def clip_factor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """``min(1, max_norm / (total_norm + 1e-6))`` (0-d; ``clip_grad_norm_``'s factor), or None on CPU where it is
    exactly 1 — every step whose norm is within ``max_norm``: nothing to scale (on a GPU reading it would sync the
    host, so the factor is returned)."""
    factor = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    if total_norm.device.type == "cpu" and bool(factor == 1.0):
        return None
    return factor


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """The squared L2 norm (0-d, float64) of ``tensor``'s values, summed over its rows (along the first dimension; a
    1-d tensor's rows are its values): each row's squares in float32 (``row_squared_norms``: the arithmetic in which
    the sparse backward's sweep sums a weight gradient's rows as it writes them), the rows' sums in float64. One
    float32 reduction over all values, as ``torch.linalg.vector_norm`` runs on CPU, loses precision with their number:
    over the 170 M values of a [73,728, 2,304] gradient it came out 2.3% low (0.07% over the 16.8 M of a [16,384,
    1,024] one). A split along the rows (latent sharding, a sharded Adam's slices) sums the same rows' squares."""
    rows = tensor.reshape(len(tensor), math.prod(tensor.shape[1:])) if tensor.dim() else tensor.reshape(1, 1)
    return row_squared_norms(rows).sum()


def global_norm(
    sharded: list[torch.Tensor],
    whole: list[torch.Tensor],
    context: Distributed | None = None,
    known_squares: list[torch.Tensor] | None = None,
    known_sharded_squares: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The L2 norm (0-d, the gradients' dtype) of gradients of which ``sharded`` are this process's rows of gradients
    split over the processes of ``context`` (their squares summed over processes) and ``whole`` gradients every process
    holds alike (counted once), as one process holding them all computes it (``squared_norm`` of each, summed in
    float64); ``known_squares`` and ``known_sharded_squares``: the float64 squared norms (0-d) of further whole
    gradients and of this process's rows of further split ones, known without reading them."""
    known, known_split = list(known_squares or []), list(known_sharded_squares or [])
    dtype = (sharded + whole)[0].dtype if sharded or whole else torch.float32
    zero = (sharded + whole + known + known_split)[0].new_zeros((), dtype=torch.float64)
    split = sum((squared_norm(grad) for grad in sharded), sum(known_split, zero))
    if context is not None:
        split = context.all_reduce(split)
    return (split + sum(known, zero) + sum((squared_norm(grad) for grad in whole), zero)).sqrt().to(dtype)


def step_clipped(optimizer: torch.optim.Optimizer, factor: torch.Tensor | None) -> None:
    """``optimizer.step()`` on its gradients scaled by ``factor`` (None: unscaled). A fused torch Adam divides them by
    ``1 / factor`` as it reads them (leaving them so divided, as a multiply would); any other optimizer's gradients
    are multiplied first."""
    if factor is None:
        optimizer.step()
        return
    if not (isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("fused")):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, factor)
        optimizer.step()
        return
    optimizer.grad_scale = factor.reciprocal()  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # type: ignore[attr-defined]
