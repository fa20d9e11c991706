"""``crosscoder.kernels.row_projection``: ``g_j ← g_j − ⟨g_j, w_j⟩ w_j`` and ``w_j ← w_j / max(‖w_j‖, ε)`` in place —
the C kernel and the reference (one block of rows and several, the last short) give the formulas' values; the C
kernel's portable (no AVX-512) build gives its values bit for bit; other dtypes run the reference; mismatched inputs
are refused."""

from __future__ import annotations

import pytest
import torch

from crosscoder.kernels import row_projection
from crosscoder.kernels.backend import use_backend
from crosscoder.kernels.row_projection import normalise_rows, project_out_rows


def rows_and_gradient(n_rows: int, width: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n_rows * width)
    rows = torch.randn(n_rows, width, generator=generator, dtype=torch.float64)
    rows /= rows.norm(dim=1, keepdim=True)
    return rows.to(dtype), torch.randn(n_rows, width, generator=generator, dtype=torch.float64).to(dtype)


def projected(backend: str, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    with use_backend(backend):
        project_out_rows(rows, grad)
    return grad


@pytest.mark.parametrize(("n_rows", "width"), [(37, 53), (300, 16), (5, 7), (1, 40)])
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
def test_each_rows_component_along_its_weight_row_is_removed(n_rows, width, backend, monkeypatch) -> None:
    monkeypatch.setattr(row_projection, "PROJECTED_ROWS", 7)  # the reference in blocks, the last short
    if backend == "auto":
        assert row_projection._row_projection_library() is not None  # compiled here (CI installs a C compiler)
    rows, grad = rows_and_gradient(n_rows, width)
    wide = grad.double() - (grad.double() * rows.double()).sum(1, keepdim=True) * rows.double()
    found = projected(backend, rows, grad)
    torch.testing.assert_close(found, wide.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((found * rows).sum(1), torch.zeros(n_rows), rtol=0, atol=1e-5)


def test_the_portable_build_without_avx512_gives_the_same_values_bit_for_bit(portable_build) -> None:
    portable = portable_build("row_projection", row_projection.SIGNATURES)
    rows, grad = rows_and_gradient(45, 2304 + 13)
    expected = projected("auto", rows, grad)
    found = grad.clone()
    portable.project_out_rows(rows.data_ptr(), found.data_ptr(), *rows.shape, 2)
    assert torch.equal(found, expected)
    expected = normalised("auto", grad)
    portable.normalise_rows(grad.data_ptr(), *grad.shape, 1e-12, 2)
    assert torch.equal(grad, expected)


def normalised(backend: str, rows: torch.Tensor, min_norm: float = 1e-12) -> torch.Tensor:
    rows = rows.clone()
    with use_backend(backend):
        normalise_rows(rows, min_norm)
    return rows


@pytest.mark.parametrize(("n_rows", "width"), [(37, 53), (300, 64), (5, 7), (3, 2304 + 13)])
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
def test_each_row_is_scaled_to_unit_norm_and_a_zero_row_stays_zero(n_rows, width, backend) -> None:
    _, weights = rows_and_gradient(n_rows, width)
    weights[0] = 0.0
    weights[-1] *= 1e-14  # below min_norm: divided by min_norm, not by its own norm
    expected = weights.double() / weights.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    found = normalised(backend, weights)
    torch.testing.assert_close(found, expected.float(), rtol=4e-7, atol=0)  # three roundings
    torch.testing.assert_close(found[1:-1].double().norm(dim=1), torch.ones(n_rows - 2, dtype=torch.float64))
    assert torch.equal(found[0], torch.zeros(width))
    torch.testing.assert_close(normalised("auto", weights), normalised("reference", weights), rtol=4e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_other_dtypes_run_the_reference(dtype) -> None:
    rows, grad = rows_and_gradient(20, 24, dtype)
    assert torch.equal(projected("auto", rows, grad), projected("reference", rows, grad))
    assert torch.equal(normalised("auto", grad), normalised("reference", grad))


def test_mismatched_inputs_are_refused() -> None:
    rows, grad = rows_and_gradient(6, 8)
    with pytest.raises(ValueError, match=r"grad has shape \[6, 7\] but \[6, 8\] was expected"):
        project_out_rows(rows, grad[:, :7].contiguous())
    with pytest.raises(ValueError, match="dtypes differ"):
        project_out_rows(rows, grad.double())
    with pytest.raises(ValueError, match="not contiguous"):
        project_out_rows(rows, grad.T.contiguous().T)
    with pytest.raises(ValueError, match="not contiguous"):
        normalise_rows(grad.T)
