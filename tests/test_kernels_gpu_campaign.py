"""``bench/gpu.sh``, the GPU campaign (docs/methods.md §4), checked without a GPU: it parses, every flag it passes
is one its benchmark takes, every test file it runs exists, and without a GPU it stops at once with a clear error."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"


def commands() -> list[str]:
    """The script's lines with their continuations joined, comments left out."""
    lines = SCRIPT.read_text().replace("\\\n", " ").splitlines()
    return [line for line in lines if not line.lstrip().startswith("#")]


def test_gpu_campaign_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_gpu_campaign_passes_only_flags_its_benchmarks_take() -> None:
    flags: dict[str, set[str]] = {}
    for line in commands():
        for script, rest in re.findall(r"bench/(\w+\.py)([^;&|]*)", line):
            flags.setdefault(script, set()).update(
                token.split("=")[0] for token in shlex.split(rest) if token.startswith("--")
            )
    assert {"step.py", "selection.py", "stream.py"} <= set(flags)
    for script, passed in flags.items():
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        unknown = {flag for flag in passed if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)}
        assert not unknown, f"bench/gpu.sh passes {sorted(unknown)} to bench/{script}, whose --help lacks them"


def test_gpu_campaign_runs_test_files_that_exist() -> None:
    test_files = {path for line in commands() for path in re.findall(r"tests/\w+\.py", line)}
    assert test_files and all((ROOT / path).is_file() for path in test_files), test_files


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run the whole campaign")
def test_gpu_campaign_without_a_gpu_stops_at_once_with_a_clear_error(tmp_path: Path) -> None:
    env = os.environ | {"PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "no CUDA GPU" in result.stderr and "nothing was run" in result.stderr
