"""Specification of the three dictionaries (docs/methods.md §1): selection, formulas, normalisation, SAE
constraints, and the errors bad input gets."""

from __future__ import annotations

import re

import pytest
import torch

from crosscoder import BatchTopKCrossCoder, BatchTopKSAE, L1CrossCoder, kernels, load_dictionary
from crosscoder.blocked_selection import CANDIDATE_MARGIN
from crosscoder.errors import ConfigError
from crosscoder.kernels.backend import use_backend
from crosscoder.step_buffers import StepBuffers

D_MODEL, DICT_SIZE, K, N_SOURCES, BATCH = 8, 32, 3, 2, 6


def _crosscoder_with_uneven_code_norms(seed: int = 0) -> BatchTopKCrossCoder:
    """A crosscoder whose decoder rows have different norms per latent and source, so ranking by
    ``f · c`` differs from ranking by ``f``."""
    torch.manual_seed(seed)
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, N_SOURCES)
    with torch.no_grad():
        crosscoder.W_dec.mul_(torch.rand(DICT_SIZE, N_SOURCES, 1) * 2.0 + 0.1)
        crosscoder.b_enc.copy_(torch.randn(DICT_SIZE) * 0.1)
    return crosscoder


def _hand_activations(crosscoder: BatchTopKCrossCoder, x: torch.Tensor) -> torch.Tensor:
    """``f = ReLU(Σ_s W_enc[:, s] · x_s + b_enc)`` on already-normalised x: [B, S, d] → [B, F]."""
    return torch.relu(torch.einsum("bsd,fsd->bf", x, crosscoder.W_enc) + crosscoder.b_enc)


def _largest_by_brute_force_sort(scores: torch.Tensor, n_keep: int) -> set[int]:
    """Flat indices of the ``n_keep`` largest scores, by a plain Python sort."""
    values = scores.flatten().tolist()
    order = sorted(range(len(values)), key=lambda index: values[index], reverse=True)
    return set(order[:n_keep])


def _kept_indices(codes: torch.Tensor) -> set[int]:
    return set(codes.flatten().nonzero().flatten().tolist())


# ---------------------------------------------------------------------------- BatchTopK (training)
def test_batch_topk_encode_keeps_exactly_the_k_times_batch_largest_scores_f_times_c() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        codes = crosscoder.encode(x, use_threshold=False)
        activations = _hand_activations(crosscoder, x)
    scores = activations * crosscoder.code_norms().detach()
    assert (activations > 0).sum() > K * BATCH  # enough positive scores to fill the budget

    assert (codes != 0).sum().item() == K * BATCH == 18
    assert _kept_indices(codes) == _largest_by_brute_force_sort(scores, K * BATCH)
    # ranking by f alone would pick a different set: the code norms matter
    assert _kept_indices(codes) != _largest_by_brute_force_sort(activations, K * BATCH)


def test_batch_topk_kept_values_are_the_unscaled_activations() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        codes = crosscoder.encode(x, use_threshold=False)
        activations = _hand_activations(crosscoder, x)
    kept = codes != 0
    torch.testing.assert_close(codes[kept], activations[kept], rtol=0, atol=1e-6)
    assert not torch.allclose(codes[kept], (activations * crosscoder.code_norms())[kept])


def test_batch_topk_with_fewer_positive_scores_than_budget_keeps_every_positive_activation() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    with torch.no_grad():
        crosscoder.b_enc[2:] = -100.0  # only latents 0 and 1 can fire: at most 2·B < k·B positives
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        codes = crosscoder.encode(x, use_threshold=False)
        activations = _hand_activations(crosscoder, x)
    assert 0 < (activations > 0).sum() < K * BATCH
    torch.testing.assert_close(codes, activations, rtol=0, atol=1e-6)


def test_training_forward_selects_like_encode_and_reports_smallest_kept_score() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        output = crosscoder.training_forward(crosscoder.normalize(x))
        activations = _hand_activations(crosscoder, x)
    scores = activations * crosscoder.code_norms().detach()

    output.codes.validate()  # built without validation on the hot path: sorted, unique and in range
    codes = output.dense_codes()
    assert (codes != 0).sum().item() == K * BATCH
    assert _kept_indices(codes) == _largest_by_brute_force_sort(scores, K * BATCH)
    torch.testing.assert_close(output.scores, scores, rtol=1e-6, atol=1e-6)
    kth_largest_score = scores.flatten().sort(descending=True).values[K * BATCH - 1]
    torch.testing.assert_close(output.min_kept_score, kth_largest_score, rtol=0, atol=1e-6)
    hand_reconstruction = torch.einsum("bf,fsd->bsd", codes, crosscoder.W_dec) + crosscoder.b_dec
    torch.testing.assert_close(output.reconstruction, hand_reconstruction, rtol=1e-5, atol=1e-6)


def test_training_forward_with_step_buffers_selects_in_latent_blocks_what_a_fresh_call_selects() -> None:
    """With the loop's buffers on CPU the forward never forms the whole score matrix while the bound holds (a sampled
    one on the first call, then the previous threshold × CANDIDATE_MARGIN), and forms it when the bound is too high:
    the same entries, values, reconstruction and threshold as a fresh call either way, and the dead latents' columns
    are the fresh scores' columns."""
    crosscoder = _crosscoder_with_uneven_code_norms()
    buffers = StepBuffers()
    dead = torch.zeros(DICT_SIZE, dtype=torch.bool)
    dead[::5] = True
    # the first call estimates its bound on a sample; then bounds below the threshold, at it (ties at the bound)
    # and above every score (the whole matrix decides)
    for seed, relative_bound in enumerate([None, 0.5, 1.0, 1e9]):
        x = crosscoder.normalize(torch.randn(BATCH, N_SOURCES, D_MODEL, generator=torch.Generator().manual_seed(seed)))
        fresh = crosscoder.training_forward(x)
        if relative_bound is not None:
            buffers.candidate_bound = relative_bound * float(fresh.min_kept_score)
        reused = crosscoder.training_forward(x, buffers=buffers, dead=dead)
        assert (reused.scores is None) == (relative_bound != 1e9)
        if reused.scores is not None:
            torch.testing.assert_close(reused.scores, fresh.scores, rtol=1e-6, atol=1e-6)
        assert torch.equal(reused.codes.rows, fresh.codes.rows) and torch.equal(
            reused.codes.latents, fresh.codes.latents
        )
        torch.testing.assert_close(reused.values, fresh.values, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reused.reconstruction, fresh.reconstruction, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reused.min_kept_score, fresh.min_kept_score, rtol=1e-6, atol=1e-6)
        latents, columns = reused.dead_columns
        assert torch.equal(latents, dead.nonzero().squeeze(1))
        torch.testing.assert_close(columns, fresh.scores[:, dead], rtol=1e-6, atol=1e-6)
        assert buffers.candidate_bound == CANDIDATE_MARGIN * float(reused.min_kept_score) > 0
    smaller = crosscoder.training_forward(x[:3], buffers=buffers)  # another batch size: new buffers
    assert torch.equal(smaller.codes.latents, crosscoder.training_forward(x[:3]).codes.latents)


def test_training_forward_k_argument_overrides_configured_k() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        output = crosscoder.training_forward(crosscoder.normalize(x), k=1)
    scores = _hand_activations(crosscoder, x) * crosscoder.code_norms().detach()
    assert (output.dense_codes() != 0).sum().item() == BATCH
    assert _kept_indices(output.dense_codes()) == _largest_by_brute_force_sort(scores, BATCH)


def test_l1_training_forward_keeps_every_activation_and_has_no_kept_score() -> None:
    torch.manual_seed(0)
    l1 = L1CrossCoder(D_MODEL, DICT_SIZE)
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        output = l1.training_forward(l1.normalize(x))
        activations = torch.relu(torch.einsum("bsd,fsd->bf", x, l1.W_enc) + l1.b_enc)
    torch.testing.assert_close(output.dense_codes(), activations, rtol=0, atol=1e-6)
    assert output.min_kept_score is None


def test_batch_topk_mask_marks_exactly_the_n_keep_largest_entries() -> None:
    torch.manual_seed(0)
    scores = torch.rand(5, 12)
    mask = kernels.batch_topk_mask(scores, 7)
    assert mask.dtype == torch.bool
    assert mask.shape == (5, 12)
    assert mask.sum().item() == 7
    assert set(mask.flatten().nonzero().flatten().tolist()) == _largest_by_brute_force_sort(scores, 7)


def test_batch_topk_mask_with_n_keep_above_numel_keeps_everything() -> None:
    scores = torch.rand(2, 3)
    assert kernels.batch_topk_mask(scores, 100).sum().item() == 6


def test_batch_topk_mask_rejects_non_positive_n_keep() -> None:
    with pytest.raises(ValueError, match="n_keep must be positive, got 0"):
        kernels.batch_topk_mask(torch.rand(2, 3), 0)


# ---------------------------------------------------------------------------- inference threshold
def test_inference_threshold_keeps_activations_whose_score_exceeds_theta() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        activations = _hand_activations(crosscoder, x)
        scores = activations * crosscoder.code_norms()
        theta = scores[scores > 0].median()
        crosscoder.threshold.fill_(theta)
        codes = crosscoder.encode(x, use_threshold=True)

    expected = torch.where(scores > theta, activations, torch.zeros(()))
    torch.testing.assert_close(codes, expected, rtol=0, atol=1e-6)
    n_above = int((scores > theta).sum())
    assert (codes != 0).sum().item() == n_above
    assert 0 < n_above < int((activations > 0).sum())  # θ really drops some positive activations
    at_theta = scores.flatten() == theta  # θ is itself one of the scores: equality is not enough
    assert at_theta.sum().item() == 1
    assert codes.flatten()[at_theta].item() == 0


def test_negative_threshold_keeps_every_positive_activation() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    assert crosscoder.threshold.item() == -1.0  # a new dictionary has no estimate yet
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        codes = crosscoder.encode(x)
        activations = _hand_activations(crosscoder, x)
    torch.testing.assert_close(codes, activations, rtol=0, atol=1e-6)
    assert (codes != 0).sum().item() == (activations > 0).sum().item() > K * BATCH


# ---------------------------------------------------------------------------- code normalisation
def test_code_norm_is_sum_of_per_source_decoder_norms() -> None:
    crosscoder = BatchTopKCrossCoder(d_model=2, dict_size=3, k=1, n_sources=2)
    with torch.no_grad():
        crosscoder.W_dec.copy_(
            torch.tensor(
                [
                    [[3.0, 4.0], [0.0, -2.0]],  # norms 5 and 2
                    [[1.0, 0.0], [0.0, 0.0]],  # norms 1 and 0
                    [[0.6, 0.8], [-0.6, 0.8]],  # norms 1 and 1
                ]
            )
        )
    norms = crosscoder.decoder_norms()
    assert norms.shape == (3, 2)
    torch.testing.assert_close(norms, torch.tensor([[5.0, 2.0], [1.0, 0.0], [1.0, 1.0]]))
    # 7, not √29 ≈ 5.39 (the norm of the concatenated decoder)
    torch.testing.assert_close(crosscoder.code_norms(), torch.tensor([7.0, 1.0, 2.0]))


def test_decoder_norms_shape_is_dict_size_by_n_sources() -> None:
    assert BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, n_sources=3).decoder_norms().shape == (DICT_SIZE, 3)
    assert L1CrossCoder(D_MODEL, DICT_SIZE).decoder_norms().shape == (DICT_SIZE, 2)
    assert BatchTopKSAE(D_MODEL, DICT_SIZE, K).decoder_norms().shape == (DICT_SIZE, 1)


def test_sae_code_norms_are_ones() -> None:
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    torch.testing.assert_close(sae.code_norms(), torch.ones(DICT_SIZE))


def test_new_dictionaries_have_decoder_norm_init_decoder_norm_and_encoder_equal_to_decoder() -> None:
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, init_decoder_norm=0.5)
    torch.testing.assert_close(crosscoder.decoder_norms(), torch.full((DICT_SIZE, N_SOURCES), 0.5))
    torch.testing.assert_close(L1CrossCoder(D_MODEL, DICT_SIZE).decoder_norms(), torch.full((DICT_SIZE, 2), 0.05))
    assert torch.equal(crosscoder.W_enc, crosscoder.W_dec)


# ---------------------------------------------------------------------------- formulas and normalisation
def _randomized_normalisation(dictionary: torch.nn.Module, scale: list[float]) -> None:
    with torch.no_grad():
        dictionary.b_enc.copy_(torch.randn_like(dictionary.b_enc) * 0.1)
        dictionary.b_dec.copy_(torch.randn_like(dictionary.b_dec))
        dictionary.input_mean.copy_(torch.randn_like(dictionary.input_mean) * 3.0)
        dictionary.input_scale.copy_(torch.tensor(scale))


@pytest.mark.parametrize("batch_topk", [True, False], ids=["BatchTopKCrossCoder", "L1CrossCoder"])
def test_crosscoder_encode_is_relu_of_encoder_on_normalised_raw_input(batch_topk: bool) -> None:
    """With θ < 0 (BatchTopK) or always (L1), inference codes are the plain ReLU activations."""
    torch.manual_seed(0)
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K) if batch_topk else L1CrossCoder(D_MODEL, DICT_SIZE)
    _randomized_normalisation(crosscoder, [0.5, 3.0])
    x = torch.randn(BATCH, N_SOURCES, D_MODEL) * 2.0 + 1.0
    x_normalized = (x - crosscoder.input_mean) * torch.tensor([0.5, 3.0])[:, None]
    expected = torch.relu(torch.einsum("bsd,fsd->bf", x_normalized, crosscoder.W_enc) + crosscoder.b_enc)
    with torch.no_grad():
        torch.testing.assert_close(crosscoder.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_crosscoder_decode_is_per_source_decoder_sum_returned_in_raw_space() -> None:
    torch.manual_seed(0)
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)
    _randomized_normalisation(crosscoder, [0.5, 3.0])
    codes = torch.relu(torch.randn(BATCH, DICT_SIZE))
    normalized = torch.einsum("bf,fsd->bsd", codes, crosscoder.W_dec) + crosscoder.b_dec
    expected = normalized / torch.tensor([0.5, 3.0])[:, None] + crosscoder.input_mean
    with torch.no_grad():
        torch.testing.assert_close(crosscoder.decode(codes), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(crosscoder.decode_normalized(codes), normalized, rtol=1e-5, atol=1e-5)


def test_forward_is_decode_of_thresholded_encode() -> None:
    torch.manual_seed(0)
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)
    _randomized_normalisation(crosscoder, [0.5, 3.0])
    crosscoder.threshold.fill_(0.3)
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        assert torch.equal(crosscoder(x), crosscoder.decode(crosscoder.encode(x, use_threshold=True)))


def test_dictionary_that_reconstructs_normalised_space_exactly_returns_raw_input() -> None:
    """Latents ±e_i for every source and coordinate reconstruct x_n exactly; with a non-trivial mean
    and scale, decode(encode(x)) must then give back the raw x."""
    d_model, n_sources = 3, 2
    directions = torch.eye(n_sources * d_model).view(-1, n_sources, d_model)
    crosscoder = BatchTopKCrossCoder(d_model, 2 * n_sources * d_model, k=1, n_sources=n_sources)
    with torch.no_grad():
        crosscoder.W_enc.copy_(torch.cat([directions, -directions]))
        crosscoder.W_dec.copy_(torch.cat([directions, -directions]))
        crosscoder.input_mean.copy_(torch.tensor([[1.0, -2.0, 3.0], [10.0, 0.0, -5.0]]))
        crosscoder.input_scale.copy_(torch.tensor([0.25, 4.0]))
    x = torch.randn(5, n_sources, d_model) * 3.0
    with torch.no_grad():
        torch.testing.assert_close(crosscoder.decode(crosscoder.encode(x)), x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(crosscoder(x), x, rtol=1e-5, atol=1e-5)


def test_normalize_and_denormalize_invert_each_other() -> None:
    torch.manual_seed(0)
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)
    _randomized_normalisation(crosscoder, [0.5, 3.0])
    x = torch.randn(BATCH, N_SOURCES, D_MODEL)
    with torch.no_grad():
        x_normalized = crosscoder.normalize(x)
        torch.testing.assert_close(x_normalized, (x - crosscoder.input_mean) * torch.tensor([0.5, 3.0])[:, None])
        torch.testing.assert_close(crosscoder.denormalize(x_normalized), x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(crosscoder.normalize(crosscoder.denormalize(x)), x, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- BatchTopKSAE
def test_sae_encode_subtracts_decoder_bias_before_the_encoder() -> None:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    _randomized_normalisation(sae, [2.0])
    x = torch.randn(BATCH, D_MODEL)
    x_normalized = (x - sae.input_mean[0]) * 2.0
    pre = (x_normalized - sae.b_dec[0]) @ sae.W_enc[:, 0].T + sae.b_enc
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(codes, torch.relu(pre), rtol=1e-5, atol=1e-5)
        without_bias_subtraction = torch.relu(x_normalized @ sae.W_enc[:, 0].T + sae.b_enc)
        assert not torch.allclose(codes, without_bias_subtraction, atol=1e-3)


def test_sae_takes_and_returns_batch_by_d_model_in_raw_space() -> None:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    _randomized_normalisation(sae, [2.0])
    x = torch.randn(BATCH, D_MODEL)
    with torch.no_grad():
        codes = sae.encode(x)
        reconstruction = sae.decode(codes)
    assert codes.shape == (BATCH, DICT_SIZE)
    assert reconstruction.shape == (BATCH, D_MODEL)
    expected = (codes @ sae.W_dec[:, 0] + sae.b_dec[0]) / 2.0 + sae.input_mean[0]
    torch.testing.assert_close(reconstruction, expected, rtol=1e-5, atol=1e-5)


def test_sae_batch_topk_keeps_the_k_times_batch_largest_activations() -> None:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    x = torch.randn(BATCH, D_MODEL)
    with torch.no_grad():
        codes = sae.encode(x, use_threshold=False)
        activations = torch.relu((x - sae.b_dec[0]) @ sae.W_enc[:, 0].T + sae.b_enc)
    assert (codes != 0).sum().item() == K * BATCH
    assert _kept_indices(codes) == _largest_by_brute_force_sort(activations, K * BATCH)


def test_sae_training_forward_ranks_its_activations_without_scaling_the_encoder() -> None:
    """c ≡ 1 (``unit_code_norms``): the scores are the ReLU activations bit for bit, the kept values are those
    activations, and no scaled copy of the encoder is made."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_(std=0.1)
    x = sae.normalize(torch.randn(BATCH, D_MODEL))
    buffers = StepBuffers()
    with torch.no_grad():
        output = sae.training_forward(x)
        blocked = sae.training_forward(x, buffers=buffers)
        activations = sae.activations_normalized(x)
    assert sae.unit_code_norms and not BatchTopKCrossCoder.unit_code_norms
    assert torch.equal(output.scores, activations)
    assert torch.equal(output.values, output.codes.gather(activations))
    assert torch.equal(blocked.values, blocked.codes.gather(activations))
    assert not buffers._tensors  # no scaled encoder, no whole score matrix; the block buffers last one pass


def test_sae_b_dec_gets_the_same_gradient_whether_or_not_the_input_needs_one() -> None:
    """The encoder's share of ∂b_dec taken per latent (``x̃`` needs no gradient, the training case) equals the one
    through a sparse ∂(x̃ − b_dec) (``x̃`` needs a gradient, which it then gets)."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
    x = sae.normalize(torch.randn(BATCH * 4, D_MODEL))
    weights = torch.randn(BATCH * 4, 1, D_MODEL)

    def b_dec_gradient(x_normalized: torch.Tensor) -> torch.Tensor:
        sae.zero_grad()
        output = sae.training_forward(x_normalized)
        assert (output.input.center is None) == x_normalized.requires_grad
        (output.reconstruction * weights).sum().backward()
        return sae.b_dec.grad.clone()

    per_latent = b_dec_gradient(x)
    x_with_gradient = x.clone().requires_grad_()
    through_input = b_dec_gradient(x_with_gradient)
    assert x_with_gradient.grad is not None
    torch.testing.assert_close(per_latent, through_input, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sae", "crosscoder", "centered_crosscoder"])
@pytest.mark.parametrize("input_needs_gradient", [False, True])
def test_the_reconstruction_errors_are_x_hat_minus_the_input_with_its_gradients(kind, input_needs_gradient):
    """``reconstruction_errors`` (formed in place over the decodes; from x̃ − b_dec when x̃ needs no gradient and the
    encoder reads that) equal x̂ − x̃ (bitwise where they are formed from x̃), and a loss on them gives every
    parameter the gradient a loss on x̂ gives, and x̃ its own minus the loss's weights."""
    torch.manual_seed(0)
    dictionary = {
        "sae": lambda: BatchTopKSAE(D_MODEL, DICT_SIZE, K),
        "crosscoder": lambda: BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, N_SOURCES),
        "centered_crosscoder": lambda: BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, N_SOURCES, centered_encoder=True),
    }[kind]()
    with torch.no_grad():
        dictionary.b_dec.normal_(std=0.1)
        dictionary.b_enc.normal_(std=0.1)
    raw = torch.randn(BATCH * 4, D_MODEL) if kind == "sae" else torch.randn(BATCH * 4, N_SOURCES, D_MODEL)
    x_normalized = dictionary.normalize(raw)
    weights = torch.randn_like(x_normalized)

    def gradients(through_errors: bool):
        dictionary.zero_grad()
        x = x_normalized.clone().requires_grad_(input_needs_gradient)
        output = dictionary.training_forward(x)
        if through_errors:
            error = output.reconstruction_error()
            (error * weights).sum().backward()
            value = error.detach()
        else:
            reconstruction = output.reconstruction
            (reconstruction * weights).sum().backward()
            value = reconstruction.detach() - x_normalized
        grads = {name: p.grad.clone() for name, p in dictionary.named_parameters() if p.grad is not None}
        return value, grads, x.grad

    errors, from_errors, input_grad = gradients(True)
    expected, from_reconstruction, expected_input_grad = gradients(False)
    centred = kind != "crosscoder" and not input_needs_gradient  # formed from x̃ − b_dec: another rounding
    if centred:
        torch.testing.assert_close(errors, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(errors, expected)
    assert from_errors.keys() == from_reconstruction.keys() >= {"W_enc", "W_dec", "b_enc", "b_dec"}
    for name, gradient in from_errors.items():
        torch.testing.assert_close(gradient, from_reconstruction[name], rtol=1e-5, atol=1e-6, msg=name)
    if input_needs_gradient:
        torch.testing.assert_close(input_grad, expected_input_grad - weights, rtol=1e-5, atol=1e-6)
    else:
        assert input_grad is None and expected_input_grad is None


def test_the_reconstruction_is_unavailable_once_the_errors_were_formed_over_its_decodes() -> None:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    output = sae.training_forward(sae.normalize(torch.randn(BATCH, D_MODEL)))
    decodes = output.prefix_decodes
    errors = output.reconstruction_errors()
    assert output.reconstruction_errors() is errors and errors.data_ptr() == decodes.data_ptr()
    with pytest.raises(ValueError, match="turned the decodes into the reconstruction errors"):
        _ = output.reconstruction


def _sae_after_backward_on_random_loss() -> BatchTopKSAE:
    """An SAE whose decoder gradient comes from the dense decode (not projected, unlike the training decode's)."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    x = torch.randn(BATCH * 4, D_MODEL)
    reconstruction = sae.decode_normalized(sae.activations_normalized(sae.normalize(x)))
    loss = (reconstruction * torch.randn_like(reconstruction)).sum()
    loss.backward()
    return sae


def test_the_saes_training_decode_hands_back_its_decoder_gradient_projected() -> None:
    """``training_decode_projects_gradient``: the training forward's backward projects the decoder's gradient off its
    rows, so that the step tells ``before_optimizer_step`` to leave it as it is."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    output = sae.training_forward(sae.normalize(torch.randn(BATCH * 4, D_MODEL)))
    (output.reconstruction * torch.randn_like(output.reconstruction)).sum().backward()
    rows, gradient = sae.W_dec.detach().flatten(1), sae.W_dec.grad.clone()
    assert sae.training_decode_projects_gradient and gradient.abs().max() > 1e-2
    torch.testing.assert_close((gradient.flatten(1) * rows).sum(-1), torch.zeros(DICT_SIZE), rtol=0, atol=1e-5)
    sae.before_optimizer_step(decoder_gradient_projected=True)
    assert torch.equal(sae.W_dec.grad, gradient)


def test_sae_before_optimizer_step_removes_decoder_parallel_gradient() -> None:
    sae = _sae_after_backward_on_random_loss()
    rows = sae.W_dec.detach().flatten(1)
    parallel_before = (sae.W_dec.grad.flatten(1) * rows).sum(-1)
    assert parallel_before.abs().max() > 1e-2

    sae.before_optimizer_step()
    parallel_after = (sae.W_dec.grad.flatten(1) * rows).sum(-1)
    torch.testing.assert_close(parallel_after, torch.zeros(DICT_SIZE), rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection_backend", ["auto", "reference"], ids=["C kernel", "reference"])
def test_sae_before_optimizer_step_subtracts_each_rows_projection_from_its_gradient(projection_backend) -> None:
    sae = _sae_after_backward_on_random_loss()
    rows, gradient = sae.W_dec.detach().flatten(1), sae.W_dec.grad.flatten(1).clone()
    expected = gradient - (gradient * rows).sum(-1, keepdim=True) * rows

    with use_backend(projection_backend):
        sae.before_optimizer_step()
    torch.testing.assert_close(sae.W_dec.grad.flatten(1), expected, rtol=1e-6, atol=1e-6)


def test_sae_after_optimizer_step_restores_unit_decoder_norms_after_adam() -> None:
    sae = _sae_after_backward_on_random_loss()
    sae.before_optimizer_step()
    torch.optim.Adam(sae.parameters(), lr=0.1).step()
    assert (sae.decoder_norms() - 1.0).abs().max() > 1e-3  # Adam moved the rows off the sphere

    sae.after_optimizer_step()
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(DICT_SIZE, 1), rtol=0, atol=1e-6)


def test_crosscoder_optimizer_hooks_leave_gradients_and_weights_alone() -> None:
    crosscoder = _crosscoder_with_uneven_code_norms()
    output = crosscoder.training_forward(crosscoder.normalize(torch.randn(BATCH, N_SOURCES, D_MODEL)))
    output.reconstruction.square().sum().backward()
    grad, weights = crosscoder.W_dec.grad.clone(), crosscoder.W_dec.detach().clone()
    crosscoder.before_optimizer_step()
    crosscoder.after_optimizer_step()
    assert torch.equal(crosscoder.W_dec.grad, grad)
    assert torch.equal(crosscoder.W_dec.detach(), weights)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "shape",
    [(4, N_SOURCES * D_MODEL), (4, 3, D_MODEL), (4, N_SOURCES, D_MODEL + 1), (N_SOURCES, D_MODEL)],
    ids=["flat", "wrong_n_sources", "wrong_d_model", "no_batch_dim"],
)
def test_crosscoder_rejects_activations_of_wrong_shape(shape: tuple[int, ...]) -> None:
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)
    message = re.escape(f"expected activations of shape [batch, n_sources=2, d_model=8], got {list(shape)}")
    with pytest.raises(ValueError, match=message):
        crosscoder.encode(torch.randn(shape))
    with pytest.raises(ValueError, match=message):
        crosscoder(torch.randn(shape))


def test_sae_rejects_stacked_sources() -> None:
    sae = BatchTopKSAE(D_MODEL, DICT_SIZE, K)
    with pytest.raises(ValueError, match=re.escape("expected activations of shape [batch, d_model=8], got [4, 1, 8]")):
        sae.encode(torch.randn(4, 1, D_MODEL))


@pytest.mark.parametrize("k", [0, -1])
def test_non_positive_k_is_rejected(k: int) -> None:
    with pytest.raises(ValueError, match=re.escape(f"k={k} is invalid") + ".*0 < k < dict_size=32"):
        BatchTopKCrossCoder(D_MODEL, DICT_SIZE, k)


@pytest.mark.parametrize("k", [DICT_SIZE, DICT_SIZE + 1])
def test_k_not_below_dict_size_is_rejected(k: int) -> None:
    with pytest.raises(ValueError, match=re.escape(f"k={k} is invalid") + ".*0 < k < dict_size=32"):
        BatchTopKCrossCoder(D_MODEL, DICT_SIZE, k)
    with pytest.raises(ValueError, match=re.escape(f"k={k} is invalid")):
        BatchTopKSAE(D_MODEL, DICT_SIZE, k)


@pytest.mark.parametrize("k", [2.0, "2", True, None])
def test_non_integer_k_is_rejected(k: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"k={k!r} is invalid") + ".*must be an integer"):
        BatchTopKCrossCoder(D_MODEL, DICT_SIZE, k)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["d_model", "dict_size", "n_sources"])
def test_non_positive_sizes_are_rejected(name: str) -> None:
    sizes = {"d_model": D_MODEL, "dict_size": DICT_SIZE, "n_sources": N_SOURCES, name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
        BatchTopKCrossCoder(k=K, **sizes)


def test_source_names_must_name_every_source() -> None:
    with pytest.raises(ValueError, match="source_names has 1 entries but n_sources=2"):
        BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, source_names=["base"])
    with pytest.raises(ValueError, match="source_names has 3 entries but n_sources=2"):
        L1CrossCoder(D_MODEL, DICT_SIZE, source_names=["base", "chat", "extra"])


@pytest.mark.parametrize("shape", [(4, DICT_SIZE - 1), (4, DICT_SIZE + 1), (DICT_SIZE,)])
def test_decode_rejects_codes_of_wrong_width(shape: tuple[int, ...]) -> None:
    crosscoder = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)
    with pytest.raises(
        ValueError, match=re.escape(f"expected codes of shape [batch, dict_size=32], got {list(shape)}")
    ):
        crosscoder.decode(torch.rand(shape))


def test_a_centered_crosscoder_encodes_the_input_minus_b_dec_and_keeps_the_choice_when_saved(tmp_path):
    torch.manual_seed(0)
    cc = BatchTopKCrossCoder(d_model=6, dict_size=20, k=2, centered_encoder=True)
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.b_enc.normal_(std=0.1)
        cc.input_scale.copy_(torch.tensor([0.5, 2.0]))
        cc.threshold.fill_(0.3)
    x = torch.randn(5, 2, 6)
    centered = (x * cc.input_scale[:, None] - cc.b_dec).flatten(1)  # normalised, minus b_dec
    activations = torch.relu(centered @ cc.W_enc.flatten(1).T + cc.b_enc)
    expected = activations * (activations * cc.code_norms() > 0.3)
    torch.testing.assert_close(cc.encode(x), expected)
    plain = BatchTopKCrossCoder(d_model=6, dict_size=20, k=2)
    plain.load_state_dict(cc.state_dict())
    assert not torch.allclose(plain.encode(x), expected)  # the reference crosscoder encodes x̃ itself

    cc.save_pretrained(tmp_path / "centered")
    loaded = load_dictionary(tmp_path / "centered")
    assert loaded.subtracts_decoder_bias and loaded.config()["centered_encoder"] is True
    torch.testing.assert_close(loaded.encode(x), expected)
    assert "centered_encoder" not in plain.config()  # files of uncentered crosscoders stay as they were


def test_centered_encoder_must_be_a_bool():
    with pytest.raises(ConfigError, match="centered_encoder must be true or false, got 'yes'"):
        BatchTopKCrossCoder(d_model=6, dict_size=20, k=2, centered_encoder="yes")
