"""Tensor kernels for the training step (installed as ``crosscoder.kernels``; pure math, no models or data).

Each op lives beside its plain-PyTorch reference and its autograd wrapper; ``backend`` picks Triton on CUDA
and the reference on CPU — or a C kernel where one exists (``native``) — (``CROSSCODER_KERNELS=triton|reference``
or ``set_backend`` forces either).
``batch_topk`` and ``sparse_decode`` are not re-exported: the names are their modules' (import them from
``crosscoder.kernels.batch_topk`` and ``crosscoder.kernels.sparse_decode``).
"""

if __name__ == "kernels":
    # Imported as a top-level `kernels`: a checkout's root is on sys.path (`python train.py`, `python -m pytest` or
    # `python -m crosscoder.eval` run from it) and this folder shadows the installed distribution of that name, which
    # transformers imports. Hand the import over to that distribution; without one, this module stays empty.
    from crosscoder._shadowed import import_past_checkout

    import_past_checkout(__name__, __file__)
else:
    from crosscoder.kernels.backend import get_backend, set_backend, use_backend
    from crosscoder.kernels.batch_topk import (
        BatchTopKSelection,
        TopKThreshold,
        batch_topk_mask,
        batch_topk_threshold,
        radix_histogram,
    )
    from crosscoder.kernels.sparse_codes import SparseCodes
    from crosscoder.kernels.sparse_encoder import gather_active

__all__ = [
    "BatchTopKSelection",
    "SparseCodes",
    "TopKThreshold",
    "batch_topk_mask",
    "batch_topk_threshold",
    "gather_active",
    "get_backend",
    "radix_histogram",
    "set_backend",
    "use_backend",
]
