"""Which input a dictionary reads, and the one function that takes it from a paired batch.

A crosscoder reads every source of a paired batch ``x: [batch, n_sources, d_model]`` (0 = base, 1 = chat). A
BatchTopK SAE reads one vector per token: the difference chat − base (a *diff-SAE*, the default), base − chat, or
a single source (a plain SAE on one model's activations). The choice is stored in the saved dictionary
(``config.json`` key ``input``) and read only through ``DictionaryInput.from_pair``, so training, evaluation, the
KL patch and the top contexts always agree (docs/methods.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder.errors import ConfigError

BASE, CHAT = 0, 1
"""Source indices of the base and the chat (finetuned) model in a paired batch."""


@dataclass(frozen=True)
class DictionaryInput:
    """What a dictionary reads from a paired batch: ``paired`` (all sources), ``chat_minus_base``,
    ``base_minus_chat`` or ``source:<i>`` (source i alone). Written as that string (``str(input)``)."""

    kind: str
    source: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("paired", "chat_minus_base", "base_minus_chat", "source"):
            raise ConfigError(
                f"unknown dictionary input {self.kind!r}: use paired, chat_minus_base, base_minus_chat or source:<i>"
            )
        if (self.kind == "source") != (self.source is not None) or (self.source is not None and self.source < 0):
            raise ConfigError(f"dictionary input {self.kind!r} with source {self.source!r}: write source:<i>, i ≥ 0")

    @classmethod
    def parse(cls, text: str) -> DictionaryInput:
        """``"chat_minus_base"``, ``"base_minus_chat"``, ``"paired"`` or ``"source:<i>"``."""
        if text.startswith("source:"):
            index = text.removeprefix("source:")
            if not index.isdigit():
                raise ConfigError(f"dictionary input {text!r}: the source index must be a number, e.g. source:1")
            return cls("source", int(index))
        return cls(text)

    def __str__(self) -> str:
        return f"source:{self.source}" if self.kind == "source" else self.kind

    @property
    def is_difference(self) -> bool:
        return self.kind in ("chat_minus_base", "base_minus_chat")

    def describe(self) -> str:
        """Human-readable, e.g. ``chat − base``."""
        return {
            "paired": "paired activations (0 = base, 1 = chat)",
            "chat_minus_base": "chat − base",
            "base_minus_chat": "base − chat",
        }.get(self.kind, f"source {self.source}")

    def from_pair(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """This input from a paired batch. x: [batch, n_sources, d_model] → [batch, n_sources, d_model] (paired) or
        [batch, d_model]. A [batch, d_model] batch is already the input of a one-vector dictionary and is returned
        as is (e.g. a file of precomputed differences). ``out`` [batch, d_model]: where a difference is written (the
        other inputs are x or a view of it)."""
        if self.kind == "paired" or x.dim() == 2:
            return x
        if x.dim() != 3:
            raise ConfigError(f"expected a paired batch [batch, n_sources, d_model], got shape {list(x.shape)}")
        if self.kind == "source":
            if self.source >= x.shape[1]:
                raise ConfigError(f"input source:{self.source} is out of range for a batch of {x.shape[1]} sources")
            return x[:, self.source]
        if x.shape[1] != 2:
            raise ConfigError(
                f"a {self.describe()} dictionary reads exactly two sources (base, chat), got {x.shape[1]}"
            )
        base, chat = x[:, BASE], x[:, CHAT]
        return torch.sub(chat, base, out=out) if self.kind == "chat_minus_base" else torch.sub(base, chat, out=out)


PAIRED = DictionaryInput("paired")
CHAT_MINUS_BASE = DictionaryInput("chat_minus_base")
BASE_MINUS_CHAT = DictionaryInput("base_minus_chat")


def input_from_description(description: str) -> DictionaryInput:
    """Read the free-text ``input_description`` of dictionaries saved in format version 1 (``"chat - base"``,
    ``"base - chat"``); anything else is refused rather than guessed."""
    normalized = description.replace("−", "-").replace(" ", "").lower()
    if normalized == "chat-base":
        return CHAT_MINUS_BASE
    if normalized == "base-chat":
        return BASE_MINUS_CHAT
    raise ConfigError(
        f"input_description {description!r} does not say which input the SAE reads: expected 'chat - base' or "
        "'base - chat'"
    )
