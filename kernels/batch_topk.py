"""BatchTopK selection by radix select on the float bits of the scores (docs/methods.md §1.5, §4.2, §4.3).

BatchTopK keeps the ``n_keep = k · B`` largest entries of a whole ``[B, F]`` score matrix. Instead of sorting
``B · F`` values (``torch.topk`` over the flattened matrix), the ``n_keep``-th largest score is found by *radix
select*: a non-negative IEEE float orders like its bit pattern read as an integer, so the threshold is built digit
by digit, most significant first, each digit chosen from a histogram of that digit over the entries that match the
digits already chosen. A final pass keeps the entries above the threshold and enough of those equal to it.

- **Radix key**: the float32 bit pattern without its sign bit, ``KEY_BITS = 31`` bits (``bits & 0x7FFFFFFF``), so
  ``-0.0`` ranks as ``0.0``. float16/bfloat16 scores are ranked by their float32 value (the conversion is exact
  and order-preserving, so they are never rounded); float64 is refused (cast to float32 first).
- **Zeros are never counted and never kept**: they carry the value 0 and contribute nothing to a reconstruction.
  With fewer than ``n_keep`` positive scores every positive score is kept and nothing else; the number kept is
  ``n_selected = min(n_keep, #positive scores)``.
- **Ties** at the threshold are kept lowest flat (row-major) index first. Under ``all_reduce`` (several ranks) they
  are kept in (rank, local flat index) order: with contiguous row shards (rank r holds the r-th block of rows of
  the global batch) that is again the lowest flat index of the concatenated global batch.
- **Distributed (docs/methods.md §4.3)**: every histogram goes through ``all_reduce`` (a sum over ranks) before a
  digit is chosen, so every rank chooses the same digits and the threshold is the exact ``n_keep``-th largest score
  of the *global* batch: N ranks × B/N rows select exactly what one process selects on the B rows. Every rank must
  call with the same ``n_keep`` (the global budget), backend and digit schedule: they then make the same
  ``all_reduce`` calls in the same order (one per histogram pass, plus, in ``batch_topk``, one ``[world_size]``
  vector of tie counts; a missing ``rank``/``world_size`` is an error there as soon as another rank holds ties).
- **Values are checked** once per selection: NaN, ±inf and negative scores are errors (on CUDA a device-side
  assert, to avoid a host sync).

With ``torch.distributed`` (data parallel, each rank its block of rows)::

    def all_reduce(counts):
        dist.all_reduce(counts)  # sum
        return counts

    selection = batch_topk(scores, k * global_batch, all_reduce, rank=dist.get_rank(), world_size=dist.get_world_size())

Three implementations of the passes, compared exactly in the tests (``backend.py`` picks one):

- **Triton** (CUDA): ``_radix_histogram_kernel``, grid ``(min(cdiv(n, BLOCK), MAX_PROGRAMS),)``; each program walks
  ``BLOCK``-entry tiles with a stride, adds ``tl.histogram`` of each tile into a ``[2**digit_bits]`` int32
  register histogram (entries not counted — zeros, other prefixes, past the end — go to bin 0 and are subtracted
  from it, as in the reference) and writes it as one row of a ``[programs, 2**digit_bits]`` partial table; the rows are
  summed in int64. The prefix is read from a device tensor, so the whole threshold search (histograms, digit
  choices, ``all_reduce``) runs without a host sync; ``batch_topk`` syncs once, in the ``nonzero`` that lists the
  kept entries. Digits of ``TRITON_DIGIT_BITS = (7, 8, 8, 8)``: four full passes with small histograms
  (``tl.histogram``'s warp-ballot lowering costs O(bins) per element).
- **C** (float32 on CPU, the production path there; ``radix_select.c``, compiled by ``native``): the histogram reads
  16 keys per AVX-512 compare, compacts the digits of those it counts and adds them into two interleaved per-thread
  histograms, and flags any value that is not a score, so the value check needs no pass of its own; the compaction
  and the kept entries count per share of the entries, then write. Digits of ``REFERENCE_DIGIT_BITS``; the entries
  that can still be kept are compacted after the first digit only out of a whole matrix (``COMPACTED_FROM``).
- **Reference** (plain PyTorch: other dtypes, the ``reference`` backend, no C compiler): ``2**18``-entry chunks
  (cache-resident) of keys are shifted to digits and counted by ``scatter_add_`` into a ``[threads, bins]`` table
  (parallel over its rows; ``torch.bincount`` and ``index_add_`` are single-threaded). Digits of
  ``REFERENCE_DIGIT_BITS = (15, 16)``: after the first pass only the entries whose first digit is at least the
  chosen one can be kept (``n_keep`` plus at most one bucket, a relative width of 2⁻⁷); they are compacted once
  (``nonzero``) and the second pass, the tie resolution and the output only touch them.

Measured on the development machine's 2-core CPU (torch 2.13), scores [4096, 16384] float32, n_keep = 100 · 4096,
median of 5 (``python bench/selection.py``; the C passes unless the row says the reference); the trained-like scores
are 9% positive with heavy-tailed per-latent scales:

=============================================  ============  ============
method                                         ReLU(N(0,1))  trained-like
=============================================  ============  ============
``torch.topk`` over the flattened matrix            1026 ms        909 ms
``torch.kthvalue``                                  1000 ms        548 ms
``batch_topk_threshold``, digits (15, 16)             45 ms         42 ms
``batch_topk_threshold``, digits (7, 8, 8, 8)         52 ms         50 ms
``batch_topk`` (rows, latents), (15, 16)              48 ms         45 ms
``batch_topk_mask`` (adds a [B, F] bool mask)        117 ms        129 ms
one full histogram pass (15 or 7 bits)                24 ms         20 ms
value check (``aminmax``)                             12 ms         13 ms
``batch_topk`` on the reference                      202 ms        222 ms
one histogram pass on the reference                   98 ms        130 ms
=============================================  ============  ============
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from crosscoder.kernels.backend import HAS_TRITON, c_kernel_allowed, resolve_backend
from crosscoder.kernels.native import native_library

if HAS_TRITON:
    import triton
    import triton.language as tl

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over all ranks and returns the sum (same shape, dtype, device); may work in place. With
``torch.distributed``: ``def all_reduce(t): dist.all_reduce(t); return t``."""

KEY_BITS = 31
"""Bits of the radix key: the float32 bit pattern without its sign bit."""
REFERENCE_DIGIT_BITS = (15, 16)
"""Digit widths of the reference path's passes, most significant first (sum: ``KEY_BITS``)."""
TRITON_DIGIT_BITS = (7, 8, 8, 8)
"""Digit widths of the Triton path's passes, most significant first (sum: ``KEY_BITS``)."""
MAX_DIGIT_BITS = 16
"""Widest digit (a histogram of 65,536 bins)."""
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 2048
"""Entries per Triton tile."""
MAX_PROGRAMS = 1024
"""Most Triton programs (rows of the partial-histogram table) per histogram pass."""
TRITON_MIN_DIGIT_BITS, TRITON_MAX_DIGIT_BITS = 5, 12
"""``tl.histogram`` needs at least a warp's 32 bins; more than 4096 bins are slow in its lowering."""
_CHUNK = 1 << 18
"""Entries per chunk of the reference path on CPU: its int32 keys and int64 digits (3 MB) stay in cache, also with
one process per core (``2**20`` was 15% slower there, ``2**17`` no faster alone)."""
_KEY_MASK = (1 << KEY_BITS) - 1
COMPACTED_FROM = 8
"""The C passes compact the entries that can still be kept after the first digit only where the entries outnumber
``n_keep`` this many times (a whole score matrix). Among the training step's candidates (about twice ``n_keep``)
the later passes read them all: cheaper than a compacted copy in fresh memory, which on the development machine took
3 ms a step to page in."""


class TopKThreshold(NamedTuple):
    """The BatchTopK threshold (all 0-d tensors on the scores' device; global under ``all_reduce``)."""

    value: torch.Tensor
    """The ``n_selected``-th largest score, in the scores' dtype: the smallest kept score (0 if none is kept)."""
    n_greater: torch.Tensor
    """int64: how many scores are strictly greater than ``value`` (all of them are kept)."""
    n_selected: torch.Tensor
    """int64: how many scores are kept, ``min(n_keep, #positive scores)``."""


@dataclass(frozen=True, eq=False)
class BatchTopKSelection:
    """The kept entries of a ``[batch_size, dict_size]`` score matrix, sorted by row then latent (CSR order).

    rows, latents: [n_kept_here] int64, this rank's kept entries. ``threshold`` and ``n_selected`` are global
    (0-d; see ``TopKThreshold``): ``threshold`` is the smallest kept score, the input of the θ EMA.
    """

    rows: torch.Tensor
    latents: torch.Tensor
    threshold: torch.Tensor
    n_selected: torch.Tensor
    batch_size: int
    dict_size: int

    def to_mask(self) -> torch.Tensor:
        """Bool mask [batch_size, dict_size] of the kept entries."""
        mask = torch.zeros(self.batch_size * self.dict_size, dtype=torch.bool, device=self.rows.device)
        mask[self.rows * self.dict_size + self.latents] = True
        return mask.view(self.batch_size, self.dict_size)


# ------------------------------------------------------------------------------------------------ public API
def batch_topk(
    scores: torch.Tensor,
    n_keep: int,
    all_reduce: AllReduce | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    digit_bits: Sequence[int] | None = None,
) -> BatchTopKSelection:
    """Keep the ``n_keep`` largest entries of ``scores`` [batch, dict_size] (non-negative): exactly
    ``min(n_keep, #positive)`` entries, all scores above the threshold and the first ties at it (lowest flat index).

    With ``all_reduce`` (sum over ranks), ``n_keep`` is the global budget and the selection is the global BatchTopK
    over all ranks' rows; ``rank``/``world_size`` order the ties across ranks. ``digit_bits``: the digit widths of
    the histogram passes (default: ``REFERENCE_DIGIT_BITS`` or ``TRITON_DIGIT_BITS``). Without the whole matrix:
    ``batch_topk_among_candidates``.
    """
    _check_scores(scores, dims=2)
    _check_n_keep(n_keep)
    _check_ranks(all_reduce, rank, world_size)
    batch_size, dict_size = scores.shape
    kept, search = _kept_entries(scores.reshape(-1), n_keep, all_reduce, rank, world_size, digit_bits, dict_size)
    threshold = search.threshold
    return BatchTopKSelection(kept.rows, kept.latents, threshold.value, threshold.n_selected, batch_size, dict_size)


def batch_topk_among_candidates(
    candidates: torch.Tensor,
    candidate_scores: torch.Tensor,
    n_keep: int,
    all_reduce: AllReduce | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    dict_size: int,
) -> tuple[BatchTopKSelection, torch.Tensor] | None:
    """``batch_topk`` of a ``[batch_size, dict_size]`` score matrix that was never formed whole, from its candidates:
    ``candidates`` [n] int64, the ascending flat indices of this rank's positive scores ≥ some bound ``β`` (the same
    on every rank), and ``candidate_scores`` [n] those scores (checked once, by the search that runs on them). When
    at least ``n_keep`` candidates exist over all ranks (one ``all_reduce`` of the count), the ``n_keep``-th largest
    score is ≥ β, every kept entry is a candidate and ties break in the same flat order: returns the selection
    ``batch_topk`` makes on the whole matrix and the kept entries' scores [n_kept]. Otherwise None: the kept entries
    may lie below β, and only the whole matrix decides (it is checked then; docs/methods.md §4.2)."""
    _check_n_keep(n_keep)
    _check_ranks(all_reduce, rank, world_size)
    if batch_size < 0 or dict_size < 1:
        raise ValueError(f"batch_size={batch_size}, dict_size={dict_size}: need batch_size >= 0 and dict_size >= 1")
    count = torch.tensor(candidates.numel(), dtype=torch.int64, device=candidates.device)
    if all_reduce is not None:
        count = all_reduce(count)
    if int(count) < n_keep:
        return None
    kept, search = _kept_entries(
        candidate_scores, n_keep, all_reduce, rank, world_size, None, dict_size, labels=candidates, with_scores=True
    )
    found = search.threshold
    selection = BatchTopKSelection(kept.rows, kept.latents, found.value, found.n_selected, batch_size, dict_size)
    return selection, kept.scores


def batch_topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask [batch, dict_size] of the ``n_keep`` largest entries of ``scores`` (non-negative): exactly
    ``min(n_keep, #positive)`` entries are set; zeros are never set; ties go to the lowest flat index."""
    return batch_topk(scores, n_keep).to_mask()


def batch_topk_threshold(
    scores: torch.Tensor,
    n_keep: int,
    all_reduce: AllReduce | None = None,
    *,
    digit_bits: Sequence[int] | None = None,
) -> TopKThreshold:
    """The exact ``n_keep``-th largest score of ``scores`` (any shape, non-negative) by radix select.

    Fewer than ``n_keep`` positive scores: the smallest positive score (``n_selected`` < ``n_keep``); none: 0.
    ``all_reduce`` is applied to every histogram before its digit is chosen (global threshold across ranks). On
    the Triton path nothing syncs with the host.
    """
    _check_scores(scores)
    _check_n_keep(n_keep)
    return _radix_select(scores.reshape(-1), n_keep, all_reduce, digit_bits).threshold


def radix_histogram(
    scores: torch.Tensor, prefix: int | torch.Tensor, prefix_bits: int, digit_bits: int
) -> torch.Tensor:
    """Histogram [2**digit_bits] int64 of the radix digit after the first ``prefix_bits`` key bits, over the
    non-zero entries of ``scores`` whose first ``prefix_bits`` key bits equal ``prefix``.

    scores: any shape, contiguous float32/bfloat16/float16 (values are not checked here: ``batch_topk`` checks
    them once). The key is the float32 bit pattern without its sign (``KEY_BITS`` bits); ``prefix``: int or 0-d
    integer tensor (on the scores' device it costs no host sync on the Triton path).
    """
    if resolve_backend(scores.device) == "triton":
        return radix_histogram_triton(scores, prefix, prefix_bits, digit_bits)
    return _radix_histogram_cpu(scores, prefix, prefix_bits, digit_bits)


def threshold_floor(counts: torch.Tensor, n_keep: int) -> float:
    """The smallest value of the first-digit bucket that holds the threshold ``batch_topk_threshold`` would find for
    ``n_keep``, from ``counts`` [2**digit_bits], a ``radix_histogram`` without prefix (``prefix_bits = 0``) of the
    scores, which may be summed over parts of them (blocks of a matrix never held whole): ≤ that threshold, and
    within one bucket of it (with 15 bits, a relative 2⁻⁷ below a normal float32). 0 when no score is positive or
    the threshold lies in the first bucket (with 15 bits: a subnormal). The histogram does not check values: counts
    of NaN, ±inf or negative entries give a meaningless floor (NaN or inf among them)."""
    _check_n_keep(n_keep)
    digit_bits = max(0, len(counts).bit_length() - 1)
    if len(counts) != 1 << digit_bits or not 0 < digit_bits <= MAX_DIGIT_BITS:
        raise ValueError(
            f"counts has {len(counts)} bins: a radix histogram has 2**digit_bits, 1 ≤ digit_bits ≤ {MAX_DIGIT_BITS}"
        )
    digit, _ = _choose_digit(counts, counts.sum().clamp(max=n_keep))
    key = int(digit) << (KEY_BITS - digit_bits)
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32))


def _radix_histogram_cpu(
    scores: torch.Tensor, prefix: int | torch.Tensor, prefix_bits: int, digit_bits: int
) -> torch.Tensor:
    """``radix_histogram`` off Triton: the C pass (float32 on CPU) where it runs, else the reference."""
    library = _native_selection(scores)
    if library is None:
        return radix_histogram_reference(scores, prefix, prefix_bits, digit_bits)
    return _native_histogram(library, scores, prefix, prefix_bits, digit_bits)[0]


def _native_histogram(
    library: ctypes.CDLL, scores: torch.Tensor, prefix: int | torch.Tensor, prefix_bits: int, digit_bits: int
) -> tuple[torch.Tensor, bool]:
    """``radix_histogram`` by the C pass, and whether it read an entry that is not a score (NaN, ±inf, negative)."""
    _check_scores(scores)
    _check_digits(prefix_bits, digit_bits)
    counts = torch.zeros(1 << digit_bits, dtype=torch.int64)
    flat = scores.reshape(-1)
    found = library.radix_histogram(
        flat.data_ptr(),
        flat.numel(),
        _check_prefix(prefix, prefix_bits),
        prefix_bits,
        digit_bits,
        counts.data_ptr(),
        _threads_for(flat.numel()),
    )
    if found < 0:
        raise MemoryError(f"radix_histogram: no memory for {torch.get_num_threads()} × 2 × {1 << digit_bits} counts")
    return counts, found == 1


# ---------------------------------------------------------------------------------------- reference histogram
def radix_histogram_reference(
    scores: torch.Tensor, prefix: int | torch.Tensor, prefix_bits: int, digit_bits: int
) -> torch.Tensor:
    """Plain-PyTorch ``radix_histogram`` (the CPU path): per cache-sized chunk, keys are shifted to digits and
    counted by a ``scatter_add_`` into a ``[threads, bins]`` table (parallel over its rows).

    The first digit (``prefix_bits == 0``, a full pass over ``[B, F]``) is the hot path: mask and shift into reused
    buffers; zeros land in bin 0 and are subtracted at the end, counted by an integer ``sign().sum()`` (the fastest
    count measured; ``(x == 0).sum()`` is 4× slower). Later digits (over the few candidates) send the entries that
    are not counted to an extra bin.
    """
    _check_scores(scores)
    _check_digits(prefix_bits, digit_bits)
    prefix = _check_prefix(prefix, prefix_bits)
    flat = scores.reshape(-1)
    device = flat.device
    n_bins = 1 << digit_bits
    shift = KEY_BITS - prefix_bits - digit_bits
    lanes = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
    counts = torch.zeros(lanes, n_bins + 1, dtype=torch.int64, device=device)
    one = torch.ones((), dtype=torch.int64, device=device)
    n_nonzero = torch.zeros((), dtype=torch.int64, device=device)
    chunk_size = min(flat.numel(), _CHUNK) if device.type == "cpu" else flat.numel()
    key_buffer = torch.empty(chunk_size, dtype=torch.int32, device=device)
    digit_buffer = torch.empty(chunk_size, dtype=torch.int64, device=device)
    for chunk in _chunks(flat):
        size = chunk.numel()
        key = torch.bitwise_and(chunk.float().view(torch.int32), _KEY_MASK, out=key_buffer[:size])
        if prefix_bits == 0:
            digit = torch.bitwise_right_shift(key, shift, out=digit_buffer[:size])
            n_nonzero += key.sign().sum(dtype=torch.int32 if size <= _CHUNK else torch.int64)
        else:
            counted = (key != 0) & ((key >> (KEY_BITS - prefix_bits)) == prefix)
            digit = torch.where(counted, (key >> shift) & (n_bins - 1), n_bins).long()
        body = size - size % lanes  # the body is spread over the lanes, the rest goes to lane 0
        counts.scatter_add_(1, digit[:body].view(lanes, body // lanes), one.expand(lanes, body // lanes))
        counts[:1].scatter_add_(1, digit[body:].view(1, size - body), one.expand(1, size - body))
    counts = counts[:, :n_bins].sum(0)
    if prefix_bits == 0:
        counts[0] -= flat.numel() - n_nonzero
    return counts


# ------------------------------------------------------------------------------------------ Triton histogram
if HAS_TRITON:

    @triton.jit
    def _radix_histogram_kernel(
        scores_ptr,  # (n,) float32 / bfloat16 / float16
        prefix_ptr,  # (1,) int64
        partial_ptr,  # (programs, 2**DIGIT_BITS) int32
        n,
        tiles_per_program,
        PREFIX_BITS: tl.constexpr,
        DIGIT_BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """partial[p, d] = #{non-zero entries in program p's tiles with key prefix == prefix and next digit d}."""
        program = tl.program_id(0)
        n_programs = tl.num_programs(0)
        n_bins: tl.constexpr = 1 << DIGIT_BITS
        prefix = tl.load(prefix_ptr)
        counts = tl.zeros([n_bins], dtype=tl.int32)
        for tile in range(tiles_per_program):
            offsets = (tile * n_programs + program).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            in_range = offsets < n
            scores = tl.load(scores_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
            key = scores.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            counted = in_range & (key != 0)
            if PREFIX_BITS > 0:
                counted = counted & ((key >> (31 - PREFIX_BITS)) == prefix)
            digit = tl.where(counted, (key >> (31 - PREFIX_BITS - DIGIT_BITS)) & (n_bins - 1), 0)
            # entries not counted land in bin 0 and are taken out again: tl.histogram's mask= is newer than
            # Triton 3.0, the oldest supported
            n_not_counted = BLOCK - tl.sum(counted.to(tl.int32), axis=0)
            counts += tl.histogram(digit, n_bins) - tl.where(tl.arange(0, n_bins) == 0, n_not_counted, 0)
        tl.store(partial_ptr + program * n_bins + tl.arange(0, n_bins), counts)


def radix_histogram_triton(
    scores: torch.Tensor, prefix: int | torch.Tensor, prefix_bits: int, digit_bits: int
) -> torch.Tensor:
    """Triton ``radix_histogram``: per-program histograms of strided tiles, summed in int64."""
    if not HAS_TRITON:
        raise RuntimeError("radix_histogram_triton needs Triton: pip install triton (or use the reference)")
    _check_scores(scores)
    _check_digits(prefix_bits, digit_bits)
    if not TRITON_MIN_DIGIT_BITS <= digit_bits <= TRITON_MAX_DIGIT_BITS:
        raise ValueError(
            f"digit_bits={digit_bits}: the Triton histogram takes {TRITON_MIN_DIGIT_BITS}..{TRITON_MAX_DIGIT_BITS} "
            "bits per digit (tl.histogram needs at least 32 bins)"
        )
    if isinstance(prefix, torch.Tensor):
        prefix_tensor = prefix.to(device=scores.device, dtype=torch.int64).reshape(1)
    else:
        _check_prefix(prefix, prefix_bits)
        prefix_tensor = torch.full((1,), prefix, dtype=torch.int64, device=scores.device)
    n_bins = 1 << digit_bits
    n = scores.numel()
    n_tiles = triton.cdiv(n, BLOCK)
    n_programs = min(n_tiles, MAX_PROGRAMS)
    if n_programs == 0:
        return torch.zeros(n_bins, dtype=torch.int64, device=scores.device)
    partial = torch.empty(n_programs, n_bins, dtype=torch.int32, device=scores.device)
    _radix_histogram_kernel[(n_programs,)](
        scores,
        prefix_tensor,
        partial,
        n,
        triton.cdiv(n_tiles, n_programs),
        PREFIX_BITS=prefix_bits,
        DIGIT_BITS=digit_bits,
        BLOCK=BLOCK,
    )
    return partial.sum(0, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ radix select
@dataclass
class _Search:
    threshold: TopKThreshold
    key: torch.Tensor  # 0-d int64: radix key of threshold.value
    ties_left: torch.Tensor  # 0-d int64: how many entries equal to the threshold are kept (over all ranks)
    candidates: torch.Tensor | None  # flat indices ⊇ the kept entries, ascending (reference path), else None
    candidate_scores: torch.Tensor | None  # float32 scores at the candidates (reference path), else None


def _radix_select(
    flat: torch.Tensor, n_keep: int, all_reduce: AllReduce | None, digit_bits: Sequence[int] | None
) -> _Search:
    """Choose the threshold key digit by digit. flat: [n] scores (checked)."""
    backend = resolve_backend(flat.device)
    schedule = _digit_schedule(digit_bits, backend)
    histogram = radix_histogram_triton if backend == "triton" else radix_histogram_reference
    library = None if backend == "triton" else _native_selection(flat)
    if library is None:
        check_score_values(flat)
    source, candidates, candidate_scores = flat, None, None
    prefix = torch.zeros((), dtype=torch.int64, device=flat.device)
    prefix_bits = 0
    n_greater = torch.zeros((), dtype=torch.int64, device=flat.device)
    for pass_index, bits in enumerate(schedule):
        if library is None:
            counts = histogram(source, prefix, prefix_bits, bits)
        else:  # the C pass also looks at every value it reads: the check costs no pass of its own
            counts, invalid = _native_histogram(library, source, prefix, prefix_bits, bits)
            if invalid:
                check_score_values(source)  # names the value
        if all_reduce is not None:
            counts = all_reduce(counts)
        if pass_index == 0:
            n_selected = counts.sum().clamp(max=n_keep)
            remaining = n_selected
        digit, n_above = _choose_digit(counts, remaining)
        prefix = (prefix << bits) | digit
        prefix_bits += bits
        n_greater = n_greater + n_above
        remaining = remaining - n_above
        if pass_index == 0 and backend == "reference" and (library is None or len(flat) > COMPACTED_FROM * n_keep):
            # Every entry that can still be kept has a first digit ≥ the chosen one: compact them once.
            candidates, candidate_scores = _entries_at_least(flat, prefix << (KEY_BITS - prefix_bits))
            source = candidate_scores
    value = prefix.to(torch.int32).view(torch.float32).to(flat.dtype)
    return _Search(TopKThreshold(value, n_greater, n_selected), prefix, remaining, candidates, candidate_scores)


class _Kept(NamedTuple):
    """The kept entries, ascending: rows and latents [n_kept] int64 of the score matrix, and their scores (or None)."""

    rows: torch.Tensor
    latents: torch.Tensor
    scores: torch.Tensor | None


def _kept_entries(
    flat: torch.Tensor,
    n_keep: int,
    all_reduce: AllReduce | None,
    rank: int,
    world_size: int,
    digit_bits: Sequence[int] | None,
    dict_size: int,
    labels: torch.Tensor | None = None,
    with_scores: bool = False,
) -> tuple[_Kept, _Search]:
    """The entries ``batch_topk`` keeps of ``flat`` [n] (checked contiguous scores) — each labelled by its flat index
    in a [*, dict_size] matrix, ``labels[i]`` (None: i) — as rows and latents, ascending, with their scores if
    ``with_scores``; and the search that chose them."""
    search = _radix_select(flat, n_keep, all_reduce, digit_bits)
    library = _native_selection(flat)
    if library is not None:  # the C pass: over the candidates compacted after the first digit, or every entry
        scores, at = (flat, labels) if search.candidates is None else (search.candidate_scores, search.candidates)
        if search.candidates is not None and labels is not None:
            at = labels.index_select(0, search.candidates)
        ranks = (all_reduce, rank, world_size)
        return _kept_native(library, scores, at, search, *ranks, dict_size, with_scores), search
    if search.candidates is None:
        candidates, candidate_scores = _entries_at_least(flat, search.key)
    else:
        candidates, candidate_scores = search.candidates, search.candidate_scores
    keys = _keys(candidate_scores)
    greater = keys > search.key
    equal = keys == search.key
    # a tie is kept when ties_before + its rank among this process's ties < ties_left (the limit clamped to what this
    # process holds, so that it fits a cumulative count's dtype)
    limit = (search.ties_left - _ties_before(equal.sum(), all_reduce, rank, world_size)).clamp(0, len(equal))
    ties_up_to_here = equal.cumsum(0, dtype=torch.int32 if len(equal) < 2**31 else torch.int64)
    kept = greater | (equal & (ties_up_to_here <= limit))
    positions = candidates[kept]
    rows, latents = _split_flat_indices_(positions if labels is None else labels.index_select(0, positions), dict_size)
    return _Kept(rows, latents, candidate_scores[kept] if with_scores else None), search


def _kept_native(
    library: ctypes.CDLL,
    scores: torch.Tensor,
    labels: torch.Tensor | None,
    search: _Search,
    all_reduce: AllReduce | None,
    rank: int,
    world_size: int,
    dict_size: int,
    with_scores: bool,
) -> _Kept:
    """``_kept_entries``' last step by the C pass over ``scores`` [n] float32 labelled ``labels`` [n] (None: their
    positions): one pass counts the entries above the threshold and its ties, the next writes the kept ones' rows,
    latents and (``with_scores``) scores."""
    key, n_ties = int(search.key), ctypes.c_int64()
    counting = (None, None, None, ctypes.byref(n_ties))
    n_greater = library.kept_entries(scores.data_ptr(), None, len(scores), key, 0, dict_size, *counting)
    ties_before = _ties_before(torch.tensor(n_ties.value), all_reduce, rank, world_size)
    limit = int((search.ties_left - ties_before).clamp(0, n_ties.value))
    rows, latents = (torch.empty(n_greater + limit, dtype=torch.int64) for _ in range(2))
    kept_scores = torch.empty(len(rows), dtype=torch.float32) if with_scores else None
    found = library.kept_entries(
        scores.data_ptr(),
        None if labels is None else labels.data_ptr(),
        len(scores),
        key,
        limit,
        dict_size,
        rows.data_ptr(),
        latents.data_ptr(),
        None if kept_scores is None else kept_scores.data_ptr(),
        ctypes.byref(n_ties),
    )
    assert found == len(rows)
    return _Kept(rows, latents, kept_scores)


def _ties_before(
    ties_here: torch.Tensor, all_reduce: AllReduce | None, rank: int, world_size: int
) -> torch.Tensor | int:
    """How many ties at the threshold the ranks before ``rank`` hold (0-d int64; 0 without ``all_reduce``): they
    are kept first."""
    if all_reduce is None:
        return 0
    ties_per_rank = torch.zeros(world_size, dtype=torch.int64, device=ties_here.device)
    ties_per_rank[rank] = ties_here
    ties_per_rank = all_reduce(ties_per_rank)
    if world_size == 1:
        _check_single_rank(ties_per_rank[0] == ties_here)
    return ties_per_rank[:rank].sum()


def _choose_digit(counts: torch.Tensor, remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit d holding the ``remaining``-th largest entry, and how many entries have a larger digit.

    counts: [bins] int64; remaining: 0-d int64. d is the largest digit with #(digit ≥ d) ≥ remaining (0 when
    remaining is 0). Device ops only: no host sync.
    """
    at_least = counts.flip(0).cumsum(0).flip(0)
    digit = ((at_least >= remaining.clamp(min=1)).sum() - 1).clamp(min=0)
    return digit, (at_least - counts).gather(0, digit.view(1)).squeeze(0)


def _entries_at_least(flat: torch.Tensor, min_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending flat indices [n] of the entries whose key is ≥ ``min_key`` and non-zero, and their scores [n] as
    float32 (a host sync: their number)."""
    bound = min_key.clamp(min=1).to(torch.int32).view(torch.float32)  # a float32 compare is exact for any dtype
    library = _native_selection(flat)
    if library is not None:
        threads = _threads_for(flat.numel())
        share_counts = torch.empty(threads, dtype=torch.int64)
        n = library.count_at_least(flat.data_ptr(), flat.numel(), float(bound), share_counts.data_ptr(), threads)
        positions, scores = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float32)
        pointers = (share_counts.data_ptr(), positions.data_ptr(), scores.data_ptr())
        library.write_at_least(flat.data_ptr(), flat.numel(), float(bound), *pointers, threads)
        return positions, scores
    parts, start = [], 0
    for chunk in _chunks(flat):
        parts.append((chunk.float() >= bound).nonzero().squeeze(1) + start)
        start += chunk.numel()
    indices = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=flat.device)
    return indices, flat.index_select(0, indices).float()


def _split_flat_indices_(flat_indices: torch.Tensor, dict_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and latents [n] of flat indices [n] into a [batch, dict_size] matrix; the latents are ``flat_indices``
    itself, overwritten (no temporary; a product and a difference instead of an int64 remainder: cheaper on CPU)."""
    rows = torch.div(flat_indices, dict_size, rounding_mode="floor")
    return rows, flat_indices.sub_(rows, alpha=dict_size)


def _chunks(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    """Cache-sized chunks on CPU; the whole tensor elsewhere."""
    if flat.device.type == "cpu" and flat.numel() > 0:
        yield from flat.split(_CHUNK)
    else:
        yield flat


def _keys(values: torch.Tensor) -> torch.Tensor:
    """Radix keys (int32, ``KEY_BITS`` bits) of float scores: the float32 bits without the sign."""
    return values.float().view(torch.int32) & _KEY_MASK


# ------------------------------------------------------------------------------------------------- C passes
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
RADIX_SELECT_SIGNATURES = (
    ("radix_histogram", _SIZE, (_POINTER, _SIZE, _SIZE, _SIZE, _SIZE, _POINTER, _SIZE)),
    ("count_at_least", _SIZE, (_POINTER, _SIZE, ctypes.c_float, _POINTER, _SIZE)),
    ("write_at_least", None, (_POINTER, _SIZE, ctypes.c_float, _POINTER, _POINTER, _POINTER, _SIZE)),
    ("kept_entries", _SIZE, (_POINTER, _POINTER, _SIZE, _SIZE, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER)),
)
"""``radix_select.c``'s functions as ``ctypes`` declares them."""
ENTRIES_PER_THREAD = 1 << 16
"""The C passes use one more of torch's threads per this many entries (a thread's start costs more than a few)."""


def _native_selection(scores: torch.Tensor) -> ctypes.CDLL | None:
    """``radix_select.c``, loaded, where it may read ``scores`` (contiguous float32 on the CPU, backend not
    ``"reference"``, a compiler at hand); else None."""
    if not (c_kernel_allowed(scores.device) and scores.dtype == torch.float32 and scores.is_contiguous()):
        return None
    return native_library("radix_select", RADIX_SELECT_SIGNATURES)


def _threads_for(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // ENTRIES_PER_THREAD))


# ------------------------------------------------------------------------------------------------ checks
def _check_scores(scores: torch.Tensor, dims: int | None = None) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if dims is not None and scores.dim() != dims:
        raise ValueError(f"scores must be a [batch, dict_size] matrix, got shape {list(scores.shape)}")
    if scores.dtype not in SCORE_DTYPES:
        raise ValueError(
            f"scores have dtype {scores.dtype}: BatchTopK ranks float32, bfloat16 or float16 scores "
            "(cast with .float())"
        )
    if not scores.is_contiguous():
        raise ValueError(f"scores are not contiguous (strides {scores.stride()}): pass scores.contiguous()")


def check_score_values(flat: torch.Tensor) -> None:
    """NaN, ±inf and negative scores are errors (-0.0 is zero). On CUDA a device-side assert (no host sync)."""
    if flat.numel() == 0:
        return
    low, high = torch.aminmax(flat)
    if flat.device.type == "cuda":
        torch._assert_async(torch.isfinite(high) & (low >= 0), "BatchTopK scores must be finite and >= 0")
        return
    if torch.isnan(high):
        raise ValueError("scores contain NaN: BatchTopK needs finite non-negative scores (check the encoder)")
    if low < 0:
        raise ValueError(
            f"scores contain a negative value ({low.item():g}): BatchTopK ranks non-negative scores f·c (ReLU first)"
        )
    if torch.isinf(high):
        raise ValueError("scores contain inf: BatchTopK needs finite non-negative scores (check the encoder)")


def _check_single_rank(alone: torch.Tensor) -> None:
    message = (
        "all_reduce sums over several ranks but world_size=1: pass rank= and world_size= so that ties at the "
        "threshold are shared out between the ranks"
    )
    if alone.device.type == "cuda":
        torch._assert_async(alone, message)
    elif not alone:
        raise ValueError(message)


def _check_n_keep(n_keep: int) -> None:
    if not isinstance(n_keep, int) or isinstance(n_keep, bool):
        raise TypeError(f"n_keep must be an int, got {type(n_keep).__name__}")
    if n_keep <= 0:
        raise ValueError(f"n_keep must be positive, got {n_keep}")


def _check_ranks(all_reduce: AllReduce | None, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} and world_size={world_size}: need 0 <= rank < world_size")
    if world_size > 1 and all_reduce is None:
        raise ValueError(f"world_size={world_size} needs all_reduce (a sum over ranks) to select across ranks")


def _check_digits(prefix_bits: int, digit_bits: int) -> None:
    if prefix_bits < 0 or not 1 <= digit_bits <= MAX_DIGIT_BITS or prefix_bits + digit_bits > KEY_BITS:
        raise ValueError(
            f"prefix_bits={prefix_bits}, digit_bits={digit_bits}: need prefix_bits >= 0, 1 <= digit_bits <= "
            f"{MAX_DIGIT_BITS} and prefix_bits + digit_bits <= {KEY_BITS} (the key: float32 bits without the sign)"
        )


def _check_prefix(prefix: int | torch.Tensor, prefix_bits: int) -> int:
    prefix = int(prefix)
    if not 0 <= prefix < (1 << prefix_bits):
        raise ValueError(f"prefix={prefix} does not fit in prefix_bits={prefix_bits} bits")
    return prefix


def _digit_schedule(digit_bits: Sequence[int] | None, backend: str) -> tuple[int, ...]:
    if digit_bits is None:
        return TRITON_DIGIT_BITS if backend == "triton" else REFERENCE_DIGIT_BITS
    schedule = tuple(digit_bits)
    if sum(schedule) != KEY_BITS or not all(1 <= bits <= MAX_DIGIT_BITS for bits in schedule):
        raise ValueError(f"digit_bits={schedule}: positive widths summing to {KEY_BITS} (e.g. {REFERENCE_DIGIT_BITS})")
    return schedule
