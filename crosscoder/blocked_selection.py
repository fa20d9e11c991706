"""The training forward's BatchTopK without the whole ``[batch, dict_size]`` score matrix (CPU; docs/methods.md §4.2).

The encoder GEMM runs in blocks of latents (``latents_per_block``: ``BLOCK_ENTRIES`` products each) into one reused
``[batch, block]`` buffer of products ``x @ W_enc.T``. Of each block only the scores ``ReLU(pre) · c ≥`` a candidate
bound β are kept — the pre-activations (the products plus the bias, added by the scan as it reads them:
``pre_activations``' floats) compared with a per-latent bound just under β / c_j, and only those that pass scaled into
scores and compared with β (``crosscoder.kernels.block_candidates``: a C scan of each block on CPU) — and the dead
latents' columns (AuxK ranks them); a counting sort by row puts the candidates in ascending flat order. β is the
previous step's threshold × ``CANDIDATE_MARGIN``; on a first step in one process, a sample of rows estimates it
(``SAMPLED_MARGIN`` lower). When at least ``k · B`` candidates exist over all processes, ``batch_topk_among_candidates``
selects exactly what ``batch_topk`` selects on the whole matrix; otherwise (β too high, or none on a distributed first
step) the matrix is formed whole, block by block with the same arithmetic, and selected in full: the same selection
either way, tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from crosscoder.distributed import Distributed
from crosscoder.kernels.batch_topk import (
    BatchTopKSelection,
    batch_topk,
    batch_topk_among_candidates,
    check_score_values,
    radix_histogram,
    threshold_floor,
)
from crosscoder.kernels.block_candidates import CandidateScan, scores_from_pre_activations
from crosscoder.kernels.sparse_encoder import pre_activations
from crosscoder.step_buffers import StepBuffers

CANDIDATE_MARGIN = 0.9
"""The next step's BatchTopK candidates are the scores ≥ 0.9 × this step's threshold: low enough that θ rarely drops
below it between steps (else the whole matrix is formed), high enough to leave a small fraction of the scores."""
SAMPLED_MARGIN = 0.8
"""A first step's bound: the threshold estimated on ``SAMPLE_ROWS`` rows, × 0.8 (the estimate is noisier)."""
SAMPLE_ROWS = 256
SAMPLE_DIGIT_BITS = 15
"""The sampled threshold's resolution: the radix key's first 15 bits (exponent and 7 mantissa bits)."""
BLOCK_ENTRIES = 1 << 21
"""Products per block of the encoder GEMM (8 MB of float32): 512 latents at a batch of 4,096, 2,048 at the paper's
1,024. On the development CPU the blocked GEMM is as fast as the whole one; blocks of 256 latents at a batch of 4,096
were 20% slower, and at a batch of 1,024 (d = 2,304, F = 73,728) 144 blocks of 512 latents took 1,261 ms against
1,224 ms for 36 of 2,048 (the whole GEMM: 1,241 ms), the diff-SAE step 1.50× and 1.72× its floor (medians of two
runs) against 1.44× and 1.49× (docs/methods.md §4.2)."""


def latents_per_block(batch: int, dict_size: int) -> int:
    """The latents of one block of the encoder GEMM for ``batch`` rows: ``BLOCK_ENTRIES`` products, at least one
    latent, at most all."""
    return max(1, min(dict_size, BLOCK_ENTRIES // max(1, batch)))


@dataclass
class BlockedSelection:
    """What ``select_in_latent_blocks`` returns: the selection, the kept entries' scores [n_kept] (CSR order), the
    whole scores [batch, dict_size] if they had to be formed (else None) and the dead latents' columns (their
    indices [n_dead] ascending and scores [batch, n_dead]; None when no latent is dead)."""

    selection: BatchTopKSelection
    kept_scores: torch.Tensor
    scores: torch.Tensor | None
    dead_columns: tuple[torch.Tensor, torch.Tensor] | None


@torch.no_grad()
def select_in_latent_blocks(
    encoder_input: torch.Tensor,
    encoder: torch.Tensor,
    encoder_bias: torch.Tensor,
    code_norms: torch.Tensor | None,
    n_keep: int,
    context: Distributed,
    buffers: StepBuffers,
    dead: torch.Tensor | None = None,
) -> BlockedSelection:
    """BatchTopK of the scores ``f · c = ReLU(encoder_input @ encoder.T + encoder_bias) · c`` [batch, dict_size]
    (``encoder`` [dict_size, width], ``encoder_bias`` and ``code_norms`` c [dict_size]; c None: c ≡ 1), keeping the
    ``n_keep`` largest of the global batch (``context``'s all-reduce), with ``dead`` [dict_size] bool the latents
    whose columns to return."""
    batch, dict_size = encoder_input.shape[0], encoder.shape[0]
    blocks = _ScoreBlocks(encoder, encoder_bias, code_norms)
    reduce = context.all_reduce if context.enabled else None
    ranks = {"rank": context.rank, "world_size": context.world_size}
    dead_latents = dead.nonzero().squeeze(1) if dead is not None and bool(dead.any()) else None
    dead_scores = None if dead_latents is None else buffers.get("dead_scores", (batch, len(dead_latents)), encoder)
    bound = buffers.candidate_bound
    if bound is None and not context.enabled:  # every process must use the same bound: estimate it alone only
        bound = SAMPLED_MARGIN * _sampled_threshold(encoder_input, blocks, n_keep)
    found = None
    if bound is not None and bound > 0:
        candidates, candidate_scores = _candidates(encoder_input, blocks, dead_latents, dead_scores, bound)
        found = batch_topk_among_candidates(
            candidates, candidate_scores, n_keep, reduce, batch_size=batch, dict_size=dict_size, **ranks
        )
    scores = None
    if found is None:  # the whole matrix decides
        scores = buffers.get("scores", (batch, dict_size), encoder)
        for latents, block in blocks(encoder_input, with_bias=True):
            _keep_dead_columns(block, latents, dead_latents, dead_scores)
            scores[:, latents].copy_(blocks.scores(block, latents))
        if dead_scores is not None:
            blocks.scores(dead_scores, dead_latents)
        selection = batch_topk(scores, n_keep, reduce, **ranks)  # checks the scores' values
        kept_scores = scores[selection.rows, selection.latents]
        buffers.release("scores")  # rarely needed: not kept between steps (the step's output holds it meanwhile)
    else:
        selection, kept_scores = found
    buffers.candidate_bound = CANDIDATE_MARGIN * float(selection.threshold)
    dead_columns = None if dead_latents is None else (dead_latents, dead_scores)
    return BlockedSelection(selection, kept_scores, scores, dead_columns)


class _ScoreBlocks:
    """The encoder's pre-activations ``x @ encoder.T + encoder_bias`` (or the products alone, for a scan that adds the
    bias) one block of latents at a time (``latents_per_block`` for the rows, unless a pass says),
    into one buffer reused for every block of one pass, and the scores ``ReLU(pre) · c`` formed from them (``scores``):
    the code norms scale the scores, not the encoder's rows, so no scaled copy of the encoder is read or written (at
    the paper's width, d = 2 × 2,304 and a batch of 1,024, scaling each block's rows took 107 ms a step). The buffer
    is freed when the pass ends, not kept for the next step: held through the rest of the step it would add to its
    peak."""

    def __init__(self, encoder: torch.Tensor, encoder_bias: torch.Tensor, code_norms: torch.Tensor | None) -> None:
        self.encoder, self.bias, self.code_norms = encoder, encoder_bias, code_norms

    def provably_finite(self, x: torch.Tensor) -> bool:
        """Whether no score on ``x`` [batch, width] can be NaN or ±inf: ``max|bias| + width · max(1, max|x|) ·
        max|encoder|``, which bounds every pre-activation, product and partial sum of the GEMM, times ``max(1,
        max|c|)``, which then bounds every score, is under half the dtype's maximum (rounding adds far less). Then
        the scores need no check of their own."""

        def largest(t: torch.Tensor) -> float:
            low, high = torch.aminmax(t)
            return max(-float(low), float(high))

        inputs = largest(x)
        bound = largest(self.bias) + x.shape[1] * (1.0 if inputs <= 1.0 else inputs) * largest(self.encoder)
        if self.code_norms is not None:
            scale = largest(self.code_norms)
            bound *= 1.0 if scale <= 1.0 else scale  # NaN stays NaN
        return math.isfinite(bound) and bound < torch.finfo(self.encoder.dtype).max / 2

    def __call__(
        self, x: torch.Tensor, with_bias: bool, size: int | None = None
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """For each block of ``size`` latents (default: ``latents_per_block`` for ``x``'s rows): its latents (a slice)
        and its pre-activations [batch, block size] (``pre_activations``' floats), or without ``with_bias`` the
        products ``x @ encoder.T`` only, which the candidates' scan adds the bias to (overwritten by the next
        block)."""
        dict_size = self.encoder.shape[0]
        size = size or latents_per_block(x.shape[0], dict_size)
        buffer = self.encoder.new_empty(x.shape[0] * size)
        for start in range(0, dict_size, size):
            latents = slice(start, min(dict_size, start + size))
            block = buffer[: x.shape[0] * (latents.stop - start)].view(x.shape[0], latents.stop - start)
            if with_bias:
                yield latents, pre_activations(x, self.encoder[latents], self.bias[latents], out=block)
            else:
                yield latents, torch.mm(x, self.encoder[latents].T, out=block)

    def scores(self, pre: torch.Tensor, latents: slice | torch.Tensor) -> torch.Tensor:
        """``ReLU(pre) · c`` of pre-activations [rows, n] of ``latents``, in place (returned)."""
        return scores_from_pre_activations(pre, None if self.code_norms is None else self.code_norms[latents])

    def candidate_bounds(self, latents: slice, bound: float) -> float | torch.Tensor:
        """For each of ``latents``, a bound on its pre-activations that every score ≥ ``bound`` > 0 meets: ``bound``
        itself with c ≡ 1, else ``bound / c_j`` lowered by 4 ε (relative; ε the dtype's machine epsilon, 2⁻²³ in
        float32), more than the rounding of the score's product, of the division and of the lowering can take away
        (3 units of ε / 2); [n], inf where c_j = 0."""
        if self.code_norms is None:
            return bound
        return (bound / self.code_norms[latents]).mul_(1 - 4 * torch.finfo(self.code_norms.dtype).eps)


def _candidates(
    encoder_input: torch.Tensor,
    blocks: _ScoreBlocks,
    dead_latents: torch.Tensor | None,
    dead_scores: torch.Tensor | None,
    bound: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the blocked GEMM: the scores ≥ ``bound`` > 0 (ascending flat indices [n] and scores [n]), the dead
    latents' columns written into ``dead_scores``. Each block's pre-activations are compared with each latent's
    ``candidate_bounds`` (no ReLU, no scaling: a score ≥ ``bound`` > 0 has a positive pre-activation above its
    latent's bound), and only the few that pass are scaled into scores and kept if those are ≥ ``bound``."""
    batch, dict_size = encoder_input.shape[0], blocks.encoder.shape[0]
    block_size = latents_per_block(batch, dict_size)
    # one scan for every block: fresh buffers per block would be paged in afresh each time
    scan = CandidateScan(batch, block_size, blocks.encoder)
    # where the scan does not look for values that are not finite: a proof that there are none, which reads the input
    # and the encoder once, or where the encoder is larger than the batch of scores (a wide input), each block's sum
    checked = not scan.sees_non_finite and (encoder_input.shape[1] > batch or not blocks.provably_finite(encoder_input))
    for block_latents, block in blocks(encoder_input, with_bias=False):
        code_norms = None if blocks.code_norms is None else blocks.code_norms[block_latents]
        bounds = blocks.candidate_bounds(block_latents, bound)
        bias = blocks.bias[block_latents]
        _keep_dead_columns(block, block_latents, dead_latents, dead_scores)  # products: their bias is added below
        scores, non_finite = scan(block, block_latents.start, bounds, code_norms, bound, bias)
        if checked or non_finite:
            _check_finite(scan.scanned_pre_activations(block, bias).view(-1))
            check_score_values(scores)  # a finite pre-activation times c may still overflow
    if dead_scores is not None:
        blocks.scores(dead_scores.add_(blocks.bias[dead_latents]), dead_latents)
    del block  # the last block too: before the merged candidates are allocated
    return scan.candidates(dict_size)


def _check_finite(scores: torch.Tensor) -> None:
    """``check_score_values`` of ReLU(``scores``) [n] (pre-activations), with a pass over them only when their sum is
    not finite (NaN or ±inf among them, or an overflow): one reduction instead of a ReLU and a min-max. (A bias of −inf
    is a score of 0, as ``batch_topk`` sees it after the ReLU.)"""
    if not math.isfinite(float(scores.sum(dtype=torch.float32))):
        check_score_values(torch.relu(scores))


def _keep_dead_columns(
    block: torch.Tensor, latents: slice, dead_latents: torch.Tensor | None, dead_scores: torch.Tensor | None
) -> None:
    """Copy the dead latents' columns of one block of scores [batch, block size] into ``dead_scores``."""
    if dead_latents is None or dead_scores is None:
        return
    first, last = torch.searchsorted(dead_latents, torch.tensor([latents.start, latents.stop])).tolist()
    if last > first:
        dead_scores[:, first:last] = block[:, dead_latents[first:last] - latents.start]


def _sampled_threshold(encoder_input: torch.Tensor, blocks: _ScoreBlocks, n_keep: int) -> float:
    """The BatchTopK threshold of ``SAMPLE_ROWS`` evenly spaced rows with the batch's budget per row, rounded down to
    its radix bucket (``threshold_floor``: under 1% lower) from the histograms of their scores block by block, so that
    the sample's scores [SAMPLE_ROWS, dict_size] are never held whole: at ``B = 4,096``, ``F = 16,384`` they, their
    block of products and MKL's buffers for it held 36 MB, the first step's largest temporaries (docs/methods.md
    §4.2)."""
    batch = encoder_input.shape[0]
    sample = encoder_input[:: max(1, batch // SAMPLE_ROWS)].contiguous()
    counts = torch.zeros(1 << SAMPLE_DIGIT_BITS, dtype=torch.int64, device=sample.device)
    # the batch's blocks, not the sample's: wider ones grew MKL's GEMM buffers to 12 MB, the step's largest temporary
    for latents, block in blocks(sample, with_bias=True, size=latents_per_block(batch, blocks.encoder.shape[0])):
        counts += radix_histogram(blocks.scores(block, latents), 0, 0, SAMPLE_DIGIT_BITS)
    per_row = n_keep / batch
    return threshold_floor(counts, max(1, round(per_row * sample.shape[0])))
