"""Training checkpoints: written atomically (temp file + rename) with a sha256 beside them, verified and read back
with ``weights_only=True``.

A checkpoint holds everything for an exact resume (docs/architecture.md §6): per dictionary its config, weights (θ and
normalisation included), optimizer, schedule and dead-latent counters; the step, tokens seen, RNG states, the data
position and the data source's fingerprint. ``step_<step>.pt.sha256`` (``sha256sum`` format) holds the checksum of
its bytes; checkpoints written before checksums existed have none and are read unverified.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from crosscoder.cache.format import file_sha256, write_atomic
from crosscoder.errors import CheckpointError

CHECKPOINT_FORMAT = "crosscoder-checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checksum_path(path: Path) -> Path:
    """The sidecar holding a checkpoint's sha256: ``step_<step>.pt.sha256``."""
    return path.with_name(f"{path.name}.sha256")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


class _HashingWriter:
    """A binary file that hashes the bytes written to it (so a checkpoint is hashed without being read back)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write ``run_dir/checkpoints/step_<step>.pt`` and its sha256 atomically (the checksum first, so a visible
    checkpoint always has one), then delete all but the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    temporary = folder / f".{path.name}.tmp"
    payload = _with_own_storage({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state})
    with open(temporary, "wb") as handle:
        writer = _HashingWriter(handle)
        torch.save(payload, writer)
        handle.flush()
        os.fsync(handle.fileno())
    write_atomic(checksum_path(path), f"{writer.digest.hexdigest()}  {path.name}\n".encode())
    os.replace(temporary, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
        checksum_path(old).unlink(missing_ok=True)
    return path


def _with_own_storage(value: Any) -> Any:
    """``value`` (dicts, lists and tuples of tensors and plain values) with every tensor that views part of a larger
    storage replaced by a copy: ``torch.save`` writes a tensor's whole storage, and a data-parallel run's parameters
    on one host are views into one segment that also holds every process's gradients (3× their bytes with 2
    processes)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.untyped_storage().nbytes() > value.numel() * value.element_size() else value
    if isinstance(value, dict):
        return {key: _with_own_storage(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_with_own_storage(item) for item in value)
    return value


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read, verify (against its sha256, when it has one) and validate a checkpoint; errors name the file and what
    to do."""
    fallback = _fallback(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    recorded = checksum_path(path)
    if recorded.is_file() and recorded.read_text(encoding="utf-8").split()[:1] != [file_sha256(path)]:
        raise CheckpointError(f"checkpoint {path} does not match its sha256 in {recorded.name} (corrupted); {fallback}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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


def _fallback(path: Path) -> str:
    """What to do about an unreadable checkpoint: set it aside and resume from the previous one, or start over."""
    run_dir = path.parent.parent
    previous = [other for other in list_checkpoints(run_dir) if other != path]
    if previous:
        return (
            f"move it aside (e.g. `mv {path} {path}.corrupt`) and --resume continues from the previous checkpoint "
            f"{previous[-1].name}"
        )
    return (
        f"no earlier checkpoint exists: to start the run over, move the run folder aside (e.g. `mv {run_dir} "
        f"{run_dir}.corrupt`) and start again without --resume"
    )
