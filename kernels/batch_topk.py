"""BatchTopK selection: keep the ``n_keep`` largest entries of a whole ``[batch, dict_size]`` score matrix.

Plain-PyTorch reference (DESIGN §3, §5). Scores are non-negative (``f · c`` after a ReLU).
"""

from __future__ import annotations

import torch


def batch_topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` largest entries of ``scores``.

    scores: [batch, dict_size], non-negative. Returns a bool mask of the same shape with exactly
    ``min(n_keep, scores.numel())`` entries set (ties at the threshold are broken arbitrarily).
    """
    if n_keep <= 0:
        raise ValueError(f"n_keep must be positive, got {n_keep}")
    flat = scores.reshape(-1)
    n_keep = min(n_keep, flat.numel())
    kept = flat.topk(n_keep, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[kept] = True
    return mask.view_as(scores)
