"""Paired activations generated from a known ("planted") sparse dictionary.

Shared latents write into both sources (with related but different directions), base-only latents only into
source 0 and chat-only latents only into source 1. Training on these batches and comparing the learned
decoder with the planted one checks the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PlantedDictionary:
    """A known sparse dictionary over two sources (0 = base, 1 = chat).

    directions: [n_latents, 2, d_model], rows of a source are zero where the latent does not exist there;
    latents are ordered shared, then base-only, then chat-only.
    """

    directions: torch.Tensor
    n_shared: int
    n_base_only: int
    n_chat_only: int
    active_per_token: float
    noise: float

    @classmethod
    def random(
        cls,
        d_model: int = 32,
        n_shared: int = 48,
        n_base_only: int = 8,
        n_chat_only: int = 8,
        active_per_token: float = 4.0,
        chat_drift: float = 0.3,
        noise: float = 0.01,
        seed: int = 0,
    ) -> PlantedDictionary:
        """Random unit directions; a shared latent's chat direction is its base direction plus ``chat_drift``
        of an independent direction (renormalised)."""
        generator = torch.Generator().manual_seed(seed)
        n_latents = n_shared + n_base_only + n_chat_only
        base = _unit(torch.randn(n_latents, d_model, generator=generator))
        chat = _unit(base + chat_drift * _unit(torch.randn(n_latents, d_model, generator=generator)))
        directions = torch.stack([base, chat], dim=1)
        directions[n_shared : n_shared + n_base_only, 1] = 0
        directions[n_shared + n_base_only :, 0] = 0
        return cls(directions, n_shared, n_base_only, n_chat_only, active_per_token, noise)

    @property
    def n_latents(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[-1]

    def sample(self, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
        """Paired activations [n_tokens, 2, d_model]: Bernoulli firing, magnitudes uniform in [0.5, 2]."""
        fire_probability = self.active_per_token / self.n_latents
        fires = torch.rand(n_tokens, self.n_latents, generator=generator) < fire_probability
        magnitudes = 0.5 + 1.5 * torch.rand(n_tokens, self.n_latents, generator=generator)
        codes = fires * magnitudes
        clean = torch.einsum("bj,jsd->bsd", codes, self.directions)
        return clean + self.noise * torch.randn(clean.shape, generator=generator)


class PlantedActivations:
    """Endless, resumable batches [batch_size, 2, d_model] from a ``PlantedDictionary``.

    Batch i depends only on (seed, i), so the position is just the batch counter. Data parallel: global batches
    of ``batch_size · world_size`` rows, of which process ``rank`` takes its ``batch_size``.
    """

    def __init__(
        self, planted: PlantedDictionary, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.planted = planted
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed = seed
        self.batch_index = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch_index)
            self.batch_index += 1
            batch = self.planted.sample(self.batch_size * self.world_size, generator)
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_index = int(state["batch_index"])


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True)
