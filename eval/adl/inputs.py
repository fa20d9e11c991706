"""What the lens command reads (docs/methods.md §10.8): the general texts, a sample of the finetuning data, the
optional chat data and the steering prompts, each with a clear error when a file does not hold what it should."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosscoder.documents import open_dataset
from crosscoder.errors import ConfigError, DataError
from crosscoder.eval.adl.steering import steering_prompts

if TYPE_CHECKING:
    from crosscoder.eval.adl.report import LensConfig


def general_texts(config: LensConfig) -> Iterator[str]:
    """Texts of the general datasets, taken from each in turn."""
    iterators = [(spec, iter(open_dataset(spec, config.dataset_split, True, config.seed))) for spec in config.datasets]
    while iterators:
        for spec, iterator in list(iterators):
            row = next(iterator, None)
            if row is None:
                iterators.remove((spec, iterator))
                continue
            if config.text_column not in row:
                raise DataError(
                    f"{spec} has no '{config.text_column}' column (columns: {sorted(row)}): set --text-column"
                )
            yield row[config.text_column]


def domain_rows(config: LensConfig) -> list[Any]:
    """The first ``domain_samples`` rows of the finetuning data (``text`` or ``messages``)."""
    if config.domain_data is None:
        return []
    dataset = open_dataset(config.domain_data, config.dataset_split, True, config.seed)
    rows = []
    for row in itertools.islice(iter(dataset), config.domain_samples):
        if isinstance(row.get("messages"), list):
            rows.append({"messages": row["messages"]})
        elif isinstance(row.get("text"), str):
            rows.append({"text": row["text"]})
        else:
            raise DataError(
                f"{config.domain_data}: each row needs a 'text' or a 'messages' column (columns: {sorted(row)})"
            )
    if not rows:
        raise DataError(f"{config.domain_data} holds no rows")
    return rows


def chat_conversations(config: LensConfig) -> Iterator[list[dict[str, Any]]]:
    """The conversations (``messages`` lists) of ``--chat-data``, read lazily."""
    for row in open_dataset(config.chat_data, config.dataset_split, True, config.seed):
        if not isinstance(row.get("messages"), list):
            raise DataError(
                f"{config.chat_data}: each row needs a 'messages' list of {{role, content}} (columns: {sorted(row)})"
            )
        yield row["messages"]


def read_prompts(path: Path | None) -> tuple[str, ...]:
    """Steering prompts from a JSON list or a file of one prompt a line; the shipped ones without a file."""
    if path is None:
        return steering_prompts()
    text = Path(path).read_text(encoding="utf-8")
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ConfigError(f"{path}: give the steering prompts as a JSON list of strings or one prompt a line")
    return tuple(prompts)
