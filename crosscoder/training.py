"""The training loop (DESIGN §4): one batch stream feeding one or more dictionaries, with exact resume.

Read ``train`` top to bottom: pick up or start the run, then for each batch every dictionary takes one
step (``Trainee.step``); metrics, checkpoints and validation happen every so many steps; at the end each
dictionary is saved with ``save_pretrained`` (and pushed to the Hub when asked).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from crosscoder.activations import resolve_device
from crosscoder.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from crosscoder.config import DICTIONARY_NAMES, RUN_CONTROL_FIELDS, Architecture, TrainConfig
from crosscoder.data import ResumableBatches, TensorActivations
from crosscoder.dictionary import BatchTopKCrossCoder, BatchTopKSAE, L1CrossCoder, SparseDictionary, StepBuffers
from crosscoder.distributed import Distributed, init_distributed, rank_device
from crosscoder.hub import dictionary_from_state
from crosscoder.losses import auxk_loss, l1_penalty, reconstruction_loss
from crosscoder.metrics import ReconstructionStats, active_counts
from crosscoder.normalization import estimate_input_scale, geometric_median
from crosscoder.sharding import (
    SHARDED,
    check_shardable,
    consolidate,
    consolidate_optimizer,
    shard,
    shard_optimizer,
    shard_rows,
    sharding_problem,
)
from crosscoder.synthetic import PlantedActivations, PlantedDictionary


class NonFiniteError(RuntimeError):
    """A batch or a loss became NaN/Inf; training stopped without writing a checkpoint."""


# ---------------------------------------------------------------------------- one dictionary being trained
@dataclass
class Trainee:
    """A dictionary with its optimizer, schedule and dead-latent counters (tokens since each latent fired)."""

    name: str
    architecture: Architecture
    dictionary: SparseDictionary
    optimizer: torch.optim.Adam
    scheduler: LambdaLR
    tokens_since_fired: torch.Tensor  # [dict_size] int64
    window: ReconstructionStats = field(default_factory=ReconstructionStats)
    buffers: StepBuffers = field(default_factory=StepBuffers)
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def input_of(self, x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
        """The dictionary's raw input from a paired batch x: [batch, n_sources, d_model]."""
        return dictionary_input(self.architecture, x, config)

    def step(self, x: torch.Tensor, step: int, k: int, config: TrainConfig, context: Distributed) -> torch.Tensor:
        """One optimisation step on raw paired activations x (this process's share of the global batch); returns
        the (detached) total loss."""
        dictionary = self.dictionary
        x_normalized = dictionary.normalize(self.input_of(x, config))
        out = dictionary.training_forward(x_normalized, k, context, self.buffers)
        reduce = context.all_reduce if context.data_parallel else None
        reconstruction = reconstruction_loss(x_normalized, out.reconstruction, config.loss)
        losses = {"reconstruction_loss": reconstruction}
        if dictionary.uses_batch_topk:
            dead = self.tokens_since_fired >= config.dead_tokens
            dead_anywhere = dead.any()
            if context.latent_parallel:  # each process counts its own latents
                dead_anywhere = context.all_reduce(dead_anywhere.long()) > 0
            k_aux = config.aux_k if config.aux_k is not None else dictionary.d_model // 2
            dead_reconstruction = None
            if dead.device.type != "cpu" or bool(dead_anywhere):  # skipped where checking costs no device sync
                dead_reconstruction = dictionary.dead_latent_reconstruction(out, dead, k_aux, context)
            losses["aux_loss"] = (
                auxk_loss(x_normalized - out.reconstruction, dead_reconstruction, reduce) * dead_anywhere
                if dead_reconstruction is not None
                else reconstruction.new_zeros(())
            )
            loss = reconstruction + config.aux_coefficient * losses["aux_loss"]
        else:
            value_code_norms = dictionary.code_norms()[out.codes.latents]
            losses["l1_penalty"] = l1_penalty(out.values, value_code_norms, x.shape[0])
            loss = reconstruction + l1_coefficient(config, step) * losses["l1_penalty"]

        self.optimizer.zero_grad(set_to_none=True)
        if context.data_parallel:  # the sum of the processes' gradients of loss / N is the average gradient
            (loss / context.world_size).backward()
            for parameter in dictionary.parameters():
                if parameter.grad is not None:
                    context.all_reduce(parameter.grad)  # every process then takes the same step
        else:
            loss.backward()
        dictionary.before_optimizer_step()
        clip_gradients(dictionary, config.grad_clip, context)
        self.optimizer.step()
        self.scheduler.step()
        dictionary.after_optimizer_step()

        with torch.no_grad():
            active = out.active_counts()  # this process's tokens (or latents); combined when the window is read
            batch_tokens = x.shape[0] * (context.world_size if context.data_parallel else 1)
            self.tokens_since_fired += batch_tokens
            fired = context.all_reduce(active.clone()) if context.data_parallel else active
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
            if out.min_kept_score is not None and step >= config.threshold_start_step:
                theta, beta = dictionary.threshold, config.threshold_beta
                theta.copy_(torch.where(theta < 0, out.min_kept_score, beta * theta + (1 - beta) * out.min_kept_score))
            self.window.update(x_normalized, out.reconstruction, active)
            for name, value in {"loss": loss, **losses}.items():
                self.loss_sums[name] = self.loss_sums.get(name, 0) + value.detach()
        return loss.detach()

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
        metrics["dead_fraction"] = float((counters >= config.dead_tokens).float().mean())
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self.dictionary.uses_batch_topk:
            metrics["threshold"] = float(self.dictionary.threshold)
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


def clip_gradients(dictionary: SparseDictionary, max_norm: float, context: Distributed) -> None:
    """Clip the gradient norm to ``max_norm``; with latent sharding the norm is over every process's latents
    (the replicated ``b_dec`` counted once), as ``torch.nn.utils.clip_grad_norm_`` computes it in one process."""
    if not context.latent_parallel:
        torch.nn.utils.clip_grad_norm_(dictionary.parameters(), max_norm)
        return
    grads = {name: p.grad for name, p in dictionary.named_parameters() if p.grad is not None}
    squares = {name: torch.linalg.vector_norm(grad).square() for name, grad in grads.items()}
    sharded = context.all_reduce(sum(value for name, value in squares.items() if name in SHARDED).clone())
    total = (sharded + sum(value for name, value in squares.items() if name not in SHARDED)).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for parameter in dictionary.parameters():
        if parameter.grad is not None:
            parameter.grad.mul_(scale)


def dictionary_input(architecture: Architecture, x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Crosscoders read the paired batch x: [batch, 2, d]; a diff-SAE reads x_chat − x_base: [batch, d] (taken
    from a paired batch, or as given when the source already yields differences)."""
    if architecture != "diff_sae" or x.dim() == 2:  # a [batch, d] batch already is a difference
        return x
    if x.shape[1] != 2:
        raise ValueError(f"a difference SAE needs exactly two sources (base, chat), got {x.shape[1]}")
    base, chat = x[:, 0], x[:, 1]
    return chat - base if config.diff_direction == "chat_minus_base" else base - chat


def l1_coefficient(config: TrainConfig, step: int) -> float:
    """λ, ramped linearly from 0 over ``l1_warmup_steps``."""
    if config.l1_warmup_steps <= 0:
        return config.l1_coefficient
    return config.l1_coefficient * min(1.0, step / config.l1_warmup_steps)


def current_k(config: TrainConfig, step: int) -> int:
    """k, annealed linearly from ``k_max`` to ``k`` over ``k_anneal_steps``."""
    if config.k_max is None or step >= config.k_anneal_steps:
        return config.k
    return round(config.k_max - (config.k_max - config.k) * step / config.k_anneal_steps)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant, with an optional linear decay to 0 over the final fraction."""
    factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    total = config.total_steps
    decay_start = total * (1 - config.decay_fraction)
    if config.decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total - step) / (total - decay_start))
    return factor


# ---------------------------------------------------------------------------- building and restoring
def resolved_dict_size(config: TrainConfig, d_model: int) -> int:
    """``dict_size``, or ``expansion_factor · d_model`` when it is not set."""
    return config.dict_size or config.expansion_factor * d_model


def new_dictionary(architecture: Architecture, config: TrainConfig, d_model: int, n_sources: int) -> SparseDictionary:
    """A freshly initialised dictionary of the given architecture for activations of this shape."""
    dict_size = resolved_dict_size(config, d_model)
    names = list(config.source_names) if config.source_names else (["base", "chat"] if n_sources == 2 else None)
    norm = {} if config.init_decoder_norm is None else {"init_decoder_norm": config.init_decoder_norm}
    if architecture == "batchtopk":
        return BatchTopKCrossCoder(d_model, dict_size, config.k, n_sources, source_names=names, **norm)
    if architecture == "l1":
        return L1CrossCoder(d_model, dict_size, n_sources, source_names=names, **norm)
    direction = "chat - base" if config.diff_direction == "chat_minus_base" else "base - chat"
    return BatchTopKSAE(d_model, dict_size, config.k, input_description=direction)


def _optimizer_and_schedule(dictionary: SparseDictionary, config: TrainConfig) -> tuple[torch.optim.Adam, LambdaLR]:
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=config.lr, betas=(0.9, 0.999), fused=True)
    return optimizer, LambdaLR(optimizer, lambda step: lr_factor(config, step))


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
        raw = dictionary_input(architecture, sample, config)
        dictionary = new_dictionary(architecture, config, sample.shape[-1], sample.shape[1]).to(device)
        with torch.no_grad():
            reduce = context.all_reduce if context.enabled else None
            dictionary.input_scale.copy_(estimate_input_scale(dictionary.as_sources(raw), reduce))
            first = dictionary.normalize(dictionary_input(architecture, first_global, config))
            if config.b_dec_init == "geometric_median":
                dictionary.b_dec.copy_(geometric_median(first))
            elif config.b_dec_init == "mean":
                dictionary.b_dec.copy_(first.mean(dim=0))
        if context.latent_parallel:  # every process built the same whole dictionary; keep this one's latents
            dictionary = shard(dictionary, context)
        dictionary.train()
        optimizer, scheduler = _optimizer_and_schedule(dictionary, config)
        counters = torch.zeros(dictionary.dict_size, dtype=torch.long, device=device)
        name = DICTIONARY_NAMES[architecture]
        trainees.append(Trainee(name, architecture, dictionary, optimizer, scheduler, counters))
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
        if context.latent_parallel:
            optimizer_state = shard_optimizer(optimizer_state, dictionary.dict_size, context)
            counters = shard_rows(counters, dictionary.dict_size, context)
            dictionary = shard(dictionary, context)
        dictionary.train()
        optimizer, scheduler = _optimizer_and_schedule(dictionary, config)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        trainees.append(Trainee(name, architecture, dictionary, optimizer, scheduler, counters))
    return trainees


# ---------------------------------------------------------------------------- data position
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
        iterator = iter(self.source)
        for _ in itertools.islice(iterator, self._skip):
            pass
        for batch in iterator:
            self.consumed += 1
            position: dict[str, Any] = {"batches": self.consumed}
            if isinstance(self.source, ResumableBatches):
                position["source"] = self.source.state_dict()
            yield batch, position


def default_batches(config: TrainConfig, context: Distributed) -> Iterable[torch.Tensor]:
    """The batch source the config names — paired models, a cache, a tensor file, the model organism, or planted
    synthetic data — yielding this process's share of each global batch."""
    local = context.local_batch_size(config.batch_size)
    rank, world = context.rank, context.world_size
    if config.base_model:
        from crosscoder.activations import PairedActivationStream

        return PairedActivationStream.from_config(
            dataclasses.replace(config, batch_size=local), rank=rank, world_size=world
        )
    if config.cache is not None:
        from crosscoder.cache import ActivationCache

        return ActivationCache(config.cache, local, seed=config.seed, rank=rank, world_size=world)
    if config.activations is not None:
        return TensorActivations.from_file(config.activations, local, config.seed, rank, world)
    if config.model_organism:
        from crosscoder.demo import organism_stream

        return organism_stream(dataclasses.replace(config, batch_size=local), rank=rank, world_size=world)
    if config.synthetic:
        return PlantedActivations(PlantedDictionary.random(seed=config.seed), local, config.seed, rank, world)
    raise ValueError(
        "no training data named: pass --base-model and --chat-model (with --datasets), --cache DIR, "
        "--activations FILE, --model-organism (offline demo models) or --synthetic (planted dictionary)"
    )


# ---------------------------------------------------------------------------- the loop
def train(
    config: TrainConfig,
    batches: Iterable[torch.Tensor] | None = None,
    validation_batches: Iterable[torch.Tensor] | None = None,
) -> dict[str, SparseDictionary]:
    """Train the configured dictionaries on batches x: [batch, n_sources, d_model] (raw activations).

    ``batches`` defaults to what the config names. ``validation_batches`` (re-iterable) are evaluated with
    the inference threshold every ``validate_every`` steps and at the end. Returns the trained dictionaries
    by name; each is also saved to ``config.run_dir / name``.
    """
    context = init_distributed(resolve_device(config.device))
    if context.enabled and config.parallelism == "latents" and config.dict_size is not None:  # before any compute
        check_shardable(config.dict_size, config.k, context)
    device = torch.device(rank_device(resolve_device(config.device), context))
    run_dir = config.run_dir
    if batches is None and config.model_organism and context.enabled:  # one process builds it, the others wait
        if context.is_main:
            from crosscoder.organism import build_model_organism

            build_model_organism(seed=config.seed, progress=config.progress)
        torch.distributed.barrier()
    stream = PositionedBatches(batches if batches is not None else default_batches(config, context))
    checkpoint = _checkpoint_to_resume(config)
    if checkpoint is not None and len(checkpoint["data"]) != context.world_size:
        raise CheckpointError(
            f"the checkpoint was written by {len(checkpoint['data'])} process(es) but {context.world_size} are "
            "running: resume with the same number of processes (each resumes its own data position)"
        )

    if checkpoint is not None:
        saved_size = next(iter(checkpoint["dictionaries"].values()))["config"]["dict_size"]
        context = dataclasses.replace(context, shard_latents=shards_latents(config, context.world_size, saved_size))
        trainees = restore_trainees(config, checkpoint["dictionaries"], device, context)
        stream.restore(checkpoint["data"][context.rank])
        step, tokens = checkpoint["step"], checkpoint["tokens"]
        _set_rng_state(checkpoint["rng"])
        iterator: Iterator[tuple[torch.Tensor, dict[str, Any]]] = iter(stream)
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        iterator = iter(stream)
        first = _take_tokens(iterator, config.normalization_tokens)
        dict_size = resolved_dict_size(config, first[0][0].shape[-1])
        context = dataclasses.replace(context, shard_latents=shards_latents(config, context.world_size, dict_size))
        trainees = start_trainees(config, [batch for batch, _ in first], device, context)
        iterator = itertools.chain(first, iterator)
        step, tokens = 0, 0
    shapes = _accepted_shapes(trainees)

    logger = RunLogger(config, run_dir, checkpoint.get("wandb_run_id") if checkpoint else None, context.is_main)
    guard = FiniteGuard(device, context)
    position: dict[str, Any] = checkpoint["data"][context.rank] if checkpoint else {"batches": 0}
    last_checkpoint = list_checkpoints(run_dir)[-1] if checkpoint else None
    total = config.total_steps
    progress = tqdm(
        total=total,
        initial=step,
        disable=not (config.progress and context.is_main),
        unit="step",
        desc=config.run_name,
    )
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < total:
            item = next(iterator, None)
            if not context.every_process(item is not None):  # one collective per step only under torchrun
                raise RuntimeError(
                    f"the batch source ran out after {step} of {total} steps"
                    + (" on at least one process" if context.enabled else "")
                    + ": provide more data or lower num_tokens"
                )
            x, position = item
            if tuple(x.shape[1:]) not in shapes:
                accepted = " or ".join(str(["batch", *shape]).replace("'", "") for shape in sorted(shapes))
                raise ValueError(
                    f"batch at step {step} has shape {list(x.shape)} but the dictionaries take {accepted}: every "
                    "batch must come from the same sources and layer"
                )
            x = x.to(device, non_blocking=True)
            guard.watch("batch", ~torch.isfinite(x).all(), step)
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # the guard stops the run at its next check
            x = context.global_batch(x)
            k = current_k(config, step)
            for trainee in trainees:
                loss = trainee.step(x, step, k, config, context)
                guard.watch(f"{trainee.name} loss", ~torch.isfinite(loss), step)
            step += 1
            tokens += x.shape[0] * (context.world_size if context.data_parallel else 1)
            window_steps += 1
            progress.update(1)

            if step % config.log_every == 0 or step == total:
                guard.check(last_checkpoint)
                elapsed = time.perf_counter() - window_start
                metrics = {t.name: t.read_window(window_steps, config, context) for t in trainees}
                data = {f"data/{name}": value for name, value in getattr(stream.source, "statistics", dict)().items()}
                throughput = window_steps * x.shape[0] * (context.world_size if context.data_parallel else 1) / elapsed
                logger.log(step, tokens, metrics, tokens_per_second=throughput, **data)
                progress.set_postfix({f"{t.name[:8]} fve": f"{metrics[t.name]['fve']:.3f}" for t in trainees})
                window_start, window_steps = time.perf_counter(), 0
            if validation_batches is not None and config.validate_every and step % config.validate_every == 0:
                logger.log(
                    step,
                    tokens,
                    {f"{t.name}/val": validate(t, validation_batches, config, device, context) for t in trainees},
                )
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                guard.check(last_checkpoint)
                last_checkpoint = _write_checkpoint(config, trainees, step, tokens, position, logger, context)
    finally:
        progress.close()
    guard.check(last_checkpoint)
    _write_checkpoint(config, trainees, step, tokens, position, logger, context)
    final_metrics = (
        {t.name: validate(t, validation_batches, config, device, context) for t in trainees}
        if validation_batches
        else logger.last
    )
    logger.finish()
    saved = _save_dictionaries(config, trainees, step, tokens, final_metrics, context)
    if context.enabled:  # nobody leaves before rank 0 has written the dictionaries
        torch.distributed.barrier()
    return saved


def shards_latents(config: TrainConfig, world_size: int, dict_size: int) -> bool:
    """Whether ``world_size`` processes split the latents rather than the batch (``TrainConfig.parallelism``):
    ``auto`` splits them when that communicates less per step than all-reducing the gradients (the dictionary has at
    least as many latents as the global batch has tokens) and every dictionary can be split evenly."""
    if world_size <= 1 or config.parallelism == "data":
        return False
    if config.parallelism == "latents":
        return True
    return (
        "l1" not in config.architectures
        and sharding_problem(dict_size, config.k, world_size) is None
        and dict_size >= config.batch_size
    )


def _checkpoint_to_resume(config: TrainConfig) -> dict[str, Any] | None:
    existing = list_checkpoints(config.run_dir)
    if not config.resume:
        if existing:
            raise FileExistsError(
                f"{config.run_dir} already holds checkpoints (latest {existing[-1].name}): pass --resume to continue "
                "that run, or choose another --run-name / --output-dir; nothing was overwritten"
            )
        return None
    if not existing:
        raise CheckpointError(
            f"--resume was given but {config.run_dir / 'checkpoints'} holds no checkpoint: start without --resume"
        )
    checkpoint = load_checkpoint(existing[-1])
    saved = TrainConfig.from_dict(checkpoint["config"])
    differing = sorted(
        name
        for name, value in config.to_dict().items()
        if name not in RUN_CONTROL_FIELDS and saved.to_dict()[name] != value
    )
    if differing:
        raise ValueError(
            f"cannot resume {existing[-1]} with a different config: {', '.join(differing)} differ from the "
            "checkpoint's; resume with the original settings (only logging, checkpointing, device and parallelism "
            "may change)"
        )
    return checkpoint


def _take_tokens(
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
        raise ValueError("the batch source is empty: there is nothing to train on")
    return taken


def _accepted_shapes(trainees: list[Trainee]) -> set[tuple[int, ...]]:
    """Per-token batch shapes the dictionaries accept: paired [n_sources, d_model], or [d_model] differences
    when every dictionary is a diff-SAE."""
    first = trainees[0].dictionary
    n_sources = 2 if trainees[0].architecture == "diff_sae" else first.n_sources
    shapes = {(n_sources, first.d_model)}
    if all(trainee.architecture == "diff_sae" for trainee in trainees):
        shapes.add((first.d_model,))
    return shapes


@torch.no_grad()
def validate(
    trainee: Trainee,
    batches: Iterable[torch.Tensor],
    config: TrainConfig,
    device: torch.device,
    context: Distributed | None = None,
) -> dict[str, float]:
    """FVE (total, per source), L0 and dead fraction on held-out batches with the inference threshold (every
    process passes the same batches; with latent sharding each decodes its latents and the parts are summed)."""
    dictionary, stats = trainee.dictionary, ReconstructionStats()
    sharded = context is not None and context.latent_parallel
    for x in batches:
        x_normalized = dictionary.normalize(trainee.input_of(x.to(device), config))
        codes = dictionary.select_with_threshold(dictionary.activations_normalized(x_normalized))
        x_hat = dictionary.decode_normalized(codes)
        if sharded:  # every process added b_dec to its part: sum the parts without it, then add it once
            x_hat = context.all_reduce(x_hat - dictionary.b_dec) + dictionary.b_dec
        stats.update(x_normalized, x_hat, active_counts(codes))
    if sharded:
        stats.gather_latents(context.all_gather_rows)
    metrics = stats.summary()
    metrics["dead_fraction"] = float((stats.latent_frequencies() == 0).double().mean())
    return metrics


class FiniteGuard:
    """Records, without host syncs, the first step whose batch or loss was not finite; ``check`` raises."""

    def __init__(self, device: torch.device, context: Distributed) -> None:
        self.first_bad: dict[str, torch.Tensor] = {}
        self.device, self.context = device, context

    def watch(self, what: str, bad: torch.Tensor, step: int) -> None:
        first = self.first_bad.setdefault(what, torch.full((), -1, dtype=torch.long, device=self.device))
        first.copy_(torch.where((first < 0) & bad, step, first))

    def check(self, last_checkpoint: Path | None) -> None:
        """Raise on every process if any process saw a non-finite batch or loss (a collective call)."""
        for what, first in self.first_bad.items():
            if self.context.enabled:  # every process raises together, naming the first bad step of any
                seen = torch.where(first >= 0, first, torch.iinfo(torch.long).max).view(1)
                torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MIN)
                bad_step = -1 if int(seen) == torch.iinfo(torch.long).max else int(seen)
            else:
                bad_step = int(first)
            if bad_step >= 0:
                kept = (
                    f"the last good checkpoint {last_checkpoint} is intact"
                    if last_checkpoint
                    else "no checkpoint was written yet"
                )
                raise NonFiniteError(
                    f"{what} at step {bad_step} contains NaN or Inf; training stopped and {kept}. "
                    "Fix the data (for example drop outlier tokens) or lower the learning rate, then resume"
                )


def _write_checkpoint(
    config: TrainConfig,
    trainees: list[Trainee],
    step: int,
    tokens: int,
    position: dict[str, Any],
    logger: RunLogger,
    context: Distributed,
) -> Path:
    """Rank 0 writes the checkpoint with every process's data position (a collective call)."""
    positions = context.all_gather_objects(position)
    dictionaries = {trainee.name: trainee.state_dict(context) for trainee in trainees}
    path = config.run_dir / "checkpoints" / f"step_{step:09d}.pt"
    if context.is_main:
        state = {
            "config": config.to_dict(),
            "step": step,
            "tokens": tokens,
            "data": positions,
            "rng": _rng_state(),
            "dictionaries": dictionaries,
            "wandb_run_id": logger.wandb_run_id,
        }
        path = save_checkpoint(state, config.run_dir, step, config.keep_checkpoints)
    if context.enabled:
        torch.distributed.barrier()
    return path


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_dictionaries(
    config: TrainConfig,
    trainees: list[Trainee],
    step: int,
    tokens: int,
    metrics: dict[str, dict[str, float]],
    context: Distributed,
) -> dict[str, SparseDictionary]:
    saved = {}
    for trainee in trainees:
        dictionary = consolidate(trainee.dictionary, context) if context.latent_parallel else trainee.dictionary
        dictionary = dictionary.eval()
        dictionary.metadata.update(
            {
                "architecture": trainee.architecture,
                "training_steps": step,
                "training_tokens": tokens,
                "processes": context.world_size,
                "parallelism": "latents" if context.latent_parallel else "data",
                "metrics": metrics.get(trainee.name, {}),
                "train_config": config.to_dict(),
            }
        )
        saved[trainee.name] = dictionary
        if not context.is_main:
            continue
        folder = config.run_dir / trainee.name
        dictionary.save_pretrained(folder)
        if config.push_to_hub:
            repo_id = config.push_to_hub if len(trainees) == 1 else f"{config.push_to_hub}-{trainee.name}"
            dictionary.push_to_hub(repo_id)
    return saved


class RunLogger:
    """Metrics to ``run_dir/metrics.jsonl`` and, when configured, to Weights & Biases (main process only; the
    others keep the latest metrics without writing)."""

    def __init__(self, config: TrainConfig, run_dir: Path, wandb_run_id: str | None, is_main: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl" if is_main else None
        self.last: dict[str, dict[str, float]] = {}
        self.run = None
        if config.wandb_project and is_main:
            import wandb

            self.run = wandb.init(
                project=config.wandb_project,
                name=config.run_name,
                id=wandb_run_id,
                resume="allow",
                mode=config.wandb_mode,
                dir=str(run_dir),
                config=config.to_dict(),
            )
        self.wandb_run_id = self.run.id if self.run is not None else None

    def log(self, step: int, tokens: int, metrics: dict[str, dict[str, float]], **extra: float) -> None:
        self.last.update(metrics)
        flat = {f"{group}/{name}": value for group, values in metrics.items() for name, value in values.items()}
        flat.update(extra)
        flat["tokens"] = tokens
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **flat}) + "\n")
        if self.run is not None:
            self.run.log(flat, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
