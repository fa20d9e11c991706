"""``crosscoder.kernels.row_sums.sum_rows``: the C kernel and the reference give ``t0 + t1 (+ t2 …)`` added in order
and each summed row's squares as ``row_squared_norms`` gives them on the same backend, bit for bit (two to four terms,
one value a row and rows wider than a vector); the portable (no AVX-512) build gives the same bits; mismatched terms
are refused."""

from __future__ import annotations

import pytest
import torch

from crosscoder.kernels import row_sums
from crosscoder.kernels.backend import use_backend
from crosscoder.kernels.row_sums import sum_rows
from crosscoder.kernels.sparse_decode import row_squared_norms


def terms(count: int, n_rows: int, width: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count * n_rows * width)
    return [torch.randn(n_rows, width, generator=generator) * 10.0**index for index in range(count)]


@pytest.mark.parametrize(("count", "n_rows", "width"), [(2, 37, 53), (3, 300, 16), (2, 8192, 1), (4, 5, 2304 + 13)])
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
def test_the_sum_and_its_row_squares_are_torchs_add_and_row_squared_norms(count, n_rows, width, backend) -> None:
    if backend == "auto":
        assert row_sums._row_sums_library() is not None  # compiled here (CI installs a C compiler)
    parts = terms(count, n_rows, width)
    expected = torch.add(parts[0], parts[1])
    for part in parts[2:]:
        expected = expected + part
    out = torch.empty(n_rows, width)
    with use_backend(backend):  # row_squared_norms: the C kernel's doubles, or torch's on the reference
        squares, expected_squares = sum_rows(parts, out), row_squared_norms(expected)
    assert torch.equal(out, expected)
    assert squares.dtype == torch.float64 and torch.equal(squares, expected_squares)
    torch.testing.assert_close(squares, expected.double().pow(2).sum(1), rtol=1e-5, atol=0)  # the rows' own squares


def test_the_portable_build_without_avx512_gives_the_same_values_bit_for_bit(portable_build) -> None:
    import ctypes

    portable = portable_build("row_sums", row_sums.SIGNATURES)
    parts = terms(3, 45, 2304 + 13)
    expected = torch.empty(45, 2304 + 13)
    expected_squares = sum_rows(parts, expected)
    found, squares = torch.empty_like(expected), torch.empty(45, dtype=torch.float64)
    pointers = (ctypes.c_void_p * 3)(*(part.data_ptr() for part in parts))
    portable.sum_rows(pointers, 3, found.data_ptr(), *found.shape, squares.data_ptr(), 2)
    assert torch.equal(found, expected) and torch.equal(squares, expected_squares)


def test_terms_unlike_the_output_are_refused() -> None:
    out = torch.empty(4, 3)
    unlike = [torch.zeros(4, 3)], [torch.zeros(4, 3), torch.zeros(3, 4)], [torch.zeros(4, 3)] * 2 + [out.double()]
    for parts in unlike:
        with pytest.raises(ValueError, match="two or more terms of out's shape"):
            sum_rows(parts, out)
