"""How much of a planted dictionary a trained one found (docs/methods.md §5), and how well its exclusive latents
match the planted exclusive ones (§12.3): the pipeline's self-check on synthetic data, where the true latents are
known."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosscoder.dictionary import SparseDictionary
from crosscoder.eval.exclusivity import BASE_ONLY, CHAT_ONLY, latent_classes, relative_norm_difference
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
    truth = dictionary.input_from_pair(planted.directions.to(dictionary.b_dec))  # [n, n_sources, d] or [n, d]
    truth = F.normalize(truth.reshape(planted.n_latents, -1), dim=-1)
    learned = dictionary.W_dec / dictionary.input_scale[None, :, None]  # [dict_size, n_sources, d]
    learned = F.normalize(learned.flatten(1), dim=-1)
    best = (truth @ learned.T).max(dim=1)
    return Recovery(best.values.cpu(), best.indices.cpu(), min_cosine)


@dataclass(frozen=True)
class ExclusiveRecovery:
    """How well a crosscoder's exclusive latents match the planted exclusive ones (``exclusive_recovery``).

    found: planted base-only and chat-only latents recovered by a latent of their own Δnorm class; planted: how many
    there are; true_claims: latents classed base-only or chat-only (among the active ones) that are such a match;
    claims: latents classed base-only or chat-only (among the active ones)."""

    found: int
    planted: int
    true_claims: int
    claims: int

    @property
    def recall(self) -> float:
        return self.found / self.planted if self.planted else float("nan")

    @property
    def precision(self) -> float:
        return self.true_claims / self.claims if self.claims else float("nan")


@torch.no_grad()
def exclusive_recovery(
    crosscoder: SparseDictionary,
    planted: PlantedDictionary,
    active: torch.Tensor | None = None,
    min_cosine: float = RECOVERED_COSINE,
) -> ExclusiveRecovery:
    """Recall and precision of the exclusive latents (docs/methods.md §12.3): a planted base-only (chat-only) latent
    is found when its best-matching learned latent (``planted_recovery``) passes ``min_cosine`` and is classed
    base-only (chat-only) by Δnorm (§6); a learned latent classed base-only or chat-only is a true claim when it is
    such a match. active: [dict_size] bool, the latents that count as claims (e.g. those that fire; None = all)."""
    recovery = planted_recovery(crosscoder, planted, min_cosine)
    classes = latent_classes(relative_norm_difference(crosscoder))
    sides = [BASE_ONLY] * planted.n_base_only + [CHAT_ONLY] * planted.n_chat_only
    exclusive = zip(
        recovery.best_cosines[planted.n_shared :].tolist(),
        recovery.best_latents[planted.n_shared :].tolist(),
        sides,
        strict=True,
    )
    matches = [latent for cosine, latent, side in exclusive if cosine > min_cosine and classes[latent] == side]
    claims = {
        j for j, label in enumerate(classes) if label in (BASE_ONLY, CHAT_ONLY) and (active is None or bool(active[j]))
    }
    return ExclusiveRecovery(len(matches), len(sides), len(set(matches) & claims), len(claims))
