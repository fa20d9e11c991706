"""The logit lens of a residual-stream vector (docs/methods.md §10.2): ``softmax(W_U · final_norm(v))``.

The final norm and the unembedding are found generically — ``get_output_embeddings()`` for ``W_U`` and the base
model's ``norm`` / ``final_layernorm`` / ``ln_f`` for the norm — and the model's final logit soft-capping
(Gemma-2: ``c · tanh(logits / c)``) is applied, so the lens reads a vector the way the model reads its last
hidden state.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from crosscoder.errors import DataError
from crosscoder.models import decoder_blocks

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
"""Attribute names transformers models give their final norm (Llama/Gemma/Qwen, Phi/OPT, GPT-2/Bloom, …)."""


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the unembedding."""
    candidates = [model.base_model]
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(AttributeError, NotImplementedError):  # some heads define it but cannot answer
            candidates.append(get_decoder())
    for owner in candidates:
        for name in FINAL_NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module) and not isinstance(module, nn.ModuleList):
                return module
    blocks = {id(module) for module in decoder_blocks(model).modules()}
    found = [
        (name.count("."), module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in FINAL_NORM_NAMES and id(module) not in blocks
    ]
    if not found:
        raise DataError(
            f"cannot find the final norm of {type(model).__name__}: the logit lens looks for a module named one of "
            f"{FINAL_NORM_NAMES} outside the decoder blocks"
        )
    return min(found, key=lambda item: item[0])[1]


def unembedding(model: nn.Module) -> nn.Module:
    """The output embedding (``lm_head``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise DataError(f"{type(model).__name__} has no output embeddings: the logit lens needs a causal LM head")
    return head


def softcap(model: nn.Module) -> float | None:
    """The final logit soft-capping constant ``c`` (Gemma-2), or None."""
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def lens_logits(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """Logits the model would give the residual-stream vectors ``[..., d_model]``: ``W_U · final_norm(v)``, soft-capped
    like the model's own; float32 ``[..., vocab]``."""
    norm, head = final_norm(model), unembedding(model)
    weight = head.weight
    hidden = norm(vectors.to(weight.device, weight.dtype))
    logits = head(hidden).float()
    cap = softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decode_tokens(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Each id decoded on its own (special tokens kept)."""
    return [tokenizer.decode([token]) for token in token_ids]


def top_tokens(tokenizer: Any, probs: torch.Tensor, k: int) -> dict[str, list]:
    """The ``k`` most probable tokens of ``probs [vocab]``: decoded strings, ids and probabilities."""
    k = min(k, probs.shape[-1])
    values, indices = probs.topk(k)
    ids = indices.tolist()
    return {"tokens": decode_tokens(tokenizer, ids), "token_ids": ids, "probs": [float(p) for p in values]}


@torch.no_grad()
def logit_lens(vector: torch.Tensor, model: nn.Module, tokenizer: Any, k: int = 20) -> dict[str, Any]:
    """Top-``k`` tokens of ``softmax(W_U · final_norm(v))`` and of the inverse ``−v`` (docs/methods.md §10.2).

    Returns ``{"tokens", "token_ids", "probs", "inverse": {"tokens", "token_ids", "probs"}}``; plain JSON."""
    vector = torch.as_tensor(vector).reshape(-1)
    logits = lens_logits(model, torch.stack([vector, -vector]))
    probs = torch.softmax(logits, dim=-1).cpu()
    result = top_tokens(tokenizer, probs[0], k)
    result["inverse"] = top_tokens(tokenizer, probs[1], k)
    return result
