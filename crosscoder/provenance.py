"""The provenance record saved with every trained dictionary (``metadata["provenance"]``): which models,
revisions, layers, datasets and filters produced its training activations, how they were normalised, and how long
it trained. Evaluation reads this record — never the training config class — so a dictionary stays usable when
``TrainConfig`` changes. The record is versioned; older dictionaries (whose metadata held the whole training config
as ``train_config``) are read through ``Provenance.from_metadata``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from crosscoder.errors import DictionaryFormatError

PROVENANCE_VERSION = 1

#: Stream fields a batch source's ``description()`` reports (models, layers, filters), copied into ``activations``.
STREAM_FIELDS = (
    "base_model",
    "chat_model",
    "base_revision",
    "chat_revision",
    "dtype",
    "datasets",
    "layers",
    "n_sources",
    "d_model",
    "context_length",
    "drop_first_tokens",
    "drop_token_ids",
    "outlier_norm_factor",
)


@dataclass(frozen=True)
class Provenance:
    """Where a dictionary's training activations came from and how it was trained.

    data_source: ``paired models`` (streamed), ``activation cache``, ``activation file``, ``synthetic`` or
        ``python batches``; data_location: the cache folder or file, if any.
    activations: what produced the activations (``STREAM_FIELDS``: models, revisions, dtypes, datasets, layers,
        context length, filters), as far as the source reports it.
    reading: how documents were read (dataset weights, split, text and messages columns).
    normalization: the tokens the input scale was estimated on.
    training: architecture, steps, tokens, processes, parallelism, seed, preset and the main hyperparameters.
    """

    data_source: str
    data_location: str | None = None
    activations: dict[str, Any] = field(default_factory=dict)
    reading: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    version: int = PROVENANCE_VERSION

    # ------------------------------------------------------------------ what evaluation asks
    @property
    def base_model(self) -> str | None:
        return self.activations.get("base_model")

    @property
    def chat_model(self) -> str | None:
        return self.activations.get("chat_model")

    @property
    def layers(self) -> tuple[int, ...] | None:
        layers = self.activations.get("layers")
        return tuple(layers) if layers else None

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(self.activations.get("datasets") or ())

    @property
    def model_organism(self) -> bool:
        """Trained on the offline model organism (its models and data can be rebuilt from ``reading["seed"]``)."""
        return bool(self.activations.get("model_organism"))

    # ------------------------------------------------------------------ reading and writing
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the dictionary") -> Provenance:
        """Read a record written by this or an earlier release (unknown keys of a newer minor change are kept out)."""
        record_version = values.get("version")
        if not isinstance(record_version, int) or record_version > PROVENANCE_VERSION:
            raise DictionaryFormatError(
                f"{source} has a provenance record of version {record_version!r}; this crosscoder reads up to "
                f"{PROVENANCE_VERSION}: upgrade crosscoder (pip install -U crosscoder)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "the dictionary") -> Provenance | None:
        """The record of a saved dictionary's metadata; for dictionaries saved before the record existed, built
        from the training config they stored (any release's fields, read by name); None when neither is there
        (e.g. a dictionary converted from dictionary_learning)."""
        if isinstance(metadata.get("provenance"), dict):
            return cls.from_dict(metadata["provenance"], source)
        old = metadata.get("train_config")
        if not isinstance(old, dict):
            return None
        return cls.from_training_config(old, metadata, description=None)

    @classmethod
    def from_training_config(
        cls, config: dict[str, Any], facts: dict[str, Any], description: dict[str, Any] | None
    ) -> Provenance:
        """A record from a training config dict (``TrainConfig.to_dict()`` of any release), facts about the run
        (``architecture``, ``training_steps``, ``training_tokens``, ``processes``, ``parallelism``) and the batch
        source's ``description()`` where it has one."""
        if config.get("base_model"):
            data_source, location = "paired models", None
        elif config.get("cache"):
            data_source, location = "activation cache", str(config["cache"])
        elif config.get("activations"):
            data_source, location = "activation file", str(config["activations"])
        elif config.get("synthetic"):
            data_source, location = "synthetic", None
        elif config.get("model_organism"):
            data_source, location = "paired models", None
        else:
            data_source, location = "python batches", None
        dtypes = [
            config.get("base_dtype") or config.get("model_dtype"),
            config.get("chat_dtype") or config.get("model_dtype"),
        ]
        from_config = {
            "base_model": config.get("base_model"),
            "chat_model": config.get("chat_model"),
            "base_revision": config.get("base_revision"),
            "chat_revision": config.get("chat_revision"),
            "dtype": dtypes if config.get("base_model") else None,
            "datasets": list(config.get("datasets") or []),
            "layers": list(config["layers"]) if config.get("layers") else None,
            "context_length": config.get("context_length"),
            "drop_first_tokens": config.get("drop_first_tokens"),
            "drop_token_ids": list(config.get("drop_token_ids") or []),
            "outlier_norm_factor": config.get("outlier_norm_factor"),
        }
        if config.get("model_organism"):  # the models are the organism's (rebuilt elsewhere from its seed)
            from_config["model_organism"] = True
        streamed = data_source == "paired models"  # else the stream settings of the config were never used
        activations = {key: value for key, value in from_config.items() if value is not None and streamed}
        if description:  # what the source itself reports wins (e.g. the revision's commit hash, a cache's models)
            activations.update({key: description[key] for key in STREAM_FIELDS if key in description})
        return cls(
            data_source=data_source,
            data_location=location,
            activations=activations,
            reading={
                key: config.get(key)
                for key in ("dataset_weights", "dataset_split", "text_column", "messages_column", "seed")
                if key in config
            },
            normalization={"tokens": config.get("normalization_tokens")},
            training={
                **{
                    key: facts[key]
                    for key in ("architecture", "training_steps", "training_tokens", "processes", "parallelism")
                    if key in facts
                },
                **{
                    key: config.get(key)
                    for key in ("preset", "seed", "k", "dict_size", "expansion_factor", "loss", "lr", "batch_size")
                    if key in config
                },
            },
            package_version=_package_version(),
        )


def _package_version() -> str:
    try:
        return version("crosscoder")
    except PackageNotFoundError:
        return "unknown"


def recorded_location(name: str) -> str:
    """A model or dataset as records name it: an existing local path made absolute, since a record is read from other
    folders than the one the run started in (``python -m crosscoder.eval`` streams from the recorded models), and
    anything else (a Hub id) as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def located_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A paired stream's fingerprint with its models and datasets as ``recorded_location`` names them (a checkpoint
    of an earlier release recorded them as given, relative paths resolved from the folder a resume runs in)."""
    located = dict(fingerprint)
    for key in ("base_model", "chat_model"):
        if isinstance(located.get(key), str):
            located[key] = recorded_location(located[key])
    if isinstance(located.get("datasets"), list):
        located["datasets"] = [recorded_location(name) for name in located["datasets"]]
    return located
