"""Resumable sources of activation batches ``x: [batch, n_sources, d_model]``.

A batch source is any iterable of batches; sources that also have ``state_dict`` / ``load_state_dict``
(the position after the last yielded batch) resume exactly. The training loop fast-forwards other iterables.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from crosscoder.cache.format import file_sha256
from crosscoder.errors import DataError, InputNotFoundError


@runtime_checkable
class ResumableBatches(Protocol):
    """An iterable of batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorActivations:
    """Shuffled batches from an in-memory tensor of activations, epoch after epoch, resumable.

    activations: [tokens, n_sources, d_model]. Each epoch is a fresh permutation drawn from (seed, epoch);
    the last incomplete batch of an epoch is dropped. Data parallel: the processes walk one order in global
    batches of ``batch_size · world_size`` rows and process ``rank`` takes its ``batch_size`` rows of each.
    """

    file: Path | None = None  #: the file the activations were read from (``from_file``)
    _fingerprint: dict[str, Any] | None = None

    def __init__(
        self, activations: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if activations.dim() != 3:
            raise DataError(f"activations must have shape [tokens, n_sources, d_model], got {list(activations.shape)}")
        if activations.shape[0] < batch_size * world_size:
            raise DataError(
                f"only {activations.shape[0]} tokens of activations for a batch of {batch_size * world_size}: "
                "collect more or lower batch_size"
            )
        self.activations = activations
        self.batch_size, self.global_batch_size = batch_size, batch_size * world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.position = 0

    @classmethod
    def from_file(
        cls, path: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> TensorActivations:
        """Read a ``.safetensors`` file (key ``activations``) or a tensor ``torch.save``d to ``.pt``."""
        activations = cls(read_activation_file(Path(path)), batch_size, seed, rank, world_size)
        activations.file = Path(path)
        return activations

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies these activations for a resumed training run: the file's size and sha256 (hashed on the
        first call only); None for a tensor given in memory."""
        if self.file is not None and self._fingerprint is None:
            size = self.file.stat().st_size
            self._fingerprint = {"source": "activation file", "bytes": size, "sha256": file_sha256(self.file)}
        return self._fingerprint

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.activations.shape[0], generator=generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        permutation = self._permutation()
        warned = False
        while True:
            if self.position + self.global_batch_size > len(permutation):
                self.epoch += 1
                self.position = 0
                permutation = self._permutation()
                if not warned:
                    warnings.warn(self._repeat_warning(), stacklevel=2)
                    warned = True
            start = self.position + self.rank * self.batch_size
            indices = permutation[start : start + self.batch_size]
            self.position += self.global_batch_size
            yield self.activations[indices]

    def _repeat_warning(self) -> str:
        tokens, per_pass = self.activations.shape[0], self.activations.shape[0] // self.global_batch_size
        return (
            f"{self.file or 'the activation tensor'} holds {tokens:,} tokens, {per_pass:,} batches of "
            f"{self.global_batch_size:,}: pass {self.epoch + 1} over them begins, so training repeats tokens it has "
            f"seen; collect more activations or train at most {per_pass:,} steps (--num-tokens "
            f"{per_pass * self.global_batch_size})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def read_activation_file(path: Path) -> torch.Tensor:
    """Activations [tokens, n_sources, d_model] from ``.safetensors`` (key ``activations``) or ``.pt``."""
    if not path.is_file():
        raise InputNotFoundError(f"activation file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise DataError(f"{path} cannot be read as safetensors ({error}): corrupt or truncated") from error
        if "activations" not in tensors:
            raise DataError(f"{path} has no tensor named 'activations' (it has {sorted(tensors)})")
        return _checked_floating(tensors["activations"], path)
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise DataError(
            f"{path} cannot be read as a weights-only torch file ({type(error).__name__}): corrupt, truncated, or "
            "holding objects other than one tensor"
        ) from error
    if not isinstance(tensor, torch.Tensor):
        raise DataError(f"{path} must hold one tensor [tokens, n_sources, d_model], got {type(tensor).__name__}")
    return _checked_floating(tensor, path)


def _checked_floating(activations: torch.Tensor, path: Path) -> torch.Tensor:
    if not activations.is_floating_point():
        raise DataError(
            f"{path} holds {activations.dtype} activations: activations are floating-point numbers (float32, "
            "bfloat16, float16); save the model's activations themselves, not token ids or quantised values"
        )
    return activations
