"""The run's side of checkpoints: which one to resume (and whether the run may: same settings, same number of
processes, same data), and writing one with every process's data position, the RNG states, the data source's
fingerprint and the last logged metrics. The file format itself is ``crosscoder.checkpoint``'s."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import torch

from crosscoder.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from crosscoder.config import DICTIONARY_NAMES, RUN_CONTROL_FIELDS, TrainConfig, config_differences
from crosscoder.distributed import Distributed
from crosscoder.errors import CheckpointError, ConfigError, OutputExistsError
from crosscoder.provenance import located_fingerprint
from crosscoder.training.run_log import METRICS_FILE, RunLogger
from crosscoder.training.trainee import Trainee


def checkpoint_to_resume(
    config: TrainConfig, fingerprint: dict[str, Any] | None, world_size: int
) -> tuple[Path, dict[str, Any]] | None:
    """The latest checkpoint (path, state) when resuming — refused if it was written with other settings, by another
    number of processes or on other data (``fingerprint``: the data source's now; None skips that check); None for a
    new run, refused if the run folder already holds a run's output.

    ``num_tokens`` may be lowered on resume, to finish a run early (not below the tokens already trained on); the
    learning-rate decay then follows the new total (``crosscoder.training.schedules.lr_factor``)."""
    existing = list_checkpoints(config.run_dir)
    if not config.resume:
        refuse_earlier_output(config, existing)
        return None
    if not existing:
        others = earlier_output(config.run_dir)
        start_over = (
            f"it holds {', '.join(others)} from an earlier run: to start over, move {config.run_dir} aside (or choose "
            "another --run-name) and start without --resume"
            if others
            else "start without --resume"
        )
        raise CheckpointError(
            f"--resume was given but {config.run_dir / 'checkpoints'} holds no checkpoint; {start_over}"
        )
    path = existing[-1]
    checkpoint = load_checkpoint(path)
    check_settings(path, checkpoint, config)
    if len(checkpoint["data"]) != world_size:
        raise CheckpointError(
            f"the checkpoint {path} was written by {len(checkpoint['data'])} process(es) but {world_size} are "
            "running: resume with the same number of processes (each resumes its own data position)"
        )
    check_data_source(path, checkpoint, fingerprint)
    return path, checkpoint


def earlier_output(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` (docs/architecture.md §6): saved dictionaries and metrics.jsonl."""
    names = [f"{name}/" for name in DICTIONARY_NAMES.values() if (run_dir / name).is_dir()]
    return names + ([METRICS_FILE] if (run_dir / METRICS_FILE).is_file() else [])


def refuse_earlier_output(config: TrainConfig, checkpoints: list[Path]) -> None:
    """A new run never writes into a run folder holding an earlier run's checkpoints, dictionaries or metrics."""
    if checkpoints:
        raise OutputExistsError(
            f"{config.run_dir} already holds checkpoints (latest {checkpoints[-1].name}): pass --resume to continue "
            "that run, or choose another --run-name / --output-dir; nothing was overwritten"
        )
    others = earlier_output(config.run_dir)
    if others:
        raise OutputExistsError(
            f"{config.run_dir} already holds an earlier run ({', '.join(others)}; its checkpoints are gone, so it "
            "cannot be resumed): choose another --run-name / --output-dir, or move that folder aside; nothing was "
            "overwritten"
        )


def check_settings(path: Path, checkpoint: dict[str, Any], config: TrainConfig) -> None:
    """Refuse settings that differ from the checkpoint's in anything but the run-control fields and a lower
    ``num_tokens``."""
    saved_tokens = int(checkpoint["config"]["num_tokens"])
    if config.num_tokens < checkpoint["tokens"]:
        raise ConfigError(
            f"num_tokens={config.num_tokens} is below the {checkpoint['tokens']} tokens {path} has already trained "
            f"on: to finish the run early, resume with num_tokens between {checkpoint['tokens']} and {saved_tokens}"
        )
    differing = [
        name
        for name in config_differences(checkpoint["config"], config)
        if name not in RUN_CONTROL_FIELDS and not (name == "num_tokens" and config.num_tokens < saved_tokens)
    ]
    if differing:
        raise ConfigError(
            f"cannot resume {path} with a different config: {', '.join(differing)} differ from the checkpoint's; "
            "resume with the original settings (only logging, checkpointing, device and parallelism may change, and "
            "num_tokens may be lowered to finish early)"
        )


def check_data_source(path: Path, checkpoint: dict[str, Any], fingerprint: dict[str, Any] | None) -> None:
    """Refuse to resume on other data than the checkpoint's, naming what differs. A source without a fingerprint
    (a plain Python iterable) is not checked; a checkpoint written before fingerprints were recorded resumes with a
    warning."""
    if fingerprint is None:
        return
    if "data_fingerprint" not in checkpoint:
        warnings.warn(
            f"{path} was written by an older crosscoder and records no fingerprint of its data: the data source "
            "cannot be checked against the one the run started on; make sure it is the same",
            stacklevel=4,
        )
        return
    saved = checkpoint["data_fingerprint"]
    if saved is None:
        return
    saved = located_fingerprint(saved)
    differing = [
        f"{key} is {saved.get(key)!r} in the checkpoint but {fingerprint.get(key)!r} now"
        for key in sorted(saved.keys() | fingerprint.keys())
        if saved.get(key) != fingerprint.get(key)
    ]
    if differing:
        raise CheckpointError(
            f"cannot resume {path} on other data than the run started on: {'; '.join(differing)}. Resume with the "
            "data source the run was started on, or start a new run (another --run-name)"
        )


def write_checkpoint(
    config: TrainConfig,
    trainees: list[Trainee],
    step: int,
    tokens: int,
    position: dict[str, Any],
    logger: RunLogger,
    context: Distributed,
    run_facts: dict[str, Any],
) -> Path:
    """Rank 0 writes the checkpoint with every process's data position (a collective call); ``run_facts``: the
    data source's fingerprint (``data_fingerprint``) and the tokens the run was planned for (``planned_tokens``)."""
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
            "metrics": logger.last,
            **run_facts,
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
