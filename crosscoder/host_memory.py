"""Host memory on CPU (docs/methods.md §4.2): huge pages for torch's large blocks, and freed large blocks given back.

A training step on CPU allocates and frees hundreds of MB of temporaries. Each fresh page of a new mapping is a page
fault, and on a virtual machine a 4 KiB fault costs microseconds: on the development machine a fresh 268 MB tensor
took 100 ms to fill, 16 ms with 2 MiB pages. Two settings make freeing cheap to undo:

- ``use_huge_pages``: torch's CPU allocator aligns each block of ≥ 2 MiB to 2 MiB and advises the kernel to back it
  with transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1``. It reads the variable once, at its first allocation,
  so ``crosscoder`` sets it on import, before it imports torch; a process that imported torch first (or set the
  variable itself) keeps what it had.
- ``return_large_blocks_to_the_system``: glibc's ``malloc`` raises its mmap threshold to the size of every large block
  freed (up to 32 MB), so after a first step the step's [batch, n_sources · d_model] temporaries come from the heap,
  whose freed middle stays resident. A threshold fixed at ``MMAP_THRESHOLD`` maps every larger block for its own and
  unmaps it when freed. The training process sets it when it builds a CPU trainee.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"
"""torch's switch for transparent huge pages in its CPU allocator (blocks of ≥ 2 MiB)."""
MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves (and returns) a block with its own mapping: 1 MiB."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_threshold_fixed = False


def use_huge_pages() -> None:
    """Turn on huge pages for torch's CPU allocator in this process and the processes it starts, unless torch is
    already imported (too late to take effect) or the environment already says (``0`` opts out)."""
    if "torch" not in sys.modules:
        os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for this process (once; later calls do nothing). Returns
    whether it is set: False off Linux or without glibc (another allocator keeps its own policy)."""
    global _threshold_fixed
    if _threshold_fixed:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _threshold_fixed = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return _threshold_fixed
