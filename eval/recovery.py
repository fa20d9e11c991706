"""How much of a planted dictionary a trained one found (docs/methods.md §5): the pipeline's self-check on
synthetic data, where the true latents are known."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosscoder.dictionary import SparseDictionary
from crosscoder.synthetic import PlantedDictionary

RECOVERED_COSINE = 0.9


@dataclass(frozen=True)
class Recovery:
    """best_cosines: [n_planted] the largest cosine between each planted latent and any learned decoder direction;
    best_latents: [n_planted] the learned latent that reaches it."""

    best_cosines: torch.Tensor
    best_latents: torch.Tensor
    min_cosine: float

    @property
    def recovered(self) -> int:
        return int((self.best_cosines > self.min_cosine).sum())

    @property
    def fraction(self) -> float:
        return self.recovered / self.best_cosines.numel()

    def describe(self) -> str:
        return (
            f"recovered {self.recovered} of {self.best_cosines.numel()} planted latents ({self.fraction:.1%}; "
            f"max decoder cosine > {self.min_cosine})"
        )


@torch.no_grad()
def planted_recovery(
    dictionary: SparseDictionary, planted: PlantedDictionary, min_cosine: float = RECOVERED_COSINE
) -> Recovery:
    """For each planted latent, its best cosine with the learned decoder directions, both as the dictionary's input
    sees them (the pair for a crosscoder, e.g. chat − base for a diff-SAE) and in raw activation space (the
    dictionary's normalisation undone: ``W_dec[j, s] / input_scale[s]``)."""
    truth = dictionary.input_from_pair(planted.directions.to(dictionary.W_dec))  # [n, n_sources, d] or [n, d]
    truth = F.normalize(truth.reshape(planted.n_latents, -1), dim=-1)
    learned = dictionary.W_dec / dictionary.input_scale[None, :, None]  # [dict_size, n_sources, d]
    learned = F.normalize(learned.flatten(1), dim=-1)
    best = (truth @ learned.T).max(dim=1)
    return Recovery(best.values.cpu(), best.indices.cpu(), min_cosine)
