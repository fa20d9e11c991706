"""``crosscoder.kernels.block_candidates``: the C scan and merge of a pass over blocks of pre-activations find exactly
the candidates their definition names on the whole matrix, as the plain-PyTorch reference does — with per-column
bounds and code norms or one bound, ties at the bound and at the threshold (a double between two float32 values), NaN
and ±inf, zero code norms, widths off the 16-lane vectors, blocks of uneven widths, any number of threads and outputs
that overflow; the C scan reports the values that are not finite; its portable (no AVX-512) build finds the same.
Without a C compiler the reference runs, after a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from crosscoder.kernels import block_candidates, native
from crosscoder.kernels.backend import use_backend
from crosscoder.kernels.block_candidates import CandidateScan, _true_positions


def adversarial_block(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pre-activations [rows, width] with many values at the threshold and just around it, NaN and ±inf; code norms
    [width] with zeros; a threshold that is a double strictly between two float32 values."""
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(rows, width, generator=generator) * 2
    threshold = float(torch.tensor(1.5, dtype=torch.float64) + 2**-30)  # rounds to 1.5 in float32
    on_grid = torch.rand(rows, width, generator=generator) < 0.2
    pre[on_grid] = torch.tensor([1.5, 1.5 - 2**-23, 1.5 + 2**-22, 0.75, 3.0])[
        torch.randint(0, 5, (int(on_grid.sum()),), generator=generator)
    ]
    pre.view(-1)[torch.randint(0, rows * width, (6,), generator=generator)] = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), float("nan"), float("inf"), 0.0]
    )
    code_norms = torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0 + 2**-23])[torch.randint(0, 5, (width,), generator=generator)]
    return pre, code_norms, threshold


def scanned(backend: str, pre, bounds, code_norms, threshold, widths=None, rows_cap=None, width_cap=None, bias=None):
    """Scan ``pre`` [rows, F] (the products, ``bias`` [F] or None added by the scan) in blocks of ``widths`` (default:
    one block) with one backend: each block's scores and non-finite flag, and the merged candidates (flat indices,
    scores)."""
    widths = widths or [pre.shape[1]]
    with use_backend(backend):
        scan = CandidateScan(pre.shape[0], width_cap or max(widths), pre)
        assert scan.native == (backend == "auto")
        per_block, start = [], 0
        for width in widths:
            latents = slice(start, start + width)
            block_bounds = bounds[latents].clone() if isinstance(bounds, torch.Tensor) else bounds
            norms = None if code_norms is None else code_norms[latents].clone()
            block_bias = None if bias is None else bias[latents].clone()
            block = pre[:, latents].clone(memory_format=torch.contiguous_format)  # the reference adds the bias in place
            per_block.append(scan(block, start, block_bounds, norms, threshold, block_bias))
            start += width
        return per_block, scan.candidates(pre.shape[1])


def expected_candidates(pre, bounds, code_norms, threshold, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, on the whole matrix: flat indices and scores of ``pre ≥ bound`` and ``ReLU(pre) · c ≥ t``
    (``pre`` plus ``bias`` first, one float sum each)."""
    pre = pre if bias is None else pre + bias
    scores = pre.relu() * (1 if code_norms is None else code_norms)
    flat = ((pre >= bounds) & (scores >= threshold)).view(-1).nonzero().squeeze(1)
    return flat, scores.view(-1)[flat]


def assert_same(found, expected) -> None:
    for got, want in zip(found, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def case(rows: int, width: int, scaled: bool, seed: int):
    pre, code_norms, threshold = adversarial_block(rows, width, seed)
    if scaled:
        bounds = (threshold / code_norms).mul_(1 - 4 * torch.finfo(torch.float32).eps)  # inf where c = 0
        bounds[::5] = 1.5  # some bounds at the grid's values: ties at the bound
        return pre, bounds, code_norms, threshold
    return pre, threshold, None, threshold


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "width"), [(37, 53), (64, 16), (5, 7), (1, 40)])
@pytest.mark.parametrize("scaled", [True, False], ids=["code norms, bound per column", "c = 1, one bound"])
def test_the_c_scan_of_one_block_finds_what_the_reference_finds(rows, width, scaled, threads, monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    pre, bounds, code_norms, threshold = case(rows, width, scaled, seed=rows * width + threads)
    reference = scanned("reference", pre, bounds, code_norms, threshold)
    assert_same(reference[1], expected_candidates(pre, bounds, code_norms, threshold))
    assert 0 < len(reference[1][0]) < pre.numel()
    for found in (
        scanned("auto", pre, bounds, code_norms, threshold),
        # a block narrower than the scan's buffers (the last block of a pass)
        scanned("auto", pre, bounds, code_norms, threshold, width_cap=width + 5),
    ):
        assert_same(found[1], reference[1])
        assert torch.equal(found[0][0][0], reference[0][0][0])  # the block's scores
        assert found[0][0][1]  # NaN and +inf seen (the reference does not look)


def adversarial_bias(width: int, seed: int) -> torch.Tensor:
    """Biases [width] that move products onto the threshold's grid (1.5 − 0.25 + 0.25), by an ulp, by a whole unit,
    to ±inf (a NaN where the product is −inf or +inf), or not at all."""
    values = torch.tensor([0.25, -0.25, 2**-23, 0.0, 1.0, -1.0, float("inf"), -float("inf")])
    return values[torch.randint(0, len(values), (width,), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "width"), [(37, 53), (5, 7)])
@pytest.mark.parametrize("scaled", [True, False], ids=["code norms, bound per column", "c = 1, one bound"])
def test_the_c_scan_adds_the_bias_as_it_reads_as_the_reference_adds_it_first(rows, width, scaled, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    pre, bounds, code_norms, threshold = case(rows, width, scaled, seed=rows + threads)
    pre = pre - torch.tensor([0.25, 0.0])[torch.randint(0, 2, pre.shape, generator=torch.Generator().manual_seed(9))]
    bias = adversarial_bias(width, seed=threads)
    expected = expected_candidates(pre, bounds, code_norms, threshold, bias)
    reference = scanned("reference", pre, bounds, code_norms, threshold, bias=bias)
    found = scanned("auto", pre, bounds, code_norms, threshold, bias=bias)
    assert 0 < len(expected[0]) < pre.numel()
    assert_same(reference[1], expected)
    assert_same(found[1], expected)
    assert torch.equal(found[0][0][0], reference[0][0][0]) and found[0][0][1]  # the scores; NaN and ±inf seen


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("widths", [[16, 16, 16, 5], [7, 30, 16], [53]], ids=str)
def test_blocks_merge_into_the_whole_matrix_row_major_order(widths, threads, monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    pre, bounds, code_norms, threshold = case(41, sum(widths), True, seed=len(widths))
    expected = expected_candidates(pre, bounds, code_norms, threshold)
    for backend in ("auto", "reference"):
        assert_same(scanned(backend, pre, bounds, code_norms, threshold, widths)[1], expected)


def test_a_block_with_more_candidates_than_the_buffers_hold_is_scanned_again(monkeypatch) -> None:
    monkeypatch.setattr(block_candidates, "INITIAL_CAPACITY_SHARE", 10**9)  # room for one candidate at first
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pre, bounds, code_norms, threshold = case(40, 66, True, seed=1)
    with use_backend("auto"):
        scan = CandidateScan(40, 33, pre)
        first = scan(pre[:, :33].contiguous(), 0, bounds[:33], code_norms[:33], threshold)[0]
        assert len(scan.positions) >= len(first) > 1  # grown
        scan(pre[:, 33:].contiguous(), 33, bounds[33:], code_norms[33:], threshold)  # and reused
        found = scan.candidates(66)
        with pytest.raises(RuntimeError, match="pass has ended"):
            scan(pre[:, :33].contiguous(), 0, bounds[:33], code_norms[:33], threshold)
    assert_same(found, expected_candidates(pre, bounds, code_norms, threshold))


@pytest.mark.parametrize(
    ("value", "code_norm", "seen"),
    [
        (float("nan"), 1.0, True),
        (float("inf"), 1.0, True),
        (3e38, 1e10, True),  # a finite pre-activation whose score overflows
        (-float("inf"), 1.0, False),  # a score of 0
        (3e38, 1.0, False),  # large, finite
    ],
)
@pytest.mark.parametrize("column", [5, 35], ids=["vector lanes", "the row's tail"])
def test_the_c_scan_reports_values_that_are_not_finite(value, code_norm, seen, column) -> None:
    pre, code_norms = torch.zeros(3, 40), torch.ones(40)
    pre[1, column], code_norms[column] = value, code_norm
    (block_scores, non_finite), *_ = scanned("auto", pre, 0.5, code_norms, 0.5)[0]
    assert non_finite == seen
    assert len(block_scores) == (value > 0.5)  # the value's candidacy is unchanged (NaN: none)


def test_the_portable_build_without_avx512_finds_the_same(portable_build, monkeypatch) -> None:
    portable = portable_build("block_candidates", block_candidates.SIGNATURES)
    monkeypatch.setattr(block_candidates, "_block_candidates_library", lambda: portable)
    pre, bounds, code_norms, threshold = case(29, 45, True, seed=3)
    found = scanned("auto", pre, bounds, code_norms, threshold, widths=[20, 25])
    assert_same(found[1], expected_candidates(pre, bounds, code_norms, threshold))
    assert all(non_finite for _, non_finite in found[0])  # each block has a NaN or +inf
    bias = adversarial_bias(45, seed=4)
    found = scanned("auto", pre, bounds, code_norms, threshold, widths=[20, 25], bias=bias)
    assert_same(found[1], expected_candidates(pre, bounds, code_norms, threshold, bias))


def test_without_a_c_compiler_the_reference_runs_after_a_warning(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    native.native_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler' on PATH.*apt-get install gcc"):
            scan = CandidateScan(8, 8, torch.zeros(1))
        assert not scan.native
        assert not scan.sees_non_finite
        pre, _, threshold = adversarial_block(8, 8, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per process, not per pass
            again = CandidateScan(8, 8, torch.zeros(1))
        again(pre, 0, threshold, None, threshold)
        assert_same(again.candidates(8), expected_candidates(pre, threshold, None, threshold))
    finally:
        native.native_library.cache_clear()


def test_the_c_scan_refuses_a_strided_block_or_mismatched_bounds() -> None:
    pre = torch.randn(8, 32)
    with use_backend("auto"):
        scan = CandidateScan(8, 32, pre)
        with pytest.raises(ValueError, match="strides"):
            scan(pre[:, ::2], 0, 1.0, None, 1.0)
        with pytest.raises(ValueError, match=r"bounds has shape \[31\].*reads \[32\] float32"):
            scan(pre, 0, torch.ones(31), None, 1.0)
        with pytest.raises(ValueError, match=r"shape \[7, 32\] but the scan was made for \[8, ≤ 32\]"):
            scan(pre[:7], 0, 1.0, None, 1.0)
        with pytest.raises(ValueError, match=r"shape \[8, 33\] but the scan was made for \[8, ≤ 32\]"):
            scan(torch.randn(8, 33), 0, 1.0, None, 1.0)
        with pytest.raises(ValueError, match=r"block has shape \[8, 32\], dtype torch.float64"):
            scan(pre.double(), 0, 1.0, None, 1.0)


@pytest.mark.parametrize("size", [64, 61, 0])
def test_true_positions_are_nonzero_of_the_mask(size) -> None:
    """Word by word (sizes divisible by 8) or byte by byte: the ascending flat indices, dense and sparse masks."""
    generator = torch.Generator().manual_seed(size)
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = (torch.rand(size, 3, generator=generator) < density).view(-1, 8 if size % 8 == 0 and size else 1)
        assert torch.equal(_true_positions(mask), mask.view(-1).nonzero().squeeze(1))
