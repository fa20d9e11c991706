"""Top-activating contexts per latent, streamed with bounded memory (docs/methods.md §9).

``TopContexts`` keeps, for each latent of a chosen set, the ``n_top`` strongest activations seen so far with a
window of token ids around each (cut at sequence boundaries) and the latent's activation on every token of the
window, so a dashboard can highlight it. Memory is O(n_latents · n_top · window), whatever the stream length.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from crosscoder.chunks import ActivationChunk
from crosscoder.dictionary import SparseDictionary
from crosscoder.errors import ConfigError, DataError
from crosscoder.progress import progress_bar

PAD = -1


@dataclass(frozen=True)
class Example:
    """One top-activating token of a latent: its activation, the window of token ids around it (``PAD``
    outside the sequence), the latent's activation on each window token, and the token's index in the window."""

    activation: float
    token_ids: list[int]
    activations: list[float]
    center: int


class TopContexts:
    """Running top-``n_top`` activations of ``latents`` with context windows ``before`` + 1 + ``after`` tokens."""

    def __init__(self, latents: torch.Tensor | list[int], n_top: int = 10, before: int = 12, after: int = 4) -> None:
        self.latents = torch.as_tensor(latents, dtype=torch.long)
        if self.latents.numel() == 0:
            raise ConfigError("the latent set is empty: name at least one latent to inspect")
        self.n_top, self.before, self.after = n_top, before, after
        width = before + 1 + after
        n = len(self.latents)
        self.values = torch.full((n, n_top), float("-inf"))
        self.window_ids = torch.full((n, n_top, width), PAD, dtype=torch.long)
        self.window_activations = torch.zeros(n, n_top, width)

    def update(self, codes: torch.Tensor, token_ids: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> None:
        """codes: [tokens, n_latents] activations of the chosen latents on consecutive tokens of a chunk;
        token_ids, sequence_ids: [tokens] (sequence_ids None = one sequence)."""
        codes = codes.detach().float().cpu()
        tokens = codes.shape[0]
        if tokens == 0:
            return
        sequence_ids = torch.zeros(tokens, dtype=torch.long) if sequence_ids is None else sequence_ids.cpu()
        offsets = torch.arange(-self.before, self.after + 1)
        positions = torch.arange(tokens)[:, None] + offsets  # [tokens, width]
        inside = (positions >= 0) & (positions < tokens)
        clipped = positions.clamp(0, tokens - 1)
        inside &= sequence_ids[clipped] == sequence_ids[:, None]

        merged = torch.cat([self.values, codes.T], dim=1)  # [n, n_top + tokens]
        best, chosen = merged.topk(self.n_top, dim=1)
        new = chosen >= self.n_top
        token = (chosen - self.n_top).clamp_min(0)  # [n, n_top]
        windows = clipped[token]  # [n, n_top, width]
        window_inside = inside[token]
        new_ids = torch.where(window_inside, token_ids.cpu()[windows], PAD)
        latent_index = torch.arange(len(self.latents))[:, None, None].expand_as(windows)
        new_activations = torch.where(window_inside, codes[windows, latent_index], 0.0)
        old = chosen.clamp_max(self.n_top - 1)
        keep_old = ~new[..., None]
        gather = old[..., None].expand_as(windows)
        self.window_ids = torch.where(keep_old, self.window_ids.gather(1, gather), new_ids)
        self.window_activations = torch.where(keep_old, self.window_activations.gather(1, gather), new_activations)
        self.values = best

    def examples(self) -> dict[int, list[Example]]:
        """Per latent id, its examples (strongest first; only activations > 0)."""
        result = {}
        for row, latent in enumerate(self.latents.tolist()):
            result[latent] = [
                Example(
                    value, self.window_ids[row, slot].tolist(), self.window_activations[row, slot].tolist(), self.before
                )
                for slot, value in enumerate(self.values[row].tolist())
                if value > 0
            ]
        return result


@torch.no_grad()
def top_contexts(
    dictionary: SparseDictionary,
    chunks: Iterable[ActivationChunk],
    latents: torch.Tensor | list[int],
    *,
    n_top: int = 10,
    before: int = 12,
    after: int = 4,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[int, list[Example]]:
    """Top-activating contexts of ``latents`` over chunks of paired activations (inference threshold)."""
    contexts = TopContexts(latents, n_top, before, after)
    bad = contexts.latents[(contexts.latents < 0) | (contexts.latents >= dictionary.dict_size)]
    if bad.numel():
        raise ConfigError(f"latent ids {bad[:10].tolist()} are out of range for {dictionary.dict_size} latents")
    seen = 0
    for chunk in progress_bar(chunks, desc="top contexts", enabled=progress, unit="chunk"):
        x = chunk.activations.to(dictionary.b_dec.device)
        codes = dictionary.encode(dictionary.input_from_pair(x).float(), use_threshold=True)[
            :, contexts.latents.to(x.device)
        ]
        contexts.update(codes, chunk.token_ids, chunk.sequence_ids)
        seen += len(chunk.token_ids)
        if max_tokens is not None and seen >= max_tokens:
            break
    if seen == 0:
        raise DataError("no tokens to inspect: the chunks are empty (did filtering drop every token?)")
    return contexts.examples()
