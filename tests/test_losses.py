"""Losses and metrics equal hand computations (DESIGN §4)."""

import torch

from crosscoder.losses import auxk_loss, l1_penalty, reconstruction_loss
from crosscoder.metrics import ReconstructionStats


def test_mse_sums_over_sources_and_d_and_averages_over_batch():
    x = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]])
    x_hat = torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 3.0]]])
    # token 0: 1 + 0 + 0 + 1 = 2; token 1: 4 + 0 + 0 + 4 = 8 → mean 5
    assert reconstruction_loss(x, x_hat, "mse").item() == 5.0


def test_l2_is_the_unsquared_norm_averaged_over_batch_and_sources():
    x = torch.zeros(2, 2, 2)
    x_hat = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, 1.0], [6.0, 8.0]]])
    # norms 5, 0, 1, 10 → mean 4
    assert reconstruction_loss(x, x_hat, "l2").item() == 4.0


def test_l1_penalty_weights_codes_by_code_norms():
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    code_norms = torch.tensor([0.5, 2.0, 1.0])
    # token 0: 0.5 + 2 = 2.5; token 1: 6 → mean 4.25
    assert l1_penalty(codes, code_norms).item() == 4.25


def test_auxk_decodes_top_dead_latents_without_decoder_bias_against_the_detached_residual():
    torch.manual_seed(0)
    batch, dict_size, n_sources, d_model, k_aux = 6, 10, 2, 3, 2
    W_dec = torch.randn(dict_size, n_sources, d_model, requires_grad=True)
    activations = torch.rand(batch, dict_size, requires_grad=True)
    code_norms = W_dec.detach().norm(dim=-1).sum(-1)
    dead = torch.zeros(dict_size, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    residual = torch.randn(batch, n_sources, d_model, requires_grad=True)

    loss = auxk_loss(residual, activations, code_norms, dead, k_aux, W_dec)

    expected_numerator = 0.0
    for b in range(batch):
        scores = {j: (activations[b, j] * code_norms[j]).item() for j in (1, 4, 7)}
        chosen = sorted(scores, key=scores.get, reverse=True)[:k_aux]
        decoded = sum(activations[b, j].item() * W_dec[j].detach() for j in chosen)
        expected_numerator += (residual[b].detach() - decoded).pow(2).sum().item()
    expected_numerator /= batch
    centred = residual.detach() - residual.detach().mean(0)
    expected_denominator = centred.pow(2).sum().item() / batch
    torch.testing.assert_close(loss.item(), expected_numerator / expected_denominator, rtol=1e-5, atol=0)

    loss.backward()
    assert residual.grad is None or residual.grad.abs().max() == 0  # the residual is detached
    alive_rows = [j for j in range(dict_size) if not dead[j]]
    assert W_dec.grad[alive_rows].abs().max() == 0  # only dead latents are decoded
    assert W_dec.grad[[1, 4, 7]].abs().max() > 0


def test_auxk_is_zero_when_no_latent_is_dead():
    W_dec = torch.randn(5, 2, 3)
    loss = auxk_loss(torch.randn(4, 2, 3), torch.rand(4, 5), torch.ones(5), torch.zeros(5, dtype=torch.bool), 2, W_dec)
    assert loss.item() == 0.0


def test_reconstruction_stats_accumulate_fve_over_batches_like_one_big_batch():
    torch.manual_seed(1)
    x = torch.randn(40, 2, 5) + torch.tensor([1.0, -2.0])[:, None]
    x_hat = x + 0.3 * torch.randn_like(x)
    codes = (torch.rand(40, 7) > 0.6).float()
    stats = ReconstructionStats()
    for start in range(0, 40, 16):
        stats.update(x[start : start + 16], x_hat[start : start + 16], codes[start : start + 16])

    residual = (x - x_hat).pow(2).sum(dim=(0, 2))
    variance = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    torch.testing.assert_close(stats.fve_per_source().float(), 1 - residual / variance)
    torch.testing.assert_close(stats.fve().float(), 1 - residual.sum() / variance.sum())
    torch.testing.assert_close(stats.l0().float(), (codes != 0).sum(-1).float().mean())
    torch.testing.assert_close(stats.latent_frequencies().float(), (codes != 0).float().mean(0))
