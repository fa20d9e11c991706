"""The end of a run: each dictionary, consolidated, saved with its metrics and provenance record (and pushed to
the Hub when asked)."""

from __future__ import annotations

from typing import Any

from crosscoder.config import TrainConfig
from crosscoder.dictionary import SparseDictionary
from crosscoder.distributed import Distributed
from crosscoder.provenance import Provenance
from crosscoder.sharding import consolidate
from crosscoder.training.trainee import Trainee


def save_dictionaries(
    config: TrainConfig,
    trainees: list[Trainee],
    step: int,
    tokens: int,
    metrics: dict[str, dict[str, float]],
    source_description: dict[str, Any] | None,
    context: Distributed,
) -> dict[str, SparseDictionary]:
    """Rank 0 writes ``run_dir/<name>/`` for each dictionary (and pushes it when ``push_to_hub`` is set); every
    process returns the consolidated dictionaries."""
    saved = {}
    for trainee in trainees:
        dictionary = consolidate(trainee.dictionary, context) if context.latent_parallel else trainee.dictionary
        dictionary = dictionary.eval()
        facts = {
            "architecture": trainee.architecture,
            "training_steps": step,
            "training_tokens": tokens,
            "processes": context.world_size,
            "parallelism": "latents" if context.latent_parallel else "data",
        }
        provenance = Provenance.from_training_config(config.to_dict(), facts, source_description)
        dictionary.metadata.update(
            {**facts, "metrics": metrics.get(trainee.name, {}), "provenance": provenance.to_dict()}
        )
        saved[trainee.name] = dictionary
        if not context.is_main:
            continue
        dictionary.save_pretrained(config.run_dir / trainee.name)
        if config.push_to_hub:
            repo_id = config.push_to_hub if len(trainees) == 1 else f"{config.push_to_hub}-{trainee.name}"
            dictionary.push_to_hub(repo_id)
    return saved
