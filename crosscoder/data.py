"""Resumable sources of activation batches ``x: [batch, n_sources, d_model]``.

A batch source is any iterable of batches; sources that also have ``state_dict`` / ``load_state_dict``
(the position after the last yielded batch) resume exactly. The training loop fast-forwards other iterables.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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
        return cls(read_activation_file(Path(path)), batch_size, seed, rank, world_size)

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.activations.shape[0], generator=generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        permutation = self._permutation()
        while True:
            if self.position + self.global_batch_size > len(permutation):
                self.epoch += 1
                self.position = 0
                permutation = self._permutation()
            start = self.position + self.rank * self.batch_size
            indices = permutation[start : start + self.batch_size]
            self.position += self.global_batch_size
            yield self.activations[indices]

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
        return tensors["activations"]
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise DataError(
            f"{path} cannot be read as a weights-only torch file ({type(error).__name__}): corrupt, truncated, or "
            "holding objects other than one tensor"
        ) from error
    if not isinstance(tensor, torch.Tensor):
        raise DataError(f"{path} must hold one tensor [tokens, n_sources, d_model], got {type(tensor).__name__}")
    return tensor
