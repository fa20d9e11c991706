"""Training losses (docs/methods.md §2). All inputs are in the dictionary's normalised space."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch


def reconstruction_losses(errors: torch.Tensor, kind: Literal["mse", "l2"]) -> torch.Tensor:
    """The reconstruction loss of each of ``g`` reconstructions: [g]. errors: x̂ − x [g, batch, n_sources, d_model]
    (``TrainingOutput.reconstruction_errors``: a Matryoshka dictionary's prefixes, else g = 1).

    ``mse``: squared error summed over sources and d, mean over the batch.
    ``l2``: unsquared per-source error norm, mean over batch and sources (the reference BatchTopK crosscoders).
    A Matryoshka dictionary fits their mean, ``(1/g) Σ_i L_rec(x, x̂^(i))`` (docs/methods.md §12.1).
    """
    if errors.dim() != 4:
        raise ValueError(f"errors must be [g, batch, n_sources, d_model], got shape {list(errors.shape)}")
    if kind == "mse":
        return _MeanSquaredErrors.apply(errors)
    if kind == "l2":
        return errors.norm(dim=-1).mean(dim=(1, 2))
    raise ValueError(f"unknown reconstruction loss {kind!r}: use 'mse' or 'l2'")


class _MeanSquaredErrors(torch.autograd.Function):
    """``Σ error_i² / batch`` of each of g errors [g, batch, ...] → [g], without a temporary: the errors are saved
    and scaled in place into their own gradient by the backward (autograd's chain would hold three more of their
    size), so the backward spends them, and a second backward through them is refused by autograd's version check."""

    @staticmethod
    def forward(ctx, errors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(errors)
        flat = errors.reshape(len(errors), -1)
        return torch.stack([torch.dot(row, row) for row in flat]) / errors.shape[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (errors,) = ctx.saved_tensors
        scale = grad * (2 / errors.shape[1])
        return errors.mul_(scale.view(-1, *[1] * (errors.dim() - 1)))


def l1_penalty(values: torch.Tensor, value_code_norms: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``mean_b Σ_j f_j · c_j`` over the active entries. values, value_code_norms: [nnz] (``c`` of each entry's
    latent)."""
    return (values * value_code_norms).sum() / batch_size


def auxk_loss(
    error: torch.Tensor,
    dead_reconstruction: torch.Tensor,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """AuxK loss ``‖e − ê‖² / ‖e − ē‖²`` (batch means) of the residual ``e = x − x̂``, docs/methods.md §2.4.

    error: x̂ − x = −e [batch, n_sources, d_model], detached here (the residual must not receive gradients):
    ``e − ê = −(error + ê)`` and ``e − ē = −(error − mean(error))`` exactly, so both norms are taken of those;
    dead_reconstruction ê: the top dead latents decoded *without* ``b_dec``, same shape
    (``SparseDictionary.dead_latent_reconstruction``). With ``all_reduce`` (a sum over data-parallel processes)
    the denominator is the global batch's, so averaging the processes' gradients gives the global loss's.
    """
    error = error.detach()
    numerator = (error + dead_reconstruction).pow(2).sum(dim=(1, 2)).mean()
    if all_reduce is None:
        denominator = (error - error.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean()
    else:  # Σ‖e − ē‖² = Σ‖e‖² − n‖ē‖² over the global batch
        flat = error.flatten(1).double()
        sums = all_reduce(torch.cat([flat.sum(0), flat.pow(2).sum().view(1), flat.new_tensor([len(flat)])]))
        count = sums[-1]
        denominator = ((sums[-2] - sums[:-2].pow(2).sum() / count) / count).to(error.dtype)
    return numerator / denominator.clamp_min(1e-12)
