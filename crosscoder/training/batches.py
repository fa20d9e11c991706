"""Where a run's batches come from, and where in them it stands (for checkpoints)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import torch

from crosscoder.config import TrainConfig
from crosscoder.data import ResumableBatches, TensorActivations
from crosscoder.dictionary import SparseDictionary
from crosscoder.distributed import Distributed
from crosscoder.errors import ConfigError, DataError
from crosscoder.synthetic import PlantedActivations, PlantedDictionary


class PositionedBatches:
    """Wraps a batch source; yields (batch, position after it). Resumable sources report their own state;
    other iterables are fast-forwarded by counting batches."""

    def __init__(self, source: Iterable[torch.Tensor]) -> None:
        self.source = source
        self.consumed = 0
        self._skip = 0

    def restore(self, position: dict[str, Any]) -> None:
        if isinstance(self.source, ResumableBatches) and "source" in position:
            self.source.load_state_dict(position["source"])
        else:
            self._skip = int(position["batches"])
        self.consumed = int(position["batches"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """(batch, position) pairs; closing this generator closes the source's iterator too (which stops a
        prefetching source's thread)."""
        iterator = iter(self.source)
        try:
            for _ in itertools.islice(iterator, self._skip):
                pass
            for batch in iterator:
                self.consumed += 1
                position: dict[str, Any] = {"batches": self.consumed}
                if isinstance(self.source, ResumableBatches):
                    position["source"] = self.source.state_dict()
                yield batch, position
        finally:
            if isinstance(iterator, Generator):
                iterator.close()


def data_fingerprint(source: Iterable[torch.Tensor]) -> dict[str, Any] | None:
    """What identifies the data a source yields (recorded in checkpoints, compared on resume): its ``fingerprint()``
    where it has one (a paired stream, a cache, an activation file), else None (a plain Python iterable)."""
    fingerprint = getattr(source, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def held_out_batches(config: TrainConfig) -> list[torch.Tensor]:
    """``config.validation_tokens`` tokens of the configured source read in another order (seed + 1; for synthetic
    data, new samples of the same planted dictionary), as whole batches [batch_size, n_sources, d_model] on the CPU;
    every process reads the same ones. A paired-model source loads its models a second time to read them."""
    source = default_batches(dataclasses.replace(config, prefetch_blocks=0), Distributed(), order_seed=config.seed + 1)
    batches, tokens = [], 0
    for batch in source:
        batches.append(batch.cpu())
        tokens += batch.shape[0]
        if tokens >= config.validation_tokens:
            break
    if not batches:
        raise DataError("validation_tokens is set but the data source yielded no batch to validate on")
    return batches


def planted_dictionary(config: TrainConfig) -> PlantedDictionary:
    """The planted dictionary a ``synthetic`` run trains on (and is checked against)."""
    return PlantedDictionary.random(seed=config.seed)


def default_batches(config: TrainConfig, context: Distributed, order_seed: int | None = None) -> Iterable[torch.Tensor]:
    """The batch source the config names — paired models, a cache, a tensor file or planted synthetic data —
    yielding this process's share of each global batch. ``order_seed`` (default ``config.seed``) seeds only the
    order or sampling of the data, never what the data is (a synthetic run's planted dictionary stays the same)."""
    local = context.local_batch_size(config.batch_size)
    rank, world = context.rank, context.world_size
    seed = config.seed if order_seed is None else order_seed
    if config.model_organism and not config.base_model:
        raise ConfigError(
            "model_organism names models that must be built first: call "
            "crosscoder.organism_source.resolve_model_organism(config) and train on the config it returns (the "
            "command line does this)"
        )
    if config.base_model:
        from crosscoder.activations import PairedActivationStream

        return PairedActivationStream.from_config(
            dataclasses.replace(config, batch_size=local, seed=seed), rank=rank, world_size=world
        )
    if config.cache is not None:
        from crosscoder.cache import ActivationCache

        return ActivationCache(
            config.cache,
            local,
            seed=seed,
            rank=rank,
            world_size=world,
            allow_incomplete=config.allow_incomplete_cache,
        )
    if config.activations is not None:
        return TensorActivations.from_file(config.activations, local, seed, rank, world)
    if config.synthetic:
        return PlantedActivations(planted_dictionary(config), local, seed, rank, world)
    raise ConfigError(
        "no training data named: pass --base-model and --chat-model (with --datasets), --cache DIR, "
        "--activations FILE, --model-organism (offline demo models) or --synthetic (planted dictionary)"
    )


def take_tokens(
    iterator: Iterator[tuple[torch.Tensor, dict[str, Any]]], n_tokens: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The first batches holding at least ``n_tokens`` tokens (they are trained on afterwards too)."""
    taken, count = [], 0
    for item in iterator:
        taken.append(item)
        count += item[0].shape[0]
        if count >= n_tokens:
            break
    if not taken:
        raise DataError("the batch source is empty: there is nothing to train on")
    return taken


def accepted_shapes(dictionaries: list[SparseDictionary]) -> set[tuple[int, ...]]:
    """Per-token batch shapes the dictionaries accept: paired [n_sources, d_model], or [d_model] (already the
    input) when every dictionary reads one vector per token."""
    first = dictionaries[0]
    crosscoders = [dictionary for dictionary in dictionaries if dictionary.input.kind == "paired"]
    n_sources = crosscoders[0].n_sources if crosscoders else 2
    shapes = {(n_sources, first.d_model)}
    if not crosscoders:
        shapes.add((first.d_model,))
    return shapes


def check_batch_shape(x: torch.Tensor, shapes: set[tuple[int, ...]], step: int) -> None:
    """Refuse a batch whose per-token shape the dictionaries do not take."""
    if tuple(x.shape[1:]) not in shapes:
        accepted = " or ".join(str(["batch", *shape]).replace("'", "") for shape in sorted(shapes))
        raise DataError(
            f"batch at step {step} has shape {list(x.shape)} but the dictionaries take {accepted}: every "
            "batch must come from the same sources and layer"
        )
