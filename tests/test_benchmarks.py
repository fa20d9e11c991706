"""Every benchmark runs end to end at tiny shapes and ends with its one line of JSON (the figures themselves are
measured by running the benchmarks at their default shapes, not here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = {
    "step.py": ["--d-model", "16", "--dict-size", "64", "--k", "4", "--batch", "32", "--repeats", "2", "--warmup", "1"],
    "selection.py": ["--batch", "32", "--dict-size", "64", "--k", "4", "--repeats", "2"],
    "stream.py": ["--hidden", "32", "--layers", "2", "--context", "16", "--block-sequences", "4", "--batch-size", "32"],
    "scaling.py": [
        "--batch-size",
        "64",
        "--d-model",
        "8",
        "--dict-size",
        "32",
        "--k",
        "4",
        "--steps",
        "6",
        "--repeats",
        "1",
    ],
}
FIGURES = {
    "step.py": ["speedup_vs_dense", "ratio_to_floor"],
    "selection.py": ["n_keep"],
    "stream.py": ["ratio_to_floor", "ratio_to_truncated", "layer_stop_speedup"],
    "scaling.py": ["scaling_2_procs", "scaling_2_procs_data_parallel", "scaling_2_procs_latent_sharded"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_and_ends_with_one_json_line(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *TINY[script]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for name in FIGURES[script]:
        assert figures[name] > 0, name
