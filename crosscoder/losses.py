"""Training losses (docs/methods.md §2). All inputs are in the dictionary's normalised space."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: Literal["mse", "l2"]) -> torch.Tensor:
    """x, x_hat: [batch, n_sources, d_model].

    ``mse``: squared error summed over sources and d, mean over the batch.
    ``l2``: unsquared per-source error norm, mean over batch and sources (the reference BatchTopK crosscoders).
    """
    if kind == "mse":
        return _MeanSquaredError.apply(x_hat, x)
    if kind == "l2":
        return (x - x_hat).norm(dim=-1).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}: use 'mse' or 'l2'")


class _MeanSquaredError(torch.autograd.Function):
    """``Σ (x̂ − x)² / batch`` with one temporary of the inputs' size: the error, saved, then scaled in place into
    x̂'s gradient (autograd's chain holds four; a second backward through it is refused by autograd's version
    check). x_hat, x: [batch, ...] of one shape."""

    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x_hat.shape != x.shape:
            raise ValueError(f"x_hat {list(x_hat.shape)} and x {list(x.shape)} must have one shape")
        error = torch.sub(x_hat, x)
        ctx.save_for_backward(error)
        flat = error.view(-1)
        return torch.dot(flat, flat) / x.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (error,) = ctx.saved_tensors
        grad_x_hat = error.mul_(grad * (2 / error.shape[0]))
        grad_x = -grad_x_hat if ctx.needs_input_grad[1] else None
        return (grad_x_hat if ctx.needs_input_grad[0] else None), grad_x


def matryoshka_loss(x: torch.Tensor, prefix_reconstructions: torch.Tensor, kind: Literal["mse", "l2"]) -> torch.Tensor:
    """The mean over nested prefixes of their reconstruction losses, ``(1/g) Σ_i L_rec(x, x̂^(i))`` (docs/methods.md
    §12.1). x: [batch, n_sources, d_model]; prefix_reconstructions: [g, batch, n_sources, d_model]."""
    return torch.stack([reconstruction_loss(x, x_hat, kind) for x_hat in prefix_reconstructions]).mean()


def l1_penalty(values: torch.Tensor, value_code_norms: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``mean_b Σ_j f_j · c_j`` over the active entries. values, value_code_norms: [nnz] (``c`` of each entry's
    latent)."""
    return (values * value_code_norms).sum() / batch_size


def auxk_loss(
    residual: torch.Tensor,
    dead_reconstruction: torch.Tensor,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """AuxK loss ``‖e − ê‖² / ‖e − ē‖²`` (batch means), docs/methods.md §2.4.

    residual e = x − x̂: [batch, n_sources, d_model], detached here (it must not receive gradients);
    dead_reconstruction ê: the top dead latents decoded *without* ``b_dec``, same shape
    (``SparseDictionary.dead_latent_reconstruction``). With ``all_reduce`` (a sum over data-parallel processes)
    the denominator is the global batch's, so averaging the processes' gradients gives the global loss's.
    """
    residual = residual.detach()
    numerator = (residual - dead_reconstruction).pow(2).sum(dim=(1, 2)).mean()
    if all_reduce is None:
        denominator = (residual - residual.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean()
    else:  # Σ‖e − ē‖² = Σ‖e‖² − n‖ē‖² over the global batch
        flat = residual.flatten(1).double()
        sums = all_reduce(torch.cat([flat.sum(0), flat.pow(2).sum().view(1), flat.new_tensor([len(flat)])]))
        count = sums[-1]
        denominator = ((sums[-2] - sums[:-2].pow(2).sum() / count) / count).to(residual.dtype)
    return numerator / denominator.clamp_min(1e-12)
