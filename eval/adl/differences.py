"""Per-position mean activation differences between the chat and the base model (docs/methods.md §10.1).

Both models read the same texts, each tokenized with the tokenizer's special tokens and cut to exactly its first
``n_positions`` tokens (shorter texts are dropped and counted). For every requested layer and position ``p`` the
stream accumulates, in float64, the sums of ``h^base_p``, ``h^chat_p`` and ``h^chat_p − h^base_p`` and the two
models' activation norms at positions ``p ≥ 5``; memory is ``O(layers · n_positions · d_model)`` whatever the
number of texts. The result is saved as safetensors plus a JSON record of its counts (``LensPaths``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosscoder.errors import ConfigError, DataError, InputNotFoundError
from crosscoder.eval.adl.paths import LensPaths
from crosscoder.eval.kl import assistant_token_mask
from crosscoder.models import residual_outputs
from crosscoder.progress import progress_bar

VECTORS = ("delta", "base_mean", "chat_mean")
"""The three vectors the lens reads at each layer and position: δ = chat − base, and the two controls."""

NORM_SKIP_POSITIONS = 5
"""Positions skipped by the mean activation norm (BOS and attention-sink positions carry outsized norms)."""


# ---------------------------------------------------------------------------- the model pair
def n_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return model.config.get_text_config().num_hidden_layers


def default_layer(model: nn.Module) -> int:
    """The default layer, relative depth 0.5: ``int(0.5 · (n_layers − 1))``."""
    return int(0.5 * (n_layers(model) - 1))


def resolve_layers(model: nn.Module, layers: Sequence[int] | int | None) -> list[int]:
    """``layers`` as a list (default: ``default_layer``); ``ConfigError`` for one out of range."""
    if layers is None or (not isinstance(layers, int) and len(layers) == 0):
        return [default_layer(model)]
    chosen = [int(layers)] if isinstance(layers, int) else [int(layer) for layer in layers]
    total = n_layers(model)
    bad = [layer for layer in chosen if not 0 <= layer < total]
    if bad:
        raise ConfigError(
            f"layer(s) {bad} out of range for a model with {total} layers: layers are 0-based block indices from 0 "
            f"to {total - 1} (layer L = hidden_states[L + 1])"
        )
    return list(dict.fromkeys(chosen))


def check_pair(base: nn.Module, chat: nn.Module, tokenizer: Any = None, base_tokenizer: Any = None) -> None:
    """The base and chat model must have the same width and (when both tokenizers are given) the same tokenizer.

    Raises ``DataError`` saying which of the two differs. Tokenizers that differ on at most 1% of the ids they
    share (e.g. renamed reserved tokens) pass; ids only one of them has (tokens a chat model added) are ignored."""
    widths = {name: model.config.get_text_config().hidden_size for name, model in (("base", base), ("chat", chat))}
    if widths["base"] != widths["chat"]:
        raise DataError(
            f"different widths: the base model has d_model={widths['base']} but the chat model has "
            f"{widths['chat']}; the lens compares the two models' activations, so they must have the same width "
            "(a chat model finetuned from that base)"
        )
    layers = {name: n_layers(model) for name, model in (("base", base), ("chat", chat))}
    if layers["base"] != layers["chat"]:
        raise DataError(
            f"different depths: the base model has {layers['base']} layers but the chat model has {layers['chat']}"
        )
    if tokenizer is None or base_tokenizer is None:
        return
    base_vocab = {index: token for token, index in base_tokenizer.get_vocab().items()}
    chat_vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    shared = base_vocab.keys() & chat_vocab.keys()
    changed = sorted(index for index in shared if base_vocab[index] != chat_vocab[index])
    if len(changed) > 0.01 * max(len(shared), 1):
        example = changed[:3]
        raise DataError(
            f"different tokenizers: the base tokenizer ({len(base_vocab)} tokens) and the chat tokenizer "
            f"({len(chat_vocab)} tokens) give {len(changed)} ids different tokens (e.g. ids {example}: "
            f"{[base_vocab[i] for i in example]} vs {[chat_vocab[i] for i in example]}); the lens feeds both models "
            "the same ids, so they must share a tokenizer"
        )


# ---------------------------------------------------------------------------- the result
@dataclass
class MeanDifferences:
    """Per-layer, per-position means (float64 tensors ``[n_positions, d_model]`` keyed by layer) and counts."""

    layers: list[int]
    n_positions: int
    delta: dict[int, torch.Tensor]
    """``δ_p = mean_i (h^chat_{i,p} − h^base_{i,p})``."""
    base_mean: dict[int, torch.Tensor]
    chat_mean: dict[int, torch.Tensor]
    norms: dict[str, dict[int, float]]
    """Mean activation norm per model (``"base"``, ``"chat"``) and layer over positions ≥ ``norm_skip``."""
    n_samples: int
    """Texts averaged."""
    n_dropped: int
    """Texts read but dropped: fewer than ``n_positions`` tokens."""
    norm_skip: int = NORM_SKIP_POSITIONS
    first_position: int = 0
    """Label of row 0 of the tensors: 0 for text, ``−k`` for the chat variant (rows ``−k … −1`` are the last tokens
    before the assistant turn, ``0 …`` its first tokens)."""
    variant: str = "text"
    """``"text"`` (the first tokens of general texts) or ``"chat"`` (around the assistant turn of conversations)."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> list[int]:
        """The position labels of the tensors' rows."""
        return list(range(self.first_position, self.first_position + self.n_positions))

    def vector(self, kind: str, layer: int, position: int) -> torch.Tensor:
        """One vector ``[d_model]``: ``kind`` in ``VECTORS``, ``position`` one of ``positions``."""
        if kind not in VECTORS:
            raise ConfigError(f"unknown vector {kind!r}: use one of {VECTORS}")
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} was not computed (layers: {self.layers})")
        check_positions([position], self.n_positions, self.first_position)
        return getattr(self, kind)[layer][position - self.first_position]

    def difference_norms(self, layer: int) -> list[float]:
        """``‖δ_p‖`` for every position."""
        return self.delta[layer].norm(dim=-1).tolist()

    def record(self) -> dict[str, Any]:
        """The JSON record saved beside the tensors."""
        return {
            "layers": self.layers,
            "n_positions": self.n_positions,
            "n_samples": self.n_samples,
            "n_dropped_short": self.n_dropped,
            "norm_skip": self.norm_skip,
            "first_position": self.first_position,
            "variant": self.variant,
            "norms": {
                model: {str(layer): value for layer, value in by_layer.items()}
                for model, by_layer in self.norms.items()
            },
            **self.metadata,
        }

    def save(self, folder: Path) -> LensPaths:
        """Write ``means.safetensors`` and ``means.json`` into ``folder`` (the chat variant: ``chat_means.*``)."""
        from safetensors.torch import save_file

        paths = LensPaths(Path(folder))
        paths.out.mkdir(parents=True, exist_ok=True)
        tensors_path, meta_path = paths.means_files(self.variant)
        tensors = {
            f"{kind}.layer{layer}": getattr(self, kind)[layer].contiguous() for kind in VECTORS for layer in self.layers
        }
        save_file(tensors, str(tensors_path))
        meta_path.write_text(json.dumps(self.record(), indent=2) + "\n", encoding="utf-8")
        return paths

    @classmethod
    def load(cls, folder: Path, variant: str = "text") -> MeanDifferences:
        """Read what ``save`` wrote."""
        from safetensors.torch import load_file

        tensors_path, meta_path = LensPaths(Path(folder)).means_files(variant)
        if not (tensors_path.exists() and meta_path.exists()):
            raise InputNotFoundError(f"{folder} holds no saved mean differences ({tensors_path.name})")
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensors_path))
        layers = [int(layer) for layer in record["layers"]]
        by_kind = {kind: {layer: tensors[f"{kind}.layer{layer}"] for layer in layers} for kind in VECTORS}
        known = {"layers", "n_positions", "n_samples", "n_dropped_short", "norm_skip", "norms", "first_position",
                 "variant"}  # fmt: skip
        return cls(
            layers=layers,
            n_positions=int(record["n_positions"]),
            delta=by_kind["delta"],
            base_mean=by_kind["base_mean"],
            chat_mean=by_kind["chat_mean"],
            norms={model: {int(k): float(v) for k, v in values.items()} for model, values in record["norms"].items()},
            n_samples=int(record["n_samples"]),
            n_dropped=int(record["n_dropped_short"]),
            norm_skip=int(record["norm_skip"]),
            first_position=int(record.get("first_position", 0)),
            variant=str(record.get("variant", "text")),
            metadata={key: value for key, value in record.items() if key not in known},
        )


def check_positions(positions: Iterable[int], n_positions: int, first: int = 0) -> list[int]:
    """``positions`` as a list; ``ConfigError`` for one outside ``[first, first + n_positions)``."""
    chosen = [int(position) for position in positions]
    bad = [position for position in chosen if not first <= position < first + n_positions]
    if bad and first < 0:
        raise ConfigError(
            f"position(s) {bad} are outside the chat positions {first} … {first + n_positions - 1} ({-first} before "
            f"the assistant turn, {n_positions + first} of it)"
        )
    if bad:
        raise ConfigError(
            f"position(s) {bad} are beyond the {n_positions} positions averaged: positions are 0-based token "
            f"indices below n_positions={n_positions} (raise --n-positions or ask for earlier positions)"
        )
    return chosen


# ---------------------------------------------------------------------------- the stream
def pad_right(rows: Sequence[Sequence[Any]], pad: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids (or flags) right-padded with ``pad`` to the longest: values and attention mask, both
    ``[len(rows), longest]``."""
    length = max(len(row) for row in rows)
    values = torch.tensor([list(row) + [pad] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return values, mask


def first_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """The first ``n`` (or fewer) token ids of ``text`` tokenized whole with special tokens. Only a prefix of
    ``20 · n`` characters is tokenized unless it has fewer than ``n`` tokens (a cut that far away cannot change the
    first ``n``)."""
    prefix = text[: 20 * n]
    ids = tokenizer(prefix, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) < n and len(prefix) < len(text):
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return list(ids[:n])


def first_tokens(
    tokenizer: Any, texts: Iterable[str], n_positions: int, max_samples: int, counts: dict[str, int]
) -> Iterator[list[int]]:
    """The first ``n_positions`` token ids (special tokens included) of each text with at least that many, up to
    ``max_samples`` of them; ``counts["read"]`` and ``counts["dropped"]`` are updated as texts are read."""
    kept = 0
    for text in texts:
        if kept >= max_samples:
            return
        if not isinstance(text, str):
            raise DataError(f"texts must be strings, got {type(text).__name__}: pass the text column of a dataset")
        counts["read"] += 1
        ids = first_ids(tokenizer, text, n_positions)
        if len(ids) < n_positions:
            counts["dropped"] += 1
            continue
        kept += 1
        yield list(ids[:n_positions])


def assistant_windows(
    tokenizer: Any, conversations: Iterable[Any], k: int, n: int, max_samples: int, counts: dict[str, int]
) -> Iterator[tuple[list[int], int]]:
    """Per conversation (``{"messages": […]}`` or a message list) rendered with the chat template: its ids up to the
    first assistant message's ``n``-th token and where the window of its last ``k`` tokens before that message
    starts. Conversations with fewer than ``k`` tokens before or ``n`` tokens in the first assistant message are
    dropped (``counts``), up to ``max_samples`` kept."""
    kept = 0
    for row in conversations:
        if kept >= max_samples:
            return
        messages = row.get("messages") if isinstance(row, dict) else row
        if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages)):
            raise DataError("each chat-data row needs a 'messages' list of {role, content} (a conversation)")
        counts["read"] += 1
        ids, positions = assistant_token_mask(tokenizer, messages)
        start = next((index for index, position in enumerate(positions) if position == 0), None)
        if start is None or start < k or positions[start : start + n] != list(range(n)):
            counts["dropped"] += 1
            continue
        kept += 1
        yield list(ids[: start + n]), start - k


def _accumulate(
    base: nn.Module,
    chat: nn.Module,
    windows: Iterable[tuple[list[int], int]],
    layers: list[int],
    n_positions: int,
    *,
    batch_size: int,
    norm_skip: int,
    progress: bool,
    total: int,
    description: str,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sums over the windows ``ids[start : start + n_positions]`` of ``(ids, start)`` rows, each batch run through
    both models once (right-padded): ``[3 (base, chat, chat − base), layers, n_positions, d]`` and the models'
    activation-norm sums over window rows ``≥ norm_skip`` ``[2, layers]``, float64; the number of rows."""
    d_model = chat.config.get_text_config().hidden_size
    device = chat.device
    sums = torch.zeros(3, len(layers), n_positions, d_model, dtype=torch.float64, device=device)
    norm_sums = torch.zeros(2, len(layers), dtype=torch.float64, device=device)
    n_samples = 0
    bar = progress_bar(total=total, desc=description, unit="text", enabled=progress)

    def run(group: list[tuple[list[int], int]]) -> None:
        ids, mask = pad_right([row for row, _ in group], 0)
        outputs = []
        for model in (base, chat):
            hidden = residual_outputs(model, ids.to(model.device), mask.to(model.device), layers)  # [b, S, layers, d]
            window = torch.stack([hidden[row, start : start + n_positions] for row, (_, start) in enumerate(group)])
            outputs.append(window.to(device, torch.float64))  # [b, n, layers, d]
        h_base, h_chat = outputs
        sums[0] += h_base.sum(0).transpose(0, 1)
        sums[1] += h_chat.sum(0).transpose(0, 1)
        sums[2] += (h_chat - h_base).sum(0).transpose(0, 1)
        for index, h in enumerate(outputs):
            norm_sums[index] += h[:, norm_skip:].norm(dim=-1).sum(dim=(0, 1))
        bar.update(len(group))

    batch: list[tuple[list[int], int]] = []
    for window in windows:
        batch.append(window)
        n_samples += 1
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    bar.close()
    return sums, norm_sums, n_samples


def _means(
    sums: torch.Tensor,
    norm_sums: torch.Tensor,
    n_samples: int,
    layers: list[int],
    n_positions: int,
    skip: int,
    n_dropped: int,
    **fields: Any,
) -> MeanDifferences:
    """The ``MeanDifferences`` of ``_accumulate``'s sums."""
    means = (sums / n_samples).cpu()
    norm_means = (norm_sums / (n_samples * (n_positions - skip))).cpu()
    return MeanDifferences(
        layers=layers,
        n_positions=n_positions,
        base_mean={layer: means[0, i] for i, layer in enumerate(layers)},
        chat_mean={layer: means[1, i] for i, layer in enumerate(layers)},
        delta={layer: means[2, i] for i, layer in enumerate(layers)},
        norms={
            "base": {layer: float(norm_means[0, i]) for i, layer in enumerate(layers)},
            "chat": {layer: float(norm_means[1, i]) for i, layer in enumerate(layers)},
        },
        n_samples=n_samples,
        n_dropped=n_dropped,
        norm_skip=skip,
        **fields,
    )


def _check_sizes(*sizes: int) -> None:
    if min(sizes) < 1:
        raise ConfigError("n_positions, max_samples and batch_size must be positive")


@torch.no_grad()
def mean_differences(
    base: nn.Module,
    chat: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    layers: Sequence[int] | int | None = None,
    n_positions: int = 128,
    max_samples: int = 10_000,
    *,
    batch_size: int = 16,
    base_tokenizer: Any = None,
    norm_skip: int = NORM_SKIP_POSITIONS,
    progress: bool = False,
) -> MeanDifferences:
    """Per-position means of the base and chat activations and of their difference (docs/methods.md §10.1).

    ``texts`` are read lazily until ``max_samples`` of them had ``n_positions`` tokens; each batch runs through
    both models once (``crosscoder.models.residual_outputs``, stopped after the deepest layer). ``layers`` default
    to ``int(0.5 · (n_layers − 1))``. Raises ``DataError`` for a mismatched pair or when no text is long enough,
    ``ConfigError`` for a layer out of range."""
    check_pair(base, chat, tokenizer, base_tokenizer)
    layers = resolve_layers(chat, layers)
    _check_sizes(n_positions, max_samples, batch_size)
    skip = norm_skip if n_positions > norm_skip else 0
    counts = {"read": 0, "dropped": 0}
    windows = ((ids, 0) for ids in first_tokens(tokenizer, texts, n_positions, max_samples, counts))
    sums, norm_sums, n_samples = _accumulate(
        base, chat, windows, layers, n_positions, batch_size=batch_size, norm_skip=skip, progress=progress,
        total=max_samples, description="mean differences",
    )  # fmt: skip
    if n_samples == 0:
        raise DataError(
            f"none of the {counts['read']} texts read has {n_positions} tokens: all {counts['dropped']} were dropped "
            "as too short; pass longer texts or a smaller --n-positions"
        )
    if counts["dropped"]:
        warnings.warn(
            f"{counts['dropped']} of {counts['read']} texts had fewer than {n_positions} tokens and were dropped; "
            f"the means average the other {n_samples}",
            stacklevel=3,
        )
    return _means(sums, norm_sums, n_samples, layers, n_positions, skip, counts["dropped"])


@torch.no_grad()
def chat_mean_differences(
    base: nn.Module,
    chat: nn.Module,
    tokenizer: Any,
    conversations: Iterable[Any],
    layers: Sequence[int] | int | None = None,
    n_positions: int = 128,
    max_samples: int = 10_000,
    *,
    k: int = 3,
    batch_size: int = 16,
    base_tokenizer: Any = None,
    norm_skip: int = NORM_SKIP_POSITIONS,
    progress: bool = False,
) -> MeanDifferences:
    """The chat-data variant (docs/methods.md §10.1): the same means over the last ``k`` tokens before the first
    assistant message and its first ``n_positions`` tokens, each conversation rendered with ``tokenizer``'s chat
    template; positions ``−k … −1, 0 … n_positions − 1`` (``first_position = −k``; tensors ``[k + n, d]``)."""
    check_pair(base, chat, tokenizer, base_tokenizer)
    layers = resolve_layers(chat, layers)
    _check_sizes(n_positions, max_samples, batch_size, k + 1)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the chat-data variant renders conversations with the chat tokenizer's chat template, and "
                          "this tokenizer has none")  # fmt: skip
    window = k + n_positions
    skip = norm_skip if window > norm_skip else 0
    counts = {"read": 0, "dropped": 0}
    sums, norm_sums, n_samples = _accumulate(
        base, chat, assistant_windows(tokenizer, conversations, k, n_positions, max_samples, counts), layers, window,
        batch_size=batch_size, norm_skip=skip, progress=progress, total=max_samples,
        description="mean differences (chat data)",
    )  # fmt: skip
    if n_samples == 0:
        raise DataError(
            f"none of the {counts['read']} conversations read has {k} tokens before its first assistant message and "
            f"{n_positions} tokens in it: all were dropped; pass longer conversations or a smaller --n-positions"
        )
    if counts["dropped"]:
        warnings.warn(
            f"{counts['dropped']} of {counts['read']} conversations had fewer than {k} tokens before or "
            f"{n_positions} tokens in their first assistant message and were dropped; the means average the other "
            f"{n_samples}",
            stacklevel=3,
        )
    return _means(
        sums, norm_sums, n_samples, layers, window, skip, counts["dropped"], first_position=-k, variant="chat"
    )
