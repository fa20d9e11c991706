"""The scores of one block of encoder pre-activations that reach a bound, compacted: the scan of the CPU training
forward's blocked BatchTopK (``crosscoder.blocked_selection``; docs/methods.md §4.2).

For a block ``pre`` [rows, width], per-column bounds (or one number), the block's code norms c [width] (None: c ≡ 1)
and a threshold t > 0, the candidates are the entries with ``pre ≥ bound`` and ``score = ReLU(pre) · c ≥ t``: their
flat positions in the block (row-major; int32 where they fit), scores, and each row's count.

Two implementations: the C kernel ``block_candidates.c`` (float32 on CPU: one pass over the block with AVX-512
compares, both cores on halves of the rows; compiled by ``native``), used unless the kernel backend is
``"reference"`` or no C compiler is at hand, and the plain-PyTorch reference below; the tests compare them.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from crosscoder.kernels.backend import get_backend
from crosscoder.kernels.native import native_library

COMPARE_CHUNK = 1 << 18
"""The reference compares this many pre-activations with their bounds at a time (whole rows), into a float buffer
(1 MB) then copied to the bool mask: on CPU a compare into float and a copy to bool take 0.27 ms per [4096, 512]
block, a compare into bool 0.68 ms."""
INITIAL_CAPACITY_SHARE = 64
"""The kernel's first output buffers hold rows · width / 64 candidates; a block with more scans again into buffers
of the size it reported."""


def scores_from_pre_activations(pre: torch.Tensor, code_norms: torch.Tensor | None) -> torch.Tensor:
    """``ReLU(pre) · c`` in place (returned): pre-activations [..., n] and their latents' code norms [n] (None: c ≡
    1)."""
    pre.relu_()
    return pre if code_norms is None else pre.mul_(code_norms)


class CandidateScan:
    """Scans the blocks [≤ rows, ≤ width] of one pass over the encoder, reusing its buffers between them (freed with
    it). ``native``: whether the C kernel runs."""

    def __init__(self, rows: int, width: int, like: torch.Tensor) -> None:
        self.position_dtype = torch.int32 if rows * width < 2**31 else torch.int64
        self.library = None
        if (
            like.device.type == "cpu"
            and like.dtype == torch.float32
            and self.position_dtype == torch.int32
            and get_backend() != "reference"
        ):
            self.library = _block_candidates_library()
        self.native = self.library is not None
        if self.native:
            self.positions = torch.empty(max(1, rows * width // INITIAL_CAPACITY_SHARE), dtype=torch.int32)
            self.scores = torch.empty(len(self.positions), dtype=torch.float32)
        else:
            self.mask = torch.empty(rows * width, dtype=torch.bool, device=like.device)
            self.compared = like.new_empty(max(min(COMPARE_CHUNK, rows * width), width))

    def __call__(
        self, block: torch.Tensor, bounds: float | torch.Tensor, code_norms: torch.Tensor | None, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidates of ``block`` [rows, width] (contiguous): positions [n] (ascending, row-major in the block),
        scores [n] and per-row counts [rows] (int64). ``bounds``: a number or [width]; ``code_norms``: [width] or
        None; ``threshold`` > 0 (a score ≥ it has a pre-activation ≥ its bound: the bounds are the caller's
        promise)."""
        if self.native:
            return self._native(block, bounds, code_norms, threshold)
        return self._reference(block, bounds, code_norms, threshold)

    def _reference(self, block, bounds, code_norms, threshold):
        rows, width = block.shape
        passed = _at_least(block, bounds, self.mask, self.compared)
        within = _true_positions(passed)
        norms = None if code_norms is None else code_norms.index_select(0, within.remainder(width))
        scores = scores_from_pre_activations(block.view(-1).index_select(0, within), norms)
        exact = (scores >= threshold).nonzero().squeeze(1)
        if len(exact) < len(within):  # passed the bound only
            within, scores = within.index_select(0, exact), scores.index_select(0, exact)
        counts = torch.bincount(within.div(width, rounding_mode="floor"), minlength=rows)
        return within.to(self.position_dtype), scores, counts

    def _native(self, block, bounds, code_norms, threshold):
        rows, width = block.shape
        if not block.is_contiguous():
            raise ValueError(f"block has strides {block.stride()}: the kernel reads a contiguous [rows, width] block")
        per_column = isinstance(bounds, torch.Tensor)
        for name, tensor in (("bounds", bounds if per_column else None), ("code_norms", code_norms)):
            if tensor is not None and (tensor.shape != (width,) or tensor.dtype != torch.float32):
                raise ValueError(f"{name} has shape {list(tensor.shape)} and dtype {tensor.dtype}: [{width}] float32")
        scalar_bound = 0.0 if per_column else float(bounds)
        bounds = bounds.contiguous() if per_column else None
        code_norms = None if code_norms is None else code_norms.contiguous()
        counts = torch.empty(rows, dtype=torch.int64)
        while True:
            found = self.library.block_candidates(
                block.data_ptr(),
                rows,
                width,
                None if bounds is None else bounds.data_ptr(),
                scalar_bound,
                None if code_norms is None else code_norms.data_ptr(),
                threshold,
                self.positions.data_ptr(),
                self.scores.data_ptr(),
                len(self.positions),
                counts.data_ptr(),
                torch.get_num_threads(),
            )
            if found >= 0:
                return self.positions[:found].clone(), self.scores[:found].clone(), counts
            self.positions = torch.empty(-found, dtype=torch.int32)  # every share of the rows fits now
            self.scores = torch.empty(-found, dtype=torch.float32)


@functools.cache
def _block_candidates_library() -> ctypes.CDLL | None:
    library = native_library("block_candidates")
    if library is not None:
        _declare(library)
    return library


def _declare(library: ctypes.CDLL) -> None:
    """``block_candidates``' C signature (block_candidates.c)."""
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.block_candidates.restype = size
    library.block_candidates.argtypes = [
        *(pointer, size, size, pointer, ctypes.c_float, pointer, ctypes.c_float),
        *(pointer, pointer, size, pointer, size),
    ]


def _at_least(
    block: torch.Tensor, bounds: float | torch.Tensor, mask: torch.Tensor, compared: torch.Tensor
) -> torch.Tensor:
    """``mask`` ← ``block`` [rows, n] ≥ ``bounds`` (a number, or one per column [n]), flat [rows · n] bool, through
    the float buffer ``compared`` (``COMPARE_CHUNK`` scores, whole rows at a time)."""
    rows, width = block.shape
    step = max(1, len(compared) // width)
    for start in range(0, rows, step):
        part = block[start : start + step]
        torch.ge(part, bounds, out=compared[: part.numel()].view(part.shape))
        mask[start * width : start * width + part.numel()].copy_(compared[: part.numel()])
    return mask[: rows * width]


def _true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices [n] of a contiguous bool mask's True entries: ``nonzero`` over its 8-byte words first,
    then over the bytes of the few words holding any (a sparse mask: 2.3× faster than over every byte)."""
    flat = mask.view(-1)
    if flat.numel() % 8:
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1)
    hits = flat.view(-1, 8).index_select(0, words).view(-1).nonzero().squeeze(1)
    return words.index_select(0, hits >> 3).mul_(8).add_(hits & 7)
