"""The training loop: one batch stream feeding one or more dictionaries, with exact resume (docs/architecture.md).

Read ``train`` top to bottom: pick up or start the run, then for each batch every dictionary takes one step
(``Trainee.step`` → ``crosscoder.training.step.training_step``); metrics, checkpoints and validation happen every
so many steps; at the end each dictionary is saved with its provenance record, then pushed when asked. A run that
stops early — on SIGINT / SIGTERM, or when the batch source runs out — writes a checkpoint at the step reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from crosscoder.config import TrainConfig
from crosscoder.dictionary import SparseDictionary
from crosscoder.distributed import init_distributed, rank_device
from crosscoder.errors import ConfigError
from crosscoder.host_memory import freed_blocks_kept
from crosscoder.models import resolve_device
from crosscoder.progress import progress_bar
from crosscoder.sharding import check_shardable, shards_latents
from crosscoder.training.batches import (
    PositionedBatches,
    accepted_shapes,
    check_batch_shape,
    data_fingerprint,
    default_batches,
    held_out_batches,
    take_tokens,
)
from crosscoder.training.checkpointing import checkpoint_to_resume, set_rng_state, write_checkpoint
from crosscoder.training.interruption import RunInterrupted, StopRequests
from crosscoder.training.monitoring import FiniteGuard, out_of_memory_advice, validate
from crosscoder.training.run_log import RunLogger
from crosscoder.training.saving import finished_dictionaries, push_dictionaries, save_dictionaries
from crosscoder.training.trainee import resolved_dict_size, restore_trainees, start_trainees


def train(
    config: TrainConfig,
    batches: Iterable[torch.Tensor] | None = None,
    validation_batches: Iterable[torch.Tensor] | None = None,
) -> dict[str, SparseDictionary]:
    """Train the configured dictionaries on batches x: [batch, n_sources, d_model] (raw activations).

    ``batches`` defaults to what the config names. ``validation_batches`` (re-iterable; default: the source read
    again for ``config.validation_tokens``) are evaluated with the inference threshold every ``validate_every``
    steps and at the end; the saved metrics are then theirs. Returns the trained dictionaries
    by name; each is also saved to ``config.run_dir / name`` (and then pushed when ``push_to_hub`` is set).

    Ending early: on SIGINT / SIGTERM the run finishes its step, writes a checkpoint and raises ``RunInterrupted``
    (continue with ``resume=True``); when the batch source runs out (on any process) it warns, writes a checkpoint
    and saves the dictionaries trained so far, their metadata saying so (``ended_early``). Resuming a finished run
    returns its saved dictionaries untouched.
    """
    config.check_output_dir()  # a file in the way or a read-only folder fails before any compute
    if (problem := config.threshold_window_problem()) is not None:
        warnings.warn(problem, stacklevel=2)
    if batches is not None and validation_batches is None and config.validation_tokens:
        raise ConfigError(
            f"validation_tokens={config.validation_tokens} re-reads the data source the config names, but batches "
            "were given: pass validation_batches as well, or set validation_tokens=0"
        )
    context = init_distributed(resolve_device(config.device))
    if context.enabled and config.parallelism == "latents" and config.dict_size is not None:  # before any compute
        check_shardable(config.dict_size, config.k, context)
    device = torch.device(rank_device(resolve_device(config.device), context))
    run_dir = config.run_dir
    source = batches if batches is not None else default_batches(config, context)
    fingerprint = data_fingerprint(source)
    resumed = checkpoint_to_resume(config, fingerprint, context.world_size)
    checkpoint = resumed[1] if resumed else None
    if checkpoint is not None and checkpoint["step"] >= config.total_steps:
        finished = finished_dictionaries(config, checkpoint["step"])
        if finished is not None:
            warnings.warn(
                f"{run_dir} already finished at step {checkpoint['step']}: its dictionaries, metrics and checkpoints "
                "were left as they are",
                stacklevel=2,
            )
            if context.is_main:
                push_dictionaries(config, finished)
            return finished
    # the tokens the run was started for (num_tokens may have been lowered on resume since)
    planned = checkpoint.get("planned_tokens", checkpoint["config"]["num_tokens"]) if checkpoint else config.num_tokens
    run_facts = {"data_fingerprint": fingerprint, "planned_tokens": planned}

    held_out: list[torch.Tensor] = []

    def validation() -> Iterable[torch.Tensor] | None:
        """The batches given, else (read once, when first needed) ``config.validation_tokens`` of the source."""
        if validation_batches is not None or not config.validation_tokens:
            return validation_batches
        if not held_out:
            held_out.extend(held_out_batches(config))
        return held_out

    stream = PositionedBatches(source)
    stop = StopRequests(abort_on_repeat=not context.enabled, announce=context.is_main)
    freed_blocks_kept(device.type)  # a step's temporaries reuse the last step's memory (host_memory)
    # closing stops a prefetching source's thread
    with stop, contextlib.closing(iter(stream)) as positioned:
        if checkpoint is not None:
            saved_size = next(iter(checkpoint["dictionaries"].values()))["config"]["dict_size"]
            context = dataclasses.replace(context, shard_latents=shards_latents(config, context.world_size, saved_size))
            trainees = restore_trainees(config, checkpoint["dictionaries"], device, context)
            stream.restore(checkpoint["data"][context.rank])
            step, tokens = checkpoint["step"], checkpoint["tokens"]
            set_rng_state(checkpoint["rng"])
            iterator: Iterator[tuple[torch.Tensor, dict[str, Any]]] = positioned
        else:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
            first = take_tokens(positioned, config.normalization_tokens)
            dict_size = resolved_dict_size(config, first[0][0].shape[-1])
            context = dataclasses.replace(context, shard_latents=shards_latents(config, context.world_size, dict_size))
            with out_of_memory_advice(config, "building the dictionaries"):
                trainees = start_trainees(config, [batch for batch, _ in first], device, context)
            iterator = itertools.chain(first, positioned)
            step, tokens = 0, 0
        shapes = accepted_shapes([trainee.dictionary for trainee in trainees])

        logger = RunLogger(config, run_dir, context.is_main, checkpoint)
        guard = FiniteGuard(device, context, config)
        position: dict[str, Any] = checkpoint["data"][context.rank] if checkpoint else {"batches": 0}
        last_checkpoint, checkpointed_step = (resumed[0], step) if resumed else (None, None)
        total = config.total_steps
        tokens_per_step = config.batch_size
        progress = progress_bar(
            total=total, initial=step, enabled=config.progress and context.is_main, unit="step", desc=config.run_name
        )
        window_start, window_steps = time.perf_counter(), 0

        def log_window() -> None:
            """Check finiteness, then log the metrics of the steps since the last log."""
            nonlocal window_start, window_steps
            guard.check(last_checkpoint)
            elapsed = time.perf_counter() - window_start
            metrics = {t.name: t.read_window(window_steps, config, context) for t in trainees}
            data = {f"data/{name}": value for name, value in getattr(source, "statistics", dict)().items()}
            logger.log(step, tokens, metrics, tokens_per_second=window_steps * tokens_per_step / elapsed, **data)
            progress.set_postfix({f"{t.name[:8]} fve": f"{metrics[t.name]['fve']:.3f}" for t in trainees})
            window_start, window_steps = time.perf_counter(), 0

        interrupted = None
        try:
            while step < total:
                received = stop.received  # read once, so that every process acts on what it told the others
                item = next(iterator, None) if received is None else None
                if not context.every_process(item is not None):  # one collective per step only under torchrun
                    asked = [signal for signal in context.all_gather_objects(received) if signal is not None]
                    interrupted = asked[0] if asked else None  # else the batch source ran out somewhere
                    break
                x, position = item
                check_batch_shape(x, shapes, step)
                x = x.to(device, non_blocking=True)
                guard.watch("batch", ~torch.isfinite(x).all(), step)
                x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # the guard stops the run at its check
                x = context.global_batch(x)
                tokens_per_step = x.shape[0] * (context.world_size if context.data_parallel else 1)
                for trainee in trainees:
                    try:
                        with out_of_memory_advice(config, f"training {trainee.name} at step {step}"):
                            loss = trainee.step(x, step, config, context)
                    except ValueError as error:  # on CPU, BatchTopK refuses non-finite scores: a diverged dictionary
                        if trainee.scores_finite(x):
                            raise
                        raise guard.diverged(trainee.name, step, last_checkpoint) from error
                    guard.watch(trainee.name, ~torch.isfinite(loss), step)
                step += 1
                tokens += tokens_per_step
                window_steps += 1
                progress.update(1)

                if step % config.log_every == 0 or step == total:
                    log_window()
                if config.validate_every and step % config.validate_every == 0 and validation() is not None:
                    logger.log(
                        step,
                        tokens,
                        {f"{t.name}/val": validate(t, validation(), device, context) for t in trainees},
                    )
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    guard.check(last_checkpoint)
                    last_checkpoint = write_checkpoint(
                        config, trainees, step, tokens, position, logger, context, run_facts
                    )
                    checkpointed_step = step
        finally:
            progress.close()
        if window_steps:  # the last steps of a run that ended early
            log_window()

        guard.check(last_checkpoint)
        if step != checkpointed_step:
            last_checkpoint = write_checkpoint(config, trainees, step, tokens, position, logger, context, run_facts)
        for trainee in trainees:  # the dictionaries returned are each process's own (no memory shared)
            trainee.finish_training()
        if interrupted is not None:
            logger.finish()
            raise RunInterrupted(
                f"stopped by {interrupted.name} at step {step} of {total}; the run so far is in {last_checkpoint}: "
                "continue it with the same command and --resume (Python: resume=True)",
                interrupted,
            )
        ended_early = None
        if step < total:
            ended_early = {"reason": "the batch source ran out", "planned_tokens": planned}
            warnings.warn(
                f"the batch source ran out after {step} of {total} steps"
                + (" on at least one process" if context.enabled else "")
                + f": the run ended early, with the dictionaries trained on {tokens} tokens saved in {run_dir} (their "
                f"metadata says so) and the checkpoint {last_checkpoint}. To train on, resume with more data "
                "(--resume)",
                stacklevel=2,
            )
        elif planned != config.num_tokens:
            ended_early = {"reason": "num_tokens was lowered on resume", "planned_tokens": planned}
        final_metrics = (
            {t.name: validate(t, validation(), device, context) for t in trainees}
            if validation() is not None
            else logger.last
        )
        logger.finish()
        description = getattr(source, "description", None)  # a stream's method, a cache's property
        saved = save_dictionaries(
            config,
            trainees,
            step,
            tokens,
            final_metrics,
            description() if callable(description) else description,
            context,
            ended_early,
        )
        if context.enabled:  # nobody leaves before rank 0 has written the dictionaries
            torch.distributed.barrier()
        if context.is_main:
            push_dictionaries(config, saved)
    return saved
