"""Δnorm classes and decoder cosine on a constructed dictionary (docs/methods.md §6)."""

import pytest
import torch

import crosscoder
from crosscoder.eval.exclusivity import decoder_cosine, latent_classes, relative_norm_difference


def constructed() -> crosscoder.BatchTopKCrossCoder:
    cc = crosscoder.BatchTopKCrossCoder(d_model=2, dict_size=5, k=1)
    rows = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.0]],  # base-only: Δnorm 0
            [[0.0, 0.0], [0.0, 3.0]],  # chat-only: Δnorm 1
            [[2.0, 0.0], [0.0, 2.0]],  # shared, orthogonal: Δnorm 0.5, cos 0
            [[1.0, 0.0], [4.0, 0.0]],  # chat-leaning: Δnorm ½(3/4 + 1) = 0.875 → other
            [[0.0, 1.0], [0.0, -0.9]],  # shared, opposite: Δnorm ½(−0.1 + 1) = 0.45, cos −1
        ]
    )
    with torch.no_grad():
        cc.W_dec.copy_(rows)
    return cc


def test_relative_norm_difference_follows_the_formula():
    expected = torch.tensor([0.0, 1.0, 0.5, 0.875, 0.45])
    torch.testing.assert_close(relative_norm_difference(constructed()), expected)


def test_classes_use_the_paper_thresholds():
    classes = latent_classes(relative_norm_difference(constructed()))
    assert classes == ["base-only", "chat-only", "shared", "other", "shared"]


def test_decoder_cosine():
    cosine = decoder_cosine(constructed())
    torch.testing.assert_close(cosine[2:], torch.tensor([0.0, 1.0, -1.0]))


def test_a_scale_difference_between_the_models_does_not_make_latents_exclusive():
    cc = constructed()
    with torch.no_grad():
        cc.input_scale.copy_(torch.tensor([1.0, 0.1]))  # the chat model's activations are 10× larger
    torch.testing.assert_close(relative_norm_difference(cc), torch.tensor([0.0, 1.0, 0.5, 0.875, 0.45]))


def test_a_single_source_dictionary_is_refused():
    with pytest.raises(ValueError, match="at least two sources"):
        relative_norm_difference(crosscoder.BatchTopKSAE(4, 8, 2))
