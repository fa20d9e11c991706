"""One full training step on the sparse kernels equals the dense reference step: loss and every gradient."""

import pytest
import torch
import torch.nn.functional as F

import crosscoder
from crosscoder.kernels.backend import use_backend
from crosscoder.losses import auxk_loss, l1_penalty, reconstruction_loss


def dense_step(dictionary, x_normalized, k, dead, k_aux):
    """The textbook dense step: dense ReLU codes, torch.topk over the flattened scores, dense decode, dense AuxK."""
    encoder_input = x_normalized - dictionary.b_dec if dictionary.subtracts_decoder_bias else x_normalized
    activations = F.relu(encoder_input.flatten(1) @ dictionary.W_enc.flatten(1).T + dictionary.b_enc)
    code_norms = dictionary.code_norms()
    if dictionary.uses_batch_topk:
        scores = (activations * code_norms).detach()
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[scores.flatten().topk(k * len(scores)).indices] = True
        codes = activations * kept.view_as(scores)
    else:
        codes = activations
    flat_decoder = dictionary.W_dec.flatten(1)
    reconstruction = (codes @ flat_decoder).view_as(x_normalized) + dictionary.b_dec
    loss = reconstruction_loss(x_normalized, reconstruction, "mse")
    if dictionary.uses_batch_topk:
        dead_scores = torch.where(dead, (activations * code_norms).detach(), -1.0)
        top = dead_scores.topk(k_aux, dim=-1)
        aux_codes = torch.zeros_like(activations).scatter(-1, top.indices, activations.gather(-1, top.indices))
        aux_codes = aux_codes * (torch.zeros_like(activations).scatter(-1, top.indices, (top.values > 0).float()))
        loss = loss + auxk_loss(x_normalized - reconstruction, (aux_codes @ flat_decoder).view_as(x_normalized)) / 32
    else:
        loss = loss + 0.1 * (codes * code_norms).sum(-1).mean()
    return loss


def sparse_step(dictionary, x_normalized, k, dead, k_aux):
    """What crosscoder.train runs (Trainee.step), on the sparse kernels."""
    out = dictionary.training_forward(x_normalized, k)
    loss = reconstruction_loss(x_normalized, out.reconstruction, "mse")
    if dictionary.uses_batch_topk:
        ahat = dictionary.dead_latent_reconstruction(out, dead, k_aux)
        loss = loss + auxk_loss(x_normalized - out.reconstruction, ahat) / 32
    else:
        loss = loss + 0.1 * l1_penalty(out.values, dictionary.code_norms()[out.codes.latents], len(x_normalized))
    return loss


def make(kind):
    torch.manual_seed(0)
    if kind == "batchtopk":
        dictionary = crosscoder.BatchTopKCrossCoder(d_model=12, dict_size=40, k=3)
        x = torch.randn(9, 2, 12)
    elif kind == "sae":
        dictionary = crosscoder.BatchTopKSAE(d_model=12, dict_size=40, k=3)
        x = torch.randn(9, 12)
    else:
        dictionary = crosscoder.L1CrossCoder(d_model=12, dict_size=40, init_decoder_norm=0.3)
        x = torch.randn(9, 2, 12)
    with torch.no_grad():
        dictionary.b_dec.normal_(std=0.1)
        dictionary.b_enc.normal_(std=0.1)
    return dictionary, dictionary.normalize(x)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["batchtopk", "sae", "l1"])
def test_sparse_step_equals_dense_step(kind, backend):
    dictionary, x_normalized = make(kind)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    gradients = {}
    losses = {}
    for name, step in (("dense", dense_step), ("sparse", sparse_step)):
        dictionary.zero_grad(set_to_none=True)
        with use_backend(backend if name == "sparse" else "reference"):
            loss = step(dictionary, x_normalized, 3, dead, 4)
            loss.backward()
        losses[name] = loss.detach()
        gradients[name] = {n: p.grad.clone() for n, p in dictionary.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["sparse"], losses["dense"], rtol=1e-5, atol=1e-6)
    assert gradients["sparse"].keys() == gradients["dense"].keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in gradients["dense"]:
        torch.testing.assert_close(gradients["sparse"][name], gradients["dense"][name], rtol=1e-4, atol=1e-5)
