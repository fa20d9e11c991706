"""The on-disk activation cache: exact round trip, shuffled resumable reading, exact resumable building,
refusal to mix sources, integrity checks, statistics, training from a cache, and the command line."""

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import crosscoder
from crosscoder.cache import ActivationCache, CacheError, CacheIntegrityError, read_manifest
from crosscoder.cache import cli as cache_cli
from crosscoder.chunks import ActivationChunk, ChunkSource
from crosscoder.data import ResumableBatches
from crosscoder.normalization import estimate_input_scale
from crosscoder.synthetic import PlantedDictionary

PLANTED = PlantedDictionary.random(d_model=8, n_shared=12, n_base_only=2, n_chat_only=2, active_per_token=3.0)
# Cumulative sums hit 100, 500, 600, 1000, …: with 100-token shards some shards end exactly at a chunk's end,
# most inside a chunk, and the 130-token chunk spans two shard boundaries.
CHUNK_SIZES = [30, 70, 45, 80, 25, 40, 130, 20, 60]
SHARD_TOKENS = 100
NUM_TOKENS = 950  # 9 full shards and one of 50


class Interrupted(Exception):
    """Raised by a test source to simulate a build killed part way."""


class PlantedChunks:
    """A deterministic ChunkSource: chunk i holds CHUNK_SIZES[i % 9] tokens drawn from PLANTED with a generator
    seeded by (seed, i); token id of row j of chunk i is 1000·i + j. Position: {"chunk": i}."""

    def __init__(
        self,
        seed: int = 0,
        n_chunks: int | None = None,
        fail_after: int | None = None,
        dtype: torch.dtype = torch.float32,
        nan_rows: bool = False,
    ) -> None:
        self.seed, self.n_chunks, self.fail_after, self.dtype, self.nan_rows = (
            seed,
            n_chunks,
            fail_after,
            dtype,
            nan_rows,
        )
        self.chunk = 0
        self.yielded = 0
        self.loaded: dict[str, Any] | None = None

    def chunks(self) -> Iterator[ActivationChunk]:
        while self.n_chunks is None or self.chunk < self.n_chunks:
            if self.fail_after is not None and self.yielded >= self.fail_after:
                raise Interrupted(f"stopped after {self.yielded} chunks")
            index = self.chunk
            self.chunk += 1
            self.yielded += 1
            yield planted_chunk(index, self.seed, self.dtype, self.nan_rows)

    def state_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
        self.chunk = int(state["chunk"])

    def description(self) -> dict[str, Any]:
        return {"generator": "planted", "seed": self.seed, "d_model": PLANTED.d_model, "dtype": str(self.dtype)}


def planted_chunk(index: int, seed: int, dtype: torch.dtype = torch.float32, nan_rows: bool = False) -> ActivationChunk:
    size = CHUNK_SIZES[index % len(CHUNK_SIZES)]
    activations = PLANTED.sample(size, torch.Generator().manual_seed(seed * 100_003 + index)).to(dtype)
    if nan_rows:
        activations[::7, index % 2, 3] = float("nan")
    return ActivationChunk(activations, torch.arange(size) + 1000 * index)


def reference(num_tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first num_tokens tokens of PlantedChunks(seed): activations [n, 2, d] in dtype and ids [n]."""
    activations, ids, index = [], [], 0
    while sum(len(part) for part in ids) < num_tokens:
        chunk = planted_chunk(index, seed)
        activations.append(chunk.activations.to(dtype))
        ids.append(chunk.token_ids)
        index += 1
    return torch.cat(activations)[:num_tokens], torch.cat(ids)[:num_tokens]


def build(folder: Path, source: ChunkSource | None = None, num_tokens: int = NUM_TOKENS, **options) -> Path:
    options.setdefault("shard_tokens", SHARD_TOKENS)
    return ActivationCache.build(folder, source or PlantedChunks(), num_tokens, progress=False, **options)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def read_epoch(cache: ActivationCache) -> tuple[torch.Tensor, torch.Tensor]:
    iterator = cache.batches_with_tokens()
    batches = [next(iterator) for _ in range(cache.batches_per_epoch)]
    return torch.cat([x for x, _ in batches]), torch.cat([ids for _, ids in batches])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A 950-token float32 cache of PlantedChunks(seed=0) in 100-token shards."""
    return build(tmp_path_factory.mktemp("cache") / "planted")


# ---------------------------------------------------------------------------- round trip and layout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_epoch_reads_back_every_written_token_bit_exact_with_its_token_id(tmp_path, dtype):
    folder = build(tmp_path / "cache", dtype=dtype)
    cache = ActivationCache(folder, batch_size=38, dtype=None)  # 950 = 25 · 38: nothing dropped
    activations, ids = read_epoch(cache)

    expected_activations, expected_ids = reference(NUM_TOKENS, dtype=dtype)
    order = ids.argsort()
    assert ids[order].equal(expected_ids.sort().values)
    assert activations.dtype == dtype
    by_id = expected_activations[expected_ids.argsort()]
    assert activations[order].view(torch.uint8).equal(by_id.contiguous().view(torch.uint8))


def test_batches_are_float32_by_default_and_shaped_batch_sources_d_model(built):
    x = next(iter(ActivationCache(built, batch_size=64)))
    assert x.dtype == torch.float32 and list(x.shape) == [64, 2, PLANTED.d_model]


def test_shards_hold_exactly_shard_tokens_and_the_last_one_the_rest(built):
    manifest = read_manifest(built)
    assert [shard["tokens"] for shard in manifest["shards"]] == [100] * 9 + [50]
    assert manifest["num_tokens"] == NUM_TOKENS and manifest["complete"] and not manifest["source_exhausted"]
    assert (built / "shard_000009.activations.bin").stat().st_size == 50 * 2 * PLANTED.d_model * 4
    assert (built / "shard_000009.token_ids.bin").stat().st_size == 50 * 4
    expected, expected_ids = reference(NUM_TOKENS)
    stored = np.fromfile(built / "shard_000003.activations.bin", dtype="<f4").reshape(100, 2, PLANTED.d_model)
    assert torch.from_numpy(stored).equal(expected[300:400])
    assert np.fromfile(built / "shard_000003.token_ids.bin", dtype="<i4").tolist() == expected_ids[300:400].tolist()


def test_manifest_records_source_description_shapes_dtype_and_position(built):
    manifest = read_manifest(built)
    assert manifest["format"] == "crosscoder-activation-cache" and manifest["format_version"] == 1
    assert manifest["description"] == PlantedChunks().description()
    assert (manifest["n_sources"], manifest["d_model"], manifest["dtype"]) == (2, PLANTED.d_model, "float32")
    # 940 tokens after chunks 0–16, so the last shard ends 10 tokens into chunk 17: position = before it, skip 10
    assert manifest["position"] == {"source": {"chunk": 17}, "skip_tokens": 10}


def test_manifest_statistics_equal_a_direct_computation(built):
    manifest = read_manifest(built)
    x, _ = reference(NUM_TOKENS)
    statistics = manifest["statistics"]
    mean_norm = x.double().norm(dim=-1).mean(dim=0)
    assert statistics["tokens"] == NUM_TOKENS
    assert torch.allclose(torch.tensor(statistics["mean_norm"], dtype=torch.float64), mean_norm, rtol=1e-12, atol=0)
    assert torch.allclose(
        torch.tensor(statistics["input_scale"], dtype=torch.float64), math.sqrt(PLANTED.d_model) / mean_norm, rtol=1e-12
    )
    assert torch.allclose(torch.tensor(statistics["input_scale"]).float(), estimate_input_scale(x), rtol=1e-5)
    assert torch.allclose(
        torch.tensor(statistics["mean"], dtype=torch.float64), x.double().mean(dim=0), rtol=1e-10, atol=1e-14
    )
    for index, shard in enumerate(manifest["shards"]):
        part = x[100 * index : 100 * index + shard["tokens"]].double()
        assert torch.allclose(
            torch.tensor(shard["norm_sum"], dtype=torch.float64), part.norm(dim=-1).sum(dim=0), rtol=1e-12
        )
        for key in ("activations", "token_ids"):
            assert hashlib.sha256((built / shard[key]).read_bytes()).hexdigest() == shard[f"{key}_sha256"]
    cache = ActivationCache(built, batch_size=10)
    assert cache.input_scale.dtype == torch.float32 and torch.allclose(cache.mean_norm, mean_norm, rtol=1e-12)
    assert cache.mean.shape == (2, PLANTED.d_model)
    assert (cache.n_sources, cache.d_model, cache.num_tokens, cache.num_shards) == (2, PLANTED.d_model, 950, 10)
    assert cache.description == PlantedChunks().description()


def test_non_finite_tokens_are_dropped_and_counted(tmp_path):
    folder = build(tmp_path / "cache", PlantedChunks(nan_rows=True), num_tokens=300)
    manifest = read_manifest(folder)
    cache = ActivationCache(folder, batch_size=300, shuffle=False)
    x, ids = next(cache.batches_with_tokens())
    assert torch.isfinite(x).all()
    assert not (ids % 1000 % 7 == 0).any()  # rows 0, 7, 14, … of every chunk held a NaN
    # kept tokens per chunk: 25, 60, 38, 68, 21, 34 (246 after chunks 0–5), then 111 of chunk 6's 130, so the last
    # shard ends 54 kept tokens into chunk 6; the dropped count covers the chunks before that position
    assert manifest["position"] == {"source": {"chunk": 6}, "skip_tokens": 54}
    assert manifest["dropped_nonfinite_tokens"] == sum(len(range(0, CHUNK_SIZES[i], 7)) for i in range(6)) == 44


# ---------------------------------------------------------------------------- shuffled, resumable reading
def shard_of(ids: torch.Tensor) -> torch.Tensor:
    """Shard index of each token id of the module cache (ids are 1000·chunk + row; shards hold 100 tokens)."""
    _, expected_ids = reference(NUM_TOKENS)
    rank = {int(token): position for position, token in enumerate(expected_ids)}
    return torch.tensor([rank[int(token)] // SHARD_TOKENS for token in ids])


def test_each_epoch_visits_the_shards_in_a_new_order(built):
    cache = ActivationCache(built, batch_size=50, seed=3)
    epochs = [read_epoch(cache)[1] for _ in range(4)]
    _, expected_ids = reference(NUM_TOKENS)
    for ids in epochs:
        assert sorted(ids.tolist()) == sorted(expected_ids.tolist())  # 950 = 19 · 50: a permutation of all
    shard_orders = [tuple(dict.fromkeys(shard_of(ids).tolist())) for ids in epochs]
    assert len(set(shard_orders)) == 4
    assert all(order != tuple(range(10)) for order in shard_orders)


def test_each_epoch_reads_the_tokens_of_a_shard_in_a_new_order(built):
    cache = ActivationCache(built, batch_size=1, seed=3)  # batch size 1: the raw reading order
    _, expected_ids = reference(NUM_TOKENS)
    orders = []
    for _ in range(3):
        ids = read_epoch(cache)[1]
        orders.append(ids[shard_of(ids) == 0].tolist())
    assert all(sorted(order) == expected_ids[:100].tolist() for order in orders)
    assert all(order != expected_ids[:100].tolist() for order in orders)
    assert len({tuple(order) for order in orders}) == 3


def test_a_batch_mixes_tokens_from_all_over_a_shard(built):
    _, ids = next(ActivationCache(built, batch_size=20, seed=3).batches_with_tokens())
    _, expected_ids = reference(NUM_TOKENS)
    rows = [expected_ids.tolist().index(token) for token in ids.tolist()]
    assert max(rows) - min(rows) + 1 > 2 * len(rows)  # not a contiguous stretch of the stream


def test_reading_order_is_deterministic_per_seed(built):
    def first_batches(seed: int) -> list[list[int]]:
        iterator = ActivationCache(built, batch_size=64, seed=seed).batches_with_tokens()
        return [next(iterator)[1].tolist() for _ in range(30)]

    assert first_batches(7) == first_batches(7)
    assert first_batches(7) != first_batches(8)


def test_unshuffled_reading_follows_storage_order_and_epochs_end_the_iteration(built):
    cache = ActivationCache(built, batch_size=100, shuffle=False, epochs=2)
    batches = list(cache.batches_with_tokens())
    _, expected_ids = reference(NUM_TOKENS)
    assert len(batches) == 2 * 9  # 950 // 100 per epoch; the last 50 tokens of each epoch are dropped
    assert torch.cat([ids for _, ids in batches[:9]]).equal(expected_ids[:900])
    assert cache.state_dict() == {"epoch": 2, "position": 0, "num_tokens": NUM_TOKENS}


def test_the_remainder_dropped_differs_between_epochs(built):
    cache = ActivationCache(built, batch_size=300, seed=1)  # 3 batches per epoch, 50 tokens dropped
    _, expected_ids = reference(NUM_TOKENS)
    dropped = [set(expected_ids.tolist()) - set(read_epoch(cache)[1].tolist()) for _ in range(2)]
    assert len(dropped[0]) == len(dropped[1]) == 50 and dropped[0] != dropped[1]


@pytest.mark.parametrize("stop_after", [3, 18, 19, 25])  # mid-epoch, last batch of epoch 0, into epoch 1
def test_reading_resumes_exactly_from_state_dict(built, stop_after):
    straight = ActivationCache(built, batch_size=50, seed=2).batches_with_tokens()
    expected = [next(straight) for _ in range(stop_after + 12)]

    first = ActivationCache(built, batch_size=50, seed=2)
    iterator = iter(first)
    for _ in range(stop_after):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))

    resumed = ActivationCache(built, batch_size=50, seed=2)
    resumed.load_state_dict(state)
    for (x, ids), (x_resumed, ids_resumed) in zip(expected[stop_after:], resumed.batches_with_tokens(), strict=False):
        assert x.equal(x_resumed) and ids.equal(ids_resumed)


def test_data_parallel_ranks_split_each_global_batch_of_one_process(built):
    single = ActivationCache(built, batch_size=120, seed=5).batches_with_tokens()
    ranks = [ActivationCache(built, batch_size=40, seed=5, rank=rank, world_size=3) for rank in range(3)]
    iterators = [rank.batches_with_tokens() for rank in ranks]
    for _ in range(10):  # 950 // 120 = 7 global batches per epoch: crosses into epoch 1
        _, expected = next(single)
        parts = [next(iterator)[1] for iterator in iterators]
        assert sorted(torch.cat(parts).tolist()) == sorted(expected.tolist())
        assert len({tuple(part.tolist()) for part in parts}) == 3
    assert ranks[0].state_dict() == ranks[2].state_dict() == {"epoch": 1, "position": 360, "num_tokens": 950}


def test_a_reading_position_of_another_cache_is_refused(built, tmp_path):
    other = build(tmp_path / "small", num_tokens=500)
    with pytest.raises(CacheError, match="saved for a cache of 950 tokens"):
        ActivationCache(other, batch_size=50).load_state_dict(ActivationCache(built, batch_size=50).state_dict())


def test_the_cache_is_a_resumable_batch_source(built):
    assert isinstance(ActivationCache(built, batch_size=10), ResumableBatches)


def test_a_batch_larger_than_the_cache_is_refused(built):
    with pytest.raises(CacheError, match=r"batch_size=951 × world_size=1 does not fit a cache of 950 tokens"):
        ActivationCache(built, batch_size=951)


# ---------------------------------------------------------------------------- resumable building
@pytest.mark.parametrize(
    "fail_after",
    [
        0,  # before the first chunk: only the manifest exists
        1,  # inside the first shard: nothing finished
        2,  # chunk 1 ends exactly where shard 0 ends
        7,  # the 130-token chunk 6 finished shards 2 and 3 inside it
        13,  # mid-shard, a few shards in
    ],
)
def test_interrupted_build_continued_with_a_fresh_source_is_byte_identical(tmp_path, built, fail_after):
    folder = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        build(folder, PlantedChunks(fail_after=fail_after))
    if fail_after == 0:
        assert list(folder.iterdir()) == []  # the manifest is written with the first chunk
        (folder / ".manifest.json.tmp").write_text("{")  # as if killed while writing it
        position = None
    else:
        partial = read_manifest(folder)
        assert not partial["complete"] and partial["num_tokens"] < NUM_TOKENS
        position = partial["position"]["source"]

    source = PlantedChunks()
    build(folder, source)
    assert source.loaded == position  # finished shards were not recomputed
    assert folder_bytes(folder) == folder_bytes(built)


def test_a_build_interrupted_twice_still_matches(tmp_path, built):
    folder = tmp_path / "twice"
    for fail_after in (4, 6):
        with pytest.raises(Interrupted):
            build(folder, PlantedChunks(fail_after=fail_after))
    build(folder, PlantedChunks())
    assert folder_bytes(folder) == folder_bytes(built)


def test_leftovers_of_a_crash_between_shard_and_manifest_are_replaced(tmp_path, built):
    folder = tmp_path / "crashed"
    with pytest.raises(Interrupted):
        build(folder, PlantedChunks(fail_after=5))
    (folder / "shard_000002.activations.bin").write_bytes(b"half-written")  # renamed, manifest not yet updated
    (folder / ".shard_000003.token_ids.bin.tmp").write_bytes(b"temporary")
    build(folder, PlantedChunks())
    assert folder_bytes(folder) == folder_bytes(built)


def test_building_a_finished_cache_again_reads_nothing_and_changes_nothing(built):
    before = folder_bytes(built)
    source = PlantedChunks()
    build(built, source)
    assert source.yielded == 0 and folder_bytes(built) == before


def test_a_cache_of_full_shards_extends_to_the_same_bytes_as_building_larger_directly(tmp_path):
    grown, direct = tmp_path / "grown", tmp_path / "direct"
    build(grown, num_tokens=500)
    build(grown, num_tokens=NUM_TOKENS)
    build(direct, num_tokens=NUM_TOKENS)
    assert folder_bytes(grown) == folder_bytes(direct)


def test_a_cache_with_a_partial_last_shard_is_not_extended(built):
    with pytest.raises(CacheError, match="last shard is partial"):
        build(built, num_tokens=2000)


def test_a_source_that_runs_out_ends_the_cache_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="ran out after 500 of the 950"):
        folder = build(tmp_path / "short", PlantedChunks(n_chunks=9))
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["source_exhausted"] and manifest["num_tokens"] == 500
    assert [shard["tokens"] for shard in manifest["shards"]] == [100] * 5


# ---------------------------------------------------------------------------- refusing to mix
@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        (PlantedChunks(seed=1), {}, r"seed: 0 in the cache, 1 in the source"),
        (PlantedChunks(dtype=torch.bfloat16), {}, r"dtype: 'torch.float32' in the cache, 'torch.bfloat16'"),
        (PlantedChunks(), {"dtype": torch.bfloat16}, r"stores float32, not bfloat16"),
        (PlantedChunks(), {"shard_tokens": 64}, r"shard_tokens=100, not 64"),
    ],
    ids=["other-seed", "other-source-dtype", "other-stored-dtype", "other-shard-size"],
)
def test_a_build_with_another_source_or_layout_is_refused_without_touching_files(tmp_path, source, options, message):
    folder = tmp_path / "cache"
    with pytest.raises(Interrupted):
        build(folder, PlantedChunks(fail_after=8))
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()}
    with pytest.raises(CacheError, match=message) as refused:
        build(folder, source, **options)
    assert "nothing was written" in str(refused.value)
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()} == before
    assert source.yielded == 0


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not an activation cache"):
        build(foreign)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(CacheError, match=r"has no manifest\.json"):
        ActivationCache(foreign, batch_size=10)
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CacheError, match="is not the manifest of a crosscoder activation cache"):
        ActivationCache(foreign, batch_size=10)
    with pytest.raises(CacheError, match="does not exist"):
        ActivationCache(tmp_path / "missing", batch_size=10)


def test_an_unfinished_cache_is_readable_only_when_allowed(tmp_path):
    folder = tmp_path / "partial"
    with pytest.raises(Interrupted):
        build(folder, PlantedChunks(fail_after=9))  # 500 tokens: shards 0–4 finished
    with pytest.raises(CacheError, match="incomplete \\(500 of 950 tokens\\)"):
        ActivationCache(folder, batch_size=50)
    cache = ActivationCache(folder, batch_size=50, allow_incomplete=True)
    assert cache.num_tokens == 500 and cache.batches_per_epoch == 10


# ---------------------------------------------------------------------------- integrity
@pytest.fixture
def copy_of(built, tmp_path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, data in folder_bytes(built).items():
        (folder / name).write_bytes(data)
    return folder


def test_a_truncated_shard_is_named_when_the_cache_is_opened(copy_of):
    path = copy_of / "shard_000004.activations.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CacheIntegrityError, match=r"shard_000004\.activations\.bin has 6,396 bytes, expected 6,400"):
        ActivationCache(copy_of, batch_size=10, verify="size")


def test_a_missing_shard_is_named_when_the_cache_is_opened(copy_of):
    (copy_of / "shard_000007.token_ids.bin").unlink()
    with pytest.raises(CacheIntegrityError, match=r"shard_000007\.token_ids\.bin is missing"):
        ActivationCache(copy_of, batch_size=10)


def test_a_flipped_byte_is_named_on_first_read_at_open_or_by_verify(copy_of):
    path = copy_of / "shard_000006.activations.bin"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))
    named = r"shard_000006\.activations\.bin fails its sha256 checksum"

    with pytest.raises(CacheIntegrityError, match=named):
        ActivationCache(copy_of, batch_size=10, verify="open")
    lazy = ActivationCache(copy_of, batch_size=950, shuffle=False)  # opening checks sizes only
    with pytest.raises(CacheIntegrityError, match=named):
        next(iter(lazy))  # the first read of shard 6 checks its sha256
    with pytest.raises(CacheIntegrityError, match=named):
        ActivationCache(copy_of, batch_size=10, verify="size").verify()
    unchecked = ActivationCache(copy_of, batch_size=950, shuffle=False, verify="size")
    assert next(iter(unchecked)).shape == (950, 2, PLANTED.d_model)  # "size" trusts the contents


def test_a_damaged_cache_is_not_continued(copy_of):
    manifest = read_manifest(copy_of)
    manifest["complete"] = False
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    (copy_of / "shard_000001.token_ids.bin").write_bytes(b"")
    with pytest.raises(CacheIntegrityError, match=r"shard_000001\.token_ids\.bin has 0 bytes"):
        build(copy_of)


# ---------------------------------------------------------------------------- training
class StopAfter:
    """A cache that raises after yielding ``batches`` batches (a run killed part way), still resumable."""

    def __init__(self, cache: ActivationCache, batches: int) -> None:
        self.cache, self.batches = cache, batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for count, batch in enumerate(self.cache, start=1):
            yield batch
            if count == self.batches:
                raise Interrupted("killed")

    def state_dict(self) -> dict[str, Any]:
        return self.cache.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache.load_state_dict(state)


def test_training_on_a_cache_runs_and_resumes_bitwise(built, tmp_path):
    config = crosscoder.TrainConfig(
        architectures=("batchtopk", "diff_sae"),
        k=2,
        dict_size=32,
        batch_size=50,
        num_tokens=50 * 30,  # 30 steps: more than one epoch (19 batches) of the cache
        lr=3e-3,
        warmup_steps=5,
        threshold_start_step=5,
        dead_tokens=500,
        normalization_tokens=200,
        checkpoint_every=10,
        log_every=5,
        output_dir=tmp_path,
        run_name="straight",
        progress=False,
    )
    crosscoder.train(config, ActivationCache(built, batch_size=50, seed=4))

    interrupted = dataclasses.replace(config, run_name="interrupted")
    with pytest.raises(Interrupted):
        crosscoder.train(interrupted, StopAfter(ActivationCache(built, batch_size=50, seed=4), 24))
    crosscoder.train(dataclasses.replace(interrupted, resume=True), ActivationCache(built, batch_size=50, seed=4))

    for name in ("batchtopk_crosscoder", "diff_sae"):
        straight = load_file(tmp_path / "straight" / name / "model.safetensors")
        resumed = load_file(tmp_path / "interrupted" / name / "model.safetensors")
        for key in straight:
            assert straight[key].equal(resumed[key]), f"{name}.{key} differs after resuming from the cache"


# ---------------------------------------------------------------------------- command line
def test_cli_builds_a_cache_from_the_configured_stream(tmp_path, monkeypatch, capsys):
    made = []

    def fake_stream(config: crosscoder.TrainConfig) -> PlantedChunks:
        made.append(config)
        return PlantedChunks()

    monkeypatch.setattr(cache_cli, "_paired_stream", fake_stream)
    folder = tmp_path / "cli"
    argv = ["build", "--out", str(folder), "--num-tokens", "950", "--batch-size", "50", "--shard-tokens", "100"]
    status = cache_cli.main([*argv, "--dtype", "bfloat16", "--no-progress"])
    assert status == 0
    assert not made[0].progress
    manifest = read_manifest(folder)
    assert (manifest["num_tokens"], manifest["dtype"], len(manifest["shards"])) == (950, "bfloat16", 10)
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 950


def test_cli_info_and_verify(built, copy_of, capsys):
    assert cache_cli.main(["info", str(built)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_tokens"], info["shards"], info["complete"]) == (950, 10, True)
    assert cache_cli.main(["verify", str(built)]) == 0
    assert "all 10 shards match" in capsys.readouterr().out

    (copy_of / "shard_000000.token_ids.bin").write_bytes(b"\0" * 400)
    assert cache_cli.main(["verify", str(copy_of)]) == 2
    assert "shard_000000.token_ids.bin fails its sha256 checksum" in capsys.readouterr().err


def test_cli_without_a_folder_says_what_is_missing(tmp_path, capsys):
    assert cache_cli.main(["build", "--num-tokens", "950", "--batch-size", "50"]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert cache_cli.main(["info", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_build_help_lists_the_stream_flags_and_no_training_flag(capsys):
    assert cache_cli.main(["build", "--help"]) == 0
    flags = {line.split()[0].rstrip(",") for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    stream = {"--" + name.replace("_", "-") for name in cache_cli.STREAM_FIELDS}
    assert flags == stream | {"--out", "--num-tokens", "--shard-tokens", "--dtype", "--preset"}
    assert "--lr" not in flags and "--k" not in flags and "--architectures" not in flags


def test_the_stream_fields_are_every_setting_the_stream_reads():
    """What ``PairedActivationStream.from_config`` and the organism's resolution read of the config (found in their
    source) is exactly what ``build`` takes besides the cache's size: no stream setting is refused or left out."""
    import inspect

    from crosscoder.activations import PairedActivationStream
    from crosscoder.organism_source import resolve_model_organism

    read = set()
    for function in (PairedActivationStream.from_config, resolve_model_organism):
        source = inspect.getsource(function)
        read |= set(re.findall(r"\bconfig\.([a-z_]+)\b", source))
    fields = {field.name for field in dataclasses.fields(crosscoder.TrainConfig)}
    assert (read & fields) - {"num_tokens"} == set(cache_cli.STREAM_FIELDS)


def test_a_training_flag_given_to_build_is_refused_before_anything_is_written(tmp_path, capsys):
    folder = tmp_path / "cache"
    for flag in (["--lr", "1e-3"], ["--k=32"], ["--no-resume"]):
        assert cache_cli.main(["build", "--out", str(folder), *flag]) == 2
        error = capsys.readouterr().err
        assert f"{flag[0].split('=')[0]} is a training setting" in error and "train.py --cache DIR" in error
    assert not folder.exists()
