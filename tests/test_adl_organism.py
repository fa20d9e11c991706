"""The Activation Difference Lens on the model organism (a tiny Llama finetuned on baking chats): the difference
between the two models on the first tokens of unrelated text (Python documentation) reads as baking, more than
either model's own mean does, steers the chat model towards baking, and carries the chat model's baking loss."""

import pytest
import torch

from crosscoder.eval import adl
from crosscoder.organism import DOMAIN_WORDS

pytestmark = pytest.mark.slow

POSITIONS = (0, 1, 2, 3, 4)


def domain_words(text: str) -> int:
    """Occurrences of the organism's domain words in a text."""
    lowered = text.lower()
    return sum(lowered.count(word) for word in DOMAIN_WORDS)


def is_domain_token(token: str) -> bool:
    return token.strip().lower() in DOMAIN_WORDS


@pytest.fixture(scope="module")
def organism_report(default_organism, tmp_path_factory):
    """The lens command's run on the organism, with small sampling settings (about a minute on one CPU thread)."""
    out = tmp_path_factory.mktemp("adl-organism")
    config = adl.LensConfig(
        base_model=str(default_organism.base_path),
        chat_model=str(default_organism.chat_path),
        datasets=(str(default_organism.general_data),),
        domain_data=str(default_organism.chat_data),
        out=out,
        positions=POSITIONS,
        n_positions=32,
        max_samples=300,
        domain_samples=400,
        steer_samples=6,
        steer_tokens=24,
        causal_texts=24,
        causal_random=4,
        causal_max_length=96,
        progress=False,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = adl.run_lens(config)
    finally:
        torch.set_num_threads(previous)
    assert report["layers"] == [default_organism.layer] == [1]
    return report


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
