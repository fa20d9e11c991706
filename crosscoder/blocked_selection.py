"""The training forward's BatchTopK without the whole ``[batch, dict_size]`` score matrix (CPU; docs/methods.md §4.2).

The encoder GEMM runs in blocks of ``ROW_BLOCK`` rows into one reused ``[ROW_BLOCK, dict_size]`` buffer. Of each
block only the scores ≥ a candidate bound β are kept (ascending flat indices, since the blocks go in row order), and
the dead latents' columns (AuxK ranks them). β is the previous step's threshold × ``CANDIDATE_MARGIN``; on a first
step in one process, a sample of rows estimates it (``SAMPLED_MARGIN`` lower). When at least ``k · B`` candidates
exist over all processes, ``batch_topk_among_candidates`` selects exactly what ``batch_topk`` selects on the whole
matrix; otherwise (β too high, or none on a distributed first step) the matrix is formed whole, block by block with
the same arithmetic, and selected in full: the same selection either way, tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder.distributed import Distributed
from crosscoder.kernels.batch_topk import (
    BatchTopKSelection,
    batch_topk,
    batch_topk_among_candidates,
    batch_topk_threshold,
    check_score_values,
)

CANDIDATE_MARGIN = 0.9
"""The next step's BatchTopK candidates are the scores ≥ 0.9 × this step's threshold: low enough that θ rarely drops
below it between steps (else the whole matrix is formed), high enough to leave a small fraction of the scores."""
SAMPLED_MARGIN = 0.8
"""A first step's bound: the threshold estimated on ``SAMPLE_ROWS`` rows, × 0.8 (the estimate is noisier)."""
SAMPLE_ROWS = 256
ROW_BLOCK = 256
"""Rows of the batch per block of the encoder GEMM: a [256, dict_size] block of scores at a time (16 MB at 16,384
latents)."""


class StepBuffers:
    """The large temporaries of a training step (a block of scores, the scaled encoder, the dead latents' columns,
    the whole score matrix when it must be formed), kept from one step to the next: on CPU a fresh allocation of that
    size is paged in (and zeroed by the kernel) on every step. Tensors a step returns (``TrainingOutput.scores``,
    ``dead_columns``) alias them and are overwritten by the next step."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.candidate_bound: float | None = None
        """A lower bound for the next BatchTopK selection's candidates: this step's threshold lowered by
        ``CANDIDATE_MARGIN`` (the selection is exact whatever it is)."""

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer ``name`` with this shape and ``like``'s dtype and device (allocated when they change)."""
        tensor = self._tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != like.dtype or tensor.device != like.device:
            tensor = self._tensors[name] = like.new_empty(shape)
        return tensor

    def release(self, name: str) -> None:
        """Free the buffer ``name`` (the whole score matrix after a step that needed it)."""
        self._tensors.pop(name, None)


@dataclass
class BlockedSelection:
    """What ``select_in_row_blocks`` returns: the selection, the kept entries' scores [n_kept] (CSR order), the
    whole scores [batch, dict_size] if they had to be formed (else None) and the dead latents' columns (their
    indices [n_dead] ascending and scores [batch, n_dead]; None when no latent is dead)."""

    selection: BatchTopKSelection
    kept_scores: torch.Tensor
    scores: torch.Tensor | None
    dead_columns: tuple[torch.Tensor, torch.Tensor] | None


@torch.no_grad()
def select_in_row_blocks(
    encoder_input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_keep: int,
    context: Distributed,
    buffers: StepBuffers,
    dead: torch.Tensor | None = None,
) -> BlockedSelection:
    """BatchTopK of the scores ``ReLU(encoder_input @ weight.T + bias)`` [batch, dict_size] (``weight``: the encoder
    scaled by the code norms, [dict_size, width]; ``bias`` [dict_size]), keeping the ``n_keep`` largest of the global
    batch (``context``'s all-reduce), with ``dead`` [dict_size] bool the latents whose columns to return."""
    batch, dict_size = encoder_input.shape[0], weight.shape[0]
    reduce = context.all_reduce if context.enabled else None
    ranks = {"rank": context.rank, "world_size": context.world_size}
    dead_latents = dead.nonzero().squeeze(1) if dead is not None and bool(dead.any()) else None
    dead_scores = None if dead_latents is None else buffers.get("dead_scores", (batch, len(dead_latents)), weight)
    bound = buffers.candidate_bound
    if bound is None and not context.enabled:  # every process must use the same bound: estimate it alone only
        bound = SAMPLED_MARGIN * _sampled_threshold(encoder_input, weight, bias, n_keep)
    found = None
    if bound is not None and bound > 0:
        candidates, candidate_scores = _blocks(encoder_input, weight, bias, buffers, dead_latents, dead_scores, bound)
        found = batch_topk_among_candidates(
            candidates, candidate_scores, n_keep, reduce, batch_size=batch, dict_size=dict_size, **ranks
        )
    scores = None
    if found is None:  # the whole matrix decides
        scores = buffers.get("scores", (batch, dict_size), weight)
        _blocks(encoder_input, weight, bias, buffers, dead_latents, dead_scores, None, whole=scores)
        selection = batch_topk(scores, n_keep, reduce, **ranks)  # checks the scores' values
        kept_scores = scores[selection.rows, selection.latents]
        buffers.release("scores")  # rarely needed: not kept between steps (the step's output holds it meanwhile)
    else:
        selection, positions = found
        kept_scores = candidate_scores[positions]
    buffers.candidate_bound = CANDIDATE_MARGIN * float(selection.threshold)
    dead_columns = None if dead_latents is None else (dead_latents, dead_scores)
    return BlockedSelection(selection, kept_scores, scores, dead_columns)


def _blocks(
    encoder_input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    buffers: StepBuffers,
    dead_latents: torch.Tensor | None,
    dead_scores: torch.Tensor | None,
    bound: float | None,
    whole: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the blocked GEMM: each block's scores ≥ ``bound`` (ascending flat indices [n] and scores [n];
    empty without a bound), its dead columns into ``dead_scores``, and, given ``whole``, the block copied into it."""
    batch, dict_size = encoder_input.shape[0], weight.shape[0]
    block = buffers.get("score_block", (min(ROW_BLOCK, batch) * dict_size,), weight)
    indices, values = [], []
    for start in range(0, batch, ROW_BLOCK):
        stop = min(batch, start + ROW_BLOCK)
        scores = block[: (stop - start) * dict_size].view(stop - start, dict_size)
        torch.addmm(bias, encoder_input[start:stop], weight.T, out=scores).relu_()
        if bound is not None:
            check_score_values(scores.view(-1))
            flat = (scores >= bound).view(-1).nonzero().squeeze(1)
            values.append(scores.view(-1)[flat])
            indices.append(flat + start * dict_size)
        if dead_scores is not None:
            torch.index_select(scores, 1, dead_latents, out=dead_scores[start:stop])
        if whole is not None:
            whole[start:stop].copy_(scores)
    if not indices:
        empty = encoder_input.new_zeros(0)
        return empty.long(), empty
    return torch.cat(indices), torch.cat(values)


def _sampled_threshold(encoder_input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_keep: int) -> float:
    """The BatchTopK threshold of ``SAMPLE_ROWS`` evenly spaced rows with the batch's budget per row."""
    batch = encoder_input.shape[0]
    stride = max(1, batch // SAMPLE_ROWS)
    sample = encoder_input[::stride]
    scores = torch.addmm(bias, sample, weight.T).relu_()
    per_row = n_keep / batch
    return float(batch_topk_threshold(scores, max(1, round(per_row * sample.shape[0]))).value)
