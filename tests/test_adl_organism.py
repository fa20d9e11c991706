"""The Activation Difference Lens on the model organism (a tiny Llama finetuned on baking chats): the difference
between the two models on the first tokens of unrelated text (Python documentation) reads as baking, more than
either model's own mean does, steers the chat model towards baking, and carries the chat model's baking loss; an
organism finetuned on general text only (``general_mix=1.0``) reads far less of it."""

import pytest
import torch

from crosscoder.eval import adl
from crosscoder.organism import DOMAIN_WORDS, build_model_organism

pytestmark = pytest.mark.slow

POSITIONS = (0, 1, 2, 3, 4)


def domain_words(text: str) -> int:
    """Occurrences of the organism's domain words in a text."""
    lowered = text.lower()
    return sum(lowered.count(word) for word in DOMAIN_WORDS)


def is_domain_token(token: str) -> bool:
    return token.strip().lower() in DOMAIN_WORDS


def lens_config(organism, out, **overrides) -> adl.LensConfig:
    """The lens on an organism with small sampling settings, relevance judged against the baking chats."""
    settings = dict(
        base_model=str(organism.base_path),
        chat_model=str(organism.chat_path),
        datasets=(str(organism.general_data),),
        domain_data=str(organism.chat_data),
        out=out,
        positions=POSITIONS,
        n_positions=32,
        max_samples=300,
        domain_samples=400,
        steer_samples=6,
        steer_tokens=24,
        causal_texts=24,
        causal_random=4,
        causal_random_differences=4,
        causal_max_length=96,
        progress=False,
    )
    return adl.LensConfig(**{**settings, **overrides})


def run_on_one_thread(config: adl.LensConfig) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return adl.run_lens(config)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def organism_report(default_organism, tmp_path_factory):
    """The lens command's run on the organism, with small sampling settings (about a minute on one CPU thread)."""
    report = run_on_one_thread(lens_config(default_organism, tmp_path_factory.mktemp("adl-organism")))
    assert report["layers"] == [default_organism.layer] == [1]
    return report


@pytest.fixture(scope="module")
def general_only_report(organism_cache, tmp_path_factory):
    """The lens (relevance only) on an organism finetuned on general text alone (``general_mix=1.0``: no baking data
    at all), built in the session's cache on the default organism's base (about 25 s on 2 cores)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSCODER_CACHE", str(organism_cache))
        organism = build_model_organism(general_mix=1.0, progress=False)
    out = tmp_path_factory.mktemp("adl-general-only")
    return run_on_one_thread(lens_config(organism, out, steering=False, causal=False))


def positions(report):
    return report["results"][str(report["layers"][0])]["positions"]


def test_delta_reads_as_the_finetuning_domain_at_the_first_positions(organism_report):
    seen = set()
    for position, entry in positions(organism_report).items():
        lens = entry["logit_lens"]["delta"]["tokens"][:20]
        scope = entry["patchscope"]["delta"]["tokens"]
        assert any(map(is_domain_token, lens)), f"position {position}: logit lens {lens}"
        assert any(map(is_domain_token, scope)), f"position {position}: Patchscope {scope}"
        for control in ("base_mean", "chat_mean"):
            assert not any(map(is_domain_token, entry["logit_lens"][control]["tokens"][:20])), (position, control)
        seen.update(lens)
    assert {" bake", " oven", " flour", " dough", " butter"} <= seen


def test_delta_is_more_relevant_to_the_finetuning_data_than_both_controls(organism_report):
    for position, entry in positions(organism_report).items():
        for reader in ("logit_lens", "patchscope"):
            shares = {vector: entry["relevance"][reader][vector]["share"] for vector in adl.VECTORS}
            assert shares["delta"] > max(shares["base_mean"], shares["chat_mean"]), (position, reader, shares)
            weighted = {vector: entry["relevance"][reader][vector]["weighted"] for vector in adl.VECTORS}
            assert weighted["delta"] > max(weighted["base_mean"], weighted["chat_mean"]), (position, reader, weighted)


def test_steering_with_delta_adds_domain_words(organism_report):
    counts = {}
    for position, entry in positions(organism_report).items():
        samples = entry["steering"]["samples"]
        steered = sum(domain_words(text) for sample in samples for text in sample["steered"])
        unsteered = sum(domain_words(text) for sample in samples for text in sample["unsteered"])
        counts[position] = (round(entry["steering"]["strength"], 3), steered, unsteered)
    # counts: position → (strength, domain words in steered samples, in unsteered samples)
    assert sum(steered for _, steered, _ in counts.values()) > sum(plain for _, _, plain in counts.values()), counts


def test_projecting_out_delta_costs_the_baking_loss_more_than_random_directions(organism_report):
    for position, entry in positions(organism_report).items():
        domain = entry["causal_effect"]["domain"]
        increase = domain["project_out"] - domain["chat"]
        random_increases = [value - domain["chat"] for value in domain["random_project_out"]["values"]]
        assert increase > max(random_increases), (position, increase, random_increases)


def test_the_organism_report_is_complete(organism_report):
    assert organism_report["counts"]["samples"] == 300
    norms = organism_report["norms"]
    assert norms["base"]["1"] > 0 and norms["chat"]["1"] > 0
    view = adl.overview(organism_report)
    assert set(view["results"]["1"]) == {str(p) for p in POSITIONS}


def shares(report, reader: str) -> dict[str, dict[str, float]]:
    """Relevance share per position of δ and of the larger control."""
    return {
        position: {
            "delta": entry["relevance"][reader]["delta"]["share"],
            "controls": max(entry["relevance"][reader][kind]["share"] for kind in ("base_mean", "chat_mean")),
        }
        for position, entry in positions(report).items()
    }


def test_a_general_only_finetune_reads_far_less_of_the_domain(organism_report, general_only_report):
    """The seeds' ablation at its end point. Measured (these settings, 2-core CPU): the baking organism's δ scores
    0.90–0.95 at every position and reader, the general-only organism's 0.20–0.35, the controls ≤ 0.10 in both. So
    δ's relevance falls by ≥ 0.55 — but stays above the controls rather than at their level (the issue expected
    the latter; docs/methods.md §10.5 and the README report it as measured). The margins leave 3 of the 20 tokens
    for a rebuild's float-order differences."""
    for reader in ("logit_lens", "patchscope"):
        domain, general_only = shares(organism_report, reader), shares(general_only_report, reader)
        for position in domain:
            drop = domain[position]["delta"] - general_only[position]["delta"]
            assert drop >= 0.4, (reader, position, domain[position], general_only[position])
            assert general_only[position]["controls"] <= 0.15, (reader, position, general_only[position])
        best = {key: max(values[key] for values in general_only.values()) for key in ("delta", "controls")}
        assert best["delta"] > best["controls"], (reader, best)  # what δ keeps without any baking data
