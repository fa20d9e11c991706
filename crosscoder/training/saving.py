"""The end of a run: each dictionary, consolidated, saved with its metrics and provenance record; then, when asked,
pushed to the Hub (only once every dictionary is saved locally)."""

from __future__ import annotations

from typing import Any

from crosscoder.config import DICTIONARY_NAMES, TrainConfig
from crosscoder.dictionary import SparseDictionary
from crosscoder.distributed import Distributed
from crosscoder.errors import PushError
from crosscoder.hub import load_dictionary
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
    ended_early: dict[str, Any] | None = None,
) -> dict[str, SparseDictionary]:
    """Rank 0 writes ``run_dir/<name>/`` for each dictionary; every process returns the consolidated dictionaries.
    ``ended_early`` (why, and the tokens planned) goes into the metadata of a run that stopped before its
    ``num_tokens``."""
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
        if ended_early is not None:
            dictionary.metadata["ended_early"] = ended_early
        saved[trainee.name] = dictionary
        if context.is_main:
            dictionary.save_pretrained(config.run_dir / trainee.name)
    return saved


def finished_dictionaries(config: TrainConfig, step: int) -> dict[str, SparseDictionary] | None:
    """The run's saved dictionaries (loaded on the CPU) when every one was saved at ``step``, else None."""
    folders = [config.run_dir / DICTIONARY_NAMES[architecture] for architecture in config.architectures]
    if not all((folder / "config.json").is_file() for folder in folders):
        return None
    loaded = {folder.name: load_dictionary(folder) for folder in folders}
    if any(dictionary.metadata.get("training_steps") != step for dictionary in loaded.values()):
        return None
    return loaded


def push_dictionaries(config: TrainConfig, dictionaries: dict[str, SparseDictionary]) -> None:
    """Upload each saved dictionary to ``push_to_hub`` (``REPO-<name>`` when there are several). A failed upload
    (offline, no token, no permission) is one error naming the repo and the reason, and how to push the complete
    local copies later."""
    if not config.push_to_hub:
        return
    repos = {
        name: config.push_to_hub if len(dictionaries) == 1 else f"{config.push_to_hub}-{name}" for name in dictionaries
    }
    for index, (name, dictionary) in enumerate(dictionaries.items()):
        try:
            dictionary.push_to_hub(repos[name])
        except (OSError, ValueError) as error:  # huggingface_hub's HTTP, offline, token and repo-id errors
            later = "; ".join(
                f"crosscoder.load_dictionary('{config.run_dir / other}').push_to_hub('{repos[other]}')"
                for other in list(dictionaries)[index:]
            )
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            raise PushError(
                f"pushing {name} to the Hub repo {repos[name]} failed ({reason}). The dictionaries in "
                f"{config.run_dir} are saved completely; once the Hub is reachable and you are logged in "
                f"(`huggingface-cli login` or HF_TOKEN) with write access to the repo, push them with {later} — or "
                "run the same command again with --resume"
            ) from error
