"""Building an activation cache from a ``ChunkSource``, resumable to the byte.

**Exact resume of a build.** Shards are cut at fixed token counts, not at chunk boundaries, so a shard may
end inside a chunk. The manifest's ``position`` is therefore a pair: the source position *before* the chunk
in which the last finished shard ended (``ChunkSource.state_dict()``) and the number of that chunk's tokens
already written (``skip_tokens``; 0 with the position *after* the chunk when the shard ended exactly at its
end). Continuing a build restores the source there, drops the first ``skip_tokens`` tokens of the next chunk
and recomputes everything after the last finished shard, so an interrupted and continued build writes the
same bytes as an uninterrupted one (manifest included: it holds no timestamps).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosscoder.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    SHARD_FILE,
    SHARD_FILE_KINDS,
    STORED_DTYPES,
    TEMPORARY_FILE,
    TOKEN_DTYPE,
    check_shard_sizes,
    dtype_name,
    read_manifest,
    shard_file_name,
    to_stored,
    write_atomic,
    write_manifest,
)
from crosscoder.chunks import ActivationChunk, ChunkSource
from crosscoder.errors import CacheError, ConfigError
from crosscoder.progress import progress_bar

_STATISTICS_ROWS = 4096  # tokens per float64 slice when summing statistics


class CacheBuilder:
    """One run of ``ActivationCache.build``: check or start the manifest, then fill shards from the source.

    Checks its arguments when made (``ConfigError`` for a bad count or dtype, ``CacheError`` for a source
    whose ``description()`` cannot be stored); ``run()`` writes the cache.
    """

    def __init__(
        self,
        folder: str | Path,
        source: ChunkSource,
        num_tokens: int,
        shard_tokens: int,
        dtype: torch.dtype | str | None,
        progress: bool,
    ) -> None:
        if num_tokens <= 0:
            raise ConfigError(f"num_tokens must be positive, got {num_tokens}")
        if shard_tokens <= 0:
            raise ConfigError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder, self.source, self.num_tokens, self.shard_tokens = Path(folder), source, num_tokens, shard_tokens
        self.dtype_name, self.progress = dtype_name(dtype), progress
        self.description = _json_copy(source.description(), "ChunkSource.description()")
        self.manifest: dict[str, Any] | None = None

    def run(self) -> None:
        manifest = self._manifest_to_continue()
        if manifest is not None and manifest["complete"]:
            return
        if manifest is not None:
            self.manifest = manifest
            manifest["requested_tokens"] = self.num_tokens
            position = manifest["position"]
            self.source.load_state_dict(copy.deepcopy(position["source"]))
            state_before, skip = position["source"], int(position["skip_tokens"])
            dropped_before = int(manifest["dropped_nonfinite_tokens"])
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            state_before, skip, dropped_before = self._source_state(), 0, 0
        self._remove_temporary_files()

        written = self.manifest["num_tokens"] if self.manifest else 0
        pending = _PendingShard()
        bar = progress_bar(
            total=self.num_tokens,
            initial=written,
            unit="tok",
            unit_scale=True,
            desc=f"caching to {self.folder.name}",
            enabled=self.progress,
        )
        chunks = iter(self.source.chunks())
        exhausted = False
        try:
            while written < self.num_tokens:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                if self.manifest is None:
                    self._start_manifest(chunk, state_before)
                activations, token_ids, dropped = self._prepare(chunk)
                state_after, dropped_after = self._source_state(), dropped_before + dropped
                if skip > activations.shape[0]:
                    raise CacheError(
                        f"the cache's position says {skip} tokens of the next chunk were written, but the source "
                        f"gave a chunk of {activations.shape[0]}: the source is not deterministic, so this build "
                        "cannot be continued exactly; build into a new folder"
                    )
                start, skip = skip, 0
                while start < activations.shape[0] and written < self.num_tokens:
                    target = min(self.shard_tokens, self.num_tokens - written)
                    take = min(target - pending.tokens, activations.shape[0] - start)
                    pending.add(activations[start : start + take], token_ids[start : start + take])
                    start += take
                    bar.update(take)
                    if pending.tokens == target:
                        at_end = start == activations.shape[0]
                        position = {
                            "source": state_after if at_end else state_before,
                            "skip_tokens": 0 if at_end else start,
                        }
                        self._finish_shard(pending, position, dropped_after if at_end else dropped_before)
                        written, pending = written + target, _PendingShard()
                state_before, dropped_before = state_after, dropped_after
        finally:
            bar.close()

        if exhausted:
            if self.manifest is None:
                raise CacheError("the source produced no chunks: there is nothing to cache")
            self.manifest["source_exhausted"] = True
            if pending.tokens:
                self._finish_shard(pending, {"source": state_before, "skip_tokens": 0}, dropped_before)
            else:
                self.manifest["complete"] = True
                write_manifest(self.folder, self.manifest)
            warnings.warn(
                f"the source ran out after {self.manifest['num_tokens']:,} of the {self.num_tokens:,} requested "
                f"tokens; the cache in {self.folder} holds those",
                stacklevel=3,
            )
        self._remove_stray_shards()

    # ---------------------------------------------------------------- checks
    def _manifest_to_continue(self) -> dict[str, Any] | None:
        """The manifest of a build to continue (None for a fresh folder); refuses a mismatched build."""
        folder = self.folder
        if not (folder / MANIFEST_NAME).exists():
            if folder.exists() and (
                not folder.is_dir() or any(not TEMPORARY_FILE.match(path.name) for path in folder.iterdir())
            ):
                raise CacheError(
                    f"{folder} exists and is not an activation cache (no {MANIFEST_NAME}): build into a new or empty "
                    "folder; nothing was written"
                )
            return None
        manifest = read_manifest(folder)
        refusal = f"refusing to add to the activation cache in {folder} (nothing was written)"
        differences = _differences(manifest["description"], self.description)
        if differences:
            raise CacheError(
                f"{refusal}: it was built from a different source — {'; '.join(differences)}. Build into another "
                "folder, or continue this one with the source it was started with"
            )
        if manifest["shard_tokens"] != self.shard_tokens:
            raise CacheError(
                f"{refusal}: it uses shard_tokens={manifest['shard_tokens']}, not {self.shard_tokens}; pass "
                f"shard_tokens={manifest['shard_tokens']} to continue it"
            )
        if self.dtype_name is not None and manifest["dtype"] != self.dtype_name:
            raise CacheError(
                f"{refusal}: it stores {manifest['dtype']}, not {self.dtype_name}; pass dtype={manifest['dtype']!r} "
                "to continue it"
            )
        written = manifest["num_tokens"]
        if written > self.num_tokens:
            raise CacheError(
                f"{refusal}: it already holds {written:,} tokens, more than the {self.num_tokens:,} asked for; read "
                "fewer tokens from it, or build the smaller cache in another folder"
            )
        check_shard_sizes(folder, manifest)
        if manifest["complete"] and written < self.num_tokens:
            if manifest["source_exhausted"]:
                warnings.warn(
                    f"the cache in {folder} is complete with {written:,} tokens: its source ran out before "
                    f"{self.num_tokens:,}",
                    stacklevel=4,
                )
                return manifest
            if any(shard["tokens"] != self.shard_tokens for shard in manifest["shards"]):
                raise CacheError(
                    f"{refusal}: it is complete with {written:,} tokens and its last shard is partial, so it cannot "
                    "be extended exactly; build the larger cache in another folder"
                )
            manifest["complete"] = False
        return manifest

    def _start_manifest(self, chunk: ActivationChunk, position: dict[str, Any]) -> None:
        """The manifest of a fresh build, written as soon as the first chunk gives the shapes and dtype."""
        _, n_sources, d_model = chunk.activations.shape
        stored = self.dtype_name or dtype_name(chunk.activations.dtype)
        self.manifest = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_VERSION,
            "description": self.description,
            "n_sources": n_sources,
            "d_model": d_model,
            "dtype": stored,
            "token_dtype": "int32",
            "shard_tokens": self.shard_tokens,
            "requested_tokens": self.num_tokens,
            "num_tokens": 0,
            "complete": False,
            "source_exhausted": False,
            "dropped_nonfinite_tokens": 0,
            "statistics": _statistics(
                torch.zeros(n_sources, dtype=torch.float64), torch.zeros(n_sources, d_model, dtype=torch.float64), 0
            ),
            "shards": [],
            "position": {"source": position, "skip_tokens": 0},
        }
        write_manifest(self.folder, self.manifest)

    def _prepare(self, chunk: ActivationChunk) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A chunk's activations in the stored dtype (on its device, contiguous) and its ids (CPU int64), finite
        tokens only; and how many tokens were dropped."""
        manifest = self.manifest
        assert manifest is not None
        shape = tuple(chunk.activations.shape[1:])
        if shape != (manifest["n_sources"], manifest["d_model"]):
            raise CacheError(
                f"the source gave a chunk of [tokens, {shape[0]}, {shape[1]}] activations but the cache holds "
                f"[tokens, {manifest['n_sources']}, {manifest['d_model']}]: every chunk must come from the same "
                "models and layers"
            )
        activations = chunk.activations.detach().to(STORED_DTYPES[manifest["dtype"]][0]).contiguous()
        token_ids = chunk.token_ids.detach().to("cpu", torch.int64)
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() > np.iinfo(TOKEN_DTYPE).max):
            raise CacheError(
                f"token ids must lie in [0, 2^31) to be stored as int32, got range [{int(token_ids.min())}, "
                f"{int(token_ids.max())}]"
            )
        finite = torch.cat([torch.isfinite(part).flatten(1).all(dim=1) for part in activations.split(_STATISTICS_ROWS)])
        dropped = int((~finite).sum())
        if dropped:
            activations, token_ids = activations[finite].contiguous(), token_ids[finite.cpu()]
        return activations, token_ids, dropped

    # ---------------------------------------------------------------- writing shards
    def _finish_shard(self, pending: _PendingShard, position: dict[str, Any], dropped: int) -> None:
        """Write the pending shard's files, then the manifest that lists it (both atomically)."""
        manifest = self.manifest
        assert manifest is not None and pending.norm_sum is not None and pending.vector_sum is not None
        index = len(manifest["shards"])
        activations = to_stored(torch.cat(pending.activations))
        token_ids = torch.cat(pending.token_ids).numpy().astype(TOKEN_DTYPE)
        entry: dict[str, Any] = {"tokens": pending.tokens}
        for key, array in (("activations", activations), ("token_ids", token_ids)):
            name = shard_file_name(index, key)
            entry[key] = name
            entry[f"{key}_sha256"] = write_atomic(self.folder / name, memoryview(np.ascontiguousarray(array)).cast("B"))
        entry["norm_sum"] = pending.norm_sum.tolist()

        statistics = manifest["statistics"]
        tokens = manifest["num_tokens"] + pending.tokens
        norm_sum = torch.tensor(statistics["norm_sum"], dtype=torch.float64) + pending.norm_sum
        vector_sum = torch.tensor(statistics["vector_sum"], dtype=torch.float64) + pending.vector_sum
        manifest["shards"].append(entry)
        manifest["num_tokens"] = tokens
        manifest["statistics"] = _statistics(norm_sum, vector_sum, tokens)
        manifest["dropped_nonfinite_tokens"] = dropped
        manifest["position"] = position
        manifest["complete"] = tokens >= manifest["requested_tokens"] or manifest["source_exhausted"]
        write_manifest(self.folder, manifest)

    def _source_state(self) -> dict[str, Any]:
        return _json_copy(self.source.state_dict(), "ChunkSource.state_dict()")

    def _remove_temporary_files(self) -> None:
        for path in self.folder.iterdir():
            if TEMPORARY_FILE.match(path.name):
                path.unlink()

    def _remove_stray_shards(self) -> None:
        """Shard files a crashed build wrote after its last manifest update and this build did not rewrite."""
        if self.manifest is None or not self.manifest["complete"]:
            return
        listed = {shard[key] for shard in self.manifest["shards"] for key in SHARD_FILE_KINDS}
        for path in self.folder.iterdir():
            if SHARD_FILE.match(path.name) and path.name not in listed:
                path.unlink()


@dataclass
class _PendingShard:
    """Tokens collected for the shard being filled, with their float64 sums."""

    activations: list[torch.Tensor] = dataclasses.field(default_factory=list)
    token_ids: list[torch.Tensor] = dataclasses.field(default_factory=list)
    tokens: int = 0
    norm_sum: torch.Tensor | None = None
    vector_sum: torch.Tensor | None = None

    def add(self, activations: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Append activations [tokens, n_sources, d_model] (stored dtype, on the chunk's device: the sums are
        computed there, then the tokens move to the CPU) and ids [tokens]."""
        for part in activations.split(_STATISTICS_ROWS):  # float64 copies of bounded size
            as_double = part.double()
            norm_sum, vector_sum = as_double.norm(dim=-1).sum(dim=0).cpu(), as_double.sum(dim=0).cpu()
            self.norm_sum = norm_sum if self.norm_sum is None else self.norm_sum + norm_sum
            self.vector_sum = vector_sum if self.vector_sum is None else self.vector_sum + vector_sum
        activations = activations.cpu()
        self.activations.append(activations)
        self.token_ids.append(token_ids)
        self.tokens += activations.shape[0]


def _statistics(norm_sum: torch.Tensor, vector_sum: torch.Tensor, tokens: int) -> dict[str, Any]:
    """Manifest statistics from running float64 sums: norm_sum [S], vector_sum [S, d].

    mean_norm = norm_sum / tokens; input_scale = √d / mean_norm (as ``normalization.estimate_input_scale``,
    over every cached token); mean = vector_sum / tokens.
    """
    statistics: dict[str, Any] = {
        "tokens": tokens,
        "norm_sum": norm_sum.tolist(),
        "vector_sum": vector_sum.tolist(),
        "mean_norm": None,
        "input_scale": None,
        "mean": None,
    }
    if tokens > 0:
        mean_norm = norm_sum / tokens
        statistics["mean_norm"] = mean_norm.tolist()
        statistics["input_scale"] = (math.sqrt(vector_sum.shape[-1]) / mean_norm).tolist()
        statistics["mean"] = (vector_sum / tokens).tolist()
    return statistics


def _json_copy(value: Any, what: str) -> Any:
    """A deep copy of ``value`` as it reads back from JSON (tuples become lists); errors name ``what``."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise CacheError(
            f"{what} must be JSON-serialisable (plain dicts, lists, strings, numbers) to be stored in the cache "
            f"manifest: {error}"
        ) from error


def _differences(cached: Any, given: Any, path: str = "") -> list[str]:
    """Human-readable paths where two JSON values differ."""
    if isinstance(cached, dict) and isinstance(given, dict):
        found = []
        for key in sorted(set(cached) | set(given), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in given:
                found.append(f"{where}: {cached[key]!r} in the cache, absent from the source")
            elif key not in cached:
                found.append(f"{where}: absent from the cache, {given[key]!r} in the source")
            else:
                found += _differences(cached[key], given[key], where)
        return found
    if cached != given:
        return [f"{path or 'description'}: {cached!r} in the cache, {given!r} in the source"]
    return []
