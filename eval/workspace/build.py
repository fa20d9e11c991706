"""The workspace's facts per latent and the analyses that need the models (docs/methods.md §11).

``latent_columns`` assembles the table from the weights (Δnorm, class, decoder cosine, decoder norms), the
activation store (frequency, mean and maximum activation), the Latent Scaling rows of the report (ν, verdict) and
the KL effects; ``model_analyses`` runs the unembedding readout for every latent, and the KL effect and steering
for the chosen latents (``--latents``, else those carrying the most of the difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crosscoder.dictionary import SparseDictionary
from crosscoder.errors import ConfigError
from crosscoder.eval.exclusivity import decoder_cosine, latent_classes, relative_norm_difference
from crosscoder.eval.workspace.effects import carried_difference, kl_effects, steer_latent
from crosscoder.eval.workspace.pages import Column
from crosscoder.eval.workspace.readout import unembedding_readout
from crosscoder.eval.workspace.store import ActivationStore
from crosscoder.progress import progress_bar

ROW_COLUMNS = {
    "nu_error": ("ν^ε", "number", "Latent Scaling error ratio (high ⇒ complete shrinkage)"),
    "nu_recon": ("ν^r", "number", "Latent Scaling reconstruction ratio (high ⇒ latent decoupling)"),
    "verdict": ("verdict", "category", "genuine, complete shrinkage or latent decoupling"),
    "nu_act": ("ν_act", "number", "diff-SAE activation ratio β_base / β_chat"),
}


@dataclass(frozen=True)
class ModelAnalyses:
    """What needs the models: readout per model for ``readout_latents``; KL effect and steering per latent."""

    readout: dict[str, Any]
    readout_latents: list[int]
    kl: dict[int, dict[str, float]]
    steering: dict[int, dict[str, Any]]


def latent_columns(
    dictionary: SparseDictionary,
    store: ActivationStore | None,
    rows: Sequence[dict[str, Any]] = (),
    kl: dict[int, dict[str, float]] | None = None,
) -> list[Column]:
    """The table's columns, each with one value per latent (None where not computed)."""
    size = dictionary.dict_size
    columns = []
    if dictionary.n_sources == 2:
        delta = relative_norm_difference(dictionary)
        columns += [
            Column("class", "class", "category", latent_classes(delta), "chat-only Δnorm > 0.9, base-only < 0.1, …"),
            Column("delta_norm", "Δnorm", "number", delta.tolist(), "0 = base-only, 1 = chat-only"),
            Column("cosine", "cos(d_base, d_chat)", "number", decoder_cosine(dictionary).tolist()),
        ]
    norms = dictionary.decoder_norms().detach().cpu()
    names = ["base", "chat"] if dictionary.n_sources == 2 else ["decoder"]
    columns += [Column(f"norm_{n}", f"‖d_{n}‖", "number", norms[:, s].tolist()) for s, n in enumerate(names)]
    if store is not None:
        columns += [
            Column("frequency", "frequency", "number", store.frequencies.tolist(), "fraction of tokens it fires on"),
            Column("mean_activation", "mean act.", "number", store.mean_activations().tolist()),
            Column("max_activation", "max act.", "number", store.max_activations.tolist()),
        ]
    for key, (label, kind, description) in ROW_COLUMNS.items():
        if any(key in row for row in rows):
            values: list[Any] = [None] * size
            for row in rows:
                values[int(row["latent"])] = row.get(key)
            columns.append(Column(key, label, kind, values, description))
    if kl:
        for key, label in (("kl_effect", "KL effect"), ("gap_share", "gap share")):
            values = [None] * size
            for latent, effect in kl.items():
                values[latent] = effect[key]
            columns.append(Column(key, label, "number", values, "KL increase when removed from the patch"))
    return columns


def checked_latents(dictionary: SparseDictionary, latents: Sequence[int]) -> list[int]:
    """``--latents`` without repeats, in order; an id outside the dictionary is refused (``ConfigError``)."""
    bad = [latent for latent in latents if not 0 <= latent < dictionary.dict_size]
    if bad:
        raise ConfigError(f"--latents {bad} are out of range: the dictionary has {dictionary.dict_size} latents")
    return list(dict.fromkeys(int(latent) for latent in latents))


def chosen_latents(
    dictionary: SparseDictionary, store: ActivationStore, latents: Sequence[int] | None, count: int
) -> list[int]:
    """``latents`` when given (checked), else the ``count`` that carry the most of the difference."""
    if latents:
        return checked_latents(dictionary, latents)
    carried = carried_difference(dictionary, store.activation_sum / max(store.tokens, 1)).cpu()
    fired = int((store.counts > 0).sum())
    return carried.argsort(descending=True)[: min(count, fired)].tolist()


def model_analyses(
    dictionary: SparseDictionary,
    store: ActivationStore,
    base_model: nn.Module,
    chat_model: nn.Module,
    tokenizer: Any,
    layer: int,
    conversations: list[list[dict[str, str]]],
    *,
    latents: Sequence[int] | None = None,
    n_effects: int = 16,
    n_steer: int = 4,
    steer_multiple: float = 4.0,
    first_tokens: int = 5,
    progress: bool = False,
) -> ModelAnalyses:
    """Readout of every latent through both models; KL effects and steering for the chosen latents."""
    every = torch.arange(dictionary.dict_size)
    readout = unembedding_readout(dictionary, {"base": base_model, "chat": chat_model}, every, progress=progress)
    chosen = chosen_latents(dictionary, store, latents, n_effects)
    can_patch = dictionary.n_sources == 2 or dictionary.input.is_difference
    kl = {}
    if chosen and conversations and can_patch:
        kl = kl_effects(
            base_model,
            chat_model,
            tokenizer,
            conversations,
            layer,
            dictionary,
            chosen,
            first_tokens=first_tokens,
            progress=progress,
        )
    steering = {}
    maxima = store.max_activations
    for latent in progress_bar(chosen[:n_steer], desc="steering", enabled=progress, unit="latent"):
        steering[latent] = steer_latent(
            chat_model, tokenizer, dictionary, latent, layer, float(maxima[latent]), multiple=steer_multiple
        )
    return ModelAnalyses(readout, every.tolist(), kl, steering)
