"""Losses and metrics equal hand computations (docs/methods.md §2, §5)."""

import pytest
import torch

import crosscoder
from crosscoder.losses import auxk_loss, l1_penalty, reconstruction_losses
from crosscoder.metrics import ReconstructionStats, active_counts


def test_mse_sums_over_sources_and_d_and_averages_over_batch():
    x = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]])
    x_hat = torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 3.0]]])
    # token 0: 1 + 0 + 0 + 1 = 2; token 1: 4 + 0 + 0 + 4 = 8 → mean 5; the second reconstruction x̂ = x: 0
    errors = torch.stack([x_hat - x, torch.zeros_like(x)])
    assert reconstruction_losses(errors, "mse").tolist() == [5.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mse_value_and_gradients_are_autograds_of_the_textbook_formula(dtype):
    """Each reconstruction's loss and the errors' gradient, and a second backward through the same graph is refused
    (the errors are turned into their gradient in place)."""
    generator = torch.Generator().manual_seed(0)
    errors = torch.randn(3, 7, 2, 5, generator=generator, dtype=dtype, requires_grad=True)
    weights = torch.randn(3, generator=generator, dtype=dtype)
    shared = errors * 1  # the losses spend their input: not the leaf
    losses = reconstruction_losses(shared, "mse")
    textbook = errors.pow(2).sum(dim=(2, 3)).mean(dim=1)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(losses, textbook, **tolerance)
    (expected,) = torch.autograd.grad((weights * textbook).sum(), errors)
    (weights * losses).sum().backward(retain_graph=True)
    torch.testing.assert_close(errors.grad, expected, **tolerance)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        losses.sum().backward()
    with pytest.raises(ValueError, match=r"must be \[g, batch, n_sources, d_model\]"):
        reconstruction_losses(errors[0], "mse")


def test_l2_is_the_unsquared_norm_averaged_over_batch_and_sources():
    errors = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, 1.0], [6.0, 8.0]]])[None]
    # norms 5, 0, 1, 10 → mean 4
    assert reconstruction_losses(errors, "l2").tolist() == [4.0]


def test_l1_penalty_weights_codes_by_code_norms():
    # dense codes [[1, 0, 2], [0, 3, 0]] with code norms [0.5, 2, 1]: token 0 gives 0.5 + 2, token 1 gives 6
    values = torch.tensor([1.0, 2.0, 3.0])
    value_code_norms = torch.tensor([0.5, 1.0, 2.0])
    assert l1_penalty(values, value_code_norms, batch_size=2).item() == 4.25


def test_auxk_decodes_top_dead_latents_without_decoder_bias_against_the_detached_residual():
    torch.manual_seed(0)
    batch, dict_size, k_aux = 6, 10, 2
    cc = crosscoder.BatchTopKCrossCoder(d_model=3, dict_size=dict_size, k=1)
    with torch.no_grad():
        cc.b_dec.normal_()  # must not enter the aux decode
        cc.b_enc.fill_(0.5)  # most activations positive
    x = torch.randn(batch, 2, 3)
    out = cc.training_forward(x)
    dead = torch.zeros(dict_size, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    dead_reconstruction = cc.dead_latent_reconstruction(out, dead, k_aux)
    residual = x - out.reconstruction
    loss = auxk_loss(out.reconstruction_error(), dead_reconstruction)

    code_norms = cc.code_norms().detach()
    activations = out.scores / code_norms
    expected = torch.zeros(batch, 2, 3)
    for b in range(batch):
        scores = {j: (activations[b, j] * code_norms[j]).item() for j in (1, 4, 7)}
        for j in sorted(scores, key=scores.get, reverse=True)[:k_aux]:
            expected[b] += activations[b, j] * cc.W_dec[j].detach()
    torch.testing.assert_close(dead_reconstruction.detach(), expected)
    e = residual.detach()
    hand = (e - expected).pow(2).sum((1, 2)).mean() / (e - e.mean(0)).pow(2).sum((1, 2)).mean()
    torch.testing.assert_close(loss.detach(), hand)

    loss.backward()
    alive = [j for j in range(dict_size) if not dead[j]]
    assert cc.W_dec.grad[alive].abs().max() == 0  # only dead latents are decoded, and e is detached
    assert cc.W_dec.grad[[1, 4, 7]].abs().max() > 0
    assert cc.W_enc.grad[[1, 4, 7]].abs().max() > 0  # the aux loss trains the dead latents' encoders
    assert cc.b_dec.grad is None or cc.b_dec.grad.abs().max() == 0


@pytest.mark.parametrize("k_aux", [3, 50])  # 50: more than the dead latents
def test_auxk_decodes_the_positive_top_dead_latents_of_each_token(k_aux):
    torch.manual_seed(3)
    cc = crosscoder.BatchTopKCrossCoder(d_model=4, dict_size=40, k=2)
    with torch.no_grad():
        cc.b_enc.fill_(-0.3)  # many scores are exactly zero: those picks decode nothing
    x = torch.randn(16, 2, 4)
    out = cc.training_forward(x)
    dead = torch.rand(40) < 0.4
    dead_reconstruction = cc.dead_latent_reconstruction(out, dead, k_aux)

    scores = out.scores.detach()
    expected = torch.zeros(16, 2, 4)
    for b in range(16):
        ranked = sorted((j for j in range(40) if dead[j]), key=lambda j: -scores[b, j].item())[:k_aux]
        for j in ranked:
            if scores[b, j] > 0:
                expected[b] += scores[b, j] / cc.code_norms()[j].detach() * cc.W_dec[j].detach()
    assert (scores[:, dead] == 0).any() and expected.abs().sum() > 0
    torch.testing.assert_close(dead_reconstruction.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k_aux", [3, 50])
def test_auxk_ranks_the_dead_columns_alone_or_the_masked_matrix_alike(k_aux):
    """The CPU ranking (dead columns only) and the sync-free one (every column, live ones below zero) pick the
    same positive-scoring latents."""
    from crosscoder.dictionary import _top_dead_latents

    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(16, 40, generator=generator).relu()
    dead = torch.rand(40, generator=generator) < 0.4
    picked = [_top_dead_latents(scores, dead, k_aux, columns) for columns in (True, False)]

    def positive(latents: torch.Tensor, values: torch.Tensor) -> set[tuple[int, int]]:
        rows, slots = (values > 0).nonzero(as_tuple=True)
        return set(zip(rows.tolist(), latents[rows, slots].tolist(), strict=True))

    kept = [positive(*pick) for pick in picked]
    assert kept[0] == kept[1] and len(kept[0]) > 0
    assert all(dead[j] for _, j in kept[0])
    for latents, _ in picked:
        assert (latents[:, 1:] > latents[:, :-1]).all()  # sorted by latent within each row


def test_no_dead_latent_means_no_aux_pass():
    cc = crosscoder.BatchTopKCrossCoder(d_model=3, dict_size=10, k=1)
    out = cc.training_forward(torch.randn(4, 2, 3))
    assert cc.dead_latent_reconstruction(out, torch.zeros(10, dtype=torch.bool), 2) is None


def test_reconstruction_stats_accumulate_fve_over_batches_like_one_big_batch():
    torch.manual_seed(1)
    x = torch.randn(40, 2, 5) + torch.tensor([1.0, -2.0])[:, None]
    x_hat = x + 0.3 * torch.randn_like(x)
    codes = (torch.rand(40, 7) > 0.6).float()
    stats = ReconstructionStats()
    for start in range(0, 40, 16):
        stats.update(x[start : start + 16], x_hat[start : start + 16], active_counts(codes[start : start + 16]))

    residual = (x - x_hat).pow(2).sum(dim=(0, 2))
    variance = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    torch.testing.assert_close(stats.fve_per_source().float(), 1 - residual / variance)
    torch.testing.assert_close(stats.fve().float(), 1 - residual.sum() / variance.sum())
    torch.testing.assert_close(stats.l0().float(), (codes != 0).sum(-1).float().mean())
    torch.testing.assert_close(stats.latent_frequencies().float(), (codes != 0).float().mean(0))

    halves = ReconstructionStats()  # the training step's way: the inputs first, then the errors x̂ − x
    for start in range(0, 40, 16):
        rows = slice(start, start + 16)
        halves.add_inputs(x[rows])
        halves.add_errors(x_hat[rows] - x[rows], active_counts(codes[rows]))
    assert halves.summary() == stats.summary() and halves.tokens == stats.tokens == 40
