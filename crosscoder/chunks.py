"""The unit the activation stream and the on-disk cache exchange: token-level paired activations with the
token ids they came from, before batching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class ActivationChunk:
    """Kept tokens of a group of documents, in document order.

    activations: [tokens, n_sources, d_model] (source order as in the producing stream, 0 = base, 1 = chat);
    token_ids: [tokens] int64, the token each row was computed on;
    sequence_ids: [tokens] int64 or None, which sequence of the chunk each row belongs to (so contexts can be
    cut at document boundaries; the on-disk cache does not store it).
    """

    activations: torch.Tensor
    token_ids: torch.Tensor
    sequence_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.activations.dim() != 3 or self.token_ids.shape != self.activations.shape[:1]:
            raise ValueError(
                f"a chunk needs activations [tokens, n_sources, d_model] and token_ids [tokens], got "
                f"{list(self.activations.shape)} and {list(self.token_ids.shape)}"
            )


@runtime_checkable
class ChunkSource(Protocol):
    """Produces chunks deterministically; ``state_dict`` after a chunk is the position right after it."""

    def chunks(self) -> Iterator[ActivationChunk]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def description(self) -> dict[str, Any]:
        """What produced the activations (models, revisions, layers, dtype, filters): a cache refuses to mix
        chunks whose descriptions differ."""
        ...
