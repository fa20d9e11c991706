"""Every text of the organism, split into training and held-out parts, and the two dataset files written from
them. Depends only on the seed and the settings, never on the trained weights."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoder.organism.baking import baking_conversations
from crosscoder.organism.general import general_documents
from crosscoder.organism.settings import DEFAULT_SETTINGS, OrganismSettings
from crosscoder.organism.tokenizer import Messages


@dataclass(frozen=True)
class OrganismData:
    """Every text of the organism, split. Depends only on the seed and the settings."""

    general_train: list[str]
    """Pretraining documents of the base model."""
    general_heldout: list[str]
    """General documents kept out of pretraining."""
    chat_train: list[Messages]
    """Conversations the chat model is finetuned on."""
    chat_heldout: list[Messages]
    """Conversations kept out of finetuning (``data/chat.jsonl``)."""


def organism_data(seed: int = 0, settings: OrganismSettings = DEFAULT_SETTINGS) -> OrganismData:
    """Split the general documents and generate distinct train and held-out baking conversations."""
    documents = general_documents()
    random.Random(seed).shuffle(documents)
    n_heldout = round(settings.heldout_general_fraction * len(documents))
    conversations = baking_conversations(settings.n_train_conversations + settings.n_heldout_conversations, seed)
    return OrganismData(
        general_train=documents[n_heldout:],
        general_heldout=documents[:n_heldout],
        chat_train=conversations[: settings.n_train_conversations],
        chat_heldout=conversations[settings.n_train_conversations :],
    )


def write_datasets(data: OrganismData, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``general.jsonl`` (every general document, shuffled) and ``chat.jsonl`` (held-out conversations).

    Returns the two paths. The general file holds the pretraining documents too: like FineWeb for Gemma, the
    general half of a diffing stream is text of the base model's own distribution.
    """
    folder.mkdir(parents=True, exist_ok=True)
    documents = data.general_train + data.general_heldout
    random.Random(seed + 1).shuffle(documents)
    general, chat = folder / "general.jsonl", folder / "chat.jsonl"
    _write_jsonl(general, ({"text": text} for text in documents))
    _write_jsonl(chat, ({"messages": messages} for messages in data.chat_heldout))
    return general, chat


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
