"""What each latent writes into each model, read through that model's final norm and unembedding
(docs/methods.md §11.2).

A latent's direction in model m is its raw-space decoder row for m (``crosscoder.eval.directions``): a crosscoder's
base half is read by the base model, its chat half by the chat model; a difference SAE's one direction, pointing from
base to chat, by both. Its logits ``W_U · final_norm(d)`` (the logit lens of
``crosscoder.eval.adl.lens``) name the tokens the direction promotes (largest) and suppresses (smallest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crosscoder.dictionary import SparseDictionary
from crosscoder.eval.adl.lens import lens_logits
from crosscoder.eval.directions import decoder_directions
from crosscoder.progress import progress_bar


@dataclass(frozen=True)
class Readout:
    """Per latent the ``k`` promoted and suppressed token ids with their logits: each [n_latents, k]; ids are -1 for
    a latent with no decoder row in that model (a dedicated crosscoder's exclusive latent)."""

    promoted: torch.Tensor
    promoted_logits: torch.Tensor
    suppressed: torch.Tensor
    suppressed_logits: torch.Tensor


@torch.no_grad()
def unembedding_readout(
    dictionary: SparseDictionary,
    models: dict[str, nn.Module],
    latents: torch.Tensor | Sequence[int],
    *,
    k: int = 10,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Readout]:
    """The readout of ``latents`` through each of ``models`` (``{"base": …, "chat": …}``, either may be left out)."""
    ids = torch.as_tensor(latents, dtype=torch.long)
    result = {}
    for name, model in models.items():
        parts: list[tuple[torch.Tensor, ...]] = []
        starts = range(0, len(ids), batch_size)
        for start in progress_bar(starts, desc=f"unembedding readout ({name})", enabled=progress, unit="batch"):
            directions = decoder_directions(dictionary, ids[start : start + batch_size])[name]
            logits = lens_logits(model, directions)
            top = logits.topk(min(k, logits.shape[-1]), dim=-1)
            bottom = logits.topk(min(k, logits.shape[-1]), dim=-1, largest=False)
            absent = (directions.norm(dim=-1) == 0).cpu()[:, None]  # a latent with no decoder row in this model
            top_ids, bottom_ids = (ids.cpu().masked_fill(absent, -1) for ids in (top.indices, bottom.indices))
            parts.append((top_ids, top.values.cpu(), bottom_ids, bottom.values.cpu()))
        result[name] = Readout(*(torch.cat(column) for column in zip(*parts, strict=True)))
    return result
