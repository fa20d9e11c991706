"""Training checkpoints: written atomically (temp file + rename), read back with ``weights_only=True``.

A checkpoint holds everything for an exact resume (docs/architecture.md §6): per dictionary its config, weights (θ and
normalisation included), optimizer, schedule and dead-latent counters; the step, tokens seen, RNG states
and the data position.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from crosscoder.errors import CheckpointError

CHECKPOINT_FORMAT = "crosscoder-checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write ``run_dir/checkpoints/step_<step>.pt`` atomically, then delete all but the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    temporary = folder / f".{path.name}.tmp"
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and validate a checkpoint; errors name the file and what to do."""
    previous = [other for other in list_checkpoints(path.parent.parent) if other != path]
    fallback = (
        f"move it aside to resume from the previous checkpoint {previous[-1].name}"
        if previous
        else "no earlier checkpoint exists: start the run again without --resume"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} does not exist") from error
    except Exception as error:  # torch raises several types for truncated or corrupt archives
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); {fallback}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a crosscoder training checkpoint; {fallback}")
    version = state.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} was written in checkpoint format {version!r}, newer than this crosscoder reads "
            f"({CHECKPOINT_VERSION}): upgrade crosscoder to resume it"
        )
    return state
