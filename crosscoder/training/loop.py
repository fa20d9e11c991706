"""The training loop: one batch stream feeding one or more dictionaries, with exact resume (docs/architecture.md).

Read ``train`` top to bottom: pick up or start the run, then for each batch every dictionary takes one step
(``Trainee.step`` → ``crosscoder.training.step.training_step``); metrics, checkpoints and validation happen every
so many steps; at the end each dictionary is saved with its provenance record (and pushed when asked).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from crosscoder.checkpoint import list_checkpoints
from crosscoder.config import TrainConfig
from crosscoder.dictionary import SparseDictionary
from crosscoder.distributed import init_distributed, rank_device
from crosscoder.errors import CheckpointError, DataError
from crosscoder.models import resolve_device
from crosscoder.progress import progress_bar
from crosscoder.sharding import check_shardable, shards_latents
from crosscoder.training.batches import (
    PositionedBatches,
    accepted_shapes,
    check_batch_shape,
    default_batches,
    take_tokens,
)
from crosscoder.training.checkpointing import checkpoint_to_resume, set_rng_state, write_checkpoint
from crosscoder.training.monitoring import FiniteGuard, validate
from crosscoder.training.run_log import RunLogger
from crosscoder.training.saving import save_dictionaries
from crosscoder.training.trainee import resolved_dict_size, restore_trainees, start_trainees


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
    stream = PositionedBatches(batches if batches is not None else default_batches(config, context))
    checkpoint = checkpoint_to_resume(config)
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
        set_rng_state(checkpoint["rng"])
        iterator: Iterator[tuple[torch.Tensor, dict[str, Any]]] = iter(stream)
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        iterator = iter(stream)
        first = take_tokens(iterator, config.normalization_tokens)
        dict_size = resolved_dict_size(config, first[0][0].shape[-1])
        context = dataclasses.replace(context, shard_latents=shards_latents(config, context.world_size, dict_size))
        trainees = start_trainees(config, [batch for batch, _ in first], device, context)
        iterator = itertools.chain(first, iterator)
        step, tokens = 0, 0
    shapes = accepted_shapes([trainee.dictionary for trainee in trainees])

    logger = RunLogger(config, run_dir, checkpoint.get("wandb_run_id") if checkpoint else None, context.is_main)
    guard = FiniteGuard(device, context)
    position: dict[str, Any] = checkpoint["data"][context.rank] if checkpoint else {"batches": 0}
    last_checkpoint = list_checkpoints(run_dir)[-1] if checkpoint else None
    total = config.total_steps
    tokens_per_step = config.batch_size
    progress = progress_bar(
        total=total, initial=step, enabled=config.progress and context.is_main, unit="step", desc=config.run_name
    )
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < total:
            item = next(iterator, None)
            if not context.every_process(item is not None):  # one collective per step only under torchrun
                raise DataError(
                    f"the batch source ran out after {step} of {total} steps"
                    + (" on at least one process" if context.enabled else "")
                    + ": provide more data or lower num_tokens"
                )
            x, position = item
            check_batch_shape(x, shapes, step)
            x = x.to(device, non_blocking=True)
            guard.watch("batch", ~torch.isfinite(x).all(), step)
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # the guard stops the run at its next check
            x = context.global_batch(x)
            tokens_per_step = x.shape[0] * (context.world_size if context.data_parallel else 1)
            for trainee in trainees:
                loss = trainee.step(x, step, config, context)
                guard.watch(f"{trainee.name} loss", ~torch.isfinite(loss), step)
            step += 1
            tokens += tokens_per_step
            window_steps += 1
            progress.update(1)

            if step % config.log_every == 0 or step == total:
                guard.check(last_checkpoint)
                elapsed = time.perf_counter() - window_start
                metrics = {t.name: t.read_window(window_steps, config, context) for t in trainees}
                data = {f"data/{name}": value for name, value in getattr(stream.source, "statistics", dict)().items()}
                logger.log(step, tokens, metrics, tokens_per_second=window_steps * tokens_per_step / elapsed, **data)
                progress.set_postfix({f"{t.name[:8]} fve": f"{metrics[t.name]['fve']:.3f}" for t in trainees})
                window_start, window_steps = time.perf_counter(), 0
            if validation_batches is not None and config.validate_every and step % config.validate_every == 0:
                logger.log(
                    step, tokens, {f"{t.name}/val": validate(t, validation_batches, device, context) for t in trainees}
                )
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                guard.check(last_checkpoint)
                last_checkpoint = write_checkpoint(config, trainees, step, tokens, position, logger, context)
    finally:
        progress.close()
    guard.check(last_checkpoint)
    write_checkpoint(config, trainees, step, tokens, position, logger, context)
    final_metrics = (
        {t.name: validate(t, validation_batches, device, context) for t in trainees}
        if validation_batches
        else logger.last
    )
    logger.finish()
    description = getattr(stream.source, "description", None)
    saved = save_dictionaries(
        config, trainees, step, tokens, final_metrics, description() if callable(description) else None, context
    )
    if context.enabled:  # nobody leaves before rank 0 has written the dictionaries
        torch.distributed.barrier()
    return saved
