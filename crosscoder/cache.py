"""On-disk activation cache (DESIGN §6): collect paired activations once, train many times.

A cache is a folder::

    manifest.json                       what, how many, statistics, checksums, build position
    shard_000000.activations.bin        [tokens, n_sources, d_model] raw little-endian values in the stored
                                        dtype (float32, float16, or bfloat16 kept as its uint16 bit patterns)
    shard_000000.token_ids.bin          [tokens] int32, the token each row was computed on
    shard_000001.activations.bin ...

Shards hold exactly ``shard_tokens`` tokens (the last may hold fewer) and are memory-mapped when read.
Every file is written to a temporary name and renamed into place; the manifest is rewritten the same way
after each finished shard, so a folder always describes a consistent prefix of the stream.

**Exact resume of a build.** Shards are cut at fixed token counts, not at chunk boundaries, so a shard may
end inside a chunk. The manifest's ``position`` is therefore a pair: the source position *before* the chunk
in which the last finished shard ended (``ChunkSource.state_dict()``) and the number of that chunk's tokens
already written (``skip_tokens``; 0 with the position *after* the chunk when the shard ended exactly at its
end). Continuing a build restores the source there, drops the first ``skip_tokens`` tokens of the next chunk
and recomputes everything after the last finished shard, so an interrupted and continued build writes the
same bytes as an uninterrupted one (manifest included: it holds no timestamps).

**Reading** (``ActivationCache``): each epoch visits the shards in an order drawn from (seed, epoch) and the
tokens of each shard in an order drawn from (seed, epoch, shard); that sequence is cut into batches, which may
span a shard boundary. The last ``num_tokens mod batch_size`` tokens of each epoch's sequence are dropped
(a different set each epoch). The position is (epoch, tokens consumed in the epoch): resume is exact.
With several data-parallel ranks, each takes its slice of every global batch.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from crosscoder.chunks import ActivationChunk, ChunkSource

CACHE_FORMAT = "crosscoder-activation-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Default tokens per shard: 65,536 tokens of two 2304-wide bf16 sources make a 604 MB shard.
DEFAULT_SHARD_TOKENS = 65_536

#: Stored dtypes: name → (torch dtype of the values, numpy dtype of the raw file).
STORED_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
}
TOKEN_DTYPE = np.dtype("<i4")
_SHARD_FILE = re.compile(r"^shard_\d{6}\.(activations|token_ids)\.bin$")
_TEMPORARY_FILE = re.compile(r"^\.(shard_\d{6}\.(activations|token_ids)\.bin|manifest\.json)\.tmp$")
_HASH_BLOCK = 1 << 23
_STATISTICS_ROWS = 4096  # tokens per float64 slice when summing statistics

Verify = Literal["size", "first_read", "open"]


class CacheError(ValueError):
    """An activation cache cannot be built or read as asked (foreign folder, mismatched build, bad request)."""


class CacheIntegrityError(CacheError):
    """A shard file is missing, truncated, or fails its sha256 checksum."""


# ---------------------------------------------------------------------------- reading
class ActivationCache:
    """Shuffled batches ``x: [batch_size, n_sources, d_model]`` read from an on-disk cache, resumable.

    Satisfies ``crosscoder.data.ResumableBatches``: pass it to ``crosscoder.train(config, cache)``.

    folder: a cache written by ``ActivationCache.build``.
    batch_size: tokens per batch; batches may span shard boundaries, and the last ``num_tokens mod
        batch_size`` tokens of each epoch's order are dropped.
    seed, shuffle: shard order per epoch from (seed, epoch), token order within a shard from (seed, epoch,
        shard); ``shuffle=False`` reads tokens in storage (= stream) order every epoch.
    epochs: stop after this many epochs (None = forever).
    dtype: dtype of the yielded batches (default float32, so that differences such as chat − base are not
        rounded to bf16); None yields the stored dtype.
    verify: ``"size"`` checks only that every shard file has its expected size (always done at open);
        ``"first_read"`` (default) also checks a shard's sha256 the first time it is read; ``"open"`` checks
        every shard's sha256 now (one full read of the cache). ``verify()`` does the full check any time.
    allow_incomplete: read a cache whose build has not finished (its finished shards).
    rank, world_size: data-parallel reading. The processes walk one order in global batches of
        ``batch_size · world_size`` tokens and process ``rank`` takes rows [rank · batch_size, (rank + 1) ·
        batch_size) of each, so together they see exactly the tokens one process with the global batch size
        sees. Every rank holds the same position.

    Within a batch, the rows taken from one shard are in storage order (sequential reads of the memory
    map); which tokens form a batch is random.
    """

    def __init__(
        self,
        folder: str | Path,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        dtype: torch.dtype | None = torch.float32,
        verify: Verify = "first_read",
        allow_incomplete: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if verify not in ("size", "first_read", "open"):
            raise ValueError(f"verify must be 'size', 'first_read' or 'open', got {verify!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if epochs is not None and epochs <= 0:
            raise ValueError(f"epochs must be positive (or None for endless), got {epochs}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"the cache in {self.folder} is incomplete ({self.manifest['num_tokens']:,} of "
                f"{self.manifest['requested_tokens']:,} tokens): run the build again to finish it, or pass "
                "allow_incomplete=True to read the finished shards"
            )
        if batch_size <= 0 or batch_size * world_size > self.num_tokens:
            raise CacheError(
                f"batch_size={batch_size} × world_size={world_size} does not fit a cache of {self.num_tokens:,} "
                "tokens: choose a global batch between 1 and the number of cached tokens, or build a larger cache"
            )
        self.batch_size, self.seed, self.shuffle, self.epochs = batch_size, seed, shuffle, epochs
        self.rank, self.world_size = rank, world_size
        self.dtype = dtype
        self.verify_mode = verify
        self.shard_sizes = [int(shard["tokens"]) for shard in self.manifest["shards"]]
        check_shard_sizes(self.folder, self.manifest)
        self._verified: set[int] = set()
        if verify == "open":
            self.verify()
        self._open_shards: OrderedDict[int, tuple[np.memmap, np.memmap]] = OrderedDict()
        self._order_epoch, self._order_shards, self._order_starts = -1, [], []
        self._permutation_key: tuple[int, int] | None = None
        self._permutation = np.empty(0, dtype=np.int64)
        self.epoch, self.position = 0, 0

    # ---------------------------------------------------------------- metadata
    @property
    def n_sources(self) -> int:
        return int(self.manifest["n_sources"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def num_tokens(self) -> int:
        """Tokens in the cache (an epoch yields ``num_tokens // batch_size`` batches)."""
        return int(self.manifest["num_tokens"])

    @property
    def stored_dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.manifest["dtype"]][0]

    @property
    def description(self) -> dict[str, Any]:
        """What produced the activations (the source's ``description()``: models, layers, dtype, filters)."""
        return self.manifest["description"]

    @property
    def num_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def global_batch_size(self) -> int:
        """Tokens consumed per step by all ranks together."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_tokens // self.global_batch_size

    @property
    def mean_norm(self) -> torch.Tensor:
        """[n_sources] mean activation norm per source over the whole cache."""
        return torch.tensor(self.manifest["statistics"]["mean_norm"], dtype=torch.float64)

    @property
    def input_scale(self) -> torch.Tensor:
        """[n_sources] float32 scale with E‖scale_s · x_s‖ = √d_model over the whole cache (DESIGN §3)."""
        return torch.tensor(self.manifest["statistics"]["input_scale"], dtype=torch.float32)

    @property
    def mean(self) -> torch.Tensor:
        """[n_sources, d_model] mean activation per source over the whole cache."""
        return torch.tensor(self.manifest["statistics"]["mean"], dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.folder)!r}, {self.num_tokens:,} tokens × {self.n_sources} sources × "
            f"{self.d_model} ({self.manifest['dtype']}), {self.num_shards} shards, batch_size={self.batch_size})"
        )

    # ---------------------------------------------------------------- batches
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches x: [batch_size, n_sources, d_model] from the current position on."""
        for activations, _ in self._batches():
            yield activations

    def batches_with_tokens(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Like iterating, with each batch's token ids: (x [batch_size, n_sources, d_model], ids [batch_size]
        int64), row-aligned. Advances the same position."""
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.global_batch_size
        while True:
            if self.position + step > self.num_tokens:
                self.epoch, self.position = self.epoch + 1, 0
            if self.epochs is not None and self.epoch >= self.epochs:
                return
            batch = self._read(self.epoch, self.position + self.rank * self.batch_size, self.batch_size)
            self.position += step
            yield batch

    def _read(self, epoch: int, position: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [position, position + count) of an epoch's order."""
        self._ensure_order(epoch)
        slot = bisect.bisect_right(self._order_starts, position) - 1
        activations, token_ids = [], []
        while count > 0:
            shard = self._order_shards[slot]
            offset = position - self._order_starts[slot]
            take = min(count, self.shard_sizes[shard] - offset)
            rows = np.sort(self._shard_permutation(epoch, shard)[offset : offset + take])
            shard_activations, shard_token_ids = self._shard(shard)
            activations.append(shard_activations[rows])
            token_ids.append(shard_token_ids[rows])
            position, count, slot = position + take, count - take, slot + 1
        x = _from_stored(np.concatenate(activations), self.manifest["dtype"])
        if self.dtype is not None:
            x = x.to(self.dtype)
        return x, torch.from_numpy(np.concatenate(token_ids).astype(np.int64))

    def _ensure_order(self, epoch: int) -> None:
        if self._order_epoch == epoch:
            return
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_shards)
        else:
            order = np.arange(self.num_shards)
        self._order_shards = [int(shard) for shard in order]
        self._order_starts = np.cumsum([0] + [self.shard_sizes[shard] for shard in self._order_shards]).tolist()
        self._order_epoch = epoch

    def _shard_permutation(self, epoch: int, shard: int) -> np.ndarray:
        if self._permutation_key != (epoch, shard):
            size = self.shard_sizes[shard]
            if self.shuffle:
                self._permutation = np.random.default_rng([self.seed, epoch, 1, shard]).permutation(size)
            else:
                self._permutation = np.arange(size)
            self._permutation_key = (epoch, shard)
        return self._permutation

    def _shard(self, index: int) -> tuple[np.memmap, np.memmap]:
        """Memory maps of a shard: activations [tokens, n_sources, d_model] (raw stored dtype), ids [tokens]."""
        if index in self._open_shards:
            self._open_shards.move_to_end(index)
            return self._open_shards[index]
        if self.verify_mode == "first_read" and index not in self._verified:
            problems = shard_checksum_problems(self.folder, self.manifest, index)
            if problems:
                raise CacheIntegrityError(_integrity_message(self.folder, problems))
            self._verified.add(index)
        entry, tokens = self.manifest["shards"][index], self.shard_sizes[index]
        stored = STORED_DTYPES[self.manifest["dtype"]][1]
        maps = (
            np.memmap(
                self.folder / entry["activations"],
                dtype=stored,
                mode="c",
                shape=(tokens, self.n_sources, self.d_model),
            ),
            np.memmap(self.folder / entry["token_ids"], dtype=TOKEN_DTYPE, mode="c", shape=(tokens,)),
        )
        self._open_shards[index] = maps
        while len(self._open_shards) > 4:
            self._open_shards.popitem(last=False)
        return maps

    def shard(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard ``index`` in storage order: activations [tokens, n_sources, d_model] in the stored dtype
        (backed by the memory map, copy-on-write: edits never reach the file) and token ids [tokens] int64 (a copy)."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range: the cache has {self.num_shards} shards")
        activations, token_ids = self._shard(index)
        return _from_stored(activations, self.manifest["dtype"]), torch.from_numpy(token_ids.astype(np.int64))

    # ---------------------------------------------------------------- integrity and position
    def verify(self) -> None:
        """Check every shard's sha256 (reads the whole cache); raises ``CacheIntegrityError`` naming each bad
        file."""
        verify_checksums(self.folder, self.manifest)
        self._verified.update(range(self.num_shards))

    def state_dict(self) -> dict[str, Any]:
        """Position after the last yielded batch: epoch and tokens consumed in it (plus the cache size, so a
        state is not applied to another cache)."""
        return {"epoch": self.epoch, "position": self.position, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_tokens", self.num_tokens)) != self.num_tokens:
            raise CacheError(
                f"this reading position was saved for a cache of {int(state['num_tokens']):,} tokens, but "
                f"{self.folder} holds {self.num_tokens:,}: resume with the cache the run was started on"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---------------------------------------------------------------- writing
    @classmethod
    def build(
        cls,
        folder: str | Path,
        source: ChunkSource,
        num_tokens: int,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        dtype: torch.dtype | str | None = None,
        progress: bool = True,
    ) -> Path:
        """Write ``num_tokens`` tokens of ``source.chunks()`` into ``folder`` (created); returns the folder.

        Continues an interrupted build in the same folder when the source's ``description()``, ``shard_tokens``
        and ``dtype`` match (the result is byte-identical to an uninterrupted build); refuses, without touching
        any file, when they differ. A finished cache may be extended to a larger ``num_tokens`` when all its
        shards are full. dtype: stored dtype (float32, float16 or bfloat16; None = the chunks' dtype). Tokens
        whose stored value is not finite (NaN, or Inf after a cast to float16) are dropped and counted in the
        manifest. If the source runs out first, the cache ends there (with a warning).
        """
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        _CacheBuilder(Path(folder), source, num_tokens, shard_tokens, _dtype_name(dtype), progress).run()
        return Path(folder)


# ---------------------------------------------------------------------------- manifest and integrity
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a cache folder; errors say why the folder is not a readable cache."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise CacheError(f"activation cache folder {folder} does not exist")
    if not path.is_file():
        raise CacheError(
            f"{folder} has no {MANIFEST_NAME}, so it is not an activation cache: build one with "
            "`python -m crosscoder.cache build --out DIR ...` or ActivationCache.build"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(f"{path} is not valid JSON ({error}): the manifest is damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not the manifest of a crosscoder activation cache (format {CACHE_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > CACHE_VERSION:
        raise CacheError(
            f"{path} is cache format version {version!r}, newer than this crosscoder reads ({CACHE_VERSION}): "
            "upgrade crosscoder"
        )
    return manifest


def check_shard_sizes(folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard file exists with the size its token count implies; raises naming each bad file."""
    item_size = STORED_DTYPES[manifest["dtype"]][1].itemsize
    row_bytes = manifest["n_sources"] * manifest["d_model"] * item_size
    problems = []
    for shard in manifest["shards"]:
        for key, expected in (
            ("activations", shard["tokens"] * row_bytes),
            ("token_ids", shard["tokens"] * TOKEN_DTYPE.itemsize),
        ):
            path = folder / shard[key]
            if not path.is_file():
                problems.append(f"{shard[key]} is missing")
            elif path.stat().st_size != expected:
                problems.append(
                    f"{shard[key]} has {path.stat().st_size:,} bytes, expected {expected:,} (truncated or overwritten)"
                )
    if problems:
        raise CacheIntegrityError(_integrity_message(folder, problems))


def shard_checksum_problems(folder: Path, manifest: dict[str, Any], index: int) -> list[str]:
    """Files of shard ``index`` whose sha256 differs from the manifest's (one full read of the shard)."""
    shard, problems = manifest["shards"][index], []
    for key in ("activations", "token_ids"):
        digest = _file_sha256(folder / shard[key])
        if digest != shard[f"{key}_sha256"]:
            problems.append(f"{shard[key]} fails its sha256 checksum (corrupted)")
    return problems


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard's sha256 matches the manifest (one full read of the cache); raises naming each bad file."""
    problems = [
        problem
        for index in range(len(manifest["shards"]))
        for problem in shard_checksum_problems(folder, manifest, index)
    ]
    if problems:
        raise CacheIntegrityError(_integrity_message(folder, problems))


def _integrity_message(folder: Path, problems: list[str]) -> str:
    return (
        f"activation cache {folder} is damaged: {'; '.join(problems)}. Restore the files from a copy, or "
        "delete the folder and build the cache again"
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _from_stored(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A tensor viewing a raw stored array (bf16 from its uint16 bit patterns)."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_stored(x: torch.Tensor) -> np.ndarray:
    """The raw array of a contiguous CPU tensor in a stored dtype (bf16 as uint16 bit patterns)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    names = {torch_dtype: name for name, (torch_dtype, _) in STORED_DTYPES.items()}
    name = names.get(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in STORED_DTYPES:
        raise ValueError(f"cannot store activations as {dtype}: choose one of {', '.join(STORED_DTYPES)}")
    return name


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


def _write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` to ``path`` through a temporary file and a rename; returns its sha256."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _write_atomic(folder / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    if os.name == "posix":  # make the renames durable
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------------------- writing
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


class _CacheBuilder:
    """One run of ``ActivationCache.build``: check or start the manifest, then fill shards from the source."""

    def __init__(
        self,
        folder: Path,
        source: ChunkSource,
        num_tokens: int,
        shard_tokens: int,
        dtype_name: str | None,
        progress: bool,
    ) -> None:
        self.folder, self.source, self.num_tokens, self.shard_tokens = folder, source, num_tokens, shard_tokens
        self.dtype_name, self.progress = dtype_name, progress
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
        bar = tqdm(
            total=self.num_tokens,
            initial=written,
            unit="tok",
            unit_scale=True,
            desc=f"caching to {self.folder.name}",
            disable=not self.progress,
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
                _write_manifest(self.folder, self.manifest)
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
                not folder.is_dir() or any(not _TEMPORARY_FILE.match(path.name) for path in folder.iterdir())
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
        dtype_name = self.dtype_name or _dtype_name(chunk.activations.dtype)
        self.manifest = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_VERSION,
            "description": self.description,
            "n_sources": n_sources,
            "d_model": d_model,
            "dtype": dtype_name,
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
        _write_manifest(self.folder, self.manifest)

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
        activations = _to_stored(torch.cat(pending.activations))
        token_ids = torch.cat(pending.token_ids).numpy().astype(TOKEN_DTYPE)
        entry: dict[str, Any] = {"tokens": pending.tokens}
        for key, array in (("activations", activations), ("token_ids", token_ids)):
            name = f"shard_{index:06d}.{key}.bin"
            entry[key] = name
            entry[f"{key}_sha256"] = _write_atomic(
                self.folder / name, memoryview(np.ascontiguousarray(array)).cast("B")
            )
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
        _write_manifest(self.folder, manifest)

    def _source_state(self) -> dict[str, Any]:
        return _json_copy(self.source.state_dict(), "ChunkSource.state_dict()")

    def _remove_temporary_files(self) -> None:
        for path in self.folder.iterdir():
            if _TEMPORARY_FILE.match(path.name):
                path.unlink()

    def _remove_stray_shards(self) -> None:
        """Shard files a crashed build wrote after its last manifest update and this build did not rewrite."""
        if self.manifest is None or not self.manifest["complete"]:
            return
        listed = {shard[key] for shard in self.manifest["shards"] for key in ("activations", "token_ids")}
        for path in self.folder.iterdir():
            if _SHARD_FILE.match(path.name) and path.name not in listed:
                path.unlink()


# ---------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class _BuildOptions:
    out: Path | None = None
    """Cache folder (created; an interrupted build in it is continued)."""
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    """Tokens per shard file."""
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """Stored dtype (default: the models' dtype)."""
    preset: str | None = None
    """Training preset to start the stream settings from."""


USAGE = """usage:
  python -m crosscoder.cache build --out DIR [--shard-tokens N] [--dtype {bfloat16,float16,float32}]
                                   [--preset NAME] --base-model M --chat-model M --datasets D ... --num-tokens N
      Stream paired activations as a training run with these flags would (models, layers, datasets, filters)
      and write --num-tokens tokens to DIR; run again to continue an interrupted build.
      `python -m crosscoder.cache build --help` lists every stream flag.
  python -m crosscoder.cache info DIR      what a cache holds
  python -m crosscoder.cache verify DIR    check every shard's sha256
"""


def _paired_stream(config: Any) -> ChunkSource:
    """The ChunkSource a training config names (imported lazily: models are only needed to build)."""
    from crosscoder.activations import PairedActivationStream

    return PairedActivationStream.from_config(config)


def _build_command(argv: Sequence[str]) -> int:
    import tyro

    from crosscoder.config import TrainConfig, preset

    options, rest = tyro.cli(_BuildOptions, args=list(argv), return_unknown_args=True, add_help=False)
    base = preset(options.preset) if options.preset is not None else TrainConfig()
    config = tyro.cli(
        TrainConfig,
        args=rest,
        default=base,
        prog="python -m crosscoder.cache build",
        description=(
            "Build an activation cache: --out DIR (required), --shard-tokens N (default "
            f"{DEFAULT_SHARD_TOKENS}), --dtype bfloat16|float16|float32 (default: the models' dtype), --preset NAME; "
            "--num-tokens sets the cache size; the stream flags below choose models, layers, datasets and filters."
        ),
    )
    if options.out is None:
        raise CacheError("name the cache folder with --out DIR")
    ActivationCache.build(
        options.out, _paired_stream(config), config.num_tokens, options.shard_tokens, options.dtype, config.progress
    )
    _print_info(options.out)
    return 0


def _print_info(folder: Path) -> None:
    manifest = read_manifest(folder)
    statistics = manifest["statistics"]
    summary = {
        "folder": str(folder),
        "complete": manifest["complete"],
        "num_tokens": manifest["num_tokens"],
        "requested_tokens": manifest["requested_tokens"],
        "shards": len(manifest["shards"]),
        "shard_tokens": manifest["shard_tokens"],
        "n_sources": manifest["n_sources"],
        "d_model": manifest["d_model"],
        "dtype": manifest["dtype"],
        "dropped_nonfinite_tokens": manifest["dropped_nonfinite_tokens"],
        "mean_norm": statistics["mean_norm"],
        "input_scale": statistics["input_scale"],
        "description": manifest["description"],
    }
    print(json.dumps(summary, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crosscoder.cache {build,info,verify} ...``; returns the exit status (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "build":
            return _build_command(rest)
        if command in ("info", "verify"):
            if len(rest) != 1:
                raise CacheError(f"`{command}` takes one cache folder, got {len(rest)} arguments")
            folder = Path(rest[0])
            if command == "verify":
                manifest = read_manifest(folder)
                check_shard_sizes(folder, manifest)
                verify_checksums(folder, manifest)
                print(f"{folder}: all {len(manifest['shards'])} shards match their checksums")
            else:
                _print_info(folder)
            return 0
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
