"""``crosscoder.kernels.block_candidates``: the C scan of a block of pre-activations finds exactly what its
plain-PyTorch reference finds — positions, scores and row counts — with per-column bounds and code norms or one bound,
ties at the bound and at the threshold (a double between two float32 values), NaN and ±inf, zero code norms, widths
off the 16-lane vectors, any number of threads and outputs that overflow; its portable (no AVX-512) build too. Without
a C compiler the reference runs, after a warning."""

from __future__ import annotations

import ctypes
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


def scanned(backend: str, pre, bounds, code_norms, threshold, rows_cap=None, width_cap=None):
    with use_backend(backend):
        scan = CandidateScan(rows_cap or pre.shape[0], width_cap or pre.shape[1], pre)
        assert scan.native == (backend == "auto")
        return scan(pre, bounds, code_norms, threshold)


def assert_same(found, expected) -> None:
    for got, want in zip(found, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "width"), [(37, 53), (64, 16), (5, 7), (1, 40)])
@pytest.mark.parametrize("scaled", [True, False], ids=["code norms, bound per column", "c = 1, one bound"])
def test_the_c_scan_finds_what_the_reference_finds(rows, width, scaled, threads, monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    pre, code_norms, threshold = adversarial_block(rows, width, seed=rows * width + threads)
    if scaled:
        bounds = (threshold / code_norms).mul_(1 - 4 * torch.finfo(torch.float32).eps)  # inf where c = 0
        bounds[::5] = 1.5  # some bounds at the grid's values: ties at the bound
    else:
        code_norms, bounds = None, threshold
    expected = scanned("reference", pre, bounds, code_norms, threshold)
    assert 0 < len(expected[0]) < pre.numel()
    assert_same(scanned("auto", pre, bounds, code_norms, threshold), expected)
    # a block narrower and shorter than the scan's buffers (the last block of a pass)
    assert_same(scanned("auto", pre, bounds, code_norms, threshold, rows + 3, width + 5), expected)


def test_a_block_with_more_candidates_than_the_buffers_hold_is_scanned_again(monkeypatch) -> None:
    monkeypatch.setattr(block_candidates, "INITIAL_CAPACITY_SHARE", 10**9)  # room for one candidate at first
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pre, code_norms, threshold = adversarial_block(40, 33, seed=1)
    bounds = threshold / code_norms
    with use_backend("auto"):
        scan = CandidateScan(40, 33, pre)
        first = scan(pre, bounds, code_norms, threshold)
        assert len(scan.positions) >= len(first[0]) > 1  # grown
        assert_same(scan(pre, bounds, code_norms, threshold), first)  # and reused
    assert_same(first, scanned("reference", pre, bounds, code_norms, threshold))


def test_the_portable_build_without_avx512_finds_the_same(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mno-avx512f"))
    native.native_library.cache_clear()
    try:
        portable = native.native_library("block_candidates")
    finally:
        native.native_library.cache_clear()
    assert portable is not None and len(list((tmp_path / "native").glob("block_candidates-*.so"))) == 1
    monkeypatch.setattr(block_candidates, "_block_candidates_library", lambda: _declared(portable))
    pre, code_norms, threshold = adversarial_block(29, 45, seed=3)
    bounds = threshold / code_norms
    assert_same(
        scanned("auto", pre, bounds, code_norms, threshold), scanned("reference", pre, bounds, code_norms, threshold)
    )


def _declared(library: ctypes.CDLL) -> ctypes.CDLL:
    block_candidates._declare(library)
    return library


def test_the_compiled_kernel_is_cached_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    native.native_library.cache_clear()
    try:
        assert native.native_library("block_candidates") is not None
        (built,) = (tmp_path / "native").glob("block_candidates-*.so")
        stamp = built.stat().st_mtime_ns
        native.native_library.cache_clear()
        assert native.native_library("block_candidates") is not None
        assert built.stat().st_mtime_ns == stamp and list((tmp_path / "native").iterdir()) == [built]
    finally:
        native.native_library.cache_clear()


def test_without_a_c_compiler_the_reference_runs_after_a_warning(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    native.native_library.cache_clear()
    block_candidates._block_candidates_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler' on PATH.*apt-get install gcc"):
            scan = CandidateScan(8, 8, torch.zeros(1))
        assert not scan.native
        pre, _, threshold = adversarial_block(8, 8, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per process, not per pass
            found = CandidateScan(8, 8, torch.zeros(1))(pre, threshold, None, threshold)
        assert_same(found, scanned("reference", pre, threshold, None, threshold))
    finally:
        native.native_library.cache_clear()
        block_candidates._block_candidates_library.cache_clear()


def test_the_c_scan_refuses_a_strided_block_or_mismatched_bounds() -> None:
    pre = torch.randn(8, 32)
    with use_backend("auto"):
        scan = CandidateScan(8, 32, pre)
        with pytest.raises(ValueError, match="strides"):
            scan(pre[:, ::2], 1.0, None, 1.0)
        with pytest.raises(ValueError, match=r"bounds has shape \[31\].*\[32\] float32"):
            scan(pre, torch.ones(31), None, 1.0)


@pytest.mark.parametrize("size", [64, 61, 0])
def test_true_positions_are_nonzero_of_the_mask(size) -> None:
    """Word by word (sizes divisible by 8) or byte by byte: the ascending flat indices, dense and sparse masks."""
    generator = torch.Generator().manual_seed(size)
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = (torch.rand(size, 3, generator=generator) < density).view(-1, 8 if size % 8 == 0 and size else 1)
        assert torch.equal(_true_positions(mask), mask.view(-1).nonzero().squeeze(1))
