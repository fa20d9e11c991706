"""Data-parallel training with torchrun (gloo, 2 processes on CPU) trains what one process trains."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
ARGS = [
    "--preset",
    "synthetic",
    "--num-tokens",
    str(256 * 30),
    "--batch-size",
    "256",
    "--dict-size",
    "64",
    "--k",
    "3",
    "--warmup-steps",
    "5",
    "--threshold-start-step",
    "10",
    "--dead-tokens",
    "2048",
    "--normalization-tokens",
    "1024",
    "--checkpoint-every",
    "10",
    "--log-every",
    "5",
    "--no-progress",
    "--device",
    "cpu",
]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_train_the_same_dictionaries_as_one(tmp_path):
    run([sys.executable, str(TRAIN), *ARGS, "--output-dir", str(tmp_path / "one")], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"]
    run([*torchrun, str(TRAIN), *ARGS, "--output-dir", str(tmp_path / "two")], tmp_path)

    for name in ("batchtopk_crosscoder", "diff_sae"):
        one = load_file(tmp_path / "one" / "synthetic" / name / "model.safetensors")
        two = load_file(tmp_path / "two" / "synthetic" / name / "model.safetensors")
        for key in one:
            difference = (one[key] - two[key]).abs().max().item()
            assert difference < 1e-4 * max(1.0, one[key].abs().max().item()), f"{name}.{key} differs by {difference}"
        assert one["threshold"].item() > 0
    checkpoints = sorted((tmp_path / "two" / "synthetic" / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == ["step_000000020.pt", "step_000000030.pt"]


@pytest.mark.slow
def test_a_distributed_run_resumes_with_the_same_number_of_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534"]
    short = [*ARGS, "--output-dir", str(tmp_path)]
    run([*torchrun, str(TRAIN), *short], tmp_path)
    single = subprocess.run(
        [sys.executable, str(TRAIN), *short, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 2 and "resume with the same number of processes" in single.stderr
