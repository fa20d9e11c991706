"""Documents for the paired stream: datasets opened from the Hub or local files, and a resumable cursor over each."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosscoder.errors import ConfigError, DataError, InputNotFoundError
from crosscoder.hub import can_be_hub_id

#: ``datasets`` builder of each local file type.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


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
            except UnicodeDecodeError as error:
                problem = _undecodable_line(Path(self.name))
                if problem is None:
                    raise
                raise DataError(problem) from error
            except StopIteration:
                if self.index == 0:
                    raise DataError(f"dataset {self.name} is empty: there are no documents to read") from None
                self.epoch, self.index, self._iterator = self.epoch + 1, 0, None
                continue
            self.index += 1
            return row
        raise AssertionError("unreachable")

    def locate(self, matches: Callable[[dict[str, Any]], bool]) -> str:
        """Where the first document that ``matches`` lies: the file and its line (JSON lines) or row (other local
        files), else this cursor's position."""
        path = Path(self.name)
        if path.suffix == ".jsonl" and path.is_file():
            with path.open(encoding="utf-8") as file:
                for number, line in enumerate(file, 1):
                    if line.strip() and matches(json.loads(line)):
                        return f"{path}, line {number}"
        elif path.is_file():
            import datasets

            rows = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train", streaming=True)
            for number, row in enumerate(rows, 1):
                if matches(row):
                    return f"{path}, row {number}"
        return f"{self.name}, document {self.index} of pass {self.epoch + 1} in reading order"

    def _open(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.epoch)
        return iter(dataset.skip(self.index)) if self.index else iter(dataset)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._iterator = int(state["epoch"]), int(state["index"]), None


def check_dataset_exists(spec: str) -> None:
    """Refuse at once a ``spec`` that can only name a local file (a data file's suffix, or a path no Hub id can be)
    when there is none: the Hub is not asked (offline, its retries take half a minute)."""
    path = Path(spec)
    if not path.exists() and (path.suffix in BUILDERS or not can_be_hub_id(spec)):
        raise InputNotFoundError(
            f"dataset file {spec} does not exist: pass an existing .json/.jsonl/.parquet/.csv/.txt file or a dataset id"
        )


def open_dataset(spec: str, split: str, streaming: bool, seed: int, rank: int = 0, world_size: int = 1) -> Any:
    """A ``datasets`` dataset from a Hub id or a local file/folder (json, jsonl, parquet, csv, txt).

    Local map-style datasets are shuffled with the seed; streaming ones are read in order.
    """
    import datasets

    path = Path(spec)
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise ConfigError(f"cannot read {spec}: use a .json/.jsonl/.parquet/.csv/.txt file or a dataset id")
        if _is_blank(path):
            raise DataError(f"dataset {path} is empty: it holds no documents; fill it or leave it out of --datasets")
        try:
            dataset = datasets.load_dataset(
                BUILDERS[path.suffix], data_files=str(path), split="train", streaming=streaming
            )
        except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as error:
            problem = _undecodable_line(path)
            if problem is None:
                raise
            raise DataError(problem) from error
    else:
        check_dataset_exists(spec)
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


def _is_blank(path: Path) -> bool:
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _undecodable_line(path: Path) -> str | None:
    """What is wrong where a local text file first breaks UTF-8 (file, line, byte), or None when it does not."""
    if not path.is_file() or path.suffix == ".parquet":
        return None
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"{path}, line {number}, is not UTF-8 text (byte 0x{line[error.start]:02x} at column "
                    f"{error.start + 1}): re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                )
    return None
