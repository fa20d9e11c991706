"""Planted recovery (docs/methods.md §5): the self-check of a synthetic run counts the planted latents a dictionary's
decoder reproduces, as its input sees them and in raw space."""

import torch

import crosscoder
from crosscoder.eval.recovery import planted_recovery
from crosscoder.synthetic import PlantedDictionary

PLANTED = PlantedDictionary.random(d_model=16, n_shared=6, n_base_only=2, n_chat_only=2, seed=3)


def with_decoder_rows(dictionary, rows: torch.Tensor, input_scale: torch.Tensor):
    """The dictionary with its first len(rows) decoder rows set to ``rows`` (raw space) under ``input_scale``."""
    with torch.no_grad():
        dictionary.input_scale.copy_(input_scale)
        dictionary.W_dec[: len(rows)] = rows.view(len(rows), dictionary.n_sources, -1) * input_scale[:, None]
    return dictionary


def test_a_crosscoder_holding_half_the_planted_pairs_recovers_half():
    cc = crosscoder.BatchTopKCrossCoder(16, 32, k=2, n_sources=2)
    half = PLANTED.directions[::2] * 3.0  # scale does not matter, direction does
    with_decoder_rows(cc, half, torch.tensor([0.5, 2.0]))  # undone before comparing: raw-space directions

    recovery = planted_recovery(cc, PLANTED)

    assert recovery.recovered == PLANTED.n_latents // 2 and recovery.fraction == 0.5
    assert torch.equal(recovery.best_latents[::2], torch.arange(PLANTED.n_latents // 2))
    torch.testing.assert_close(recovery.best_cosines[::2], torch.ones(PLANTED.n_latents // 2))
    assert "recovered 5 of 10 planted latents (50.0%" in recovery.describe()


def test_a_diff_sae_is_compared_with_the_planted_chat_minus_base_directions():
    sae = crosscoder.BatchTopKSAE(16, 32, k=2)
    difference = PLANTED.directions[:, 1] - PLANTED.directions[:, 0]
    with_decoder_rows(sae, difference, torch.tensor([4.0]))
    assert planted_recovery(sae, PLANTED).fraction == 1.0

    base_only = sae.__class__(16, 32, k=2)
    with_decoder_rows(base_only, PLANTED.directions[:, 0], torch.tensor([1.0]))  # the wrong input: base rows
    assert planted_recovery(base_only, PLANTED).recovered < PLANTED.n_latents
