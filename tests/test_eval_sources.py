"""What evaluation streams from: the dictionary's provenance record, overridden by the user's flags — and never
code that a saved file asks to run."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tokenizer, chat_rows, corpus, finetuned_copy, llama, save_pair, write_jsonl

import crosscoder

EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama pair whose folders carry custom code (``auto_map`` → evil.py) and local datasets."""
    root = tmp_path_factory.mktemp("pair")
    tokenizer = build_tokenizer()
    base = llama(len(tokenizer))
    base_path, chat_path = save_pair(root, base, finetuned_copy(base), tokenizer)
    marker = root / "EXECUTED"
    for folder in (base_path, chat_path):
        (folder / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
    general = write_jsonl(root / "general.jsonl", [{"text": text} for text in corpus()[:60]])
    chats = write_jsonl(root / "chat.jsonl", chat_rows(60))
    return {"root": root, "base": base_path, "chat": chat_path, "general": general, "chats": chats, "marker": marker}


def trained_on_a_file(root, d_model=32):
    """A BatchTopK crosscoder trained from an activation file: its provenance names no models."""
    path = root / "activations.safetensors"
    save_file({"activations": torch.randn(2048, 2, d_model)}, path)
    config = crosscoder.TrainConfig(
        activations=path,
        dict_size=64,
        k=4,
        batch_size=256,
        num_tokens=256 * 8,
        normalization_tokens=512,
        warmup_steps=2,
        output_dir=root / "runs",
        run_name="from-file",
        progress=False,
        log_every=4,
    )
    crosscoder.train(config)
    return root / "runs" / "from-file" / "batchtopk_crosscoder"


def evaluate(*arguments):
    command = [sys.executable, "-m", "crosscoder.eval", *map(str, arguments), "--num-tokens", "400"]
    command += ["--kl-conversations", "2", "--n-leaning", "2", "--n-effects", "2", "--n-steer", "1"]
    command += ["--no-progress", "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.slow
def test_evaluation_never_runs_code_that_a_dictionary_names(pair, tmp_path):
    folder = trained_on_a_file(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    metadata = config["metadata"]
    del metadata["provenance"]  # a dictionary of format 1, as downloaded, naming the models and asking for their code
    metadata["train_config"] = {
        "base_model": str(pair["base"]),
        "chat_model": str(pair["chat"]),
        "datasets": [str(pair["general"]), str(pair["chats"])],
        "layers": [2],
        "context_length": 32,
        "model_dtype": "float32",
        "trust_remote_code": True,
    }
    (folder / "config.json").write_text(json.dumps(config))

    finished = evaluate(folder, "--out", tmp_path / "report")
    assert finished.returncode == 0, finished.stderr
    assert not pair["marker"].exists()

    evaluate(folder, "--out", tmp_path / "trusted", "--trust-remote-code")  # the user's own choice
    assert pair["marker"].exists()  # (the control: the folder's code does run when the user allows it)
    pair["marker"].unlink()


@pytest.mark.slow
def test_flags_name_the_models_for_a_dictionary_trained_from_a_file(pair, tmp_path):
    folder = trained_on_a_file(tmp_path)
    provenance = crosscoder.load_dictionary(folder).metadata["provenance"]
    assert provenance["data_source"] == "activation file"

    refused = evaluate(folder, "--out", tmp_path / "refused")
    assert refused.returncode == 2
    assert "pass --base-model, --chat-model and --datasets" in refused.stderr
    assert "activation file" in refused.stderr and "Traceback" not in refused.stderr

    models = ["--base-model", pair["base"], "--chat-model", pair["chat"], "--layers", "2"]
    finished = evaluate(folder, "--out", tmp_path / "report", *models, "--datasets", pair["general"], pair["chats"])
    assert finished.returncode == 0, finished.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["reconstruction"]["tokens"] > 0 and report["downstream_kl"]["n_first"] > 0
