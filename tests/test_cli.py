"""The command line: ``python train.py`` with presets, overrides, --help and clean errors."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import crosscoder
from crosscoder.cli import parse_config
from crosscoder.config import PRESETS

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_is_generated_from_the_config_field_docs(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "average active latents per token" in result.stdout  # the doc of TrainConfig.k
    assert "paper-batchtopk" in result.stdout  # presets are listed


@pytest.mark.parametrize(
    ("module", "positional"),
    [("crosscoder.eval", " DICTIONARY"), ("crosscoder.eval.adl", ""), ("crosscoder.eval.agent", "")],
)
def test_each_evaluation_command_names_itself_and_its_flags_plainly_in_its_help(module, positional, capsys):
    main = importlib.import_module(f"{module}.__main__").main
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {module} [-h] [OPTIONS]{positional}\n"), text.splitlines()[0]
    assert "--no-no-" not in text


def test_preset_then_overrides():
    config = parse_config(["--preset", "paper-batchtopk", "--lr", "3e-4", "--k", "50"])
    assert (config.preset, config.loss, config.lr, config.k) == ("paper-batchtopk", "l2", 3e-4, 50)
    assert config.architectures == ("batchtopk",)


def test_every_preset_is_a_valid_config():
    for name, (description, config) in PRESETS.items():
        assert description and config.preset == name and not config.problems()


def test_no_arguments_picks_the_demo_in_a_fresh_run_folder_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert parse_config([]).run_name == "demo" and capsys.readouterr().err == ""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    config = parse_config([])
    assert config.preset == "demo" and config.run_name == "demo-1"
    assert capsys.readouterr().err == "runs/demo holds an earlier run (kept): this one goes to runs/demo-1\n"


def test_resume_alone_continues_the_latest_demo(tmp_path, monkeypatch):
    """What an interrupted ``python train.py`` says to run, "the same command and --resume", resumes its folder."""
    monkeypatch.chdir(tmp_path)
    assert parse_config(["--resume"]).run_name == "demo"
    for name in ("demo", "demo-1", "demo-2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    config = parse_config(["--resume"])
    assert (config.preset, config.run_name, config.resume) == ("demo", "demo-2", True)
    assert parse_config([]).run_name == "demo-3"


def test_unknown_preset_exits_2_and_lists_the_known_ones(tmp_path):
    result = run_train("--preset", "gemma-magic", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown preset 'gemma-magic'" in result.stderr and "paper-l1" in result.stderr


def test_invalid_value_exits_with_the_reason(tmp_path):
    result = run_train("--k", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "--k must be > 0, got 0" in result.stdout + result.stderr


def test_config_round_trips_through_its_dict():
    config = crosscoder.TrainConfig(architectures=("l1", "diff_sae"), activations=Path("a.pt"), source_names=("b", "c"))
    assert crosscoder.TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['flux'\]"):
        crosscoder.TrainConfig.from_dict({**config.to_dict(), "flux": 1})


@pytest.mark.slow
def test_train_py_runs_the_synthetic_self_check_and_recovers_the_planted_latents(tmp_path):
    result = run_train("--preset", "synthetic", "--output-dir", str(tmp_path), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "batchtopk_crosscoder" in result.stdout and "fve=" in result.stdout
    for name in ("batchtopk_crosscoder", "diff_sae"):
        dictionary = crosscoder.load_dictionary(tmp_path / "synthetic" / name)
        assert dictionary.metadata["training_steps"] == 8000
        assert "dead_fraction" in dictionary.metadata["metrics"]  # validated on held-out planted data, with θ
        recovered = re.search(rf"{name}: recovered (\d+) of 64 planted latents", result.stdout)
        assert recovered is not None, result.stdout
        assert int(recovered.group(1)) >= 61  # ≥ 95 %


@pytest.mark.slow
def test_train_py_without_arguments_diffs_the_model_organism(tmp_path, organism_cache):
    """The default run at a reduced size (the organism comes from the session's cache)."""
    env = {**os.environ, "CROSSCODER_CACHE": str(organism_cache)}
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--preset",
            "demo",
            "--num-tokens",
            str(1024 * 150),
            "--dict-size",
            "256",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "chat-only" in result.stdout
    # the closing summary leads with the lens, then explains every dictionary
    lens = result.stdout.index("Activation Difference Lens")
    assert lens < result.stdout.index("batchtopk_crosscoder: fve") < result.stdout.index("diff_sae: the")
    assert "position 0: logit lens" in result.stdout and (tmp_path / "demo" / "adl" / "report.json").is_file()
    cc = crosscoder.load_dictionary(tmp_path / "demo" / "batchtopk_crosscoder")
    assert cc.metadata["training_steps"] == 150 and cc.metadata["metrics"]["fve"] > 0.5
