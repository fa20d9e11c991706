"""The on-disk cache filled from a real paired stream: collect once, train many times."""

import dataclasses
import filecmp
import os
import subprocess
import sys

import pytest
from tiny_models import build_tokenizer, local_pair_config

import crosscoder
from crosscoder.activations import PairedActivationStream
from crosscoder.cache import ActivationCache, CacheError, read_manifest


class StopAfter:
    """A paired stream whose chunk iteration dies after ``n`` chunks (an interrupted collection)."""

    def __init__(self, stream: PairedActivationStream, n: int) -> None:
        self.stream, self.n = stream, n

    def chunks(self):
        for index, chunk in enumerate(self.stream.chunks()):
            if index == self.n:
                raise KeyboardInterrupt
            yield chunk

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return local_pair_config(
        tmp_path_factory.mktemp("models"),
        build_tokenizer(),
        documents=100,
        layers=(1,),
        context_length=24,
        block_sequences=8,
        model_batch_size=4,
        batch_size=32,
        num_tokens=1000,
        normalization_tokens=128,
        warmup_steps=2,
    )


def test_an_interrupted_collection_continues_to_the_same_cache(config, tmp_path):
    ActivationCache.build(
        tmp_path / "straight", PairedActivationStream.from_config(config), 1000, shard_tokens=300, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        ActivationCache.build(
            tmp_path / "resumed",
            StopAfter(PairedActivationStream.from_config(config), 3),
            1000,
            shard_tokens=300,
            progress=False,
        )
    ActivationCache.build(
        tmp_path / "resumed", PairedActivationStream.from_config(config), 1000, shard_tokens=300, progress=False
    )
    straight = sorted(path.name for path in (tmp_path / "straight").iterdir())
    assert straight == sorted(path.name for path in (tmp_path / "resumed").iterdir())
    for name in straight:
        assert filecmp.cmp(tmp_path / "straight" / name, tmp_path / "resumed" / name, shallow=False), name

    cache = ActivationCache(tmp_path / "straight", batch_size=32)
    assert (cache.n_sources, cache.d_model, cache.num_tokens) == (2, 32, 1000)
    assert cache.description["layers"] == [1] and cache.description["chat_model"] == config.chat_model


def test_a_cache_of_another_layer_is_not_mixed_in(config, tmp_path):
    ActivationCache.build(
        tmp_path / "cache", PairedActivationStream.from_config(config), 300, shard_tokens=300, progress=False
    )
    before = {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()}
    other_layer = PairedActivationStream.from_config(dataclasses.replace(config, layers=(2,)))
    with pytest.raises(CacheError, match="layers"):
        ActivationCache.build(tmp_path / "cache", other_layer, 600, shard_tokens=300, progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()} == before


def test_training_reads_the_cache_named_in_the_config(config, tmp_path):
    ActivationCache.build(
        tmp_path / "cache", PairedActivationStream.from_config(config), 1000, shard_tokens=300, progress=False
    )
    cached = dataclasses.replace(
        config,
        base_model=None,
        chat_model=None,
        cache=tmp_path / "cache",
        num_tokens=32 * 40,
        output_dir=tmp_path,
        run_name="from-cache",
        architectures=("batchtopk", "diff_sae"),
    )
    dictionaries = crosscoder.train(cached)
    assert dictionaries["diff_sae"].metadata["training_steps"] == 40


@pytest.mark.slow
def test_cache_build_reads_the_model_organism(default_organism, organism_cache, tmp_path):
    """``--preset demo`` (``--model-organism`` at its context length) fills in the organism's models and data."""
    environment = {**os.environ, "CROSSCODER_CACHE": str(organism_cache)}
    command = [sys.executable, "-m", "crosscoder.cache", "build", "--out", str(tmp_path / "acts")]
    command += ["--preset", "demo", "--num-tokens", "2048", "--no-progress"]  # the demo reads the organism
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "acts")
    assert manifest["complete"] and manifest["num_tokens"] >= 2048
    assert manifest["description"]["base_model"] == str(default_organism.base_path)
