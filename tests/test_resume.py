"""Exact resume: a run killed after its step-N/2 checkpoint and resumed ends bitwise identical to a run
trained straight through (CPU)."""

import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(*args: str) -> None:
    subprocess.run([sys.executable, str(WORKER), *args], check=True, timeout=300)


def test_killed_and_resumed_run_equals_the_straight_run_bitwise(tmp_path):
    run_worker(str(tmp_path), "straight")

    # Blocks after yielding 25 batches: the step-20 checkpoint exists, steps 21–24 were trained but not saved.
    process = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "interrupted", "--hang-after", "25"])
    checkpoint = tmp_path / "interrupted" / "checkpoints" / "step_000000020.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # let it train past the checkpoint into the hang
    process.kill()
    process.wait()
    assert checkpoint.exists()
    assert not (tmp_path / "interrupted" / "batchtopk_crosscoder").exists()

    run_worker(str(tmp_path), "interrupted", "--resume")

    for name in ("batchtopk_crosscoder", "diff_sae"):
        straight = load_file(tmp_path / "straight" / name / "model.safetensors")
        resumed = load_file(tmp_path / "interrupted" / name / "model.safetensors")
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert straight[key].equal(resumed[key]), f"{name}.{key} differs after resume"
        assert straight["threshold"].item() > 0
