"""The evaluation command end to end on tiny real models, and its latent workspace in a real headless Chromium."""

import json

import pytest
from test_workspace import Chromium
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
    for name in ("index.html", "table.js", "vocab.js", "delta_norm_histogram.png", "nu_scatter.png"):
        assert (root / "report" / name).stat().st_size > 0
    assert [row["latent"] for row in report["latents"]] == [row["latent"] for row in rows]
    effects = written["latent_effects"]
    assert effects and all(set(effect) == {"kl_effect", "gap_share"} for effect in effects.values())
    assert json.loads((root / "report" / "store" / "store.json").read_text())["complete"]


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
def test_the_workspace_shows_readout_kl_and_steering_in_headless_chromium(trained, tmp_path):
    root, _ = trained
    out = root / "workspace"
    report = evaluate(
        EvalConfig(
            str(root / "run" / "batchtopk_crosscoder"),
            out=out,
            num_tokens=800,
            kl_conversations=2,
            n_leaning=3,
            latents=(3, 5),
            n_steer=1,
            export_json=True,
            progress=False,
        )
    )
    assert set(report["latent_effects"]) == {"3", "5"}
    records = json.loads((out / "export" / "shard_00000.json").read_text())["latents"]
    record = records["3"]
    assert set(record) >= {"histogram", "top", "quantiles", "readout", "kl", "steering"}
    assert set(record["readout"]) == {"base", "chat"} and len(record["readout"]["chat"]["promoted"]) == 10
    assert "kl" in records["5"] and "steering" not in records["5"]  # --n-steer 1: only the first is steered
    profile = tmp_path / "profile"
    profile.mkdir()
    browser = Chromium(profile)
    try:
        browser.open(f"file://{out / 'index.html'}")
        assert browser.evaluate("document.querySelector('#page-info').textContent") == "rows 1–64 of 64"
        browser.evaluate("location.hash = '#latent=3'")
        browser.wait_for("document.querySelector('#latent-view .readout')")
        text = browser.evaluate("document.querySelector('#latent-view').textContent")
        assert "base promotes" in text and "chat suppresses" in text and "KL increase" in text
        assert browser.evaluate("document.querySelectorAll('#latent-view .steering tr').length") == 4  # 3 prompts
        shot = browser.send("Page.captureScreenshot", format="png")
        assert len(shot["data"]) > 10_000
    finally:
        browser.close()
