"""Latent Scaling (docs/methods.md §7): the paper's own values, brute-force least squares, planted artifacts."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crosscoder
from crosscoder.eval.latent_scaling import (
    COMPLETE_SHRINKAGE,
    GENUINE,
    LATENT_DECOUPLING,
    compute_betas,
    compute_sae_betas,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sof" / "batchtopk_crosscoder"


def test_betas_match_the_papers_code_on_the_reference_crosscoder():
    cc = crosscoder.load_dictionary(FIXTURE)
    expected = load_file(FIXTURE / "latent_scaling_expected.safetensors")
    batches = [expected[f"batch_{i}"] for i in range(8)]
    result = compute_betas(cc, batches)
    torch.testing.assert_close(result.count_active, expected["count_active"])
    for name in ("beta_error_base", "beta_error_chat", "beta_recon_base", "beta_recon_chat"):
        torch.testing.assert_close(getattr(result, name), expected[name], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert result.count_active.eq(0).any()  # a latent that never fires gets NaN, as in the reference


def test_betas_equal_a_brute_force_least_squares_fit_per_latent():
    torch.manual_seed(0)
    cc = crosscoder.BatchTopKCrossCoder(d_model=6, dict_size=10, k=3)
    with torch.no_grad():
        cc.threshold.fill_(0.2)
        cc.input_scale.copy_(torch.tensor([0.5, 2.0]))
        cc.b_dec.normal_()
    batches = [torch.randn(16, 2, 6) for _ in range(3)]
    latents = [1, 4, 7]
    result = compute_betas(cc, batches, latents)

    x = cc.normalize(torch.cat(batches)).double()  # normalised space: each model on the same scale
    f = cc.encode(torch.cat(batches), use_threshold=True).double()
    x_hat = cc.decode_normalized(f.float()).double()
    decoder = cc.W_dec.detach().double()
    for position, j in enumerate(latents):
        fired = f[:, j] != 0
        d = decoder[j, 1]
        for m, error_beta, recon_beta in (
            (0, result.beta_error_base, result.beta_recon_base),
            (1, result.beta_error_chat, result.beta_recon_chat),
        ):
            design = (f[fired, j][:, None] * d).reshape(-1, 1)  # y_i ≈ β f_ij d, stacked over tokens
            error = x[fired, m] - x_hat[fired, m] + f[fired, j][:, None] * decoder[j, m]
            for beta, target in ((error_beta, error), (recon_beta, x_hat[fired, m])):
                solution = torch.linalg.lstsq(design, target.reshape(-1, 1)).solution.item()
                assert beta[position].item() == pytest.approx(solution, rel=1e-5)


def planted_crosscoder() -> tuple[crosscoder.BatchTopKCrossCoder, list[torch.Tensor]]:
    """Three "chat-only" latents (zero base decoder) over data where:
    latent 0 is genuine (the chat model has its direction, the base model nothing there);
    latent 1 suffered complete shrinkage (the base model has the same direction, unexplained by the dictionary);
    latent 2 is decoupled (the base model has the direction, reconstructed by a base-only latent 3)."""
    d = 8
    basis = torch.eye(d)
    cc = crosscoder.BatchTopKCrossCoder(d_model=d, dict_size=6, k=2)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 1], cc.W_dec[1, 1], cc.W_dec[2, 1] = basis[0], basis[1], basis[2]
        cc.W_dec[3, 0] = basis[2]  # base-only twin of latent 2
        cc.W_dec[4, 0], cc.W_dec[4, 1] = basis[5], basis[5]  # a shared latent
        cc.W_enc.zero_()
        cc.W_enc[0, 1], cc.W_enc[1, 1], cc.W_enc[2, 1] = basis[0], basis[1], basis[2]
        cc.W_enc[3, 0] = basis[2]
        cc.W_enc[4, 0] = basis[5]
        cc.threshold.fill_(0.05)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        a = torch.rand(64, 4, generator=generator) * (torch.rand(64, 4, generator=generator) < 0.5)
        x = torch.zeros(64, 2, d)
        x[:, 1, 0] = a[:, 0]  # genuine: chat only
        x[:, 1, 1] = a[:, 1]
        x[:, 0, 1] = a[:, 1]  # complete shrinkage: base has it too, nothing reconstructs it
        x[:, 1, 2] = a[:, 2]
        x[:, 0, 2] = a[:, 2]  # decoupling: base has it, latent 3 reconstructs it
        x[:, :, 5] = a[:, 3:4]
        batches.append(x)
    return cc, batches


def test_planted_artifacts_are_flagged_and_the_genuine_latent_is_not():
    cc, batches = planted_crosscoder()
    result = compute_betas(cc, batches, [0, 1, 2])
    assert result.verdicts() == [GENUINE, COMPLETE_SHRINKAGE, LATENT_DECOUPLING]
    torch.testing.assert_close(result.nu_error[[0, 2]], torch.zeros(2), atol=1e-6, rtol=0)
    assert result.nu_error[1].item() == pytest.approx(1.0)
    assert result.nu_recon[2].item() == pytest.approx(1.0)


def test_sae_nu_act_uses_the_models_activations_as_targets():
    _, batches = planted_crosscoder()
    sae = crosscoder.BatchTopKSAE(d_model=8, dict_size=4, k=1)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_enc.zero_()
        for j in range(3):  # difference directions: latent 0 sees chat-only data
            sae.W_dec[j, 0, j] = 1
            sae.W_enc[j, 0, j] = 1
        sae.W_dec[3, 0, 7] = 1
        sae.threshold.fill_(0.05)
    beta_base, beta_chat, nu = compute_sae_betas(sae, batches, [0, 1, 2])
    assert beta_chat[0].item() == pytest.approx(1.0) and beta_base[0].item() == 0.0
    assert nu[0].item() == 0.0
    assert nu[1:].isnan().all()  # chat − base is zero along e1 and e2: those latents never fire


@pytest.mark.parametrize(
    ("latents", "message"), [([], "latent set is empty"), ([3, 64], r"latent ids \[64\] are out of range")]
)
def test_bad_latent_sets(latents, message):
    cc = crosscoder.load_dictionary(FIXTURE)
    with pytest.raises(ValueError, match=message):
        compute_betas(cc, [torch.zeros(4, 2, 16)], latents)


def test_empty_data_and_single_source_dictionaries_are_refused():
    cc = crosscoder.load_dictionary(FIXTURE)
    with pytest.raises(ValueError, match="no activations"):
        compute_betas(cc, [])
    with pytest.raises(ValueError, match="needs two sources"):
        compute_betas(crosscoder.BatchTopKSAE(16, 64, 4), [torch.zeros(4, 16)])
