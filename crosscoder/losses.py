"""Training losses (DESIGN §4). All inputs are in the dictionary's normalised space."""

from __future__ import annotations

from typing import Literal

import torch


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: Literal["mse", "l2"]) -> torch.Tensor:
    """x, x_hat: [batch, n_sources, d_model].

    ``mse``: squared error summed over sources and d, mean over the batch.
    ``l2``: unsquared per-source error norm, mean over batch and sources (the reference BatchTopK crosscoders).
    """
    error = x - x_hat
    if kind == "mse":
        return error.pow(2).sum(dim=(1, 2)).mean()
    if kind == "l2":
        return error.norm(dim=-1).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}: use 'mse' or 'l2'")


def l1_penalty(codes: torch.Tensor, code_norms: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_j f_j · c_j``. codes: [batch, dict_size]; code_norms: [dict_size]."""
    return (codes * code_norms).sum(dim=-1).mean()


def auxk_loss(
    residual: torch.Tensor,
    activations: torch.Tensor,
    code_norms: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    W_dec: torch.Tensor,
) -> torch.Tensor:
    """AuxK loss on dead latents: ``‖e − ê‖² / ‖e − ē‖²`` (batch means), DESIGN §4.

    residual e: [batch, n_sources, d_model], detached here (x − x̂ must not receive gradients);
    activations: [batch, dict_size] ReLU activations; dead: [dict_size] bool; W_dec: [dict_size, n_sources, d_model].
    Each token decodes its top-``k_aux`` dead latents by score ``f · c`` *without* ``b_dec``.
    Returns 0 when no latent is dead (without a host-device sync).
    """
    residual = residual.detach()
    k_aux = min(k_aux, activations.shape[-1])
    if k_aux <= 0:
        return residual.new_zeros(())
    scores = torch.where(dead, activations * code_norms, torch.full_like(activations, -1.0))
    top = scores.topk(k_aux, dim=-1)
    values = activations.gather(-1, top.indices) * (top.values > 0)
    aux_codes = torch.zeros_like(activations).scatter(-1, top.indices, values)
    decoded = (aux_codes @ W_dec.flatten(1)).view_as(residual)
    numerator = (residual - decoded).pow(2).sum(dim=(1, 2)).mean()
    denominator = (residual - residual.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean()
    return numerator / denominator.clamp_min(1e-12) * dead.any()
