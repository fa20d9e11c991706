"""Writing the workspace folder: ``index.html`` and its static files, ``table.js`` (every latent's row),
``latents/shard_NNNNN.js`` (per-latent records, loaded on demand) and ``vocab.js`` (docs/methods.md §11.5).

Pages opened from ``file://`` cannot ``fetch()`` JSON in Chromium, so each data file is a script that hands its JSON
to a global callback (``workspaceTable(…)``, ``workspaceShard(…)``, ``workspaceVocab(…)``); ``export_json`` writes
the same records as plain ``.json`` files, one per shard.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from crosscoder.errors import InputNotFoundError
from crosscoder.eval.inspection import PAD
from crosscoder.eval.workspace.readout import Readout
from crosscoder.eval.workspace.store import ActivationStore, Reservoir, histogram_edges, quantile_buckets
from crosscoder.progress import progress_bar

STATIC_FILES = ("index.html", "app.js", "app.css")
SHARD_PATTERN = "shard_{:05d}"
LEVELS = 255
"""Window activations are stored as levels ``round(255 · a / peak)``, peak = the window's largest activation."""


@dataclass(frozen=True)
class Column:
    """A table column: ``kind`` is ``number``, ``category`` (values are labels), ``text`` or ``id``."""

    name: str
    label: str
    kind: str
    values: Sequence[Any] | None = None
    description: str = ""


@dataclass
class WorkspaceContent:
    """Everything the workspace shows. columns: the table (values [dict_size] each; None or NaN = missing);
    readout: per model, aligned with ``readout_latents``; kl / steering: per latent id."""

    title: str
    dict_size: int
    columns: list[Column]
    summary: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    store: ActivationStore | None = None
    decode: Callable[[int], str] | None = None
    readout: dict[str, Readout] = field(default_factory=dict)
    readout_latents: Sequence[int] = ()
    kl: dict[int, dict[str, float]] = field(default_factory=dict)
    steering: dict[int, dict[str, Any]] = field(default_factory=dict)


def write_workspace(out: Path, content: WorkspaceContent, *, shard_size: int = 256, progress: bool = False) -> Path:
    """Write the workspace into ``out``; returns ``out / "index.html"``."""
    out.mkdir(parents=True, exist_ok=True)
    static = resources.files("crosscoder.eval.workspace").joinpath("static")
    for name in STATIC_FILES:
        (out / name).write_text(static.joinpath(name).read_text(encoding="utf-8"), encoding="utf-8")
    shutil.rmtree(out / "latents", ignore_errors=True)
    (out / "latents").mkdir()
    vocab: dict[int, str] = {}
    readout_row = {int(latent): row for row, latent in enumerate(content.readout_latents)}
    n_shards = math.ceil(content.dict_size / shard_size)
    for shard in progress_bar(range(n_shards), desc="workspace shards", enabled=progress, unit="shard"):
        first, last = shard * shard_size, min((shard + 1) * shard_size, content.dict_size)
        records = _records(content, first, last, readout_row, vocab)
        payload = json.dumps({"shard": shard, "latents": records}, separators=(",", ":"))
        (out / "latents" / f"{SHARD_PATTERN.format(shard)}.js").write_text(f"workspaceShard({payload});\n")
    columns = list(content.columns)
    if content.store is not None and content.decode is not None:
        columns.append(Column("top_tokens", "top tokens", "text", _top_tokens(content.store, vocab)))
    table = {
        "title": content.title,
        "summary": content.summary,
        "images": content.images,
        "n_latents": content.dict_size,
        "shard_size": shard_size,
        "has_vocab": bool(vocab),
        "histogram_edges": histogram_edges(),
        "columns": [_column_spec(column) for column in [Column("latent", "latent", "id"), *columns]],
        "data": {column.name: _column_values(column) for column in columns},
    }
    (out / "table.js").write_text(f"workspaceTable({_dumps(table)});\n", encoding="utf-8")
    if vocab:
        (out / "vocab.js").write_text(f"workspaceVocab({_dumps({str(k): v for k, v in vocab.items()})});\n")
    return out / "index.html"


def export_json(workspace: Path, out: Path) -> list[Path]:
    """Each shard of a written workspace as ``out/shard_NNNNN.json`` (the format of docs/methods.md §11.5)."""
    shards = sorted((workspace / "latents").glob("shard_*.js"))
    if not shards:
        raise InputNotFoundError(f"{workspace} holds no latents/shard_*.js: build the workspace first")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in shards:
        text = path.read_text(encoding="utf-8").strip()
        body = text.removeprefix("workspaceShard(").removesuffix(");")
        written.append(out / f"{path.stem}.json")
        written[-1].write_text(body + "\n", encoding="utf-8")
    return written


def _records(
    content: WorkspaceContent, first: int, last: int, readout_row: dict[int, int], vocab: dict[int, str]
) -> dict[str, dict[str, Any]]:
    """The per-latent records of latents ``first … last − 1`` (keys are latent ids as strings)."""
    records: dict[str, dict[str, Any]] = {str(latent): {} for latent in range(first, last)}
    store = content.store
    if store is not None:
        top = _slice_examples(store.top, first, last, store.settings.before, content.decode, vocab)
        sample = _slice_examples(store.sample, first, last, store.settings.before, content.decode, vocab)
        histogram = store.histogram[first:last]
        for offset, latent in enumerate(range(first, last)):
            record = records[str(latent)]
            bins = histogram[offset].nonzero().squeeze(1).tolist()
            record["histogram"] = {"bins": [[b, int(histogram[offset, b])] for b in bins]}
            record["top"] = top[offset]
            record["quantiles"] = _buckets(sample[offset], store.settings.n_quantiles)
    for latent in range(first, last):
        record = records[str(latent)]
        if latent in readout_row:
            record["readout"] = {
                name: _readout_lists(readout, readout_row[latent], content.decode)
                for name, readout in content.readout.items()
            }
        if latent in content.kl:
            record["kl"] = content.kl[latent]
        if latent in content.steering:
            record["steering"] = content.steering[latent]
    return records


def _slice_examples(
    reservoir: Reservoir,
    first: int,
    last: int,
    before: int,
    decode: Callable[[int], str] | None,
    vocab: dict[int, str],
) -> list[list[dict[str, Any]]]:
    """The kept examples of latents ``first … last − 1`` in slot order, each as a JSON record."""
    held = (reservoir.keys[first:last] >= 0).tolist()
    values = reservoir.values[first:last].tolist()
    ids = reservoir.window_ids[first:last]
    activations = reservoir.window_activations[first:last]
    peaks = activations.amax(dim=-1).clamp_min(1e-30)
    levels = (activations.clamp_min(0) / peaks[..., None] * LEVELS).round().int().tolist()
    ids_list, peaks_list = ids.tolist(), peaks.tolist()
    if decode is not None:
        for token in ids[reservoir.keys[first:last] >= 0].unique().tolist():
            if token != PAD and token not in vocab:
                vocab[token] = decode(token)
    result = []
    for row, slots in enumerate(held):
        result.append(
            [
                {
                    "activation": values[row][slot],
                    "tokens": ids_list[row][slot],
                    "levels": levels[row][slot],
                    "peak": peaks_list[row][slot],
                    "center": before,
                }
                for slot, kept in enumerate(slots)
                if kept
            ]
        )
    return result


def _buckets(examples: list[dict[str, Any]], n_quantiles: int) -> list[dict[str, Any]]:
    """Sampled examples cut into quantile buckets with their activation ranges."""
    return [
        {"low": bucket[0]["activation"], "high": bucket[-1]["activation"], "examples": bucket}
        for bucket in quantile_buckets(examples, lambda example: example["activation"], n_quantiles)
    ]


def _readout_lists(readout: Readout, row: int, decode: Callable[[int], str] | None) -> dict[str, list]:
    def pairs(ids: torch.Tensor, logits: torch.Tensor) -> list:
        pairs_ = zip(ids.tolist(), logits.tolist(), strict=True)
        return [[decode(i) if decode else i, round(v, 4)] for i, v in pairs_ if i >= 0]  # -1: no row in this model

    return {
        "promoted": pairs(readout.promoted[row], readout.promoted_logits[row]),
        "suppressed": pairs(readout.suppressed[row], readout.suppressed_logits[row]),
    }


def _top_tokens(store: ActivationStore, vocab: dict[int, str]) -> list[str | None]:
    """Per latent the distinct tokens its top activations fire on, strongest first (None for a dead latent)."""
    texts: list[str | None] = []
    for tokens in store.top_centre_tokens():
        names = dict.fromkeys(repr(vocab[token]) for token in tokens if token in vocab)
        texts.append(" ".join(names)[:160] if names else None)
    return texts


def _column_spec(column: Column) -> dict[str, Any]:
    spec = {"name": column.name, "label": column.label, "kind": column.kind, "description": column.description}
    if column.kind == "category":
        spec["labels"] = sorted({value for value in column.values or () if value is not None})
    return spec


def _column_values(column: Column) -> list[Any]:
    values = list(column.values or ())
    if column.kind == "category":
        index = {label: i for i, label in enumerate(_column_spec(column)["labels"])}
        return [None if value is None else index[value] for value in values]
    if column.kind == "number":
        return [None if value is None or not math.isfinite(value) else value for value in map(_plain, values)]
    return values


def _plain(value: Any) -> float | None:
    return None if value is None else float(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)
