"""A dictionary being trained: its optimizer, schedule, dead-latent counters and metric window; built fresh
(initialised and normalised on the first batches) or restored exactly from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from crosscoder.config import CENTERABLE, DICTIONARY_NAMES, Architecture, TrainConfig
from crosscoder.dictionary import (
    BatchTopKCrossCoder,
    BatchTopKSAE,
    DedicatedCrossCoder,
    L1CrossCoder,
    MatryoshkaCrossCoder,
    MatryoshkaSAE,
    SparseDictionary,
)
from crosscoder.distributed import Distributed
from crosscoder.errors import ConfigError
from crosscoder.hub import dictionary_from_state
from crosscoder.metrics import ReconstructionStats
from crosscoder.normalization import estimate_input_scale, geometric_median
from crosscoder.sharding import consolidate, consolidate_optimizer, shard, shard_optimizer, shard_rows
from crosscoder.step_buffers import StepBuffers
from crosscoder.training.schedules import lr_factor
from crosscoder.training.sharded_optimizer import MOMENTS, ShardedAdam, shards_optimizer
from crosscoder.training.step import training_step


@dataclass
class Trainee:
    """A dictionary with its optimizer, schedule and dead-latent counters (tokens since each latent fired)."""

    name: str
    architecture: Architecture
    dictionary: SparseDictionary
    optimizer: torch.optim.Adam | ShardedAdam
    scheduler: LambdaLR
    tokens_since_fired: torch.Tensor  # [dict_size] int64
    window: ReconstructionStats = field(default_factory=ReconstructionStats)
    buffers: StepBuffers = field(default_factory=StepBuffers)
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        architecture: Architecture,
        dictionary: SparseDictionary,
        config: TrainConfig,
        context: Distributed | None = None,
        optimizer_state: dict[str, Any] | None = None,
    ) -> Trainee:
        """A trainee for ``dictionary`` with Adam (see ``optimizer_and_schedule``) holding ``optimizer_state`` (a
        ``state_dict()``, one process's layout) or, without it, the state of its first step (step 0, zero moments:
        allocated now rather than inside the first step, where the step's temporaries are live), a fresh schedule and
        no latent dead yet."""
        optimizer, scheduler = optimizer_and_schedule(dictionary, config, context or Distributed())
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        else:  # a sharded one's own slices only
            adam = optimizer.inner if isinstance(optimizer, ShardedAdam) else optimizer
            adam.load_state_dict(first_step_state(adam))
        counters = torch.zeros(dictionary.dict_size, dtype=torch.long, device=dictionary.b_dec.device)
        return cls(DICTIONARY_NAMES[architecture], architecture, dictionary.train(), optimizer, scheduler, counters)

    def step(self, x: torch.Tensor, step: int, config: TrainConfig, context: Distributed) -> torch.Tensor:
        """One optimisation step on raw paired activations x: [batch, n_sources, d_model] (this process's share of
        the global batch, or the global batch under latent sharding); returns the (detached) total loss."""
        dictionary = self.dictionary
        dead = self.tokens_since_fired >= config.dead_tokens
        # formed in a buffer kept between steps: fresh pages cost more than the arithmetic (docs/methods.md §4.2)
        scratch = self.buffers.input((x.shape[0], dictionary.n_sources, dictionary.d_model), dictionary.W_enc)
        result = training_step(
            dictionary,
            self.optimizer,
            dictionary.normalize(dictionary.input_from_pair(x, out=scratch.flatten(1)), out=scratch),
            step=step,
            dead=dead,
            config=config,
            context=context,
            buffers=self.buffers,
            window=self.window,  # this process's tokens (or latents); combined when the window is read
        )
        self.scheduler.step()
        with torch.no_grad():
            batch_tokens = x.shape[0] * (context.world_size if context.data_parallel else 1)
            self.tokens_since_fired += batch_tokens
            fired = context.all_reduce(result.active.clone()) if context.data_parallel else result.active
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
            kept = result.min_kept_score
            if kept is not None and step >= config.threshold_start_step:
                theta, beta = dictionary.threshold, config.threshold_beta
                theta.copy_(torch.where(theta < 0, kept, beta * theta + (1 - beta) * kept))
            for name, value in {"loss": result.loss, **result.losses}.items():
                self.loss_sums[name] = self.loss_sums.get(name, 0) + value
        return result.loss

    def finish_training(self) -> None:
        """End the stepping: the dictionary's parameters become this process's own again where a sharded optimizer
        shared them between processes (``ShardedAdam.unshare``)."""
        if isinstance(self.optimizer, ShardedAdam):
            self.optimizer.unshare()

    @torch.no_grad()
    def scores_finite(self, x: torch.Tensor) -> bool:
        """Whether the scores f·c the dictionary ranks are finite on raw x: [batch, n_sources, d_model] (one host
        sync; tells a diverged dictionary from other failures of a step)."""
        dictionary = self.dictionary
        codes = dictionary.activations_normalized(dictionary.normalize(dictionary.input_from_pair(x)))
        return bool(torch.isfinite(codes * dictionary.code_norms()).all())

    def read_window(self, steps: int, config: TrainConfig, context: Distributed) -> dict[str, float]:
        """Metrics averaged since the last read over all processes (one host sync), then reset."""
        if context.data_parallel:
            self.window.all_reduce(context.all_reduce)
            losses = {
                name: context.all_reduce(value.clone()) / context.world_size for name, value in self.loss_sums.items()
            }
        else:
            if context.latent_parallel:  # same batch everywhere; each process counted its own latents
                self.window.gather_latents(context.all_gather_rows)
            losses = self.loss_sums
        metrics = self.window.summary()
        metrics.update({name: float(value) / steps for name, value in losses.items()})
        counters = (
            context.all_gather_rows(self.tokens_since_fired) if context.latent_parallel else self.tokens_since_fired
        )
        metrics["dead_fraction_train"] = float((counters >= config.dead_tokens).float().mean())
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self.dictionary.uses_batch_topk:
            metrics.update(self.dictionary.threshold_metrics())
        self.window, self.loss_sums = ReconstructionStats(), {}
        return metrics

    def state_dict(self, context: Distributed) -> dict[str, Any]:
        """Everything to resume this dictionary's training; latent shards are consolidated (a collective call)."""
        if context.latent_parallel:
            whole = consolidate(self.dictionary, context)
            optimizer = consolidate_optimizer(self.optimizer.state_dict(), context)
            counters = context.all_gather_rows(self.tokens_since_fired)
        else:
            whole, optimizer, counters = self.dictionary, self.optimizer.state_dict(), self.tokens_since_fired
        return {
            "config": whole.config(),
            "state_dict": whole.state_dict(),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": counters,
        }


def optimizer_and_schedule(
    dictionary: SparseDictionary, config: TrainConfig, context: Distributed
) -> tuple[torch.optim.Adam | ShardedAdam, LambdaLR]:
    """Adam (β = 0.9, 0.999) — sharded over data-parallel processes when ``shards_optimizer`` says so
    (``ShardedAdam``) — and the learning-rate schedule of ``crosscoder.training.schedules.lr_factor``."""
    betas = (0.9, 0.999)
    if shards_optimizer(config, context):
        optimizer = ShardedAdam(list(dictionary.parameters()), context, lr=config.lr, betas=betas)
        return optimizer, LambdaLR(optimizer.inner, lambda step: lr_factor(config, step))
    adam = torch.optim.Adam(dictionary.parameters(), lr=config.lr, betas=betas, fused=True)
    return adam, LambdaLR(adam, lambda step: lr_factor(config, step))


def first_step_state(adam: torch.optim.Adam) -> dict[str, Any]:
    """Adam's ``state_dict()`` before its first step: step 0 and zero moments for every parameter, as that step
    would create them."""
    parameters = [parameter for group in adam.param_groups for parameter in group["params"]]
    state = {
        index: {"step": torch.zeros(()), **{name: torch.zeros_like(parameter) for name in MOMENTS}}
        for index, parameter in enumerate(parameters)
    }
    return {"state": state, "param_groups": adam.state_dict()["param_groups"]}


def resolved_dict_size(config: TrainConfig, d_model: int) -> int:
    """``dict_size``, or ``expansion_factor · d_model`` when it is not set."""
    return config.dict_size or config.expansion_factor * d_model


def new_dictionary(architecture: Architecture, config: TrainConfig, d_model: int, n_sources: int) -> SparseDictionary:
    """A freshly initialised dictionary of the given architecture for activations of this shape."""
    dict_size = resolved_dict_size(config, d_model)
    names = list(config.source_names) if config.source_names else (["base", "chat"] if n_sources == 2 else None)
    norm = {} if config.init_decoder_norm is None else {"init_decoder_norm": config.init_decoder_norm}
    prefix_sizes = [round(fraction * dict_size) for fraction in config.matryoshka_prefixes]
    if architecture.startswith("matryoshka") and (prefix_sizes[0] < 1 or len(set(prefix_sizes)) < len(prefix_sizes)):
        raise ConfigError(
            f"--matryoshka-prefixes {list(config.matryoshka_prefixes)} round to the latent counts {prefix_sizes} of "
            f"dict_size={dict_size}, which must increase from at least 1: use fewer or larger fractions"
        )
    if architecture in CENTERABLE:
        norm["centered_encoder"] = config.centered_encoder
    if architecture == "batchtopk":
        return BatchTopKCrossCoder(d_model, dict_size, config.k, n_sources, source_names=names, **norm)
    if architecture == "l1":
        return L1CrossCoder(d_model, dict_size, n_sources, source_names=names, **norm)
    if architecture == "matryoshka":
        return MatryoshkaCrossCoder(d_model, dict_size, config.k, prefix_sizes, n_sources, source_names=names, **norm)
    if architecture == "dedicated":
        exclusive = [round(fraction * dict_size) for fraction in config.exclusive_fractions]
        budgets = list(config.exclusive_k) if config.exclusive_k is not None else None
        return DedicatedCrossCoder(
            d_model, dict_size, config.k, exclusive, config.exclusive_encoder, n_sources, source_names=names,
            exclusive_k=budgets, **norm,
        )  # fmt: skip
    if architecture == "matryoshka_diff_sae":
        return MatryoshkaSAE(d_model, dict_size, config.k, prefix_sizes, input=config.diff_direction)
    return BatchTopKSAE(d_model, dict_size, config.k, input=config.diff_direction)


def start_trainees(
    config: TrainConfig, first_batches: list[torch.Tensor], device: torch.device, context: Distributed
) -> list[Trainee]:
    """New dictionaries, normalised on the first batches (per-source scale over every process's tokens, b_dec from
    the first global batch), identical on every process."""
    sample = torch.cat(first_batches)[: config.normalization_tokens // context.world_size].to(device)
    first_global = context.all_gather_rows(first_batches[0].to(device))
    trainees = []
    for index, architecture in enumerate(config.architectures):
        torch.manual_seed(config.seed * 1_000 + index)
        n_sources = sample.shape[1] if sample.dim() == 3 else 2  # a [batch, d] source yields differences
        dictionary = new_dictionary(architecture, config, sample.shape[-1], n_sources).to(device)
        with torch.no_grad():
            reduce = context.all_reduce if context.enabled else None
            raw = dictionary.input_from_pair(sample)
            dictionary.input_scale.copy_(estimate_input_scale(dictionary.as_sources(raw), reduce))
            first = dictionary.normalize(dictionary.input_from_pair(first_global))
            if config.b_dec_init == "geometric_median":
                dictionary.b_dec.copy_(geometric_median(first))
            elif config.b_dec_init == "mean":
                dictionary.b_dec.copy_(first.mean(dim=0))
        if context.latent_parallel:  # every process built the same whole dictionary; keep this one's latents
            dictionary = shard(dictionary, context)
        trainees.append(Trainee.new(architecture, dictionary, config, context))
    return trainees


def restore_trainees(
    config: TrainConfig, saved: dict[str, Any], device: torch.device, context: Distributed
) -> list[Trainee]:
    """Dictionaries, optimizers, schedules and counters exactly as checkpointed (sharded again if asked)."""
    trainees = []
    for architecture in config.architectures:
        name = DICTIONARY_NAMES[architecture]
        state = saved[name]
        dictionary = dictionary_from_state(state["config"], state["state_dict"], source=f"checkpoint[{name}]")
        dictionary = dictionary.to(device)
        optimizer_state, counters = state["optimizer"], state["tokens_since_fired"].to(device)
        if state["config"]["format_version"] < 3 and isinstance(dictionary, DedicatedCrossCoder):
            optimizer_state = _dedicated_moments_from_version_2(dictionary, optimizer_state)
        if context.latent_parallel:
            optimizer_state = shard_optimizer(optimizer_state, dictionary.dict_size, context)
            counters = shard_rows(counters, dictionary.dict_size, context)
            dictionary = shard(dictionary, context)
        trainee = Trainee.new(architecture, dictionary, config, context, optimizer_state)
        trainee.scheduler.load_state_dict(state["scheduler"])
        trainee.tokens_since_fired = counters
        trainees.append(trainee)
    return trainees


def _dedicated_moments_from_version_2(dictionary: DedicatedCrossCoder, state: dict[str, Any]) -> dict[str, Any]:
    """Adam's state of a dedicated crosscoder checkpointed in format 2 (parameters W_enc, b_enc, a dense W_dec, b_dec)
    for today's parameters (W_enc, b_enc, W_dec_base, W_dec_chat, b_dec): the decoder's moments split per model as
    ``crosscoder.hub`` splits the weights (the dropped blocks' moments were zero)."""
    old = state["state"]
    new = {new_index: old[old_index] for old_index, new_index in ((0, 0), (1, 1), (3, 4)) if old_index in old}
    if 2 in old:
        halves = {name: dictionary.split_decoder(old[2][name]) for name in MOMENTS}
        for index, model in ((2, 0), (3, 1)):  # each its own step tensor: Adam increments it in place
            new[index] = {**old[2], "step": old[2]["step"].clone(), **{name: halves[name][model] for name in halves}}
    groups = [{**group, "params": list(range(5))} for group in state["param_groups"]]
    return {"state": new, "param_groups": groups}
