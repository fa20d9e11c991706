"""Sparse encoder backward: gradients of the active pre-activations only (docs/methods.md §4.4).

The forward pre-activations ``pre = x @ W_enc.T + b_enc`` (B, F) come from one dense GEMM run *without*
autograd (the selection needs every score; nothing of it is kept for backward). ``gather_active`` then attaches
the active entries ``pre[rows[e], latents[e]]`` (nnz,) to the graph as if they had been computed from
``x``, ``W_enc`` and ``b_enc``: identity in forward, and in backward, with ``g`` the gradient of the entries,

- ``∂W_enc[j] = Σ_{e: latents[e] = j} g[e] · x[rows[e]]``  (``latent_scatter_sum``, the same kernel as ``∂W_dec``)
- ``∂b_enc[j] = Σ_{e: latents[e] = j} g[e]``                (``latent_value_sums``)
- ``∂x[b]     = Σ_{e in row b} g[e] · W_enc[latents[e]]``   (``row_gather_sum``, the decode forward's kernel)

all O(nnz · D): the encoder GEMM is the only dense work of a training step. When the input is centred,
``x = x₀ − center`` with a constant ``x₀`` (the SAE's ``x − b_dec``), only ``center`` needs a gradient, and

- ``∂center   = −Σ_b ∂x[b] = −Σ_j ∂b_enc[j] · W_enc[j]``     (one (F,) × (F, D) product)

costs O(F · D) and reuses ``∂b_enc``: ``∂x`` (O(nnz · D)) is never formed. Kernels and dispatch live in
``sparse_decode.py`` and ``backend.py``.

Typical use in a training forward (x: (B, D) with D = n_sources · d_model)::

    with torch.no_grad():
        pre = x @ W_enc.T + b_enc
        scores = F.relu(pre) * code_norms
        mask = batch_topk_mask(scores, k * B) & (scores > 0)
    codes = SparseCodes.from_mask(mask)
    values = F.relu(gather_active(codes.gather(pre), x, W_enc, b_enc, codes))
    reconstruction = sparse_decode(values, codes, W_dec)
"""

from __future__ import annotations

import torch

from crosscoder.kernels.backend import check_float_tensor, check_same_dtype
from crosscoder.kernels.sparse_codes import SparseCodes
from crosscoder.kernels.sparse_decode import WeightGradient, latent_scatter_sum, latent_value_sums, row_gather_sum


def pre_activations(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The encoder's pre-activations ``x @ weight.T + bias`` [batch, n] (x: [batch, width], weight: [n, width], bias:
    [n]; ``out``: where to write them, without autograd). On CPU the product, then the bias added to it — one float
    sum per entry, which the blocked selection's C scan adds as it reads a block of products (``block_candidates``),
    so every CPU path forms the same floats (an ``addmm`` rounds differently: MKL adds the bias inside the GEMM;
    with the bias in the scan, a training step at B = 4,096, F = 16,384 writes and reads no [B, F] bias copy);
    elsewhere one ``addmm`` (the bias in the GEMM's epilogue)."""
    if x.device.type == "cpu":
        return torch.mm(x, weight.T, out=out).add_(bias)
    return torch.addmm(bias, x, weight.T, out=out)


class GatherActive(torch.autograd.Function):
    """values (nnz,) = pre_active_values, differentiable as ``(x @ W_enc.T + b_enc)[rows, latents]``, with
    ``x = x₀ − center`` for a constant x₀ when ``center`` is given."""

    @staticmethod
    def forward(
        ctx,
        pre_active_values: torch.Tensor,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        codes: SparseCodes,
        center: torch.Tensor | None,
        weight_gradient: WeightGradient | None,
    ) -> torch.Tensor:
        ctx.codes, ctx.weight_gradient = codes, weight_gradient
        ctx.save_for_backward(x, W_enc)
        return pre_active_values.clone()

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, W_enc = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        needs_pre, needs_x, needs_weight, needs_bias, _, needs_center, _ = ctx.needs_input_grad
        grad = grad_values.contiguous().to(W_enc.dtype)
        grad_x = row_gather_sum(grad, codes, W_enc) if needs_x else None
        grad_weight = None
        if needs_weight:
            materialise = latent_scatter_sum if ctx.weight_gradient is None else ctx.weight_gradient
            grad_weight = materialise(grad, codes, x)
        grad_bias = latent_value_sums(grad, codes) if needs_bias or needs_center else None
        grad_center = torch.mv(W_enc.T, grad_bias).neg_() if needs_center else None
        return (
            grad_values if needs_pre else None,
            grad_x,
            grad_weight,
            grad_bias if needs_bias else None,
            None,
            grad_center,
            None,
        )


def gather_active(
    pre_active_values: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    codes: SparseCodes,
    center: torch.Tensor | None = None,
    weight_gradient: WeightGradient | None = None,
) -> torch.Tensor:
    """Attach the active pre-activations to the graph with a sparse encoder backward.

    pre_active_values: (nnz,) ``(x @ W_enc.T + b_enc)[codes.rows, codes.latents]`` computed without autograd
    (``codes.gather(pre)``); x: (B, D); W_enc: (F, D) contiguous (``W_enc.flatten(1)``); b_enc: (F,).
    All share one dtype. Returns a (nnz,) copy of ``pre_active_values``; gradients reach ``W_enc``, ``b_enc``
    and, if it requires grad, ``x``, each in its own dtype.

    center: (D,) or None. Given, ``x`` is ``x₀ − center`` for an ``x₀`` that needs no gradient (the SAE's
    ``x − b_dec``), formed without autograd: ``center`` receives ``−Σ_b ∂x[b] = −∂b_enc @ W_enc`` (O(F · D))
    in place of the O(nnz · D) ``∂x``.

    weight_gradient: how the backward materialises ``∂W_enc`` (``WeightGradient``; None: a new tensor).
    """
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes must be SparseCodes, got {type(codes).__name__}: build with SparseCodes.from_mask")
    check_float_tensor("pre_active_values", pre_active_values, (codes.nnz,), codes.device)
    check_float_tensor("W_enc", W_enc, (codes.dict_size, None), codes.device)
    check_float_tensor("x", x, (codes.batch_size, W_enc.shape[1]), codes.device)
    check_float_tensor("b_enc", b_enc, (codes.dict_size,), codes.device)
    check_same_dtype(pre_active_values=pre_active_values, x=x, W_enc=W_enc, b_enc=b_enc)
    if center is not None:
        check_float_tensor("center", center, (W_enc.shape[1],), codes.device)
        check_same_dtype(x=x, center=center)
        if x.requires_grad:
            raise ValueError(
                "x requires grad although center is given: form x = x0 - center without autograd (torch.no_grad), "
                "center then receives the gradient of x; or pass center=None to take the gradient through x"
            )
    return GatherActive.apply(pre_active_values, x, W_enc, b_enc, codes, center, weight_gradient)
