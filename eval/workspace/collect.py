"""Filling the activation store: one streamed, resumable pass, in one process or several (docs/methods.md §11.1).

``collect_store`` encodes each chunk with the inference threshold and adds it to the store. Every
``checkpoint_every`` chunks the partial store is saved with the source's position (``ChunkSource.state_dict``), so an
interrupted pass resumes where it stopped; a finished store is saved as complete and reopening it computes nothing.
With several processes each passes its own share of the chunks (the ``i``-th local chunk of rank ``r`` is chunk
``i · world_size + r`` of the whole stream); the partial stores are gathered and merged exactly on every process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crosscoder.chunks import ActivationChunk, ChunkSource
from crosscoder.dictionary import SparseDictionary
from crosscoder.distributed import Distributed
from crosscoder.errors import DataError
from crosscoder.eval.workspace.store import ActivationStore, StoreSettings
from crosscoder.progress import progress_bar


def dictionary_fingerprint(dictionary: SparseDictionary) -> str:
    """A short hash of the dictionary's class, encoder choice, shapes and weights: a store is reused only for the same
    codes."""
    digest = hashlib.sha256(f"{type(dictionary).__name__} {dictionary.subtracts_decoder_bias}".encode())
    tensors = (dictionary.W_enc, dictionary.b_enc, dictionary.W_dec, dictionary.b_dec, dictionary.threshold)
    for tensor in (*tensors, dictionary.input_scale, dictionary.input_mean):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect_store(
    dictionary: SparseDictionary,
    source: ChunkSource,
    folder: Path,
    settings: StoreSettings,
    *,
    max_tokens: int,
    checkpoint_every: int = 16,
    context: Distributed | None = None,
    progress: bool = False,
) -> ActivationStore:
    """The store of ``dictionary`` over the chunks of ``source`` from its current position up to ``max_tokens``
    tokens (per process), saved in ``folder``; resumed from a partial store there, or read back when complete — only
    for the same weights, token count, processes and data (the source's ``description()``, where it has one)."""
    context = context or Distributed()
    fingerprint = dictionary_fingerprint(dictionary)
    description = getattr(source, "description", None)  # what the source reads (models, datasets, order)
    data = json.loads(json.dumps(description() if callable(description) else description, default=str))  # as saved
    identity = {"fingerprint": fingerprint, "max_tokens": max_tokens, "world_size": context.world_size, "data": data}
    part = folder / (f"rank{context.rank}" if context.enabled else "partial")
    finished = _read(folder, settings, identity)
    if finished is not None:
        return finished
    store = _read(part, settings, identity, complete=False) or ActivationStore(settings)
    resumed = store.tokens > 0
    if resumed:
        source.load_state_dict(_read_meta(part)["position"])
    chunks_done = _read_meta(part)["chunks_done"] if resumed else 0
    device = dictionary.b_dec.device
    bar = progress_bar(desc="activation store", enabled=progress and context.is_main, unit="tok", total=max_tokens)
    bar.update(store.tokens)
    for chunk in _chunks(source, store.tokens, max_tokens):
        codes = dictionary.encode(dictionary.input_from_pair(chunk.activations.to(device).float()), use_threshold=True)
        store.update(codes, chunk.token_ids, chunk.sequence_ids, chunks_done * context.world_size + context.rank)
        chunks_done += 1
        bar.update(len(chunk.token_ids))
        if chunks_done % checkpoint_every == 0:
            position = source.state_dict()
            store.save(part, {**identity, "complete": False, "chunks_done": chunks_done, "position": position})
    bar.close()
    if context.enabled:
        partials = context.all_gather_objects(store)
        store = partials[0]
        for other in partials[1:]:
            store.merge(other)
    if store.tokens == 0:
        raise DataError("no tokens reached the activation store: the chunks are empty (did filtering drop them all?)")
    if context.is_main:
        store.save(folder, {**identity, "complete": True})
    if part.exists():
        shutil.rmtree(part)
    return store


def _chunks(source: ChunkSource, seen: int, max_tokens: int) -> Iterator[ActivationChunk]:
    if seen >= max_tokens:
        return
    for chunk in source.chunks():
        yield chunk
        seen += len(chunk.token_ids)
        if seen >= max_tokens:
            return


def _read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "store.json").read_text(encoding="utf-8"))


def _read(
    folder: Path, settings: StoreSettings, identity: dict[str, Any], complete: bool = True
) -> ActivationStore | None:
    """The store saved in ``folder`` when it was made with these settings and identity (and is complete, or
    partial, as asked); None otherwise (a store of other weights or settings is rebuilt, not mixed in)."""
    if not (folder / "store.json").exists():
        return None
    store, meta = ActivationStore.load(folder)
    same = store.settings == settings and all(meta.get(key) == value for key, value in identity.items())
    return store if same and meta.get("complete") is complete else None
