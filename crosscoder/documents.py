"""Documents for the paired stream: datasets opened from the Hub or local files, and a resumable cursor over each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosscoder.errors import ConfigError, DataError, InputNotFoundError


@dataclass
class DocumentCursor:
    """Walks one dataset's documents epoch after epoch; ``(epoch, index)`` is its position."""

    dataset: Any
    name: str
    epoch: int = 0
    index: int = 0
    _iterator: Iterator[dict[str, Any]] | None = field(default=None, repr=False)

    def next_document(self) -> dict[str, Any]:
        for _attempt in range(2):
            if self._iterator is None:
                self._iterator = self._open()
            try:
                row = next(self._iterator)
            except StopIteration:
                if self.index == 0:
                    raise DataError(f"dataset {self.name} is empty: there are no documents to read") from None
                self.epoch, self.index, self._iterator = self.epoch + 1, 0, None
                continue
            self.index += 1
            return row
        raise AssertionError("unreachable")

    def _open(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.epoch)
        return iter(dataset.skip(self.index)) if self.index else iter(dataset)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._iterator = int(state["epoch"]), int(state["index"]), None


def open_dataset(spec: str, split: str, streaming: bool, seed: int, rank: int = 0, world_size: int = 1) -> Any:
    """A ``datasets`` dataset from a Hub id or a local file/folder (json, jsonl, parquet, csv, txt).

    Local map-style datasets are shuffled with the seed; streaming ones are read in order.
    """
    import datasets

    path = Path(spec)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
    if path.is_file():
        if path.suffix not in builders:
            raise ConfigError(f"cannot read {spec}: use a .json/.jsonl/.parquet/.csv/.txt file or a dataset id")
        dataset = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train", streaming=streaming)
    else:
        try:
            dataset = datasets.load_dataset(spec, split=split, streaming=streaming)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
            raise InputNotFoundError(
                f"dataset '{spec}' is neither a local file nor loadable ({type(error).__name__}: {error}); offline, "
                "pass a local .jsonl/.parquet file or a dataset already in the HF datasets cache"
            ) from error
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if not streaming:
        dataset = dataset.shuffle(seed=seed)
    return dataset
