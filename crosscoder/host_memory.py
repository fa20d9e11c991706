"""Host memory on CPU (docs/methods.md §4.2): huge pages for torch's large blocks, and freed large blocks given back.

A training step on CPU allocates and frees hundreds of MB of temporaries. Each fresh page of a new mapping is a page
fault, and on a virtual machine a 4 KiB fault costs microseconds: on the development machine a fresh 268 MB tensor
took 100 ms to fill, 16 ms with 2 MiB pages. Two settings make freeing cheap to undo:

- ``use_huge_pages``: torch's CPU allocator aligns each block of ≥ 2 MiB to 2 MiB and advises the kernel to back it
  with transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1``. It reads the variable once, at its first allocation,
  so ``crosscoder`` sets it on import, before it imports torch; a process that imported torch first (or set the
  variable itself) keeps what it had.
- ``large_blocks_returned_to_the_system``: glibc's ``malloc`` raises its mmap threshold to the size of every large
  block freed (up to 32 MiB), so after a first step the step's [batch, n_sources · d_model] temporaries come from the
  heap, whose freed middle stays resident. While a run of a wide enough dictionary (``RETURNED_FROM_LATENTS``) trains
  on CPU (``crosscoder.train``) the threshold is fixed at ``MMAP_THRESHOLD``: every larger block is mapped for its own
  and unmapped when freed, so each is paged in afresh, a cost with nothing to gain for what runs next in the process
  (an evaluation, the lens). glibc cannot return to its sliding threshold: at the end of the run both thresholds are
  set where glibc's own policy ends up (``THRESHOLDS_AFTER_TRAINING``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"
"""torch's switch for transparent huge pages in its CPU allocator (blocks of ≥ 2 MiB)."""
MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves (and returns) a block with its own mapping while a run trains: 1 MiB."""
RETURNED_FROM_LATENTS = 8192
"""The fewest latents per process (of the widest dictionary a run trains) for which freed blocks are returned while
it trains: a cut-off between the shapes measured. The blocks returned (1 to 32 MiB: the [batch, n_sources ·
d_model] temporaries, the selection's blocks) are paged in afresh at their next use, a cost that does not grow with
the dictionary's width while the step's compute does. On the development machine, 300 steps at the demo's settings
of three 512-latent dictionaries took 53–54 s with the blocks returned (29 s of it in the kernel, 8.4–8.8 M page
faults) against 24–36 s (3.5 s, 0.1 M), while at 8,192 latents (``bench/step.py --dict-size 8192``) the cost was
within the machine's noise and the step's peak fell from 1.24 to 1.18× its state (crosscoder) and from 1.32–1.39 to
1.22–1.24× (diff-SAE), at 16,384 from 1.13 to 1.09× and from 1.19–1.20 to 1.13× (docs/methods.md §4.2)."""
THRESHOLDS_AFTER_TRAINING = (32 << 20, 64 << 20)
"""glibc's mmap and trim thresholds after a run: the ceiling its sliding mmap threshold climbs to on 64-bit
(``DEFAULT_MMAP_THRESHOLD_MAX``, reached once a block of 32 MiB was freed) and twice that, as glibc sets them
together. On the development machine the lens on the model organism (no steering) took 41.8–43.5 s (11.7–13.9 s of it
in the kernel, paging in) with the threshold left at 1 MiB, 28.5–30.6 s under glibc's own policy and 26.9–28.3 s
with these (docs/methods.md §4.2)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_runs_training = 0


def use_huge_pages() -> None:
    """Turn on huge pages for torch's CPU allocator in this process and the processes it starts, unless torch is
    already imported (too late to take effect) or the environment already says (``0`` opts out)."""
    if "torch" not in sys.modules:
        os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")


@contextmanager
def large_blocks_returned_to_the_system(device_type: str, latents: int) -> Iterator[bool]:
    """While inside, on CPU, with ``latents`` (the widest dictionary's, per process) of at least
    ``RETURNED_FROM_LATENTS``, glibc's mmap threshold is fixed at ``MMAP_THRESHOLD``; on leaving the outermost such
    scope it is set to ``THRESHOLDS_AFTER_TRAINING``. Yields whether the threshold is fixed: False off CPU, for a
    narrower dictionary, off Linux or without glibc (another allocator keeps its own policy)."""
    global _runs_training
    fixed = device_type == "cpu" and latents >= RETURNED_FROM_LATENTS and _set_thresholds(MMAP_THRESHOLD)
    _runs_training += fixed
    try:
        yield fixed
    finally:
        _runs_training -= fixed
        if fixed and not _runs_training:
            _set_thresholds(*THRESHOLDS_AFTER_TRAINING)


def _set_thresholds(mmap_threshold: int, trim_threshold: int | None = None) -> bool:
    """``mallopt`` glibc's mmap threshold (and its trim threshold); whether glibc took them."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    taken = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    if trim_threshold is not None:
        taken &= mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return taken


@functools.cache
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``; None off Linux or under another C library (musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
