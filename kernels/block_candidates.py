"""The CPU training forward's BatchTopK candidates, block by block of latents (``crosscoder.blocked_selection``;
docs/methods.md §4.2).

For a block [rows, width] of encoder pre-activations ``pre`` (or of the products ``x @ W_enc.T``, with the block's
biases [width], which the scan adds: ``pre = product + bias``, one float sum each), per-column bounds (or one
number), the block's code norms c [width] (None: c ≡ 1) and a threshold t > 0, the candidates are the entries with
``pre ≥ bound`` and ``score = ReLU(pre) · c ≥ t``. A pass scans its blocks as they come and then merges their
candidates into the whole [rows, dict_size] matrix's row-major order (flat indices and scores).

Two implementations: the C kernels of ``block_candidates.c`` (float32 on CPU: one pass over each block with
AVX-512 compares, torch's threads on shares of its rows; a counting sort by row in one pass; compiled by
``native``), used unless the kernel backend is ``"reference"`` or no C compiler is at hand, and the plain-PyTorch
reference below; the tests compare them.
"""

from __future__ import annotations

import ctypes

import torch

from crosscoder.kernels.backend import c_kernel_allowed
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
    """One pass over the encoder's blocks of latents: scans each block [rows, ≤ width] as it comes (``__call__``),
    keeps its candidates, and merges them at the end (``candidates``); its buffers are reused between blocks and
    freed with it. ``native``: whether the C kernels run; ``sees_non_finite``: whether a scan reports NaN and +inf
    pre-activations and infinite scores (the C scan does, at no cost; the reference does not look)."""

    def __init__(self, rows: int, width: int, like: torch.Tensor) -> None:
        self.rows, self.width = rows, width
        self.position_dtype = torch.int32 if rows * width < 2**31 else torch.int64
        self.library = None
        if c_kernel_allowed(like.device) and like.dtype == torch.float32 and self.position_dtype == torch.int32:
            self.library = _block_candidates_library()
        self.native = self.sees_non_finite = self.library is not None
        if self.native:
            self.positions = torch.empty(max(1, rows * width // INITIAL_CAPACITY_SHARE), dtype=torch.int32)
            self.scores = torch.empty(len(self.positions), dtype=torch.float32)
        else:
            self.mask = torch.empty(rows * width, dtype=torch.bool, device=like.device)
            self.compared = like.new_empty(max(min(COMPARE_CHUNK, rows * width), width))
        # each block's first latent, width, candidates' positions (int32 where they fit: half the memory of flat
        # indices while the blocks are scanned) and scores, and their count in each row
        self.blocks: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.ended = False

    def __call__(
        self,
        block: torch.Tensor,
        first_latent: int,
        bounds: float | torch.Tensor,
        code_norms: torch.Tensor | None,
        threshold: float,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Scan ``block`` [rows, width] (contiguous) of the latents from ``first_latent`` on, after the blocks before
        it (ascending latents). ``bounds``: a number or [width]; ``code_norms``: [width] or None; ``threshold`` > 0
        (a score ≥ it has a pre-activation ≥ its bound: the bounds are the caller's promise); ``bias``: [width] or
        None, added to the block's values to form the pre-activations (one float sum each: the C scan adds it as it
        reads them, the reference into the block). Returns the block's candidates' scores [n] and whether the scan
        saw a NaN or +inf pre-activation or an infinite score (always False where it does not look,
        ``sees_non_finite``)."""
        if self.ended:
            raise RuntimeError("this scan's pass has ended (candidates() was called): start a new CandidateScan")
        if block.dim() != 2 or block.shape[0] != self.rows or block.shape[1] > self.width:
            raise ValueError(
                f"block has shape {list(block.shape)} but the scan was made for [{self.rows}, ≤ {self.width}]"
            )
        if self.native:
            positions, scores, counts, non_finite = self._native(block, bounds, code_norms, threshold, bias)
        else:
            positions, scores, counts = self._reference(
                block if bias is None else block.add_(bias), bounds, code_norms, threshold
            )
            non_finite = False
        self.blocks.append((first_latent, block.shape[1], positions, scores, counts))
        return scores, non_finite

    def scanned_pre_activations(self, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The pre-activations of a block this scan has just scanned with ``bias``, in the block (returned): the
        reference added the bias there already, the C scan only read it."""
        return block.add_(bias) if self.native and bias is not None else block

    def candidates(self, dict_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every scanned block's candidates in the row-major order of the whole [rows, dict_size] matrix: flat
        indices (int64) [n] and scores [n]. Ends the pass: the scan's buffers are released first."""
        blocks, self.blocks, self.ended = self.blocks, [], True
        for name in ("positions", "scores", "mask", "compared"):
            self.__dict__.pop(name, None)
        if self.native:
            return self._merged_native(blocks, dict_size)
        return _merged_reference(blocks, self.rows, dict_size)

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

    def _native(self, block, bounds, code_norms, threshold, bias):
        rows, width = block.shape
        if not block.is_contiguous():
            raise ValueError(f"block has strides {block.stride()}: the kernel reads a contiguous [rows, width] block")
        per_column = isinstance(bounds, torch.Tensor)
        for name, tensor, shape in (
            ("block", block, (rows, width)),
            ("bounds", bounds if per_column else None, (width,)),
            ("code_norms", code_norms, (width,)),
            ("bias", bias, (width,)),
        ):
            if tensor is not None and (tensor.shape != shape or tensor.dtype != torch.float32 or tensor.is_cuda):
                raise ValueError(
                    f"{name} has shape {list(tensor.shape)}, dtype {tensor.dtype} on {tensor.device}: the C scan "
                    f"reads {list(shape)} float32 on the CPU"
                )
        scalar_bound = 0.0 if per_column else float(bounds)
        bounds = bounds.contiguous() if per_column else None
        code_norms, bias = (None if t is None else t.contiguous() for t in (code_norms, bias))
        counts = torch.empty(rows, dtype=torch.int64)
        non_finite = ctypes.c_int32(0)
        while True:
            found = self.library.block_candidates(
                block.data_ptr(),
                None if bias is None else bias.data_ptr(),
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
                ctypes.byref(non_finite),
            )
            if found >= 0:
                return self.positions[:found].clone(), self.scores[:found].clone(), counts, bool(non_finite.value)
            self.positions = torch.empty(-found, dtype=torch.int32)  # every share of the rows fits now
            self.scores = torch.empty(-found, dtype=torch.float32)

    def _merged_native(self, blocks, dict_size):
        counts = torch.stack([block[4] for block in blocks])  # [n_blocks, rows]; becomes where each block's rows start
        columns = [torch.tensor([block[i] for block in blocks], dtype=torch.int64) for i in (0, 1)]
        sizes = torch.tensor([len(block[2]) for block in blocks], dtype=torch.int64)
        addresses = [torch.tensor([block[i].data_ptr() for block in blocks], dtype=torch.int64) for i in (2, 3)]
        total = int(sizes.sum())
        flat_indices = torch.empty(total, dtype=torch.int64)
        scores = torch.empty(total, dtype=torch.float32)
        merged = self.library.merge_candidates(
            len(blocks),
            *(tensor.data_ptr() for tensor in (*columns, sizes, *addresses, counts)),
            self.rows,
            dict_size,
            flat_indices.data_ptr(),
            scores.data_ptr(),
            torch.get_num_threads(),
        )
        assert merged == total
        return flat_indices, scores


def _merged_reference(blocks, rows: int, dict_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``CandidateScan.candidates`` in torch ops: a counting sort by row into row-major order over the whole matrix
    (the blocks cover ascending latents and each block's candidates are row-major, so row r's candidates of block j
    follow its candidates of the blocks before j); each block's lists freed as they are placed."""
    counts = torch.stack([block[4] for block in blocks])  # [n_blocks, rows]
    by_row = counts.T.reshape(-1)  # (row, block) in row-major order
    first_in_matrix = (by_row.cumsum(0) - by_row).view(rows, len(blocks)).T  # [n_blocks, rows]
    shifts = first_in_matrix - (counts.cumsum(1) - counts)  # minus where each row starts within its block
    like = blocks[0][3]
    flat_indices = torch.empty(int(by_row.sum()), dtype=torch.long, device=like.device)
    candidate_scores = torch.empty(len(flat_indices), dtype=like.dtype, device=like.device)
    for j in reversed(range(len(blocks))):
        first_latent, width, within, block_scores, _ = blocks.pop()
        within = within.long()
        block_rows = within.div(width, rounding_mode="floor")
        destinations = shifts[j].index_select(0, block_rows)
        destinations += torch.arange(len(within), device=destinations.device)
        # flat index in the whole matrix: row · dict_size + the block's first latent + column
        flat_indices.index_copy_(0, destinations, block_rows.mul_(dict_size - width).add_(within).add_(first_latent))
        candidate_scores.index_copy_(0, destinations, block_scores)
    return flat_indices, candidate_scores


_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = (
    (
        "block_candidates",
        _SIZE,
        (
            *(_POINTER, _POINTER, _SIZE, _SIZE, _POINTER, ctypes.c_float, _POINTER, ctypes.c_float, _POINTER),
            _POINTER,
            *(_SIZE, _POINTER, _SIZE, ctypes.POINTER(ctypes.c_int32)),
        ),
    ),
    ("merge_candidates", _SIZE, (_SIZE, *(_POINTER,) * 6, _SIZE, _SIZE, _POINTER, _POINTER, _SIZE)),
)
"""``block_candidates.c``'s functions as ``ctypes`` declares them."""


def _block_candidates_library() -> ctypes.CDLL | None:
    return native_library("block_candidates", SIGNATURES)


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
