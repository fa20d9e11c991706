"""The model organism as a training data source: ``--model-organism`` (the demo's, ``cache build``'s) resolved into
the organism's models, data, layer and chat markers, so that the rest of the code sees a
paired-model config like any other."""

from __future__ import annotations

import dataclasses

import torch

from crosscoder.config import TrainConfig
from crosscoder.distributed import init_distributed
from crosscoder.errors import ConfigError
from crosscoder.models import resolve_device
from crosscoder.organism import ModelOrganism, build_model_organism


def organism_config(config: TrainConfig, organism: ModelOrganism) -> TrainConfig:
    """The config with the organism's models, data, layer and chat markers (dropped from training) filled in."""
    sources = organism.stream_sources()
    return dataclasses.replace(
        config,
        base_model=sources["base_model"],
        chat_model=sources["chat_model"],
        datasets=sources["datasets"],
        layers=config.layers or sources["layers"],
        drop_token_ids=tuple(sorted(set(config.drop_token_ids) | set(sources["drop_token_ids"]))),
    )


def resolve_model_organism(config: TrainConfig) -> TrainConfig:
    """With ``model_organism`` set: build (or load) the organism — under torchrun on the first process while the
    others wait — and return the config with its models, data, layer and chat markers filled in, a paired-model
    config like any other. Any other config is returned unchanged."""
    if not config.model_organism:
        return config
    if config.base_model or config.chat_model:
        raise ConfigError("name one data source, not --model-organism and --base-model/--chat-model")
    context = init_distributed(resolve_device(config.device))
    if context.is_main:
        build_model_organism(seed=config.seed, progress=config.progress)
    if context.enabled:
        torch.distributed.barrier()
    return organism_config(config, build_model_organism(seed=config.seed, progress=False))
