"""Sparse decode and sparse encoder backward (docs/methods.md §4.4): Triton kernels, plain-PyTorch references,
dense PyTorch.

The Triton kernels run on CPU in Triton's interpreter, which must be switched on before Triton is first imported:
this module sets ``TRITON_INTERPRET=1`` (unless set) before its imports, and ``tests/conftest.py`` must do the same
when another test module imports ``crosscoder.kernels`` first. With ``TRITON_INTERPRET=0`` and a GPU
(``bench/gpu.sh``) the Triton side of each test runs compiled, on CUDA tensors. Shapes are small and odd (not
multiples of the block sizes); the interpreter is slow. That every kernel compiles: ``test_kernels_compile.py``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from crosscoder.kernels import backend, sparse_codes
from crosscoder.kernels.sparse_codes import SparseCodes
from crosscoder.kernels.sparse_decode import (
    BLOCK_D_MAX,
    BLOCK_ENTRIES,
    entry_dot,
    latent_scatter_rows,
    latent_scatter_sum,
    latent_value_sums,
    prefix_decode,
    row_gather_sum,
    sparse_decode,
)
from crosscoder.kernels.sparse_encoder import gather_active

TOLERANCES = {  # (rtol, atol) for Triton against the reference, and for either against dense PyTorch
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    # both accumulate in float32 and round once; the interpreter truncates where CUDA rounds: one bf16 ulp
    torch.bfloat16: (2**-7 + 1e-3, 1e-3),
}

BACKENDS = ["reference", "triton"]


def triton_device() -> torch.device:
    """Where the Triton kernels run: CPU tensors in the interpreter, else CUDA tensors (compiled)."""
    if not backend.HAS_TRITON:
        pytest.skip("Triton is not installed")
    if backend.TRITON_INTERPRETED:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.fail(
            "Triton runs compiled but there is no GPU: TRITON_INTERPRET=1 must be set before Triton is first "
            "imported (at the top of tests/conftest.py)"
        )
    return torch.device("cuda")


@pytest.fixture(params=BACKENDS)
def device(request) -> torch.device:
    """Run the test under each backend, on its device: the reference on CPU, Triton on ``triton_device()``."""
    chosen = triton_device() if request.param == "triton" else torch.device("cpu")
    with backend.use_backend(request.param):
        yield chosen


def move(codes: SparseCodes, device: torch.device) -> SparseCodes:
    """The same codes on ``device``."""
    return SparseCodes(
        codes.rows.to(device), codes.latents.to(device), codes.row_offsets.to(device), codes.batch_size, codes.dict_size
    )


def make_codes(
    batch_size: int,
    dict_size: int,
    density: float,
    seed: int = 0,
    empty_rows: tuple[int, ...] = (),
    full_rows: tuple[int, ...] = (),
    busy_latents: tuple[int, ...] = (),
) -> SparseCodes:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch_size, dict_size, generator=generator) < density
    mask[:, list(busy_latents)] = True
    mask[list(full_rows)] = True
    mask[list(empty_rows)] = False
    return SparseCodes.from_mask(mask)


# (codes, d_model): odd sizes, rows with no active latent, a row and a latent with more entries than BLOCK_ENTRIES,
# an empty pattern, and a model width narrower than the smallest block.
PATTERNS = {
    "odd_sizes": (lambda: make_codes(40, 37, 0.2, empty_rows=(0, 7, 39), full_rows=(3,), busy_latents=(5,)), 150),
    "no_active_latent": (lambda: make_codes(6, 11, 0.0), 9),
    "narrow": (lambda: make_codes(9, 23, 0.3, seed=1, empty_rows=(4,)), 3),
}


def random_like_pattern(codes: SparseCodes, d_model: int, dtype: torch.dtype, seed: int = 0):
    """values (nnz,), a (B, D) and a (F, D) matrix."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(codes.nnz, generator=generator, dtype=torch.float64).to(dtype)
    batch_matrix = torch.randn(codes.batch_size, d_model, generator=generator, dtype=torch.float64).to(dtype)
    latent_matrix = torch.randn(codes.dict_size, d_model, generator=generator, dtype=torch.float64).to(dtype)
    return values, batch_matrix, latent_matrix


def all_primitives(values, batch_matrix, latent_matrix, codes):
    return {
        "row_gather_sum": row_gather_sum(values, codes, latent_matrix),
        "latent_scatter_sum": latent_scatter_sum(values, codes, batch_matrix),
        "latent_value_sums": latent_value_sums(values, codes),
        "entry_dot": entry_dot(codes, batch_matrix, latent_matrix),
    }


# ---------------------------------------------------------------------------------------------- SparseCodes
def test_from_mask_lists_entries_by_row_then_latent_with_row_offsets():
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    codes = SparseCodes.from_mask(mask)
    assert codes.rows.tolist() == [0, 0, 2, 2]
    assert codes.latents.tolist() == [1, 3, 0, 1]
    assert codes.row_offsets.tolist() == [0, 2, 2, 4]
    assert (codes.batch_size, codes.dict_size, codes.nnz) == (3, 4, 4)


@pytest.mark.parametrize("view_backend", ["auto", "reference"], ids=["C counting sort", "torch.sort"])
def test_latent_view_sorts_entries_by_latent_keeping_rows_ascending(view_backend):
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    with backend.use_backend(view_backend):
        codes = SparseCodes.from_mask(mask)
        assert codes.latent_order.tolist() == [2, 0, 3, 1]
        assert codes.latent_offsets.tolist() == [0, 1, 3, 3, 4]
        assert codes.rows_by_latent.tolist() == [2, 0, 2, 0]


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_the_c_counting_sort_gives_the_stable_sorts_latent_view(density):
    """Random codes with unused latents, empty rows, every entry present, and none."""
    assert sparse_codes._sparse_codes_library() is not None  # compiled here (CI installs a C compiler)
    generator = torch.Generator().manual_seed(int(density * 100))
    mask = torch.rand(37, 53, generator=generator) < density
    mask[:, 7] = density > 0  # one latent in every row
    views = {}
    for name in ("auto", "reference"):
        with backend.use_backend(name):
            codes = SparseCodes.from_mask(mask)
            views[name] = (codes.latent_order, codes.latent_offsets, codes.rows_by_latent)
    for got, want in zip(views["auto"], views["reference"], strict=True):
        assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want)


def test_codes_with_a_latent_out_of_range_get_the_reference_view_not_a_write_out_of_bounds():
    rows, latents = torch.tensor([0, 0, 1]), torch.tensor([2, 9, 1])  # 9 ≥ dict_size: unchecked codes
    views = {}
    for name in ("auto", "reference"):
        with backend.use_backend(name):
            codes = SparseCodes.from_sorted_indices(rows, latents, batch_size=2, dict_size=4)
            views[name] = (codes.latent_order, codes.latent_offsets, codes.rows_by_latent)
    for got, want in zip(views["auto"], views["reference"], strict=True):
        assert torch.equal(got, want)


def test_to_dense_and_gather_are_inverse():
    codes = make_codes(5, 8, 0.4)
    values = torch.arange(1.0, codes.nnz + 1)
    dense = codes.to_dense(values)
    assert dense.count_nonzero().item() == codes.nnz
    assert torch.equal(dense[codes.rows, codes.latents], values)
    assert torch.equal(codes.gather(dense), values)


def test_from_indices_equals_from_mask():
    from_mask = make_codes(7, 9, 0.3)
    from_indices = SparseCodes.from_indices(from_mask.rows, from_mask.latents, 7, 9)
    assert torch.equal(from_indices.row_offsets, from_mask.row_offsets)
    trusted = SparseCodes.from_sorted_indices(from_mask.rows, from_mask.latents, 7, 9)
    assert torch.equal(trusted.row_offsets, from_mask.row_offsets) and torch.equal(trusted.latents, from_mask.latents)


def test_codes_without_entries_have_empty_views():
    codes = SparseCodes.from_mask(torch.zeros(3, 4, dtype=torch.bool))
    assert codes.nnz == 0
    assert codes.row_offsets.tolist() == [0, 0, 0, 0]
    assert codes.latent_offsets.tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("rows", "latents", "message"),
    [
        ([0, 1, 3], [0, 1, 2], r"rows holds indices in \[0, 3\], outside \[0, batch_size=3\)"),
        ([0, 1, 2], [0, -1, 2], r"latents holds indices in \[-1, 2\]"),
        ([0, 2, 1], [0, 1, 2], "sorted by row then latent"),
        ([0, 0, 1], [1, 1, 2], "without duplicates"),
        ([0, 1], [0, 1, 2], "rows has 2 entries but latents has 3"),
    ],
)
def test_from_indices_rejects_invalid_patterns(rows, latents, message):
    with pytest.raises(ValueError, match=message):
        SparseCodes.from_indices(torch.tensor(rows), torch.tensor(latents), 3, 4)


def test_from_indices_rejects_int32_and_non_contiguous_indices():
    with pytest.raises(ValueError, match=r"rows must be an int64 tensor, got torch.int32: convert with .long\(\)"):
        SparseCodes.from_indices(torch.tensor([0], dtype=torch.int32), torch.tensor([0]), 1, 1)
    with pytest.raises(ValueError, match="latents must be contiguous"):
        SparseCodes.from_indices(torch.tensor([0, 1]), torch.tensor([[0, 0], [1, 1]])[:, 0], 2, 2)


def test_from_mask_rejects_non_bool_masks():
    with pytest.raises(ValueError, match="mask must be a 2-D bool tensor"):
        SparseCodes.from_mask(torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------- primitives
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_primitives_equal_dense_products(pattern):
    make, d_model = PATTERNS[pattern]
    codes = make()
    values, batch_matrix, latent_matrix = random_like_pattern(codes, d_model, torch.float64)
    dense = codes.to_dense(values)
    expected = {
        "row_gather_sum": dense @ latent_matrix,
        "latent_scatter_sum": dense.T @ batch_matrix,
        "latent_value_sums": dense.sum(dim=0),
        "entry_dot": codes.gather(batch_matrix @ latent_matrix.T),
    }
    with backend.use_backend("reference"):
        got = all_primitives(values, batch_matrix, latent_matrix, codes)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_primitives_match_reference(pattern, dtype):
    device = triton_device()
    make, d_model = PATTERNS[pattern]
    codes = make()
    inputs = random_like_pattern(codes, d_model, dtype)
    with backend.use_backend("triton"):
        triton_out = all_primitives(*(tensor.to(device) for tensor in inputs), move(codes, device))
    with backend.use_backend("reference"):
        reference_out = all_primitives(*inputs, codes)
    rtol, atol = TOLERANCES[dtype]
    for name, tensor in triton_out.items():
        assert tensor.dtype == dtype, name
        torch.testing.assert_close(tensor.cpu(), reference_out[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_latent_scatter_sum_writes_into_a_given_output_whatever_it_held(pattern, dtype, device):
    """``out`` (the previous step's gradient in training) is overwritten, rows of inactive latents with zeros, and
    returned: the same sums as into a new tensor, bitwise."""
    make, d_model = PATTERNS[pattern]
    codes = move(make(), device)
    values, batch_matrix, _ = (tensor.to(device) for tensor in random_like_pattern(codes, d_model, dtype))
    fresh = latent_scatter_sum(values, codes, batch_matrix)
    out = torch.full((codes.dict_size, d_model), float("nan"), dtype=dtype, device=device)
    written = latent_scatter_sum(values, codes, batch_matrix, out)
    assert written.data_ptr() == out.data_ptr() and torch.equal(written, fresh)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_latent_scatter_rows_are_the_rows_of_latents_with_entries(pattern, device):
    make, d_model = PATTERNS[pattern]
    codes = move(make(), device)
    values, batch_matrix, _ = (tensor.to(device) for tensor in random_like_pattern(codes, d_model, torch.float32))
    latents, rows = latent_scatter_rows(values, codes, batch_matrix)
    assert torch.equal(latents.cpu(), codes.latents.unique().cpu())
    torch.testing.assert_close(rows, latent_scatter_sum(values, codes, batch_matrix)[latents], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (torch.zeros(5, 3), r"out has shape \[5, 3\] but \[11, 4\] was expected"),
        (torch.zeros(11, 4, dtype=torch.float64), "dtype"),
        (torch.zeros(4, 11).T, "out is not contiguous"),
    ],
    ids=["shape", "dtype", "strides"],
)
def test_latent_scatter_sum_rejects_an_output_that_does_not_fit(out, message):
    codes = make_codes(6, 11, 0.3)
    values, batch_matrix, _ = random_like_pattern(codes, 4, torch.float32)
    with pytest.raises(ValueError, match=message):
        latent_scatter_sum(values, codes, batch_matrix, out)


def test_bfloat16_sums_accumulate_in_float32(device):
    # 300 terms of 1·1: a bfloat16 accumulator stalls at 256 (256 + 1 rounds back to 256); float32 reaches 300.
    codes = SparseCodes.from_mask(torch.ones(300, 1, dtype=torch.bool, device=device))  # one latent in 300 rows
    ones = torch.ones(codes.nnz, dtype=torch.bfloat16, device=device)
    table = torch.ones(300, 2, dtype=torch.bfloat16, device=device)
    assert latent_scatter_sum(ones, codes, table).tolist() == [[300.0, 300.0]]
    assert latent_value_sums(ones, codes).tolist() == [300.0]
    wide = SparseCodes.from_mask(torch.ones(1, 300, dtype=torch.bool, device=device))  # one row, 300 latents
    assert row_gather_sum(ones, wide, table).tolist() == [[300.0, 300.0]]
    left, right = (torch.ones(rows, 300, dtype=torch.bfloat16, device=device) for rows in (1, 300))
    dots = entry_dot(wide, left, right)
    assert dots.dtype == torch.bfloat16 and dots.unique().tolist() == [300.0]


# ---------------------------------------------------------------------------------------------- autograd: decode
def test_sparse_decode_passes_gradcheck_in_float64():
    codes = make_codes(6, 7, 0.35, empty_rows=(2,))
    values, _, weight = random_like_pattern(codes, 4, torch.float64)
    with backend.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda v, w: sparse_decode(v, codes, w), (values.requires_grad_(), weight.requires_grad_())
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_decode_matches_dense_decode_and_its_gradients(dtype, device):
    make, d_model = PATTERNS["odd_sizes"]
    codes = make()
    values, grad_out, weight = (tensor.to(device) for tensor in random_like_pattern(codes, d_model, dtype))
    codes = move(codes, device)
    sparse_values, sparse_weight = values.clone().requires_grad_(), weight.clone().requires_grad_()
    out = sparse_decode(sparse_values, codes, sparse_weight)
    out.backward(grad_out)
    # dense PyTorch in float32 on the same (rounded) inputs
    dense_values, dense_weight = values.float().requires_grad_(), weight.float().requires_grad_()
    expected = codes.to_dense(dense_values) @ dense_weight
    expected.backward(grad_out.float())
    rtol, atol = TOLERANCES[dtype]
    assert out.dtype == sparse_values.grad.dtype == sparse_weight.grad.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(sparse_values.grad.float(), dense_values.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(sparse_weight.grad.float(), dense_weight.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("prefix_sizes", [(37,), (1, 5, 36, 37), (20, 37)], ids=str)
def test_prefix_decode_equals_a_dense_decode_of_each_prefix_and_its_gradients(prefix_sizes, device):
    """Matryoshka's cumulative block decode (docs/methods.md §12.1) against one dense decode per prefix."""
    make, d_model = PATTERNS["odd_sizes"]
    codes = make()
    values, _, weight = (tensor.to(device) for tensor in random_like_pattern(codes, d_model, torch.float32))
    generator = torch.Generator().manual_seed(1)  # not the global generator: the same test whatever ran before
    grad_out = torch.randn(len(prefix_sizes), codes.batch_size, d_model, generator=generator).to(device)
    codes = move(codes, device)
    sparse_values, sparse_weight = values.clone().requires_grad_(), weight.clone().requires_grad_()
    out = prefix_decode(sparse_values, codes, sparse_weight, prefix_sizes)
    out.backward(grad_out)
    dense_values, dense_weight = values.clone().requires_grad_(), weight.clone().requires_grad_()
    dense = codes.to_dense(dense_values)
    expected = torch.stack([dense[:, :size] @ dense_weight[:size] for size in prefix_sizes])
    expected.backward(grad_out)
    # float32 sums of up to len(prefix_sizes) · d_model products in another order: 1e-5 of the result's scale
    pairs = ((out, expected), (sparse_values.grad, dense_values.grad), (sparse_weight.grad, dense_weight.grad))
    for actual, dense_result in pairs:
        scale = float(dense_result.detach().abs().max())
        torch.testing.assert_close(actual, dense_result, rtol=1e-5, atol=1e-5 * scale)


def test_decoder_gradient_is_zero_exactly_on_inactive_latents(device):
    codes = make_codes(10, 12, 0.15, seed=3)
    values, grad_out, weight = (tensor.to(device) for tensor in random_like_pattern(codes, 20, torch.float32))
    codes = move(codes, device)
    weight.requires_grad_()
    sparse_decode(values, codes, weight).backward(grad_out)
    inactive = codes.latent_offsets[1:] == codes.latent_offsets[:-1]
    assert inactive.any() and (~inactive).any()
    assert torch.equal(weight.grad[inactive], torch.zeros_like(weight.grad[inactive]))
    assert (weight.grad[~inactive].abs().sum(dim=1) > 0).all()


def test_decode_of_empty_codes_is_zero_with_zero_gradients(device):
    codes = SparseCodes.from_mask(torch.zeros(4, 6, dtype=torch.bool, device=device))
    values = torch.zeros(0, device=device, requires_grad=True)
    weight = torch.randn(6, 5, device=device, requires_grad=True)
    out = sparse_decode(values, codes, weight)
    out.backward(torch.randn(4, 5, device=device))
    assert torch.equal(out, torch.zeros(4, 5, device=device))
    assert values.grad.shape == (0,)
    assert torch.equal(weight.grad, torch.zeros(6, 5, device=device))


# ---------------------------------------------------------------------------------------------- autograd: encoder
def active_pre_activations(x, W_enc, b_enc, codes):
    """What the training step feeds gather_active: the dense encoder GEMM without autograd, sampled."""
    with torch.no_grad():
        return codes.gather(x @ W_enc.T + b_enc)


def test_gather_active_passes_gradcheck_in_float64():
    codes = make_codes(5, 7, 0.4, empty_rows=(1,))
    _, x, W_enc = random_like_pattern(codes, 4, torch.float64)
    b_enc = torch.randn(7, dtype=torch.float64)
    inputs = (x.requires_grad_(), W_enc.requires_grad_(), b_enc.requires_grad_())
    with backend.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: gather_active(active_pre_activations(x, w, b, codes), x, w, b, codes), inputs
        )


def test_gather_active_returns_the_active_pre_activations(device):
    codes = make_codes(8, 10, 0.3)
    _, x, W_enc = (tensor.to(device) for tensor in random_like_pattern(codes, 6, torch.float32))
    b_enc = torch.randn(10, device=device)
    codes = move(codes, device)
    pre_active = active_pre_activations(x, W_enc, b_enc, codes)
    assert torch.equal(gather_active(pre_active, x, W_enc, b_enc, codes), pre_active)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_training_step_matches_dense_pytorch(dtype, device):
    """Encoder GEMM → BatchTopK-like mask → ReLU → decode → MSE: every gradient equals dense autograd's."""
    make, d_model = PATTERNS["odd_sizes"]
    codes = move(make(), device)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(codes.batch_size, d_model, generator=generator).to(device, dtype)
    params = {
        "W_enc": torch.randn(codes.dict_size, d_model, generator=generator) / d_model**0.5,
        "b_enc": torch.rand(codes.dict_size, generator=generator),
        "W_dec": torch.randn(codes.dict_size, d_model, generator=generator) / d_model**0.5,
    }
    params = {name: p.to(device) for name, p in params.items()}
    sparse = {name: p.to(dtype).requires_grad_() for name, p in params.items()}
    x_sparse = x.clone().requires_grad_()  # as for the SAE, whose input x − b_dec needs a gradient
    encoder = (x_sparse, sparse["W_enc"], sparse["b_enc"])
    values = gather_active(active_pre_activations(*encoder, codes), *encoder, codes)
    reconstruction = sparse_decode(torch.relu(values), codes, sparse["W_dec"])
    (reconstruction.float() - x.float()).pow(2).sum().backward()

    dense = {name: p.to(dtype).float().requires_grad_() for name, p in params.items()}
    x_dense = x.float().requires_grad_()
    mask = codes.to_dense(torch.ones(codes.nnz, device=device))
    dense_codes = torch.relu(x_dense @ dense["W_enc"].T + dense["b_enc"]) * mask
    (dense_codes @ dense["W_dec"] - x_dense.detach()).pow(2).sum().backward()

    # bf16 also rounds the pre-activations, the reconstruction and the gradients, each once: compare at the
    # scale of each tensor (a few bf16 ulps of its largest entry)
    rtol = 1e-5 if dtype == torch.float32 else 2**-5
    results = {name: (sparse[name].grad, dense[name].grad) for name in params}
    results["x"] = (x_sparse.grad, x_dense.grad)
    results["reconstruction"] = (reconstruction, dense_codes @ dense["W_dec"])
    for name, (got, expected) in results.items():
        assert got.dtype == dtype, name
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_encoder_gradients_match_dense_sampled_pre_activations(x_requires_grad, device):
    """∂W_enc, ∂b_enc (and ∂x when asked) of Σ_e r_e · pre[rows_e, latents_e] against dense autograd."""
    make, d_model = PATTERNS["odd_sizes"]
    codes = make()
    weights, x, W_enc = (tensor.to(device) for tensor in random_like_pattern(codes, d_model, torch.float64, seed=2))
    b_enc = torch.randn(codes.dict_size, dtype=torch.float64, device=device)
    codes = move(codes, device)
    sparse_inputs = [
        x.clone().requires_grad_(x_requires_grad),
        W_enc.clone().requires_grad_(),
        b_enc.clone().requires_grad_(),
    ]
    values = gather_active(active_pre_activations(*sparse_inputs, codes), *sparse_inputs, codes)
    (values * weights).sum().backward()
    dense_inputs = [
        x.clone().requires_grad_(x_requires_grad),
        W_enc.clone().requires_grad_(),
        b_enc.clone().requires_grad_(),
    ]
    pre = dense_inputs[0] @ dense_inputs[1].T + dense_inputs[2]
    (codes.gather(pre) * weights).sum().backward()
    for name, got, want in zip(("x", "W_enc", "b_enc"), sparse_inputs, dense_inputs, strict=True):
        if name == "x" and not x_requires_grad:
            assert got.grad is None
            continue
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_centered_input_sends_minus_the_batch_sum_of_the_input_gradient_to_the_center(dtype, device):
    """x = x₀ − center (the SAE's x − b_dec) formed without autograd: ∂center = −∂b_enc @ W_enc equals dense
    autograd through x₀ − center and the general path's batch sum of ∂x; ∂W_enc and ∂b_enc are unchanged."""
    make, d_model = PATTERNS["odd_sizes"]
    codes = make()
    weights, x0, W_enc = (tensor.to(device) for tensor in random_like_pattern(codes, d_model, dtype, seed=3))
    generator = torch.Generator().manual_seed(4)
    b_enc, center = (torch.randn(size, generator=generator).to(device, dtype) for size in (codes.dict_size, d_model))
    codes = move(codes, device)

    def gradients(path):
        W, b, c = (tensor.clone().requires_grad_() for tensor in (W_enc, b_enc, center))
        if path == "centered":
            with torch.no_grad():
                x = x0 - c
            values = gather_active(active_pre_activations(x, W, b, codes), x, W, b, codes, center=c)
        elif path == "through_x":  # the general path: ∂x, summed over the batch by autograd
            x = x0 - c
            values = gather_active(active_pre_activations(x, W, b, codes), x, W, b, codes)
        else:
            values = codes.gather((x0 - c) @ W.T + b)
        (values * weights).sum().backward()
        return {"W_enc": W.grad, "b_enc": b.grad, "center": c.grad}

    rtol, atol = TOLERANCES[dtype]
    centered = gradients("centered")
    for path in ("through_x", "dense"):
        for name, expected in gradients(path).items():
            assert centered[name].dtype == dtype, name
            torch.testing.assert_close(centered[name], expected, rtol=rtol, atol=atol, msg=f"{name} vs {path}")


def test_centered_gather_active_refuses_an_input_that_requires_grad():
    codes = make_codes(4, 6, 0.5)
    x, center = torch.randn(4, 5, requires_grad=True), torch.randn(5, requires_grad=True)
    with pytest.raises(ValueError, match="x requires grad although center is given: form x = x0 - center without"):
        gather_active(torch.randn(codes.nnz), x, torch.randn(6, 5), torch.randn(6), codes, center=center)


# ---------------------------------------------------------------------------------------------- determinism
def test_forward_and_gradients_are_bitwise_reproducible(device):
    """Scatter-adds into latent rows are segmented sums over the latent-sorted view: no atomics, same bits."""
    codes = make_codes(64, 48, 0.2, seed=4, busy_latents=(0, 1))
    values, x, weight = (tensor.to(device) for tensor in random_like_pattern(codes, 40, torch.float32))
    b_enc = torch.randn(48, device=device)
    codes = move(codes, device)

    def step():
        inputs = [t.clone().requires_grad_() for t in (x, weight, b_enc)]
        encoded = gather_active(active_pre_activations(*inputs, codes), *inputs, codes)
        decoder = weight.clone().requires_grad_()
        out = sparse_decode(torch.relu(encoded) * values, codes, decoder)
        out.pow(2).sum().backward()
        return [out, decoder.grad, *(t.grad for t in inputs)]

    for first, second in zip(step(), step(), strict=True):
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_non_contiguous_weight_is_an_error_naming_the_fix():
    codes = make_codes(4, 6, 0.5)
    weight = torch.randn(5, 6).T  # (6, 5) but transposed
    with pytest.raises(ValueError, match=r"table is not contiguous .*: pass table.contiguous\(\)"):
        sparse_decode(torch.randn(codes.nnz), codes, weight)


@pytest.mark.parametrize(
    ("values", "weight", "message"),
    [
        (torch.randn(3), torch.randn(6, 5), r"values has shape \[3\] but \[NNZ\] was expected"),
        (None, torch.randn(7, 5), r"table has shape \[7, 5\] but \[6, any\] was expected"),
        (
            None,
            torch.randn(6, 5, dtype=torch.float64),
            "dtypes differ \\(values: torch.float32, table: torch.float64\\)",
        ),
        (None, torch.ones(6, 5, dtype=torch.int64), "table has dtype torch.int64: use float16, bfloat16"),
    ],
    ids=["values_length", "weight_rows", "mixed_dtypes", "integer_weight"],
)
def test_decode_rejects_mismatched_inputs(values, weight, message):
    codes = make_codes(4, 6, 0.5)
    values = torch.randn(codes.nnz) if values is None else values
    with pytest.raises(ValueError, match=message.replace("NNZ", str(codes.nnz))):
        sparse_decode(values, codes, weight)


def test_gather_active_rejects_inputs_of_the_wrong_width():
    codes = make_codes(4, 6, 0.5)
    with pytest.raises(ValueError, match=r"x has shape \[4, 3\] but \[4, 5\] was expected"):
        gather_active(torch.randn(codes.nnz), torch.randn(4, 3), torch.randn(6, 5), torch.randn(6), codes)


def test_kernels_take_sparse_codes_not_dense_masks():
    with pytest.raises(TypeError, match="codes must be SparseCodes, got Tensor"):
        sparse_decode(torch.randn(3), torch.ones(2, 3, dtype=torch.bool), torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------- backend selection
def test_auto_backend_uses_the_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    with backend.use_backend("auto"):
        assert backend.resolve_backend(torch.device("cpu")) == "reference"
        assert backend.resolve_backend(torch.device("cuda")) == ("triton" if backend.HAS_TRITON else "reference")


def test_environment_variable_selects_the_backend_unless_set_backend_overrides(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    previous = backend.set_backend(None)
    try:
        assert backend.resolve_backend(torch.device("cuda")) == "reference"
        with backend.use_backend("auto"):
            assert backend.get_backend() == "auto"
        assert backend.get_backend() == "reference"
        monkeypatch.setenv(backend.ENV_VAR, "cuda")
        with pytest.raises(ValueError, match="CROSSCODER_KERNELS='cuda' is not a kernel backend: use one of auto"):
            backend.get_backend()
    finally:
        backend.set_backend(previous)


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="backend='fast' is not a kernel backend"):
        backend.set_backend("fast")


def test_forcing_triton_on_cpu_without_the_interpreter_explains_how(monkeypatch):
    monkeypatch.setattr(backend, "HAS_TRITON", True)
    monkeypatch.setattr(backend, "TRITON_INTERPRETED", False)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before Triton"):
        backend.resolve_backend(torch.device("cpu"))


def test_block_sizes_are_smaller_than_the_test_shapes_so_every_loop_runs_several_times():
    make, d_model = PATTERNS["odd_sizes"]
    codes = make()
    assert d_model > BLOCK_D_MAX and d_model % BLOCK_D_MAX
    assert (codes.row_offsets.diff().max() > BLOCK_ENTRIES) and (codes.latent_offsets.diff().max() > BLOCK_ENTRIES)
