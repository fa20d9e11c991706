"""Reading an activation cache: ``ActivationCache``, shuffled batches with an exact, resumable position.

Each epoch visits the shards in an order drawn from (seed, epoch) and the tokens of each shard in an order
drawn from (seed, epoch, shard); that sequence is cut into batches, which may span a shard boundary. The last
``num_tokens mod batch_size`` tokens of each epoch's sequence are dropped (a different set each epoch). The
position is (epoch, tokens consumed in the epoch): resume is exact. With several data-parallel ranks, each
takes its slice of every global batch.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from crosscoder.cache.builder import CacheBuilder
from crosscoder.cache.format import (
    DEFAULT_SHARD_TOKENS,
    SHARD_FILE_KINDS,
    STORED_DTYPES,
    TOKEN_DTYPE,
    check_shard_sizes,
    from_stored,
    integrity_message,
    read_manifest,
    shard_checksum_problems,
    verify_checksums,
)
from crosscoder.chunks import ChunkSource
from crosscoder.errors import CacheError, CacheIntegrityError, ConfigError

Verify = Literal["size", "first_read", "open"]


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
            raise ConfigError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if verify not in ("size", "first_read", "open"):
            raise ConfigError(f"verify must be 'size', 'first_read' or 'open', got {verify!r}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        if epochs is not None and epochs <= 0:
            raise ConfigError(f"epochs must be positive (or None for endless), got {epochs}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"the cache in {self.folder} is incomplete ({self.manifest['num_tokens']:,} of "
                f"{self.manifest['requested_tokens']:,} tokens): run the build again to finish it, or read the "
                "finished shards with --allow-incomplete-cache (allow_incomplete=True in Python)"
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

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this cache's activations for a resumed training run: the manifest's description (models,
        revisions, layers, datasets, filters), the stored dtype and one sha256 over every shard file's checksum."""
        checksums = "".join(shard[f"{kind}_sha256"] for shard in self.manifest["shards"] for kind in SHARD_FILE_KINDS)
        return {
            "source": "activation cache",
            **self.description,
            "stored_dtype": self.manifest["dtype"],
            "shards_sha256": hashlib.sha256(checksums.encode()).hexdigest(),
        }

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
        """[n_sources] float32 scale with E‖scale_s · x_s‖ = √d_model over the whole cache."""
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
        x = from_stored(np.concatenate(activations), self.manifest["dtype"])
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
                raise CacheIntegrityError(integrity_message(self.folder, problems))
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
        return from_stored(activations, self.manifest["dtype"]), torch.from_numpy(token_ids.astype(np.int64))

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
        CacheBuilder(folder, source, num_tokens, shard_tokens, dtype, progress).run()
        return Path(folder)
