"""Tensor kernels for the training step (installed as ``crosscoder.kernels``; pure math, no models or data)."""

from crosscoder.kernels.batch_topk import batch_topk_mask

__all__ = ["batch_topk_mask"]
