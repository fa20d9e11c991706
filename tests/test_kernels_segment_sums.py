"""The C kernel of the sparse sums (``kernels/segment_sums.c``, the CPU's float32 path): ``latent_scatter_sum``'s
segmented sums equal the formula in float64 and MKL's reference to rounding, bit for bit whatever the thread count
and in the portable (no AVX-512) build; every row of a given output is written (zero rows for latents without
entries), through non-temporal stores where rows are 64-byte aligned and plain ones where not; the rows of latents
with entries alone (AuxK's) come from the same kernel; the entries' dot products it takes in the same sweep (the
decode backward's ∂values) equal ``entry_dot``'s to rounding, on every path, and the sums it projects off the
weight's rows (the SAE's constraint) are ``project_out_rows`` of the sums, bit for bit on the C path and AuxK's rows
projected too; the decode's ``row_gather_sum`` (rows as
segments, no order, plain stores) equals ``embedding_bag``'s to rounding; other dtypes run the reference."""

from __future__ import annotations

import pytest
import torch

from crosscoder.kernels import sparse_decode
from crosscoder.kernels.backend import use_backend
from crosscoder.kernels.row_projection import project_out_rows
from crosscoder.kernels.sparse_codes import SparseCodes
from crosscoder.kernels.sparse_decode import (
    AlongWeight,
    entry_dot,
    latent_scatter_rows,
    latent_scatter_sum,
    row_gather_sum,
    row_squared_norms,
)
from crosscoder.step_buffers import SharedGradient


def pattern(batch: int, dict_size: int, density: float, seed: int = 0) -> SparseCodes:
    """Codes with some latents of many entries (more than the kernel's four per sweep) and some of none."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, dict_size, generator=generator) < density
    mask[:, 1] = True
    mask[:, 2:5] = False
    return SparseCodes.from_mask(mask)


def inputs(codes: SparseCodes, width: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(width)
    values = torch.randn(codes.nnz, generator=generator, dtype=torch.float64).to(dtype)
    return values, torch.randn(codes.batch_size, width, generator=generator, dtype=torch.float64).to(dtype)


def summed(codes: SparseCodes, values: torch.Tensor, table: torch.Tensor, backend: str, out=None) -> torch.Tensor:
    with use_backend(backend):
        return latent_scatter_sum(values, codes, table, out)


SHAPES = [(40, 37, 0.2, 150), (9, 23, 0.3, 3), (64, 50, 0.5, 64), (30, 11, 0.9, 2304 + 5)]
"""(batch, dict_size, density, width): widths off the vector lanes, narrower than one, on them (aligned rows)."""


@pytest.mark.parametrize(("batch", "dict_size", "density", "width"), SHAPES)
def test_the_c_kernel_sums_each_latents_entries(batch, dict_size, density, width) -> None:
    assert sparse_decode._segment_sums_library() is not None  # compiled here (CI installs a C compiler)
    codes = pattern(batch, dict_size, density)
    values, table = inputs(codes, width)
    exact = codes.to_dense(values.double()).T @ table.double()
    out = torch.full((dict_size, width), float("nan"))  # whatever it held is overwritten
    found = summed(codes, values, table, "auto", out)
    assert found.data_ptr() == out.data_ptr()
    torch.testing.assert_close(found, exact.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found, summed(codes, values, table, "reference"), rtol=1e-5, atol=1e-5)
    assert torch.equal(found[2:5], torch.zeros(3, width))  # latents without entries: zero rows
    assert torch.equal(summed(codes, values, table, "auto"), found)  # into a new tensor: the same


def test_rows_off_the_cache_line_are_written_with_plain_stores() -> None:
    codes = pattern(64, 50, 0.5)
    values, table = inputs(codes, 64)
    aligned = summed(codes, values, table, "auto")
    storage = torch.full((50 * 64 + 1,), float("nan"))
    shifted = storage[1:].view(50, 64)  # 4 bytes past a 64-byte boundary: every row off it
    assert shifted.data_ptr() % 64 != 0
    assert torch.equal(summed(codes, values, table, "auto", shifted), aligned)
    assert storage[0].isnan()  # nothing written before the output


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_sums_do_not_depend_on_the_thread_count(threads) -> None:
    codes = pattern(300, 1100, 0.05)  # several chunks of 256 latents
    values, table = inputs(codes, 40)
    expected = summed(codes, values, table, "auto")
    out = torch.empty_like(expected)
    library = sparse_decode._segment_sums_library()
    pointers = (codes.latent_offsets, codes.rows_by_latent, codes.latent_order, values, table)
    dot_rows, dots = torch.randn(1100, 40), torch.empty(codes.nnz)
    with use_backend("auto"):
        expected_dots = torch.empty(codes.nnz)
        latent_scatter_sum(values, codes, table, along=AlongWeight(dot_rows, expected_dots))
    status = library.segment_sums(
        *(t.data_ptr() for t in pointers),
        1100,
        40,
        out.data_ptr(),
        dot_rows.data_ptr(),
        dots.data_ptr(),
        0,
        1,
        None,
        threads,
    )
    assert status == 0 and torch.equal(out, expected) and torch.equal(dots, expected_dots)


def test_an_empty_pattern_gives_zero_rows() -> None:
    codes = SparseCodes.from_mask(torch.zeros(5, 7, dtype=torch.bool))
    values, table = inputs(codes, 16)
    assert torch.equal(summed(codes, values, table, "auto", torch.full((7, 16), float("nan"))), torch.zeros(7, 16))


def test_auxks_rows_come_from_the_same_sums() -> None:
    codes = pattern(40, 37, 0.2)
    values, table = inputs(codes, 48)
    with use_backend("auto"):
        latents, rows = latent_scatter_rows(values, codes, table)
    assert torch.equal(latents, codes.latents.unique())
    assert torch.equal(rows, summed(codes, values, table, "auto")[latents])


def test_the_portable_build_without_avx512_gives_the_same_values_bit_for_bit(portable_build) -> None:
    portable = portable_build("segment_sums", sparse_decode.SEGMENT_SUMS_SIGNATURES)
    codes = pattern(64, 50, 0.5)
    values, table = inputs(codes, 2304 + 16)
    expected = summed(codes, values, table, "auto")
    out = torch.empty_like(expected)
    pointers = (codes.latent_offsets, codes.rows_by_latent, codes.latent_order, values, table)
    dot_rows = torch.randn(50, 2320)
    expected_dots, dots = torch.empty(codes.nnz), torch.empty(codes.nnz)
    with use_backend("auto"):
        latent_scatter_sum(values, codes, table, along=AlongWeight(dot_rows, expected_dots))
    assert (
        portable.segment_sums(
            *(t.data_ptr() for t in pointers),
            50,
            2320,
            out.data_ptr(),
            dot_rows.data_ptr(),
            dots.data_ptr(),
            0,
            1,
            None,
            2,
        )
        == 0
    )
    assert torch.equal(out, expected) and torch.equal(dots, expected_dots)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_other_dtypes_run_the_reference(dtype) -> None:
    codes = pattern(40, 37, 0.2)
    values, table = inputs(codes, 24, dtype)
    assert torch.equal(summed(codes, values, table, "auto"), summed(codes, values, table, "reference"))


@pytest.mark.parametrize(("batch", "dict_size", "density", "width"), SHAPES)
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
def test_the_entries_dot_products_come_with_the_sums(batch, dict_size, density, width, backend) -> None:
    codes = pattern(batch, dict_size, density)
    values, table = inputs(codes, width)
    dot_rows = torch.randn(dict_size, width, generator=torch.Generator().manual_seed(1))
    dots = torch.full((codes.nnz,), float("nan"))
    with use_backend(backend):
        sums = latent_scatter_sum(values, codes, table, along=AlongWeight(dot_rows, dots))
    exact = codes.gather(table.double() @ dot_rows.double().T)
    torch.testing.assert_close(dots, exact.float(), rtol=1e-5, atol=1e-4)  # sums of up to 2,309 products
    with use_backend("reference"):
        torch.testing.assert_close(dots, entry_dot(codes, table, dot_rows), rtol=1e-5, atol=1e-4)
    assert torch.equal(sums, summed(codes, values, table, backend))  # the sums as without the dots


def test_the_decode_backward_takes_both_gradients_from_one_sweep() -> None:
    codes = pattern(40, 37, 0.2)
    values, _ = inputs(codes, 48)
    weight = torch.randn(37, 48, generator=torch.Generator().manual_seed(2))
    target = torch.randn(40, 48, generator=torch.Generator().manual_seed(3))
    gradients = {}
    for backend in ("auto", "reference"):
        leaves = values.clone().requires_grad_(), weight.clone().requires_grad_()
        with use_backend(backend):
            (sparse_decode.sparse_decode(leaves[0], codes, leaves[1]) - target).pow(2).sum().backward()
        gradients[backend] = [leaf.grad for leaf in leaves]
    dense_values, dense_weight = values.double().requires_grad_(), weight.double().requires_grad_()
    (codes.to_dense(dense_values) @ dense_weight - target.double()).pow(2).sum().backward()
    for found in gradients.values():
        torch.testing.assert_close(found[0], dense_values.grad.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(found[1], dense_weight.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("batch", "dict_size", "density", "width"), SHAPES)
def test_the_decodes_row_sums_equal_embedding_bags(batch, dict_size, density, width) -> None:
    codes = pattern(batch, dict_size, density)
    codes = SparseCodes.from_mask(codes.to_dense(torch.ones(codes.nnz)).bool().index_fill_(0, torch.tensor([0]), False))
    values, _ = inputs(codes, width)
    weight = torch.randn(dict_size, width, generator=torch.Generator().manual_seed(4))
    with use_backend("auto"):
        found = row_gather_sum(values, codes, weight)
    with use_backend("reference"):
        reference = row_gather_sum(values, codes, weight)
    exact = codes.to_dense(values.double()) @ weight.double()
    torch.testing.assert_close(found, exact.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(found, reference, rtol=1e-5, atol=1e-4)
    assert torch.equal(found[0], torch.zeros(width))  # a row without entries
    library = sparse_decode._segment_sums_library()
    for stream in (0, 1):  # the stores do not change the values
        out = torch.empty_like(found)
        pointers = (codes.row_offsets, codes.latents, None, values, weight)
        arguments = (*(None if t is None else t.data_ptr() for t in pointers), batch, width, out.data_ptr())
        assert library.segment_sums(*arguments, None, None, 0, stream, None, 2) == 0
        assert torch.equal(out, found)


@pytest.mark.parametrize(("batch", "dict_size", "density", "width"), SHAPES)
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
def test_projected_sums_are_the_sums_projected_off_the_weights_rows(batch, dict_size, density, width, backend) -> None:
    codes = pattern(batch, dict_size, density)
    values, table = inputs(codes, width)
    weight = torch.randn(dict_size, width, generator=torch.Generator().manual_seed(5))
    weight /= weight.norm(dim=1, keepdim=True)
    with use_backend(backend):
        expected = latent_scatter_sum(values, codes, table)
        project_out_rows(weight, expected)
        projected = latent_scatter_sum(values, codes, table, along=AlongWeight(weight, project=True))
    assert torch.equal(projected, expected)  # the same arithmetic as the projection's own pass
    torch.testing.assert_close((projected * weight).sum(1), torch.zeros(dict_size), rtol=0, atol=1e-4)
    assert torch.equal(projected[2:5], torch.zeros(3, width))


def test_auxks_rows_are_projected_before_they_join_the_primarys_sums() -> None:
    codes, aux_codes = pattern(40, 37, 0.2), pattern(40, 37, 0.05, seed=1)
    values, table = inputs(codes, 48)
    aux_values = torch.randn(aux_codes.nnz, generator=torch.Generator().manual_seed(6))
    weight = torch.randn(37, 48, generator=torch.Generator().manual_seed(7))
    weight /= weight.norm(dim=1, keepdim=True)
    shared = SharedGradient(lambda: None)
    assert shared.secondary(aux_values, aux_codes, table, along=AlongWeight(weight, project=True)) is None
    total = shared.primary(values, codes, table, along=AlongWeight(weight, project=True))
    expected = latent_scatter_sum(values, codes, table) + latent_scatter_sum(aux_values, aux_codes, table)
    project_out_rows(weight, expected)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("batch", "dict_size", "density", "width"), SHAPES)
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
@pytest.mark.parametrize("project", [False, True], ids=["sums", "projected sums"])
def test_each_rows_squared_norm_comes_with_the_sums(batch, dict_size, density, width, backend, project) -> None:
    """``squares`` gets each returned row's squared norm (as stored: after the projection), in the C sweep or a pass
    of the reference's own; zero for a latent without entries."""
    codes = pattern(batch, dict_size, density)
    values, table = inputs(codes, width)
    weight = torch.randn(dict_size, width, generator=torch.Generator().manual_seed(5))
    weight /= weight.norm(dim=1, keepdim=True)
    squares = torch.full((dict_size,), float("nan"), dtype=torch.float64)
    with use_backend(backend):
        sums = latent_scatter_sum(values, codes, table, along=AlongWeight(weight, project=project), squares=squares)
    torch.testing.assert_close(squares, sums.double().square().sum(1), rtol=1e-5, atol=0)
    with use_backend(backend):  # the clipping norm of a gradient no sweep formed: the same doubles
        assert torch.equal(row_squared_norms(sums), squares)
    assert torch.equal(squares[2:5], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        latent_scatter_sum(values, codes, table, squares=squares.float())


def test_a_shared_gradients_row_squares_cover_auxks_rows_and_are_dropped_when_it_comes_late() -> None:
    codes, aux_codes = pattern(40, 37, 0.2), pattern(40, 37, 0.05, seed=1)
    values, table = inputs(codes, 48)
    aux_values = torch.randn(aux_codes.nnz, generator=torch.Generator().manual_seed(6))
    early = SharedGradient(lambda: None)
    early.secondary(aux_values, aux_codes, table)
    total = early.primary(values, codes, table)
    assert early.gradient_address == total.data_ptr()
    torch.testing.assert_close(early.row_squares, total.double().square().sum(1), rtol=1e-5, atol=0)
    late = SharedGradient(lambda: None)
    late.primary(values, codes, table)
    assert late.row_squares is not None
    late.secondary(aux_values, aux_codes, table)  # a dense gradient autograd adds: the squares no longer hold
    assert late.row_squares is None


@pytest.mark.parametrize("width", [1, 15, 64, 200, 2320])
def test_row_squared_norms_are_each_rows_float32_dot_widened(width) -> None:
    rows = torch.randn(301, width, generator=torch.Generator().manual_seed(7))
    found = row_squared_norms(rows)
    assert found.dtype == torch.float64 and found.shape == (301,)
    torch.testing.assert_close(found, torch.linalg.vecdot(rows, rows).double(), rtol=2e-6, atol=0)
    with use_backend("reference"):
        torch.testing.assert_close(row_squared_norms(rows), found, rtol=2e-6, atol=0)
    torch.testing.assert_close(row_squared_norms(rows.double()), rows.double().square().sum(1))
    assert row_squared_norms(rows[:0]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[n_rows, width\]"):
        row_squared_norms(rows.view(-1))
