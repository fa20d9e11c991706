"""The sum of equally shaped matrices with each summed row's squared norm (docs/methods.md §3.6): a sharded Adam's
reduce-scatter through shared memory sums each process's chunk of the processes' gradients, and the clipping norm
needs that sum's row squares; one pass gives both instead of a sum and then a pass over it.

Two implementations: the C kernel of ``row_sums.c`` (float32 on CPU, torch's threads on shares of the rows; compiled
by ``native``), used unless the kernel backend is ``"reference"`` or no C compiler is at hand, and the plain-PyTorch
reference below (``torch.add``, then ``row_squared_norms``); they give the same floats and doubles, and the tests
compare them.
"""

from __future__ import annotations

import ctypes

import torch

from crosscoder.kernels.backend import c_kernel_allowed
from crosscoder.kernels.native import native_library
from crosscoder.kernels.sparse_decode import row_squared_norms


def sum_rows(terms: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out`` [n_rows, width] ← ``terms[0] + terms[1] + …`` (each [n_rows, width], at least two; added in order, one
    float add at a time); returns the squared norm of each row of the sum as stored, float64 [n_rows]
    (``row_squared_norms``' arithmetic)."""
    if len(terms) < 2 or any(term.shape != out.shape or term.dtype != out.dtype for term in terms) or out.dim() != 2:
        shapes = [(list(term.shape), term.dtype) for term in terms]
        raise ValueError(f"sum_rows needs two or more terms of out's shape {list(out.shape)} and dtype; got {shapes}")
    library = None
    if out.dtype == torch.float32 and c_kernel_allowed(out.device) and out.is_contiguous() and out.shape[1] > 1:
        library = _row_sums_library()
    if library is None:  # the reference (and rows of one value, which row_squared_norms squares as the kernel would)
        torch.add(terms[0], terms[1], out=out)
        for term in terms[2:]:
            out.add_(term)
        return row_squared_norms(out)
    terms = [term.contiguous() for term in terms]
    pointers = (ctypes.c_void_p * len(terms))(*(term.data_ptr() for term in terms))
    squares = torch.empty(len(out), dtype=torch.float64)
    library.sum_rows(pointers, len(terms), out.data_ptr(), *out.shape, squares.data_ptr(), torch.get_num_threads())
    return squares


SIGNATURES = (
    (
        "sum_rows",
        None,
        (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, *(ctypes.c_int64,) * 2, ctypes.c_void_p, ctypes.c_int64),
    ),
)
"""``row_sums.c``'s functions as ``ctypes`` declares them."""


def _row_sums_library() -> ctypes.CDLL | None:
    return native_library("row_sums", SIGNATURES)
