"""The run's side of checkpoints: which one to resume (and whether the run may), and writing one with every
process's data position and the RNG states. The file format itself is ``crosscoder.checkpoint``'s."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from crosscoder.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from crosscoder.config import RUN_CONTROL_FIELDS, TrainConfig, config_differences
from crosscoder.distributed import Distributed
from crosscoder.errors import CheckpointError, ConfigError, OutputExistsError
from crosscoder.training.run_log import RunLogger
from crosscoder.training.trainee import Trainee


def checkpoint_to_resume(config: TrainConfig) -> dict[str, Any] | None:
    """The latest checkpoint when resuming (refused if it was written with other settings); None for a new run
    (refused if the run folder already holds checkpoints)."""
    existing = list_checkpoints(config.run_dir)
    if not config.resume:
        if existing:
            raise OutputExistsError(
                f"{config.run_dir} already holds checkpoints (latest {existing[-1].name}): pass --resume to continue "
                "that run, or choose another --run-name / --output-dir; nothing was overwritten"
            )
        return None
    if not existing:
        raise CheckpointError(
            f"--resume was given but {config.run_dir / 'checkpoints'} holds no checkpoint: start without --resume"
        )
    checkpoint = load_checkpoint(existing[-1])
    differing = [name for name in config_differences(checkpoint["config"], config) if name not in RUN_CONTROL_FIELDS]
    if differing:
        raise ConfigError(
            f"cannot resume {existing[-1]} with a different config: {', '.join(differing)} differ from the "
            "checkpoint's; resume with the original settings (only logging, checkpointing, device and parallelism "
            "may change)"
        )
    return checkpoint


def write_checkpoint(
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
            "rng": rng_state(),
            "dictionaries": dictionaries,
            "wandb_run_id": logger.wandb_run_id,
        }
        path = save_checkpoint(state, config.run_dir, step, config.keep_checkpoints)
    if context.enabled:
        torch.distributed.barrier()
    return path


def rng_state() -> dict[str, Any]:
    """The torch, Python (and CUDA) random states, for an exact resume."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
