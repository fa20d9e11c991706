"""Reconstruction quality on held-out activations, in raw activation space, with the inference threshold."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from crosscoder.dictionary import SparseDictionary
from crosscoder.errors import DataError
from crosscoder.metrics import ReconstructionStats, active_counts
from crosscoder.progress import progress_bar

RARE_FREQUENCY = 1e-4


@dataclass(frozen=True)
class Reconstruction:
    """FVE (total and per source), L0, and latent firing frequencies [dict_size] over ``tokens`` tokens."""

    fve: float
    fve_per_source: list[float]
    l0: float
    frequencies: torch.Tensor
    tokens: int

    @property
    def dead_fraction(self) -> float:
        """Latents that never fired."""
        return float((self.frequencies == 0).double().mean())

    @property
    def rare_fraction(self) -> float:
        """Latents that fired, but on fewer than ``RARE_FREQUENCY`` of the tokens."""
        return float(((self.frequencies > 0) & (self.frequencies < RARE_FREQUENCY)).double().mean())

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "fve": self.fve,
            "fve_per_source": self.fve_per_source,
            "l0": self.l0,
            "tokens": self.tokens,
            "dead_fraction": self.dead_fraction,
            "rare_fraction": self.rare_fraction,
        }


@torch.no_grad()
def reconstruction(
    dictionary: SparseDictionary, batches: Iterable[torch.Tensor], *, progress: bool = False
) -> Reconstruction:
    """Evaluate a dictionary on raw batches (crosscoders: [batch, n_sources, d_model]; SAEs: their own input)."""
    stats = ReconstructionStats()
    for x in progress_bar(batches, desc="reconstruction", enabled=progress, unit="batch"):
        x = x.to(dictionary.b_dec.device).float()
        codes = dictionary.encode(x, use_threshold=True)
        stats.update(dictionary.as_sources(x), dictionary.as_sources(dictionary.decode(codes)), active_counts(codes))
    if stats.tokens == 0:
        raise DataError("no activations were given: the batches are empty (did filtering drop every token?)")
    return Reconstruction(
        float(stats.fve()),
        [float(v) for v in stats.fve_per_source()],
        float(stats.l0()),
        stats.latent_frequencies().float().cpu(),
        stats.tokens,
    )
