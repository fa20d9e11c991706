"""Bad input is refused before any compute with one message naming the value, file or line and the fix."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tokenizer, corpus, finetuned_copy, llama, save_pair, write_jsonl

from crosscoder.activations import PairedActivationStream, StreamSettings
from crosscoder.cache import ActivationCache, read_manifest
from crosscoder.chunks import ActivationChunk
from crosscoder.config import TrainConfig
from crosscoder.data import TensorActivations
from crosscoder.dictionary import BatchTopKCrossCoder
from crosscoder.documents import open_dataset
from crosscoder.errors import ConfigError, DataError, DictionaryFormatError, InputNotFoundError
from crosscoder.hub import load_dictionary
from crosscoder.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
SOF_FIXTURES = ROOT / "tests" / "fixtures" / "sof"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command line of this repository (``train.py …`` or ``-m crosscoder.… …``) in a fresh process."""
    command = [sys.executable, str(ROOT / args[0]), *args[1:]] if args[0] == "train.py" else [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_message(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status 2 and one message holding every expected text (as printed: an ``error: …`` line, or the box
    tyro draws around a refused flag), no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.replace("│", " ").split())
    for text in expected:
        assert text in message, result.stderr


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny Llama pair saved as model folders (4 layers, 256 positions)."""
    base = llama(len(tokenizer))
    return save_pair(tmp_path_factory.mktemp("pair"), base, finetuned_copy(base), tokenizer)


@pytest.fixture(scope="module")
def models(tokenizer):
    base = llama(len(tokenizer))
    return base, finetuned_copy(base)


def text_file(path: Path, n: int = 30) -> Path:
    return write_jsonl(path, [{"text": text} for text in corpus()[:n]])


# ---------------------------------------------------------------------------- 7: every numeric field has a range
BAD_VALUES: list[tuple[str, object, dict[str, object], str]] = [
    ("expansion_factor", 0, {}, "--expansion-factor must be > 0, got 0"),
    ("dict_size", 0, {"k": 1}, "--dict-size must be > 0, got 0"),
    ("k", 0, {}, "--k must be > 0, got 0"),
    ("k_max", 3, {"k": 4, "k_anneal_steps": 10}, "--k-max (3) must be at least --k (4)"),
    ("k_max", 65, {"k": 4, "dict_size": 64, "k_anneal_steps": 10}, "--k-max (65) must be at most --dict-size (64)"),
    ("k_max", 8, {"k": 4}, "--k-max (8) anneals over --k-anneal-steps, which must then be > 0, got 0"),
    ("k_anneal_steps", -1, {}, "--k-anneal-steps must be ≥ 0, got -1"),
    ("init_decoder_norm", 0.0, {}, "--init-decoder-norm must be finite and > 0, got 0.0"),
    ("context_length", 1, {}, "--context-length must be ≥ 2, got 1"),
    ("block_sequences", 0, {}, "--block-sequences must be > 0, got 0"),
    ("model_batch_size", 0, {}, "--model-batch-size must be > 0, got 0"),
    ("drop_first_tokens", -1, {}, "--drop-first-tokens must be ≥ 0, got -1"),
    ("outlier_norm_factor", -1.0, {}, "--outlier-norm-factor must be finite and ≥ 0, got -1.0"),
    ("prefetch_blocks", -1, {}, "--prefetch-blocks must be ≥ 0, got -1"),
    ("batch_size", 0, {}, "--batch-size must be > 0, got 0"),
    ("num_tokens", 0, {}, "--num-tokens must be > 0, got 0"),
    ("normalization_tokens", 0, {}, "--normalization-tokens must be > 0, got 0"),
    ("lr", math.inf, {}, "--lr must be finite and > 0, got inf"),
    ("lr", 0.0, {}, "--lr must be finite and > 0, got 0.0"),
    ("warmup_steps", -1, {}, "--warmup-steps must be ≥ 0, got -1"),
    ("decay_fraction", 1.5, {}, "--decay-fraction must be finite and in [0, 1], got 1.5"),
    ("grad_clip", -1.0, {}, "--grad-clip must be finite and > 0, got -1.0"),
    ("grad_clip", 0.0, {}, "--grad-clip must be finite and > 0, got 0.0"),
    ("grad_clip", math.nan, {}, "--grad-clip must be finite and > 0, got nan"),
    ("l1_coefficient", -0.1, {}, "--l1-coefficient must be finite and ≥ 0, got -0.1"),
    ("l1_warmup_steps", -1, {}, "--l1-warmup-steps must be ≥ 0, got -1"),
    ("aux_k", -1, {}, "--aux-k must be ≥ 0, got -1"),
    ("aux_coefficient", math.inf, {}, "--aux-coefficient must be finite and ≥ 0, got inf"),
    ("dead_tokens", 0, {}, "--dead-tokens must be > 0, got 0"),
    ("threshold_start_step", -1, {}, "--threshold-start-step must be ≥ 0, got -1"),
    ("threshold_beta", 1.0, {}, "--threshold-beta must be finite and in (0, 1), got 1.0"),
    ("seed", -1, {}, "--seed must be ≥ 0, got -1"),
    ("checkpoint_every", -1, {}, "--checkpoint-every must be ≥ 0, got -1"),
    ("keep_checkpoints", 0, {}, "--keep-checkpoints must be ≥ 1, got 0"),
    ("log_every", 0, {}, "--log-every must be > 0, got 0"),
    ("validate_every", -1, {}, "--validate-every must be ≥ 0, got -1"),
    ("validation_tokens", -1, {}, "--validation-tokens must be ≥ 0, got -1"),
]


@pytest.mark.parametrize(("field", "value", "others", "message"), BAD_VALUES)
def test_an_out_of_range_number_is_refused_naming_the_flag_value_and_range(field, value, others, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**{field: value, **others})


def test_every_numeric_field_has_a_range_rule():
    def numeric(hint: object) -> bool:
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return all(numeric(arg) for arg in typing.get_args(hint) if arg is not type(None))
        return hint in (int, float)

    hints = typing.get_type_hints(TrainConfig)
    fields = {field.name for field in dataclasses.fields(TrainConfig) if numeric(hints[field.name])}
    assert fields == {field for field, *_ in BAD_VALUES}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"datasets": ("a.jsonl", "b.jsonl"), "dataset_weights": (0.0, 0.0)}, "not all 0, got [0.0, 0.0]"),
        ({"datasets": ("a.jsonl", "b.jsonl"), "dataset_weights": (1.0, -1.0)}, "got [1.0, -1.0]"),
        ({"datasets": ("a.jsonl",), "dataset_weights": (math.inf,)}, "--dataset-weights must be finite and ≥ 0"),
        ({"layers": (2, -1)}, "--layers must be ≥ 0, got [-1]"),
        ({"drop_token_ids": (-5,)}, "--drop-token-ids must be ≥ 0, got [-5]"),
    ],
)
def test_out_of_range_lists_are_refused(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**values)


def test_a_threshold_average_longer_than_the_run_is_named_with_the_beta_that_fits():
    short = TrainConfig(num_tokens=1024 * 1500, batch_size=1024, threshold_start_step=300, threshold_beta=0.999)
    assert short.threshold_window_problem() == (
        "threshold_beta=0.999 averages θ over ~1000 steps but only 1200 steps follow threshold_start_step=300: θ will "
        "keep 30% of its first estimate and lag the final weights; set threshold_beta ≤ 0.9975 or train longer"
    )
    assert dataclasses.replace(short, threshold_beta=0.9975).threshold_window_problem() is None
    assert dataclasses.replace(short, architectures=("l1",)).threshold_window_problem() is None  # no threshold
    never = dataclasses.replace(short, threshold_start_step=1500)
    assert never.threshold_window_problem() == (
        "the run ends at step 1500, before threshold_start_step=1500: θ is never estimated, so the saved dictionary "
        "keeps every positive activation at inference (no sparsity); set threshold_start_step below 1500 or train "
        "longer"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [(("--grad-clip", "-1"), "--grad-clip must be finite and > 0, got -1.0"), (("--lr", "inf"), "got inf")],
)
def test_train_py_refuses_gradient_ascent_and_an_infinite_learning_rate(tmp_path, flags, message):
    result = run("train.py", "--preset", "synthetic", *flags, cwd=tmp_path)
    assert_one_message(result, message)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 10: models that cannot give the context
def test_a_context_longer_than_the_models_positions_is_refused(models, tokenizer):
    base, chat = models
    with pytest.raises(ConfigError, match=r"context_length=512 is longer than the base model's max_position_embe"):
        PairedActivationStream(
            base, chat, tokenizer, [[]], StreamSettings(layers=(1,), context_length=512), batch_size=8
        )


def test_a_model_folder_declaring_more_layers_than_its_weights_hold_is_refused(tmp_path, pair_folders):
    base, chat = pair_folders
    shutil.copytree(chat, tmp_path / "chat")
    config = json.loads((chat / "config.json").read_text())
    (tmp_path / "chat" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(
        DataError, match=r"18 weights its config.json declares are not in its checkpoint.*model\.layers\.4"
    ):
        PairedActivationStream.from_models(
            base_model=str(base),
            chat_model=str(tmp_path / "chat"),
            datasets=[str(text_file(tmp_path / "text.jsonl"))],
            settings=StreamSettings(layers=(1,), context_length=32),
            batch_size=8,
        )


# ---------------------------------------------------------------------------- 11: activation files and weights
def test_re_reading_a_short_activation_file_warns_with_the_pass(tmp_path):
    path = tmp_path / "short.safetensors"
    save_file({"activations": torch.randn(100, 2, 8)}, path)
    source = TensorActivations.from_file(path, batch_size=32)
    batches = iter(source)
    for _ in range(3):  # one pass: 3 batches of 32
        next(batches)
    with pytest.warns(UserWarning, match=r"short\.safetensors holds 100 tokens, 3 batches of 32: pass 2 over them"):
        next(batches)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_integer_activation_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"ids{suffix}"
    ids = torch.randint(0, 100, (64, 2, 8))
    if suffix == ".safetensors":
        save_file({"activations": ids}, path)
    else:
        torch.save(ids, path)
    with pytest.raises(DataError, match=rf"ids{re.escape(suffix)} holds torch.int64 activations"):
        TensorActivations.from_file(path, batch_size=8)


def test_a_dictionary_with_nan_weights_is_refused_naming_the_file(tmp_path):
    dictionary = BatchTopKCrossCoder(8, 32, 4)
    with torch.no_grad():
        dictionary.W_dec[3, 0, 0] = math.nan
        dictionary.b_enc[0] = math.inf
    dictionary.save_pretrained(tmp_path / "diverged")
    with pytest.raises(DictionaryFormatError, match=r"diverged/model\.safetensors: b_enc, W_dec hold NaN or Inf"):
        load_dictionary(tmp_path / "diverged")


def test_a_dictionary_learning_checkpoint_with_inf_weights_is_refused(tmp_path):
    state = torch.load(SOF_FIXTURES / "l1_crosscoder" / "checkpoint.pt", weights_only=True)
    state["decoder.weight"][0, 0, 0] = math.inf
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(DictionaryFormatError, match=r"checkpoint\.pt: W_dec hold NaN or Inf"):
        load_dictionary(tmp_path / "checkpoint.pt")


# ---------------------------------------------------------------------------- 14: one message, no traceback
def test_a_model_folder_with_a_corrupt_config_json_is_one_message(tmp_path, pair_folders):
    base, chat = pair_folders
    shutil.copytree(chat, tmp_path / "chat")
    (tmp_path / "chat" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    data = text_file(tmp_path / "text.jsonl")
    result = run(
        "train.py", "--base-model", str(base), "--chat-model", str(tmp_path / "chat"), "--datasets", str(data),
        "--context-length", "32", cwd=tmp_path,
    )  # fmt: skip
    assert_one_message(result, f"model folder {tmp_path / 'chat'} cannot be loaded", "config.json")


def test_a_model_folder_without_weights_is_refused(tmp_path, pair_folders):
    base, chat = pair_folders
    shutil.copytree(chat, tmp_path / "chat")
    (tmp_path / "chat" / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"model folder .*chat cannot be loaded: .*no file named model\.safetensors"):
        PairedActivationStream.from_models(
            base_model=str(base),
            chat_model=str(tmp_path / "chat"),
            datasets=[str(text_file(tmp_path / "text.jsonl"))],
            settings=StreamSettings(layers=(1,), context_length=32),
            batch_size=8,
        )


@pytest.mark.parametrize("streaming", [True, False])
def test_an_empty_jsonl_dataset_is_named(tmp_path, streaming):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"dataset .*empty\.jsonl is empty"):
        open_dataset(str(tmp_path / "empty.jsonl"), "train", streaming, seed=0)


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_an_evaluation_out_that_is_a_file_is_refused_before_loading_anything(tmp_path, where):
    (tmp_path / "taken").write_text("notes")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "report"
    result = run("-m", "crosscoder.eval", str(tmp_path / "no-dictionary"), "--out", str(out), cwd=tmp_path)
    assert_one_message(result, f"--out {out}")


@pytest.mark.parametrize("models", ["recorded", "--no-models"])
def test_evaluation_latents_out_of_range_are_refused_before_the_models(tmp_path, models):
    """The dictionary names no models: a check after the models (where the per-latent analyses run) would fail on
    them instead, and with --no-models not at all."""
    BatchTopKCrossCoder(8, 32, 4).save_pretrained(tmp_path / "saved")
    flags = ["--no-models"] if models == "--no-models" else []
    result = run("-m", "crosscoder.eval", "saved", "--latents", "3", "99999", *flags, cwd=tmp_path)
    assert_one_message(result, "--latents [99999] are out of range: the dictionary has 32 latents")


def test_evaluation_latents_with_no_models_are_named_as_unused(tmp_path):
    BatchTopKCrossCoder(8, 32, 4).save_pretrained(tmp_path / "saved")
    result = run("-m", "crosscoder.eval", "saved", "--latents", "3", "--no-models", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--latents [3] choose the latents of the KL effects and steering, which need the models" in result.stderr
    warning = next(line for line in result.stderr.splitlines() if "--latents [3]" in line)
    assert warning.startswith("warning: --latents [3]") and "UserWarning" not in result.stderr  # one line, as errors


def test_a_failed_evaluation_leaves_no_empty_out_folder_it_created(tmp_path):
    result = run("-m", "crosscoder.eval", "./missing", "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert_one_message(result, "./missing is not a local folder")
    assert not (tmp_path / "report").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is theirs, empty or not
    result = run("-m", "crosscoder.eval", "./missing", "--out", str(tmp_path / "mine"), cwd=tmp_path)
    assert result.returncode == 2 and (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("spec", ["general.jsonl", "data/general.parquet", "./texts", "/nowhere/texts"])
def test_a_missing_dataset_file_is_refused_before_the_models_load_without_asking_the_hub(tmp_path, spec, monkeypatch):
    """A name only a local file can have: one message at once, no Hub request (offline its retries take half a
    minute), and in the lens before any model loads (the models named here do not exist either)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(InputNotFoundError, match=f"dataset file {spec} does not exist"):
        open_dataset(spec, "train", streaming=True, seed=0)
    result = run(
        "-m", "crosscoder.eval.adl", "--base-model", "./no-base", "--chat-model", "./no-chat", "--datasets", spec,
        "--out", str(tmp_path / "lens"), cwd=tmp_path,
    )  # fmt: skip
    assert_one_message(result, f"dataset file {spec} does not exist")


def test_a_model_path_that_cannot_be_a_hub_id_is_named_as_a_missing_folder(tmp_path):
    for name in (str(tmp_path / "bse"), "./bse", "models/organism/bse"):
        with pytest.raises(InputNotFoundError, match="does not exist: pass a folder written by save_pretrained") as e:
            load_causal_lm(name, revision=None, dtype="float32", device="cpu", trust_remote_code=False)
        assert "hf download" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_an_unwritable_evaluation_out_is_refused(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    result = run("-m", "crosscoder.eval", "x", "--out", str(tmp_path / "locked" / "report"), cwd=tmp_path)
    assert_one_message(result, "cannot be created or written (Permission denied)")


def test_a_cache_out_that_is_a_file_is_refused_before_loading_models(tmp_path):
    (tmp_path / "taken").write_text("notes")
    result = run(
        "-m", "crosscoder.cache", "build", "--out", str(tmp_path / "taken"), "--base-model", "nobody/base",
        "--chat-model", "nobody/chat", "--datasets", "missing.jsonl", "--num-tokens", "100", cwd=tmp_path,
    )  # fmt: skip
    assert_one_message(result, f"--out {tmp_path / 'taken'} cannot hold the cache: {tmp_path / 'taken'} is a file")


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_a_training_output_dir_that_is_a_file_is_refused_before_training(tmp_path, where):
    (tmp_path / "taken").write_text("notes")
    output_dir = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "runs"
    result = run("train.py", "--preset", "synthetic", "--output-dir", str(output_dir), cwd=tmp_path)
    assert_one_message(result, f"--output-dir {output_dir} cannot hold the run folder synthetic")


def test_a_dictionary_learning_bias_of_the_wrong_shape_is_named(tmp_path):
    state = torch.load(SOF_FIXTURES / "batchtopk_crosscoder" / "checkpoint.pt", weights_only=True)
    state["encoder.bias"] = torch.zeros(1)  # broadcastable: copy_ would have filled every latent with it
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(DictionaryFormatError, match=re.escape("tensor 'encoder.bias' has shape [1], but the other")):
        load_dictionary(tmp_path / "checkpoint.pt")
    state["encoder.bias"], state["decoder.bias"] = torch.zeros(64), torch.zeros(2, 8)
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(
        DictionaryFormatError, match=re.escape("'decoder.bias' has shape [2, 8], but the other tensors need [2, 16]")
    ):
        load_dictionary(tmp_path / "checkpoint.pt")


# ---------------------------------------------------------------------------- 15: names, flags, the cache's own rules
def stream_over(path: Path, pair, tokenizer, streaming: bool) -> PairedActivationStream:
    base, chat = pair
    return PairedActivationStream(
        base,
        chat,
        tokenizer,
        [open_dataset(str(path), "train", streaming, seed=0)],
        StreamSettings(layers=(1,), context_length=16, block_sequences=64),
        batch_size=8,
        dataset_names=[str(path)],
        prefetch_blocks=0,
    )


@pytest.mark.parametrize("streaming", [True, False])
def test_a_null_text_row_is_named_by_file_and_line(tmp_path, models, tokenizer, streaming):
    path = tmp_path / "holes.jsonl"
    path.write_text('{"text": "one two three"}\n\n{"text": "four five"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"holes\.jsonl, line 4: the document has no text \('text' is null\)"):
        next(stream_over(path, models, tokenizer, streaming).chunks())


@pytest.mark.parametrize("streaming", [True, False])
def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path, models, tokenizer, streaming):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "plain"}\n{"text": "crème brûlée"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2, is not UTF-8 text \(byte 0xe8 at column 13\)"):
        next(stream_over(path, models, tokenizer, streaming).chunks())


def test_a_weights_file_given_to_load_dictionary_says_to_pass_its_folder(tmp_path):
    BatchTopKCrossCoder(8, 32, 4).save_pretrained(tmp_path / "saved")
    with pytest.raises(ConfigError, match=rf"pass the folder that holds it \({re.escape(str(tmp_path / 'saved'))}\)"):
        load_dictionary(tmp_path / "saved" / "model.safetensors")


def test_cache_build_of_fewer_tokens_than_a_training_batch(tmp_path, pair_folders):
    base, chat = pair_folders
    data = text_file(tmp_path / "text.jsonl", n=100)
    result = run(
        "-m", "crosscoder.cache", "build", "--out", str(tmp_path / "cache"), "--base-model", str(base),
        "--chat-model", str(chat), "--datasets", str(data), "--layers", "2", "--context-length", "32",
        "--block-sequences", "16", "--model-dtype", "float32", "--num-tokens", "1024", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "cache")["num_tokens"] == 1024


class _Interrupted(Exception):
    pass


class _InterruptedChunks:
    """A ChunkSource of random chunks that fails after ``n`` chunks, as an interrupted build does."""

    def __init__(self, n: int) -> None:
        self.n, self.chunk = n, 0

    def chunks(self):
        while True:
            if self.chunk == self.n:
                raise _Interrupted
            generator = torch.Generator().manual_seed(self.chunk)
            self.chunk += 1
            yield ActivationChunk(torch.randn(100, 2, 16, generator=generator), torch.arange(100))

    def state_dict(self):
        return {"chunk": self.chunk}

    def load_state_dict(self, state):
        self.chunk = state["chunk"]

    def description(self):
        return {"generator": "random"}


def test_training_on_an_unfinished_cache_has_a_flag(tmp_path):
    with pytest.raises(_Interrupted):
        ActivationCache.build(tmp_path / "partial", _InterruptedChunks(6), 1000, shard_tokens=100, progress=False)
    flags = ("train.py", "--cache", str(tmp_path / "partial"), "--k", "4", "--dict-size", "64", "--batch-size", "100")
    flags += ("--num-tokens", "1000", "--normalization-tokens", "200", "--no-progress")
    refused = run(*flags, cwd=tmp_path)
    assert_one_message(refused, "is incomplete (600 of 1,000 tokens)")
    trained = run(*flags, "--allow-incomplete-cache", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert load_file(tmp_path / "runs" / "run" / "batchtopk_crosscoder" / "model.safetensors")["W_dec"].shape[0] == 64
