"""The training process's host memory on CPU: freed large blocks go back to the system (docs/methods.md §4.2).

glibc's ``malloc`` serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps it when
freed, but it raises that threshold to the size of every such block freed (up to 32 MB): after the first step, the
step's [batch, n_sources · d_model] temporaries come from the heap, whose freed middle is never given back. On the
development machine, at B = 4,096 and F = 16,384, that raised the crosscoder step's peak from 1.18× its unavoidable
state to 1.26–1.31× (``bench/step.py``). A fixed threshold keeps every block of ``MMAP_THRESHOLD`` bytes or more out
of the heap; the blocks the step reuses (its ``StepBuffers``, the parameters and Adam's moments) are allocated once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves (and returns) a block with its own mapping: 1 MiB."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_configured = False


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for this process (once; later calls do nothing). Returns
    whether it is set: False off Linux or without glibc (another allocator keeps its own policy)."""
    global _configured
    if _configured:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _configured = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return _configured
