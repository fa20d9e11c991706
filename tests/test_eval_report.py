"""The evaluation command end to end on tiny real models, and its dashboard in a real headless Chromium."""

import json
import shutil
import subprocess

import pytest
from tiny_models import build_tokenizer, finetuned_copy, llama, local_pair_config, save_pair

import crosscoder
from crosscoder.eval.report import EvalConfig, evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = local_pair_config(
        root,
        build_tokenizer(),
        scale=0.1,
        architectures=("batchtopk", "diff_sae"),
        num_tokens=64 * 60,
        lr=3e-3,
        run_name="run",
    )
    crosscoder.train(config)
    return root, config


@pytest.mark.slow
def test_crosscoder_report_folder(trained):
    root, _ = trained
    report = evaluate(
        EvalConfig(
            str(root / "run" / "batchtopk_crosscoder"),
            out=root / "report",
            num_tokens=1500,
            kl_conversations=8,
            n_leaning=4,
            progress=False,
        )
    )
    written = json.loads((root / "report" / "report.json").read_text())
    assert written["class"] == "BatchTopKCrossCoder"
    assert 0 < written["reconstruction"]["fve"] <= 1
    assert sum(written["exclusivity"]["counts"].values()) == 64
    assert written["latent_scaling"]["analysed_chat_latents"] >= 1
    kl = written["downstream_kl"]
    assert set(kl["gap_closed"]) == {"crosscoder", "chat_latents"} and kl["all_tokens"]["base"] > 0
    rows = written["latents"]
    assert {
        "latent",
        "delta_norm",
        "class",
        "cosine",
        "nu_error",
        "nu_recon",
        "verdict",
        "frequency",
        "top_tokens",
    } <= set(rows[0])
    for name in ("dashboard.html", "delta_norm_histogram.png", "nu_scatter.png"):
        assert (root / "report" / name).stat().st_size > 0
    assert [row["latent"] for row in report["latents"]] == [row["latent"] for row in rows]


@pytest.mark.slow
def test_diff_sae_report_has_nu_act_and_the_diff_sae_patch(trained):
    root, _ = trained
    evaluate(
        EvalConfig(
            str(root / "run" / "diff_sae"),
            out=root / "sae-report",
            num_tokens=1000,
            kl_conversations=4,
            n_leaning=3,
            progress=False,
        )
    )
    written = json.loads((root / "sae-report" / "report.json").read_text())
    assert "nu_act" in written["latents"][0]
    assert set(written["downstream_kl"]["gap_closed"]) == {"diff_sae"}


def test_models_of_another_width_are_refused(trained, tmp_path):
    root, _ = trained
    tokenizer = build_tokenizer()
    wide = llama(len(tokenizer), hidden=48)
    base_path, chat_path = save_pair(tmp_path, wide, finetuned_copy(wide), tokenizer)
    with pytest.raises(ValueError, match="the dictionary has d_model=32 but the models have 48"):
        evaluate(
            EvalConfig(
                str(root / "run" / "batchtopk_crosscoder"),
                out=tmp_path / "r",
                base_model=str(base_path),
                chat_model=str(chat_path),
                progress=False,
            )
        )


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(trained):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    root, _ = trained
    out = root / "dash"
    evaluate(
        EvalConfig(
            str(root / "run" / "batchtopk_crosscoder"),
            out=out,
            num_tokens=800,
            kl_conversations=2,
            n_leaning=3,
            progress=False,
        )
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={root / 'chromium-profile'}",
    ]
    page = f"file://{out / 'dashboard.html'}"
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="latents">' in dom.stdout and "Top-activating contexts" in dom.stdout
    assert dom.stdout.count('class="token center"') >= 1  # highlighted tokens were rendered
    shot = subprocess.run(
        [browser, *flags, f"--screenshot={out / 'dashboard.png'}", "--window-size=1200,2000", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0 and (out / "dashboard.png").stat().st_size > 10_000
