"""Every benchmark runs end to end at tiny shapes and ends with its one line of JSON (the figures themselves are
measured by running the benchmarks at their default shapes, not here)."""

import json
import os
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
    "step.py": [
        "speedup_vs_dense",
        "ratio_to_floor",
        "diff_sae_ratio_to_floor",
        "matryoshka_vs_batchtopk",
        "dedicated_vs_batchtopk",
        "dead_latents_vs_batchtopk",
        "state_mb",
        "ours_peak_over_state",
    ],
    "selection.py": ["n_keep"],
    "stream.py": ["ratio_to_floor", "ratio_to_truncated", "layer_stop_speedup"],
    "scaling.py": [
        "scaling_2_procs",
        "scaling_2_procs_data_parallel",
        "scaling_2_procs_data_parallel_sharded_optimizer",
        "scaling_2_procs_latent_sharded",
        "ceiling_2_procs",
        "share_of_ceiling_2_procs_data_parallel_sharded_optimizer",
    ],
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
        if name.endswith("peak_over_state"):  # memory growth at tiny shapes may round to nothing
            assert figures[name] >= 0, name
        else:
            assert figures[name] > 0, name


@pytest.mark.slow
def test_variants_quick_compares_the_three_crosscoders_on_planted_data(tmp_path):
    """``bench/variants.py --quick``: the structure of its JSON line (the numbers are measured by the full run)."""
    command = [sys.executable, str(BENCH / "variants.py"), "--quick"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["dictionaries"]) == {"batchtopk", "dedicated", "matryoshka"}
    for row in summary["dictionaries"].values():
        assert 0 <= row["recovered"] <= 1 and 0 <= row["exclusive_recall"] <= 1
        assert row["exclusive_planted"] == 6 and 0 <= row["exclusive_found"] <= 6
        assert row["exclusive_precision"] is None or 0 <= row["exclusive_precision"] <= 1


@pytest.mark.slow
def test_findings_quick_writes_its_report(organism_cache, tmp_path):
    """``bench/findings.py --quick`` on the organism: the structure of what it writes (the science is in the
    full run, reported in the README)."""
    environment = {**os.environ, "CROSSCODER_CACHE": str(organism_cache)}
    command = [sys.executable, str(BENCH / "findings.py"), "--quick", "--quiet", "--out", str(tmp_path / "findings")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    crosscoders = ("l1", "batchtopk", "matryoshka", "dedicated")
    assert set(summary["findings"]) == {*crosscoders, "diff_sae"}
    assert set(summary["gap_closed"]) == {
        f"{name}: {part}" for name in (*crosscoders, "diff_sae") for part in ("reconstruction", "focus latents")
    }
    written = json.loads((tmp_path / "findings" / "findings.json").read_text())
    for architecture in crosscoders:
        entry = written["dictionaries"][architecture]
        assert sum(entry["classes"].values()) <= entry["dict_size"]
        assert all(0 <= share <= 1 for share in entry["latent_scaling"].values())
        assert (tmp_path / "findings" / f"nu_scatter_{architecture}.png").stat().st_size > 0
    # the dedicated crosscoder's exclusive partitions are exclusive by construction (Δnorm exactly 0 or 1)
    by_partition = written["dictionaries"]["dedicated"]["by_partition"]
    assert set(by_partition["chat-only"]) == {"chat-only"} and set(by_partition["base-only"]) == {"base-only"}
    assert written["dictionaries"]["dedicated"]["focus"] == "chat-only"
    assert (tmp_path / "findings" / "delta_norm_histograms.png").stat().st_size > 0
    markdown = (tmp_path / "findings" / "findings.md").read_text()
    assert all(f"| {name} |" in markdown for name in summary["findings"]) and "gap closed" in markdown
    assert all(name.replace("_", " ") in markdown for name in written["checks"])


@pytest.mark.slow
def test_findings_on_the_real_settings_show_the_papers_directions_where_the_organism_does(organism_cache, tmp_path):
    """``bench/findings.py`` at the demo's settings with the papers' three dictionaries (about 2.5 minutes): the
    directions the organism shows — the L1 crosscoder (at matched sparsity) has more chat-only latents than the
    BatchTopK one, the diff-SAE closes more of the KL gap than the crosscoder's reconstruction and its chat-leaning
    latents, and its top latents point at the domain — and every direction it does not show reported as not
    reproduced (README, Results)."""
    environment = {**os.environ, "CROSSCODER_CACHE": str(organism_cache)}
    out = tmp_path / "findings"
    command = [sys.executable, str(BENCH / "findings.py"), "--quiet", "--out", str(out)]
    command += ["--architectures", "l1", "batchtopk", "diff_sae"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])["checks"]
    assert checks["l1_has_more_chat_only_latents_than_batchtopk"]
    assert checks["diff_sae_closes_at_least_as_much_kl_gap_as_crosscoder_focus_latents"]
    assert checks["diff_sae_closes_more_kl_gap_than_crosscoder_reconstruction"]
    assert checks["diff_sae_top_latents_point_at_the_domain_more_than_batchtopk_focus_latents"]
    markdown = (out / "findings.md").read_text()
    for name, held in checks.items():
        verdict = "yes" if held else "no — not reproduced here"
        assert f"- {name.replace('_', ' ')}: **{verdict}**" in markdown


@pytest.mark.slow
def test_adl_mixing_quick_writes_its_curve(tmp_path):
    """``bench/adl_mixing.py --quick`` on two tiny organisms: one point per mix with δ's and the controls' relevance
    (tiny organisms learn little: the curve itself comes from the full run)."""
    environment = {**os.environ, "CROSSCODER_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, str(BENCH / "adl_mixing.py"), "--quick", "--quiet", "--mixes", "0", "1"]
    command += ["--no-steering", "--out", str(tmp_path / "mixing")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads(result.stdout.strip().splitlines()[-1])["points"]
    assert [point["general_mix"] for point in points] == [0.0, 1.0]
    for point in points:
        for reader in ("logit_lens", "patchscope"):
            assert 0 <= point[reader]["delta"] <= 1 and 0 <= point[reader]["controls"] <= 1
    assert "| 1 |" in (tmp_path / "mixing" / "adl_mixing.md").read_text()
