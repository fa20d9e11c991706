"""The default run (``python train.py`` with no arguments): diff the offline model organism.

The organism (``crosscoder.organism``) is a tiny base LM and a copy finetuned narrowly on baking recipes,
built offline on the first run and cached. Its activations at the recommended layer are streamed from both
models over a 50/50 mixture of general text and held-out baking chats, a BatchTopK crosscoder and a diff-SAE
are trained side by side, and a summary says what the diff found.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from transformers import AutoTokenizer

from crosscoder.activations import PairedActivationStream
from crosscoder.config import TrainConfig
from crosscoder.dictionary import SparseDictionary
from crosscoder.eval.exclusivity import BASE_ONLY, CHAT_ONLY, SHARED, latent_classes, relative_norm_difference
from crosscoder.organism import CHAT_MARKERS, ModelOrganism, build_model_organism


def organism_config(config: TrainConfig, organism: ModelOrganism) -> TrainConfig:
    """The config with the organism's models, data, layer and chat markers (dropped from training) filled in."""
    markers = AutoTokenizer.from_pretrained(organism.chat_path).convert_tokens_to_ids(list(CHAT_MARKERS))
    return dataclasses.replace(
        config,
        model_organism=False,
        base_model=str(organism.base_path),
        chat_model=str(organism.chat_path),
        datasets=(str(organism.general_data), str(organism.chat_data)),
        layers=config.layers or (organism.layer,),
        drop_token_ids=tuple(sorted(set(config.drop_token_ids) | set(markers))),
    )


def organism_stream(config: TrainConfig) -> PairedActivationStream:
    """Build (or load) the organism and stream its paired activations as the config asks."""
    organism = build_model_organism(seed=config.seed, progress=config.progress)
    return PairedActivationStream.from_config(organism_config(config, organism))


def summary(dictionaries: dict[str, SparseDictionary]) -> list[str]:
    """Lines reporting each dictionary's metrics and, for crosscoders, its latent classes."""
    lines = []
    for name, dictionary in dictionaries.items():
        metrics = dictionary.metadata.get("metrics", {})
        figures = ", ".join(
            f"{key}={metrics[key]:.4g}"
            for key in ("fve", "fve_source_0", "fve_source_1", "l0", "dead_fraction")
            if key in metrics
        )
        lines.append(f"{name}: {figures}")
        if dictionary.n_sources == 2:
            counts = Counter(latent_classes(relative_norm_difference(dictionary)))
            lines.append(
                f"  latents: {counts[CHAT_ONLY]} chat-only, {counts[BASE_ONLY]} base-only, {counts[SHARED]} shared "
                f"of {dictionary.dict_size} (by relative decoder norm)"
            )
    return lines
