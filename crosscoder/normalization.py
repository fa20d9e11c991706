"""Statistics estimated once from the first tokens of a stream (docs/methods.md §1.2)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from crosscoder.errors import DataError


def estimate_input_scale(
    x: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Per-source scalar with ``E‖scale_s · x_s‖ = √d_model``. x: [tokens, n_sources, d_model] → [n_sources].
    ``all_reduce`` (a sum over processes) makes the mean run over every process's tokens."""
    sums = torch.cat(
        [x.double().norm(dim=-1).sum(dim=0), torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)]
    )
    if all_reduce is not None:
        sums = all_reduce(sums)
    mean_norm = (sums[:-1] / sums[-1]).float()
    if (mean_norm <= 0).any() or not torch.isfinite(mean_norm).all():
        raise DataError(
            f"cannot normalise activations whose mean norm per source is {mean_norm.tolist()}: "
            "a source is all zeros or not finite"
        )
    return math.sqrt(x.shape[-1]) / mean_norm


def geometric_median(points: torch.Tensor, iterations: int = 100, tolerance: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm. points: [n, ...] → [...], the point minimising the sum of distances."""
    flat = points.reshape(points.shape[0], -1).double()
    median = flat.mean(dim=0)
    for _ in range(iterations):
        weights = 1 / (flat - median).norm(dim=-1).clamp_min(1e-12)
        updated = (weights[:, None] * flat).sum(dim=0) / weights.sum()
        converged = (updated - median).norm() <= tolerance * median.norm().clamp_min(1e-12)
        median = updated
        if converged:
            break
    return median.to(points.dtype).reshape(points.shape[1:])
