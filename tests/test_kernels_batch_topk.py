"""BatchTopK by radix select (``crosscoder.kernels.batch_topk``): the histogram's Triton kernel and C pass against
its reference, exact thresholds, tie-breaking, the zero rule, the distributed ``all_reduce`` hook, and input errors —
on each path: ``"reference"`` (plain PyTorch), ``"auto"`` on CPU (the C passes of ``radix_select.c``) and Triton.

The Triton kernel runs under the interpreter on CPU: ``TRITON_INTERPRET=1`` must be set before
``crosscoder.kernels`` is first imported (``conftest.py`` does; so does this module, when imported first). With
``TRITON_INTERPRET=0`` and a GPU (``bench/gpu.sh``) the same tests run the compiled kernel on CUDA tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from crosscoder.kernels import backend
from crosscoder.kernels import batch_topk as bt

BACKENDS = ["reference", "auto", "triton"]
triton_ready = pytest.mark.skipif(
    not (torch.cuda.is_available() or backend.TRITON_INTERPRETED),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before crosscoder.kernels is imported",
)
backends = pytest.mark.parametrize(
    "backend_name",
    [pytest.param(name, marks=triton_ready if name == "triton" else ()) for name in BACKENDS],
    indirect=True,
)


TRITON_DEVICE = torch.device("cpu" if backend.TRITON_INTERPRETED or not torch.cuda.is_available() else "cuda")
"""Where the Triton kernel runs: on CPU tensors in the interpreter, else on the GPU."""


@pytest.fixture
def backend_name(request):
    """Runs the test with the kernel backend forced to the parameter ("reference", "auto": the C passes on CPU, or
    "triton")."""
    with backend.use_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend_name) -> torch.device:
    """The device of the test's scores: the Triton kernel's (``TRITON_DEVICE``) or, for the others, the CPU."""
    return TRITON_DEVICE if backend_name == "triton" else torch.device("cpu")


def relu_gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).relu()


def histogram_by_definition(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
    """Count the next digit of the 31-bit key over non-zero entries whose first prefix_bits bits equal prefix."""
    keys = scores.float().view(torch.int32).flatten() & 0x7FFFFFFF
    keys = keys[keys != 0]
    if prefix_bits:
        keys = keys[(keys >> (31 - prefix_bits)) == prefix]
    digits = (keys >> (31 - prefix_bits - digit_bits)) & ((1 << digit_bits) - 1)
    return torch.bincount(digits, minlength=1 << digit_bits)


def expected_kept(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Flat indices of the n_keep largest positive scores, ties lowest index first, ascending."""
    flat = scores.float().flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    n_selected = min(n_keep, int((flat > 0).sum()))
    return order[:n_selected].sort().values


def kept_flat(selection: bt.BatchTopKSelection) -> torch.Tensor:
    return selection.rows * selection.dict_size + selection.latents


# ------------------------------------------------------------------------------------------------ histogram
def histogram_inputs() -> list:
    scores = relu_gaussian(7, 601)  # 4207 entries: not a multiple of BLOCK
    scores[2] = 0.0  # an all-zero row
    scores[3, :5] = -0.0
    return [
        pytest.param(scores, id="fp32-odd-size"),
        pytest.param(scores.bfloat16(), id="bf16"),
        pytest.param(scores.half(), id="fp16"),
        pytest.param(torch.zeros(3, 5), id="all-zero"),
        pytest.param(torch.rand(1, 1), id="single-entry"),
    ]


@triton_ready
@pytest.mark.parametrize("scores", histogram_inputs())
@pytest.mark.parametrize("prefix_bits, digit_bits", [(0, 7), (0, 12), (7, 8), (15, 8), (23, 8), (4, 5)])
def test_radix_histogram_triton_equals_reference_and_definition(scores, prefix_bits, digit_bits) -> None:
    keys = scores.float().view(torch.int32).flatten() & 0x7FFFFFFF
    busiest = int(torch.mode(keys[keys != 0] >> (31 - prefix_bits)).values) if prefix_bits and keys.any() else 0
    for prefix in {0, busiest}:
        expected = histogram_by_definition(scores, prefix, prefix_bits, digit_bits)
        reference = bt.radix_histogram_reference(scores, prefix, prefix_bits, digit_bits)
        on_device = scores.to(TRITON_DEVICE)
        triton_counts = bt.radix_histogram_triton(on_device, torch.tensor(prefix), prefix_bits, digit_bits).cpu()
        assert reference.dtype == triton_counts.dtype == torch.int64
        assert torch.equal(reference, expected)
        assert torch.equal(triton_counts, expected)


@triton_ready
def test_radix_histogram_triton_tile_loop_covers_every_entry_once(monkeypatch) -> None:
    monkeypatch.setattr(bt, "BLOCK", 64)
    monkeypatch.setattr(bt, "MAX_PROGRAMS", 3)  # 2000 entries: 32 tiles over 3 programs
    scores = relu_gaussian(40, 50)
    counts = bt.radix_histogram_triton(scores.to(TRITON_DEVICE), 0, 0, 8).cpu()
    assert torch.equal(counts, histogram_by_definition(scores, 0, 0, 8))


@pytest.mark.parametrize("threads", [1, 3])
def test_radix_histogram_reference_chunks_and_lanes_count_every_entry_once(monkeypatch, threads) -> None:
    monkeypatch.setattr(bt, "_CHUNK", 1001)  # 1001-entry chunks: with 3 lanes, 2 entries per chunk left over
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scores = relu_gaussian(13, 517)
        for prefix_bits, digit_bits in [(0, 15), (0, 16), (15, 16)]:
            prefix = int(scores.max().view(torch.int32)) >> (31 - prefix_bits) if prefix_bits else 0
            assert torch.equal(
                bt.radix_histogram_reference(scores, prefix, prefix_bits, digit_bits),
                histogram_by_definition(scores, prefix, prefix_bits, digit_bits),
            )
    finally:
        torch.set_num_threads(previous_threads)


def test_radix_histogram_counts_neither_zero_nor_negative_zero() -> None:
    scores = torch.tensor([[0.0, -0.0, 1.0, 2.0]])
    assert int(bt.radix_histogram_reference(scores, 0, 0, 15).sum()) == 2
    assert int(bt.radix_histogram(scores, 0, 0, 15).sum()) == 2  # the C pass


@pytest.fixture
def c_shares(monkeypatch):
    """The C passes split their entries into 3 threads' shares from 7 entries on (not only past 65,536 each)."""
    assert bt._native_selection(torch.zeros(1)) is not None, "the C passes did not compile: see the warning"
    monkeypatch.setattr(bt, "ENTRIES_PER_THREAD", 7)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("scores", histogram_inputs())
@pytest.mark.parametrize("prefix_bits, digit_bits", [(0, 15), (0, 16), (0, 7), (15, 16), (7, 8), (23, 8), (30, 1)])
def test_radix_histogram_c_pass_equals_the_definition_in_threads_shares(c_shares, scores, prefix_bits, digit_bits):
    """float32 scores take the C pass (3 threads' shares of uneven sizes); bfloat16/float16 the reference."""
    keys = scores.float().view(torch.int32).flatten() & 0x7FFFFFFF
    busiest = int(torch.mode(keys[keys != 0] >> (31 - prefix_bits)).values) if prefix_bits and keys.any() else 0
    assert (bt._native_selection(scores) is not None) == (scores.dtype == torch.float32)
    for prefix in {0, busiest}:
        counts = bt.radix_histogram(scores, prefix, prefix_bits, digit_bits)
        assert counts.dtype == torch.int64
        assert torch.equal(counts, histogram_by_definition(scores, prefix, prefix_bits, digit_bits))


@pytest.mark.parametrize("bound", [1.0, 0.5, 1e-30, 3.0])
def test_entries_at_least_c_pass_equals_the_reference_in_threads_shares(c_shares, bound) -> None:
    scores = relu_gaussian(13, 51, seed=5)
    scores.view(-1)[::17] = 1.0  # ties at the bound
    scores[4] = -0.0
    min_key = torch.tensor(bound).view(torch.int32).long()
    positions, values = bt._entries_at_least(scores.view(-1), min_key)
    with backend.use_backend("reference"):
        expected_positions, expected_values = bt._entries_at_least(scores.view(-1), min_key)
    assert positions.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(positions, expected_positions) and torch.equal(values, expected_values)
    assert torch.equal(positions, ((scores.view(-1) >= bound) & (scores.view(-1) > 0)).nonzero().squeeze(1))


def test_the_portable_c_build_without_avx512_counts_selects_and_checks_the_same(portable_build, monkeypatch) -> None:
    portable = portable_build("radix_select", bt.RADIX_SELECT_SIGNATURES)
    monkeypatch.setattr(bt, "_native_selection", lambda scores: portable if scores.dtype == torch.float32 else None)
    scores = torch.randint(0, 50, (13, 41), generator=torch.Generator().manual_seed(7)).float() / 7  # ties
    for prefix_bits, digit_bits in [(0, 15), (15, 16), (3, 8)]:
        prefix = int(scores.max().view(torch.int32)) >> (31 - prefix_bits) if prefix_bits else 0
        expected = histogram_by_definition(scores, prefix, prefix_bits, digit_bits)
        assert torch.equal(bt.radix_histogram(scores, prefix, prefix_bits, digit_bits), expected)
    assert torch.equal(kept_flat(bt.batch_topk(scores, 200)), expected_kept(scores, 200))
    scores[12, 40] = float("nan")  # in the tail after the last 16 lanes
    with pytest.raises(ValueError, match="NaN"):
        bt.batch_topk(scores, 200)


# ------------------------------------------------------------------------------------------------ threshold
@backends
@pytest.mark.parametrize("n_keep", [1, 7, 300, 2047])
def test_threshold_is_exactly_the_n_keep_th_largest_score(device, n_keep) -> None:
    scores = relu_gaussian(33, 129).to(device)
    threshold = bt.batch_topk_threshold(scores, n_keep)
    ranked = scores.flatten().sort(descending=True).values
    assert threshold.value.dtype == torch.float32
    assert threshold.value.item() == ranked[n_keep - 1].item()
    assert threshold.n_greater.item() == int((ranked > ranked[n_keep - 1]).sum())
    assert threshold.n_selected.item() == n_keep


@pytest.mark.parametrize("digit_bits", [(15, 16), (7, 8, 8, 8), (11, 10, 10), (1, 15, 15)])
def test_every_digit_schedule_finds_the_same_threshold(digit_bits) -> None:
    scores = relu_gaussian(21, 95) * 1e-3
    ranked = scores.flatten().sort(descending=True).values
    assert bt.batch_topk_threshold(scores, 100, digit_bits=digit_bits).value.item() == ranked[99].item()


@backends
def test_bfloat16_threshold_is_a_bfloat16_score(device) -> None:
    scores = relu_gaussian(17, 70).bfloat16().to(device)
    threshold = bt.batch_topk_threshold(scores, 50)
    assert threshold.value.dtype == torch.bfloat16
    assert threshold.value.item() == scores.flatten().sort(descending=True).values[49].item()


@backends
@pytest.mark.parametrize("n_keep", [1, 300, 2047, 10**6])
def test_threshold_floor_from_histograms_summed_over_blocks_is_the_threshold_s_bucket(
    backend_name, device, n_keep
) -> None:
    """Over a matrix seen in blocks of columns (its histograms summed), the floor is the smallest value whose key
    shares the threshold's first digit: ≤ the exact threshold, and the threshold's bucket (also with fewer positive
    scores than n_keep: the smallest positive one's) — with 8-bit digits and, off Triton (at most 8 bits), 15."""
    scores = relu_gaussian(33, 129).to(device)
    scores[:, 5] = 0.75  # ties inside one block
    threshold = bt.batch_topk_threshold(scores, n_keep).value.item()

    def key(value: float) -> int:
        return torch.tensor(value, dtype=torch.float32).view(torch.int32).item()

    for digit_bits in (8,) if backend_name == "triton" else (8, 15):
        counts = sum(bt.radix_histogram(block.contiguous(), 0, 0, digit_bits) for block in scores.split(40, dim=1))
        floor = bt.threshold_floor(counts, n_keep)
        shift = bt.KEY_BITS - digit_bits
        assert 0 < floor <= threshold
        assert key(floor) >> shift == key(threshold) >> shift and key(floor) % (1 << shift) == 0


def test_threshold_floor_of_no_positive_score_is_zero_and_bad_histograms_are_named() -> None:
    assert bt.threshold_floor(bt.radix_histogram(torch.zeros(4, 6), 0, 0, 15), 3) == 0.0
    for bins in (100, 0, 1 << 17):
        with pytest.raises(ValueError, match=f"counts has {bins} bins"):
            bt.threshold_floor(torch.zeros(bins, dtype=torch.int64), 3)


# ------------------------------------------------------------------------------------------------ selection
@backends
@pytest.mark.parametrize("n_keep", [1, 64, 500])
def test_batch_topk_keeps_the_n_keep_largest_sorted_by_row_then_latent(device, n_keep) -> None:
    scores = relu_gaussian(19, 83).to(device)
    selection = bt.batch_topk(scores, n_keep)
    assert selection.rows.numel() == n_keep == selection.n_selected.item()
    assert torch.equal(kept_flat(selection), expected_kept(scores, n_keep))
    assert selection.threshold.item() == scores[selection.rows, selection.latents].min().item()


@backends
def test_ties_at_the_threshold_are_kept_lowest_flat_index_first(device) -> None:
    scores = torch.randint(0, 4, (9, 31), generator=torch.Generator().manual_seed(1)).float().to(device)  # 0..3
    n_above = int((scores > 2).sum())
    n_keep = n_above + 5  # 5 of the many 2.0s
    selection = bt.batch_topk(scores, n_keep)
    kept = kept_flat(selection)
    assert kept.numel() == n_keep
    assert selection.threshold.item() == 2.0
    twos = (scores.flatten() == 2).nonzero().squeeze(1)
    assert torch.equal(kept[torch.isin(kept, twos)], twos[:5])
    assert torch.equal(kept, expected_kept(scores, n_keep))


@backends
def test_fewer_positive_scores_than_n_keep_keeps_every_positive_score_and_no_zero(device) -> None:
    scores = relu_gaussian(8, 20).to(device)  # about 80 positive scores
    scores[0, :3] = -0.0
    n_positive = int((scores > 0).sum())
    selection = bt.batch_topk(scores, n_positive + 50)
    assert selection.n_selected.item() == selection.rows.numel() == n_positive
    assert torch.equal(kept_flat(selection), (scores.flatten() > 0).nonzero().squeeze(1))
    assert selection.threshold.item() == scores[scores > 0].min().item()


@backends
def test_n_keep_above_numel_keeps_every_positive_entry(device) -> None:
    scores = torch.rand(2, 3, device=device) + 0.5
    assert bt.batch_topk_mask(scores, 100).sum().item() == 6
    nothing = bt.batch_topk(torch.zeros(4, 5, device=device), 100)
    assert nothing.rows.numel() == 0 and nothing.threshold.item() == 0.0 and nothing.n_selected.item() == 0


@backends
def test_an_empty_batch_keeps_nothing(device) -> None:
    selection = bt.batch_topk(torch.zeros(0, 7, device=device), 10)
    assert selection.rows.numel() == 0 and selection.n_selected.item() == 0 and selection.threshold.item() == 0.0


def candidates_at_least(scores: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ascending flat indices of the positive scores ≥ ``bound``, and those scores."""
    flat = scores.reshape(-1)
    positions = ((flat >= bound) & (flat > 0)).nonzero().squeeze(1)
    return positions, flat[positions]


@pytest.mark.parametrize("backend_name", ["reference", "auto"], indirect=True)
@pytest.mark.parametrize("relative_bound", [1e-6, 0.8, 0.99, 1.0, 1.01, 2.0])
def test_the_selection_among_candidates_is_the_whole_selection_or_declines(backend_name, relative_bound) -> None:
    """Bounds below the threshold (the candidates hold every kept entry), at it (ties at the bound) and above it
    (too few candidates: None, the whole matrix must decide): the same entries, threshold and count as
    ``batch_topk`` on the whole matrix, and the kept entries' scores."""
    scores = torch.randint(0, 40, (16, 64), generator=torch.Generator().manual_seed(4)).float() / 5  # many ties
    n_keep = 100
    exact = bt.batch_topk(scores, n_keep)
    candidates, values = candidates_at_least(scores, relative_bound * exact.threshold.item())
    found = bt.batch_topk_among_candidates(candidates, values, n_keep, batch_size=16, dict_size=64)
    if relative_bound > 1:
        assert candidates.numel() < n_keep and found is None
        return
    assert n_keep <= candidates.numel() < scores.numel()
    selection, kept_scores = found
    assert torch.equal(selection.rows, exact.rows) and torch.equal(selection.latents, exact.latents)
    assert selection.threshold.item() == exact.threshold.item() and selection.n_selected.item() == n_keep
    assert torch.equal(kept_scores, scores[selection.rows, selection.latents])


def test_candidates_that_are_not_finite_or_fewer_than_n_keep_are_refused_or_declined() -> None:
    scores = relu_gaussian(8, 20)
    candidates, values = candidates_at_least(scores, 1e-9)  # every positive score: fewer than n_keep
    assert (
        bt.batch_topk_among_candidates(candidates, values, candidates.numel() + 1, batch_size=8, dict_size=20) is None
    )
    with pytest.raises(ValueError, match="dict_size=0: need"):
        bt.batch_topk_among_candidates(candidates, values, 5, batch_size=8, dict_size=0)
    values[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bt.batch_topk_among_candidates(candidates, values, 5, batch_size=8, dict_size=20)


def test_batch_topk_mask_equals_the_selection() -> None:
    scores = relu_gaussian(6, 50)
    mask = bt.batch_topk_mask(scores, 40)
    assert mask.dtype == torch.bool and mask.shape == (6, 50) and mask.sum().item() == 40
    assert torch.equal(mask.flatten().nonzero().squeeze(1), expected_kept(scores, 40))


# ---------------------------------------------------------------------------------------- distributed hook
class ThreadedAllReduce:
    """``world_size`` threads acting as ranks: each call blocks until all ranks called, then returns the sum."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = [0] * world_size

    def for_rank(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)
            self.barrier.wait()
            self.calls[rank] += 1
            return total

        return all_reduce


def run_ranks(
    shards: list[torch.Tensor], n_keep: int, pass_ranks: bool = True, **options
) -> tuple[list[bt.BatchTopKSelection], list[int]]:
    group = ThreadedAllReduce(len(shards))
    with ThreadPoolExecutor(len(shards)) as pool:
        futures = [
            pool.submit(
                bt.batch_topk,
                shard,
                n_keep,
                group.for_rank(rank),
                **({"rank": rank, "world_size": len(shards)} if pass_ranks else {}),
                **options,
            )
            for rank, shard in enumerate(shards)
        ]
        return [future.result() for future in futures], group.calls


@backends
@pytest.mark.parametrize("split", [(6, 6), (3, 9)])
def test_two_ranks_with_all_reduce_select_what_one_process_selects_on_the_whole_batch(
    backend_name, device, split, monkeypatch
) -> None:
    if backend_name == "triton" and backend.TRITON_INTERPRETED:  # the interpreter is not thread-safe
        lock, launch = threading.Lock(), bt.radix_histogram_triton

        def serialized(*args):
            with lock:
                return launch(*args)

        monkeypatch.setattr(bt, "radix_histogram_triton", serialized)
    scores = torch.randint(0, 50, (12, 40), generator=torch.Generator().manual_seed(2)).float().to(device) / 7  # ties
    threshold = scores.flatten().sort(descending=True).values[120].item()
    n_keep = int((scores > threshold).sum()) + int((scores == threshold).sum()) // 2  # half of the ties
    assert all((shard == threshold).sum() > 1 for shard in scores.split(split))  # ties on both ranks
    single = bt.batch_topk(scores, n_keep)
    assert single.threshold.item() == threshold
    (first, second), calls = run_ranks(list(scores.split(split)), n_keep)
    assert torch.equal(torch.cat([first.rows, second.rows + split[0]]), single.rows)
    assert torch.equal(torch.cat([first.latents, second.latents]), single.latents)
    assert first.threshold.item() == second.threshold.item() == threshold
    assert first.n_selected.item() == second.n_selected.item() == n_keep
    n_passes = len(bt.TRITON_DIGIT_BITS if backend_name == "triton" else bt.REFERENCE_DIGIT_BITS)
    assert calls == [n_passes + 1] * 2  # one all_reduce per histogram pass, one for the tie counts


@pytest.mark.parametrize("backend_name", ["reference", "auto"], indirect=True)
@pytest.mark.parametrize("relative_bound", [0.9, 1.5])
def test_two_ranks_select_among_their_candidates_what_one_process_selects(backend_name, relative_bound) -> None:
    """The candidate count is global: both ranks select among their candidates (0.9 θ) or both decline (1.5 θ)."""
    scores = torch.randint(0, 50, (12, 40), generator=torch.Generator().manual_seed(2)).float() / 7  # ties
    single = bt.batch_topk(scores, 150)
    bound = relative_bound * single.threshold.item()
    group = ThreadedAllReduce(2)
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                bt.batch_topk_among_candidates,
                *candidates_at_least(shard, bound),
                150,
                group.for_rank(rank),
                rank=rank,
                world_size=2,
                batch_size=shard.shape[0],
                dict_size=40,
            )
            for rank, shard in enumerate(scores.split((3, 9)))
        ]
        results = [future.result() for future in futures]
    if relative_bound > 1:
        assert results == [None, None] and group.calls == [1, 1]  # the candidate count only
        return
    (first, _), (second, _) = results
    assert torch.equal(torch.cat([first.rows, second.rows + 3]), single.rows)
    assert torch.equal(torch.cat([first.latents, second.latents]), single.latents)
    assert first.threshold.item() == second.threshold.item() == single.threshold.item()
    assert group.calls == [1 + len(bt.REFERENCE_DIGIT_BITS) + 1] * 2  # the count, the histograms, the tie counts


def test_more_ties_on_lower_ranks_than_an_int32_holds_leave_none_here() -> None:
    """Rank 1 of 2, told that rank 0 holds 3·10⁹ ties at the threshold: every tie goes to rank 0, none here (the
    limit on a tie's rank is clamped before its int32 compare, not wrapped)."""

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape == (2,):  # the ties per rank; the histograms are this rank's alone
            tensor = tensor.clone()
            tensor[0] = 3_000_000_000
        return tensor

    selection = bt.batch_topk(torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]]), 3, all_reduce, rank=1, world_size=2)
    assert selection.latents.tolist() == [4]


def test_a_single_rank_with_all_reduce_selects_what_it_selects_alone() -> None:
    scores = torch.randint(0, 5, (6, 20), generator=torch.Generator().manual_seed(3)).float()
    alone = bt.batch_topk(scores, 30)
    with_hook = bt.batch_topk(scores, 30, lambda counts: counts)
    assert torch.equal(with_hook.rows, alone.rows) and torch.equal(with_hook.latents, alone.latents)


def test_all_reduce_without_rank_and_world_size_is_an_error_when_ranks_share_ties() -> None:
    scores = torch.ones(4, 10)  # 40 ties, 20 on each rank
    with pytest.raises(ValueError, match="pass rank= and world_size="):
        run_ranks(list(scores.split(2)), 25, pass_ranks=False)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "scores, message",
    [
        (torch.rand(8, 6).t(), "not contiguous"),
        (torch.rand(4, 4, dtype=torch.float64), "float64"),
        (torch.ones(4, 4, dtype=torch.int32), "int32"),
        (torch.tensor([[1.0, -0.5]]), "negative value"),
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
        (torch.tensor([[1.0, float("inf")]]), "inf"),
        (torch.rand(2, 3, 4), r"\[batch, dict_size\]"),
    ],
    ids=["non-contiguous", "float64", "int32", "negative", "nan", "inf", "3-d"],
)
def test_invalid_scores_are_rejected_with_a_clear_error(scores, message) -> None:
    with pytest.raises(ValueError, match=message):
        bt.batch_topk(scores, 2)


@pytest.mark.parametrize("backend_name", ["reference", "auto"], indirect=True)
@pytest.mark.parametrize("value, message", [(float("nan"), "NaN"), (-2.0, "negative value"), (float("inf"), "inf")])
@pytest.mark.parametrize("position", [0, 15, 16, 40, 63, 64])
def test_a_value_that_is_not_a_score_anywhere_is_named(backend_name, value, message, position) -> None:
    """The C histogram looks at every value it counts (16 lanes at a time, then the tail; 2 threads' shares): one bad
    value anywhere among 65 is an error naming it; -0.0 is a zero, not a negative score."""
    scores = relu_gaussian(5, 13, seed=6) + 0.5
    scores.view(-1)[[3, 33]] = -0.0
    assert bt.batch_topk(scores, 10).rows.numel() == 10
    scores.view(-1)[position] = value
    with pytest.raises(ValueError, match=message):
        bt.batch_topk(scores, 10)


def test_invalid_arguments_are_rejected_with_a_clear_error() -> None:
    scores = torch.rand(3, 4)
    with pytest.raises(ValueError, match="n_keep must be positive, got 0"):
        bt.batch_topk_mask(scores, 0)
    with pytest.raises(ValueError, match="needs all_reduce"):
        bt.batch_topk(scores, 2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="summing to 31"):
        bt.batch_topk(scores, 2, digit_bits=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        bt.radix_histogram(scores, 5, 2, 8)
    with pytest.raises(ValueError, match="prefix_bits \\+ digit_bits <= 31"):
        bt.radix_histogram(scores, 0, 20, 16)
