"""Latent-sharded dictionaries (docs/architecture.md §7): each of N processes holds ``dict_size / N`` latents — its
rows of ``W_enc``, ``b_enc``, ``W_dec`` and their Adam moments — while ``b_dec`` and the buffers are replicated.

Every process sees the same (all-gathered global) batch; the BatchTopK threshold comes from the all-reduced radix
histograms and the partial reconstructions are summed over processes. Checkpoints and saved dictionaries are
consolidated: one file holding the whole dictionary, loadable in a single process.
"""

from __future__ import annotations

from typing import Any

import torch

from crosscoder.config import LATENT_SHARDABLE, TrainConfig
from crosscoder.dictionary import DICTIONARY_CLASSES, SparseDictionary
from crosscoder.distributed import Distributed
from crosscoder.errors import ConfigError
from crosscoder.hub import dictionary_from_state

#: Latent-major tensors (dim 0 = latent) that are split across processes, by parameter position in the optimizer.
SHARDED = ("W_enc", "b_enc", "W_dec")


def _rows(context: Distributed, dict_size: int) -> slice:
    size = dict_size // context.world_size
    return slice(context.rank * size, (context.rank + 1) * size)


def sharding_problem(dict_size: int, k: int | None, world_size: int) -> str | None:
    """Why ``dict_size`` latents cannot be split over ``world_size`` processes, or None if they can."""
    if dict_size % world_size:
        return f"dict_size={dict_size} does not split evenly over {world_size} processes: use a multiple"
    if k is not None and dict_size // world_size <= k:
        return f"each process's {dict_size // world_size} latents must exceed k={k}"
    return None


def check_shardable(dict_size: int, k: int | None, context: Distributed) -> None:
    problem = sharding_problem(dict_size, k, context.world_size)
    if problem is not None:
        raise ConfigError(problem)


def shards_latents(config: TrainConfig, world_size: int, dict_size: int) -> bool:
    """Whether ``world_size`` processes split the latents rather than the batch (``TrainConfig.parallelism``):
    ``auto`` splits them when that communicates less per step than all-reducing the gradients (the dictionary has at
    least as many latents as the global batch has tokens) and every dictionary can be split (``LATENT_SHARDABLE``),
    evenly."""
    if world_size <= 1 or config.parallelism == "data":
        return False
    if config.parallelism == "latents":
        return True
    return (
        all(architecture in LATENT_SHARDABLE for architecture in config.architectures)
        and sharding_problem(dict_size, config.k, world_size) is None
        and dict_size >= config.batch_size
    )


def shard(full: SparseDictionary, context: Distributed) -> SparseDictionary:
    """This process's latents of a whole dictionary (same class, ``dict_size / N`` latents)."""
    check_shardable(full.dict_size, full.k, context)
    config = full.config()
    kwargs = {key: value for key, value in config.items() if key not in ("format", "format_version", "dict_class")}
    kwargs["dict_size"] = full.dict_size // context.world_size
    part = DICTIONARY_CLASSES[config["dict_class"]](**kwargs).to(full.W_dec.device)
    state = full.state_dict()
    rows = _rows(context, full.dict_size)
    part.load_state_dict({key: value[rows] if key in SHARDED else value for key, value in state.items()})
    return part


def gather_rows(tensor: torch.Tensor, context: Distributed) -> torch.Tensor:
    """Every process's rows of a latent-major tensor, concatenated in rank order."""
    return context.all_gather_rows(tensor)


def consolidate(part: SparseDictionary, context: Distributed) -> SparseDictionary:
    """The whole dictionary from every process's shard (a collective call)."""
    state = {key: gather_rows(value, context) if key in SHARDED else value for key, value in part.state_dict().items()}
    config = {**part.config(), "dict_size": part.dict_size * context.world_size}
    return dictionary_from_state(config, state, source="latent shards").to(part.W_dec.device)


def consolidate_optimizer(state: dict[str, Any], context: Distributed) -> dict[str, Any]:
    """Adam state with the sharded parameters' moments gathered (parameters in the order W_enc, b_enc, W_dec, b_dec)."""
    gathered = {}
    for index, moments in state["state"].items():
        sharded = int(index) < len(SHARDED)
        gathered[index] = {
            key: gather_rows(value, context) if sharded and key in ("exp_avg", "exp_avg_sq") else value
            for key, value in moments.items()
        }
    return {"state": gathered, "param_groups": state["param_groups"]}


def shard_optimizer(state: dict[str, Any], dict_size: int, context: Distributed) -> dict[str, Any]:
    """Inverse of ``consolidate_optimizer``: this process's rows of the sharded moments."""
    rows = _rows(context, dict_size)
    sliced = {}
    for index, moments in state["state"].items():
        sharded = int(index) < len(SHARDED)
        sliced[index] = {
            key: value[rows].clone() if sharded and key in ("exp_avg", "exp_avg_sq") else value
            for key, value in moments.items()
        }
    return {"state": sliced, "param_groups": state["param_groups"]}


def shard_rows(tensor: torch.Tensor, dict_size: int, context: Distributed) -> torch.Tensor:
    """This process's rows of a [dict_size, ...] tensor."""
    return tensor[_rows(context, dict_size)].clone()
