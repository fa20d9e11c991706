"""Host memory on CPU (docs/methods.md §4.2): GEMM buffers from malloc, freed blocks kept for reuse, and torch's
blocks left unaligned (no huge pages).

A training step on CPU allocates and frees tens to hundreds of MB of temporaries. Each fresh page of a new mapping is
a page fault, and on a virtual machine a fault costs microseconds (on the development machine a fresh 268 MB tensor
took 100 ms to fill with 4 KiB pages), so the step's temporaries come from the heap and are reused there:

- ``gemm_buffers_from_malloc``: MKL, torch's BLAS on x86, keeps each thread's GEMM buffers in a memory manager of
  its own for the life of the process (9.8 MB after one ``[4,096, 512] × [512, 512]`` product, 19 MB beside a
  diff-SAE step at ``B = 4,096``, ``F = 16,384``) unless ``MKL_DISABLE_FAST_MM`` is set, which it reads when torch
  loads it; ``crosscoder`` sets it on import. The buffers then come from ``malloc`` and go back to it after each
  product, where the rest of the step reuses them.
- ``freed_blocks_kept``: glibc's ``malloc`` serves blocks below ``KEPT_THRESHOLDS``' 32 MiB from its heap and keeps
  up to 64 MiB of freed heap resident — the ceiling its own sliding policy climbs to, there from the first step — so a
  step's temporaries (the decode's output, the selection's blocks and candidates, the codes) reuse the memory the last
  step freed instead of being paged in afresh. ``crosscoder.train`` sets it when it trains on CPU.
- No huge pages: ``crosscoder`` no longer sets ``THP_MEM_ALLOC_ENABLE=1`` (until 2026-12-05 it did), with which
  torch aligns each block of ≥ 2 MiB to 2 MiB: carved from the heap, such blocks split its free memory, and the peak
  grew over a run (to 1.25× the state over 100 crosscoder steps at ``F = 16,384``, against 1.09–1.12 unaligned). A
  process that sets the variable itself keeps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable

GEMM_BUFFERS_VARIABLE = "MKL_DISABLE_FAST_MM"
"""MKL's switch for its own memory manager: any non-empty value turns it off (an empty one leaves it on)."""
KEPT_THRESHOLDS = (32 << 20, 64 << 20)
"""glibc's mmap and trim thresholds while and after a run trains on CPU: the ceiling its sliding mmap threshold climbs
to on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``, reached once a block of 32 MiB was freed) and twice that, as glibc sets
them together. Until 2026-12-05 a run of at least 8,192 latents per process fixed the mmap threshold at 1 MiB instead,
returning every freed temporary to the system for a peak 3–4% lower; when the development machine's page faults got
about three times as expensive (~16 µs), that cost a diff-SAE step at F = 16,384 5,800 faults and 93 ms of kernel
time a step (412 against 319 ms; docs/methods.md §4.2)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def gemm_buffers_from_malloc() -> None:
    """Have MKL take its GEMM buffers from ``malloc`` and free them after each product: ``GEMM_BUFFERS_VARIABLE`` set
    to ``1`` in this process and the processes it starts, unless torch is already imported (too late: MKL reads it
    when torch loads it) or the environment already says (an empty ``MKL_DISABLE_FAST_MM`` keeps MKL's cache).
    Measured over 14 diff-SAE steps at ``B = 4,096``, ``F = 16,384`` (the growth of the peak RSS, as ``bench/step.py``
    reads it): 305–306 MB against 316–319 MB with the cache, in the same time."""
    if "torch" not in sys.modules:
        os.environ.setdefault(GEMM_BUFFERS_VARIABLE, "1")


def freed_blocks_kept(device_type: str) -> bool:
    """On CPU, set glibc's thresholds to ``KEPT_THRESHOLDS`` for the rest of the process; whether they were set (False
    off CPU, off Linux or without glibc: another allocator keeps its own policy)."""
    return device_type == "cpu" and _set_thresholds(*KEPT_THRESHOLDS)


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """``mallopt`` glibc's mmap and trim thresholds; whether glibc took them."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


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
