"""Dictionaries saved by earlier releases stay usable: they load with the right input and evaluate with today's
``python -m crosscoder.eval``, whatever has happened to ``TrainConfig`` since.

``tests/fixtures/release_0_1/`` holds a BatchTopK crosscoder and a diff-SAE trained on the model organism by the
release whose ``TrainConfig`` still had ``shard_latents`` (dictionary format 1: the SAE's input as free text, the
whole training config as metadata); ``tests/fixtures/format_2/`` holds the same pair saved by the current format
(format 2: a typed ``input`` and a provenance record). Regenerate the latter only when the format version changes,
and keep the old folders.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crosscoder
from crosscoder.config import TrainConfig, config_differences
from crosscoder.dictionary_input import BASE_MINUS_CHAT, CHAT_MINUS_BASE, PAIRED
from crosscoder.errors import DictionaryFormatError
from crosscoder.eval.__main__ import main as evaluate_command
from crosscoder.provenance import Provenance

FIXTURES = Path(__file__).parent / "fixtures"
RELEASES = ["release_0_1", "format_2"]


@pytest.mark.parametrize("release", RELEASES)
def test_saved_dictionaries_load_with_their_input_and_provenance(release):
    crosscoder_ = crosscoder.load_dictionary(FIXTURES / release / "batchtopk_crosscoder")
    sae = crosscoder.load_dictionary(FIXTURES / release / "diff_sae")
    assert isinstance(crosscoder_, crosscoder.BatchTopKCrossCoder) and crosscoder_.input == PAIRED
    assert isinstance(sae, crosscoder.BatchTopKSAE) and sae.input == CHAT_MINUS_BASE
    for dictionary in (crosscoder_, sae):
        provenance = Provenance.from_metadata(dictionary.metadata)
        assert provenance is not None and provenance.data_source == "paired models"
        assert provenance.training["training_steps"] > 0


def test_release_0_1_provenance_is_read_from_its_training_config():
    sae = crosscoder.load_dictionary(FIXTURES / "release_0_1" / "diff_sae")
    provenance = Provenance.from_metadata(sae.metadata)
    assert provenance.model_organism and provenance.base_model is None
    assert provenance.training["architecture"] == "diff_sae" and provenance.training["k"] == 4


def test_a_format_1_sae_without_a_readable_description_takes_the_recorded_direction(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(FIXTURES / "release_0_1" / "diff_sae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["input_description"] = "difference"
    config["metadata"]["train_config"]["diff_direction"] = "base_minus_chat"
    (folder / "config.json").write_text(json.dumps(config))
    assert crosscoder.load_dictionary(folder).input == BASE_MINUS_CHAT

    del config["metadata"]["train_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DictionaryFormatError, match="does not say whether the SAE reads chat − base or base − chat"):
        crosscoder.load_dictionary(folder)


def test_a_training_config_of_an_earlier_release_is_compared_field_by_field():
    old = json.loads((FIXTURES / "release_0_1" / "diff_sae" / "config.json").read_text())["metadata"]["train_config"]
    same = TrainConfig.from_dict(old)
    assert same.parallelism == "auto"  # shard_latents=False
    assert config_differences(old, same) == []
    assert config_differences({**old, "shard_latents": True}, same) == ["parallelism"]
    assert config_differences({**old, "from_the_future": 1}, same) == ["from_the_future"]


@pytest.mark.slow
@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", ["batchtopk_crosscoder", "diff_sae"])
def test_saved_dictionaries_evaluate_with_todays_command(release, name, organism_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSCODER_CACHE", str(organism_cache))
    out = tmp_path / "report"
    arguments = [str(FIXTURES / release / name), "--out", str(out), "--num-tokens", "3000", "--kl-conversations", "4"]
    assert evaluate_command([*arguments, "--n-leaning", "3", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dict_size"] == 256 and 0 < report["reconstruction"]["fve"] <= 1
    assert set(report["downstream_kl"]["gap_closed"]) == (
        {"diff_sae"} if name == "diff_sae" else {"crosscoder", "chat_latents"}
    )


RESUME_FLAGS = [
    "--preset", "synthetic", "--dict-size", "64", "--k", "4", "--batch-size", "128", "--num-tokens", "2560",
    "--normalization-tokens", "512", "--warmup-steps", "2", "--threshold-start-step", "5", "--checkpoint-every", "10",
    "--keep-checkpoints", "2", "--log-every", "5", "--run-name", "release-0.1", "--no-progress",
    "--lr", "1e-3",  # the synthetic preset's rate in that release
]  # fmt: skip


@pytest.mark.slow
def test_a_checkpoint_of_release_0_1_resumes_to_what_that_release_would_have_trained(tmp_path):
    """The release-0.1 run (``TrainConfig.shard_latents`` era) checkpointed at step 10 of 20; today's code resumes it
    and ends where that release ended its own run."""
    shutil.copytree(FIXTURES / "release_0_1" / "run" / "checkpoints", tmp_path / "release-0.1" / "checkpoints")
    command = [sys.executable, str(Path(__file__).parent.parent / "train.py"), *RESUME_FLAGS]
    finished = subprocess.run([*command, "--output-dir", str(tmp_path), "--resume"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    resumed = crosscoder.load_dictionary(tmp_path / "release-0.1" / "batchtopk_crosscoder")
    assert resumed.metadata["training_steps"] == 20
    expected = load_file(FIXTURES / "release_0_1" / "run" / "finished_by_release_0_1.safetensors")
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
