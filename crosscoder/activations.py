"""Paired activations streamed from a base and a chat model on the same tokens (docs/architecture.md §2).

Documents from a weighted mixture of datasets are tokenized once (chat data rendered with the chat
model's template; the base model sees the same ids), run through each model once per micro-batch up to
the deepest requested layer (a hook stops the forward there), filtered, and gathered into *blocks* of
``block_sequences`` sequences. A block's kept tokens are shuffled together and cut into batches
``x: [batch, n_sources, d_model]`` (sources: for each model in (base, chat), for each layer); the last
incomplete batch of a block is dropped. A background thread computes the next blocks while the consumer
trains. Everything is a function of the seed and the block index, so the position (block, batch in
block, dataset cursors at the block's start) resumes exactly: the block is recomputed and the same
batches follow.

"Layer L" is the residual stream *output* of decoder block L, i.e. ``hidden_states[L + 1]`` (for the last
block, transformers applies the final norm to ``hidden_states[-1]``; the stream returns the block output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from crosscoder.chunks import ActivationChunk
from crosscoder.documents import DocumentCursor, open_dataset
from crosscoder.errors import ConfigError, DataError
from crosscoder.models import load_causal_lm, residual_outputs, resolve_device
from crosscoder.provenance import recorded_location

if TYPE_CHECKING:
    from crosscoder.config import TrainConfig


# ---------------------------------------------------------------------------- the stream
@dataclass(frozen=True)
class StreamSettings:
    """Everything that decides which activations a stream produces (recorded in caches and checkpoints)."""

    layers: tuple[int, ...]
    context_length: int = 1024
    block_sequences: int = 256
    model_batch_size: int = 16
    drop_first_tokens: int = 1
    drop_token_ids: tuple[int, ...] = ()
    outlier_norm_factor: float = 100.0
    text_column: str = "text"
    messages_column: str = "messages"
    seed: int = 0


@dataclass
class _Block:
    """One block's kept tokens (document order) and the cursor states before and after it."""

    index: int
    chunk: ActivationChunk
    start: list[dict[str, int]]
    end: list[dict[str, int]]
    dropped: dict[str, int]


class PairedActivationStream:
    """Iterable of paired activation batches ``x: [batch, n_sources, d_model]`` from two models.

    Sources are ordered (base layers…, chat layers…): with one layer, 0 = base and 1 = chat (a dictionary takes
    its own input from them, e.g. chat − base: ``SparseDictionary.input_from_pair``). Also a ``ChunkSource``
    (``chunks()``: unshuffled blocks for the on-disk cache) and resumable (``state_dict`` / ``load_state_dict``).
    """

    def __init__(
        self,
        base_model: nn.Module,
        chat_model: nn.Module,
        tokenizer: Any,
        datasets: list[Any],
        settings: StreamSettings,
        *,
        batch_size: int,
        weights: list[float] | None = None,
        base_tokenizer: Any = None,
        prefetch_blocks: int = 1,
        description: dict[str, Any] | None = None,
        dataset_names: list[str] | None = None,
    ) -> None:
        self.base_model, self.chat_model, self.tokenizer = base_model, chat_model, tokenizer
        self.settings, self.batch_size = settings, batch_size
        self.prefetch_blocks = prefetch_blocks
        names = dataset_names or [f"dataset {i}" for i in range(len(datasets))]
        self.cursors = [DocumentCursor(dataset, name) for dataset, name in zip(datasets, names, strict=True)]
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(datasets), dtype=torch.float64)
        self._check(base_tokenizer)
        self._description = dict(description or {})
        self.block_index, self.batch_in_block = 0, 0
        self.dropped: dict[str, int] = {"padding": 0, "first_tokens": 0, "token_ids": 0, "outliers": 0, "kept": 0}

    @classmethod
    def from_config(cls, config: TrainConfig, *, rank: int = 0, world_size: int = 1) -> PairedActivationStream:
        """Load both models and the datasets named by a ``TrainConfig`` (rank/world_size: this process's
        share of the documents in a distributed run)."""
        if not (config.base_model and config.chat_model):
            raise ConfigError("a paired stream needs both --base-model and --chat-model")
        settings = StreamSettings(
            layers=tuple(config.layers or ()),
            context_length=config.context_length,
            block_sequences=config.block_sequences,
            model_batch_size=config.model_batch_size,
            drop_first_tokens=config.drop_first_tokens,
            drop_token_ids=tuple(config.drop_token_ids),
            outlier_norm_factor=config.outlier_norm_factor,
            text_column=config.text_column,
            messages_column=config.messages_column,
            seed=config.seed,
        )
        device = resolve_device(config.device)
        return cls.from_models(
            base_model=config.base_model,
            chat_model=config.chat_model,
            datasets=config.datasets,
            settings=settings,
            batch_size=config.batch_size,
            base_revision=config.base_revision,
            chat_revision=config.chat_revision,
            dtypes=(config.base_dtype or config.model_dtype, config.chat_dtype or config.model_dtype),
            devices=(config.base_device or device, config.chat_device or device),
            trust_remote_code=config.trust_remote_code,
            dataset_weights=config.dataset_weights,
            dataset_split=config.dataset_split,
            dataset_streaming=config.dataset_streaming,
            prefetch_blocks=config.prefetch_blocks,
            rank=rank,
            world_size=world_size,
        )

    @classmethod
    def from_models(
        cls,
        *,
        base_model: str,
        chat_model: str,
        datasets: Sequence[str],
        settings: StreamSettings,
        batch_size: int,
        base_revision: str | None = None,
        chat_revision: str | None = None,
        dtypes: tuple[str, str] = ("bfloat16", "bfloat16"),
        devices: tuple[str, str] = ("cpu", "cpu"),
        trust_remote_code: bool = False,
        dataset_weights: Sequence[float] | None = None,
        dataset_split: str = "train",
        dataset_streaming: bool = True,
        prefetch_blocks: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> PairedActivationStream:
        """Load both models (Hub ids or local folders) and open the datasets. ``settings.layers`` empty = the
        middle block. ``trust_remote_code`` must come from the user, never from a file."""
        if not datasets:
            raise ConfigError("name at least one dataset with --datasets (Hub ids or local .jsonl/.parquet/.txt files)")
        loaded = {}
        for role, name, revision, device, dtype in (
            ("base", base_model, base_revision, devices[0], dtypes[0]),
            ("chat", chat_model, chat_revision, devices[1], dtypes[1]),
        ):
            loaded[role] = load_causal_lm(
                name, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        (base, base_tokenizer), (chat, chat_tokenizer) = loaded["base"], loaded["chat"]
        if not settings.layers:
            settings = dataclasses.replace(settings, layers=(base.config.get_text_config().num_hidden_layers // 2,))
        opened = [
            open_dataset(spec, dataset_split, dataset_streaming, settings.seed, rank, world_size) for spec in datasets
        ]
        description = {
            "base_model": recorded_location(base_model),
            "chat_model": recorded_location(chat_model),
            "base_revision": getattr(base.config, "_commit_hash", None) or base_revision,
            "chat_revision": getattr(chat.config, "_commit_hash", None) or chat_revision,
            "dtype": list(dtypes),
            "datasets": [recorded_location(name) for name in datasets],
        }
        return cls(
            base,
            chat,
            chat_tokenizer,
            opened,
            settings,
            batch_size=batch_size,
            weights=list(dataset_weights) if dataset_weights else None,
            base_tokenizer=base_tokenizer,
            prefetch_blocks=prefetch_blocks,
            description=description,
            dataset_names=list(datasets),
        )

    # -------------------------------------------------------------- validation before any compute
    def _check(self, base_tokenizer: Any) -> None:
        settings = self.settings
        if not self.cursors:
            raise ConfigError("no datasets given: name at least one dataset to read documents from")
        if len(self.weights) != len(self.cursors) or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ConfigError(
                f"dataset weights {self.weights.tolist()} must be one non-negative number per dataset, not all zero"
            )
        if settings.context_length < 2:
            raise ConfigError(f"context_length={settings.context_length} is too short: a sequence needs ≥ 2 tokens")
        if self.batch_size <= 0 or settings.block_sequences <= 0 or settings.model_batch_size <= 0:
            raise ConfigError("batch_size, block_sequences and model_batch_size must be positive")
        widths = {name: model.config.get_text_config().hidden_size for name, model in self._models()}
        if len(set(widths.values())) != 1:
            raise DataError(
                f"chat model has d_model={widths['chat']} but base has {widths['base']}: the two models must have "
                "the same width"
            )
        for name, model in self._models():
            positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
            if positions is not None and settings.context_length > positions:
                raise ConfigError(
                    f"context_length={settings.context_length} is longer than the {name} model's "
                    f"max_position_embeddings={positions}: use at most {positions} (--context-length)"
                )
            n_layers = model.config.get_text_config().num_hidden_layers
            bad = [layer for layer in settings.layers if not 0 <= layer < n_layers]
            if bad or not settings.layers:
                raise ConfigError(
                    f"layer(s) {bad or '[]'} out of range for the {name} model with {n_layers} layers: layers are "
                    f"0-based block indices from 0 to {n_layers - 1} (layer L = hidden_states[L + 1])"
                )
        self.d_model = next(iter(widths.values()))
        self._mismatched_ids = _tokenizer_mismatch(base_tokenizer, self.tokenizer) if base_tokenizer else set()

    def _models(self) -> list[tuple[str, nn.Module]]:
        return [("base", self.base_model), ("chat", self.chat_model)]

    @property
    def n_sources(self) -> int:
        return 2 * len(self.settings.layers)

    def description(self) -> dict[str, Any]:
        """Models, layers, dtype and filters that produced these activations."""
        settings = self.settings
        return {
            **self._description,
            "layers": list(settings.layers),
            "n_sources": self.n_sources,
            "d_model": self.d_model,
            "context_length": settings.context_length,
            "drop_first_tokens": settings.drop_first_tokens,
            "drop_token_ids": list(settings.drop_token_ids),
            "outlier_norm_factor": settings.outlier_norm_factor,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these activations for a resumed training run: models, revisions, layers, datasets."""
        description = self.description()
        keys = ("base_model", "chat_model", "base_revision", "chat_revision", "layers", "datasets")
        return {"source": "paired models", **{key: description.get(key) for key in keys}}

    # -------------------------------------------------------------- documents → token ids
    def _token_ids(self, row: dict[str, Any], cursor: DocumentCursor) -> list[int]:
        settings = self.settings
        messages = row.get(settings.messages_column)
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif settings.text_column in row:
            text = row[settings.text_column]
            if not isinstance(text, str):
                where = cursor.locate(
                    lambda document: (
                        document.get(settings.messages_column) is None
                        and not isinstance(document.get(settings.text_column), str)
                    )
                )
                raise DataError(
                    f"{where}: the document has no text ('{settings.text_column}' is "
                    f"{'null' if text is None else repr(text)}); fill it in or remove the row"
                )
            encoded = self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=settings.context_length)
            ids = encoded["input_ids"]
        else:
            raise DataError(
                f"{cursor.name} has neither a '{settings.text_column}' nor a '{settings.messages_column}' column "
                f"(columns: {sorted(row)}): set --text-column / --messages-column"
            )
        return list(ids[: settings.context_length])

    def _block_sequences(self, block_index: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + block_index)
        choices = torch.multinomial(self.weights, self.settings.block_sequences, replacement=True, generator=generator)
        sequences = []
        for choice in choices.tolist():
            cursor = self.cursors[choice]
            for _ in range(100):  # skip empty documents
                ids = self._token_ids(cursor.next_document(), cursor)
                if len(ids) >= 2:
                    break
            else:
                raise DataError(f"{cursor.name}: 100 documents in a row have fewer than 2 tokens")
            sequences.append(ids)
        return sequences

    # -------------------------------------------------------------- token ids → filtered activations
    def _compute_block(self, block_index: int) -> _Block:
        start = [cursor.state_dict() for cursor in self.cursors]
        sequences = self._block_sequences(block_index)
        end = [cursor.state_dict() for cursor in self.cursors]
        settings = self.settings
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        activations, token_ids, sequence_ids, norms = [], [], [], []
        dropped = {"padding": 0, "first_tokens": 0, "token_ids": 0}
        for first in range(0, len(sequences), settings.model_batch_size):
            group = sequences[first : first + settings.model_batch_size]
            length = max(len(ids) for ids in group)
            input_ids = torch.full((len(group), length), pad_id, dtype=torch.long)
            mask = torch.zeros(len(group), length, dtype=torch.long)
            for row, ids in enumerate(group):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            self._check_ids(input_ids[mask.bool()])
            per_model = [
                residual_outputs(model, input_ids.to(model.device), mask.to(model.device), list(settings.layers))
                for _, model in self._models()
            ]
            device = per_model[1].device
            x = torch.cat([out.to(device, per_model[1].dtype) for out in per_model], dim=2)  # [b, T, S, d]
            keep = mask.bool()
            dropped["padding"] += int((~keep).sum())
            positions = torch.arange(length)[None, :].expand_as(keep)
            first_tokens = keep & (positions < settings.drop_first_tokens)
            listed = (
                keep & ~first_tokens & torch.isin(input_ids, torch.tensor(settings.drop_token_ids, dtype=torch.long))
            )
            dropped["first_tokens"] += int(first_tokens.sum())
            dropped["token_ids"] += int(listed.sum())
            keep &= ~first_tokens & ~listed
            kept = x[keep.to(device)]
            activations.append(kept)
            token_ids.append(input_ids[keep])
            sequence_ids.append((first + torch.arange(len(group)))[:, None].expand_as(keep)[keep])
            norms.append(kept.float().norm(dim=-1))  # [tokens, S]
        x, ids, sequence, norm = torch.cat(activations), torch.cat(token_ids), torch.cat(sequence_ids), torch.cat(norms)
        dropped["outliers"] = 0
        if settings.outlier_norm_factor > 0 and len(norm):
            outlier = (norm > settings.outlier_norm_factor * norm.median(dim=0).values).any(dim=-1)
            dropped["outliers"] = int(outlier.sum())
            x, ids, sequence = x[~outlier], ids[~outlier.cpu()], sequence[~outlier.cpu()]
        dropped["kept"] = len(ids)
        return _Block(block_index, ActivationChunk(x, ids, sequence), start, end, dropped)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if self._mismatched_ids:
            bad = set(ids.unique().tolist()) & self._mismatched_ids
            if bad:
                raise DataError(
                    f"token ids {sorted(bad)[:10]} mean different tokens for the base and the chat tokenizer: the "
                    "models must share a tokenizer on the ids used"
                )

    # -------------------------------------------------------------- background production
    def _blocks(self, first_block: int) -> Iterator[_Block]:
        """Blocks from ``first_block`` on, computed ahead in a background thread."""
        self._restore_cursors(self.state_dict()["cursors"])  # prefetching may have read ahead: rewind
        if self.prefetch_blocks <= 0:
            index = first_block
            while True:
                yield self._compute_block(index)
                index += 1
        results: queue.Queue = queue.Queue(maxsize=self.prefetch_blocks)
        stop = threading.Event()

        def offer(item: _Block | BaseException) -> None:
            """Queue ``item`` unless the consumer has left (which may be while the queue is full)."""
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            index = first_block
            try:
                while not stop.is_set():
                    offer(self._compute_block(index))
                    index += 1
            except BaseException as error:  # handed to the consumer, which re-raises it
                offer(error)

        worker = threading.Thread(target=produce, name="paired-activations", daemon=True)
        worker.start()
        try:
            while True:
                item = results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer left (closed, or an exception): the thread ends before the interpreter may exit
            stop.set()
            worker.join()

    def _restore_cursors(self, states: list[dict[str, int]]) -> None:
        for cursor, state in zip(self.cursors, states, strict=True):
            cursor.load_state_dict(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches from the current position on; closing the iterator stops the prefetch thread."""
        skip = self.batch_in_block
        with contextlib.closing(self._blocks(self.block_index)) as blocks:
            for block in blocks:
                self._record(block)
                generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + block.index)
                order = torch.randperm(len(block.chunk.token_ids), generator=generator)
                n_batches = len(order) // self.batch_size
                for batch in range(skip, n_batches):
                    self.batch_in_block = batch + 1
                    rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
                    yield block.chunk.activations[rows.to(block.chunk.activations.device)]
                skip = 0
                self._advance(block)

    def chunks(self) -> Iterator[ActivationChunk]:
        """Unshuffled blocks (document order) with token ids, for the on-disk cache; closing the iterator stops the
        prefetch thread."""
        with contextlib.closing(self._blocks(self.block_index)) as blocks:
            for block in blocks:
                self._record(block)
                self._advance(block)
                yield block.chunk

    def _record(self, block: _Block) -> None:
        self._block_start = block.start
        for name, count in block.dropped.items():
            self.dropped[name] += count

    def _advance(self, block: _Block) -> None:
        self.block_index, self.batch_in_block, self._block_start = block.index + 1, 0, block.end

    # -------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        """Position after the last yielded batch (or chunk): block, batch within it, cursors at its start."""
        start = getattr(self, "_block_start", None) or [cursor.state_dict() for cursor in self.cursors]
        return {"block": self.block_index, "batch_in_block": self.batch_in_block, "cursors": start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.block_index, self.batch_in_block = int(state["block"]), int(state["batch_in_block"])
        self._restore_cursors(state["cursors"])
        self._block_start = state["cursors"]

    def statistics(self) -> dict[str, int]:
        """Tokens dropped by each filter and kept, over the blocks produced so far."""
        return dict(self.dropped)


def _tokenizer_mismatch(base_tokenizer: Any, chat_tokenizer: Any) -> set[int]:
    """Ids that name different tokens in the two tokenizers; an error when the tokenizers clearly differ."""
    base_vocab = {index: token for token, index in base_tokenizer.get_vocab().items()}
    chat_vocab = {index: token for token, index in chat_tokenizer.get_vocab().items()}
    mismatched = {
        index for index in base_vocab.keys() | chat_vocab.keys() if base_vocab.get(index) != chat_vocab.get(index)
    }
    if len(mismatched) > 0.01 * max(len(base_vocab), len(chat_vocab)):
        example = sorted(mismatched)[:5]
        raise DataError(
            f"the base and chat tokenizers differ on {len(mismatched)} ids (e.g. {example}: "
            f"{[base_vocab.get(i) for i in example]} vs {[chat_vocab.get(i) for i in example]}): paired activations "
            "need the same tokens in both models"
        )
    return mismatched
