"""Patchscope of a residual-stream vector (docs/methods.md §10.3).

The unit vector ``v̂`` times ``norm · s`` *replaces* the output of block ``layer`` at the last position of each
identity prompt; the model's next-token distribution there says what the vector means to it. Per scale: each
prompt's top ``top_k`` tokens, only the tokens in every prompt's top set, their probabilities averaged over the
prompts, the ``keep`` most probable. A grader picks one scale (docs/methods.md §10.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from crosscoder.errors import ConfigError
from crosscoder.eval.adl.graders import Grader, OfflineGrader
from crosscoder.eval.adl.lens import decode_tokens
from crosscoder.models import decoder_blocks

IDENTITY_PROMPTS = (
    "man -> man\n1135 -> 1135\nhello -> hello\n?",
    "bear -> bear\n42 -> 42\nblue -> blue\n?",
    "921 -> 921\ntarget -> target\nanna -> anna\n?",
)
"""Prompts whose natural continuation repeats the token at the last position."""


def default_scales() -> tuple[float, ...]:
    """0.5–2.0 in steps of 0.1, then 3, 4, 5, 10, 20, then linspace(20, 200, 10); sorted, without repeats."""
    scales = [round(0.5 + 0.1 * step, 1) for step in range(16)] + [3.0, 4.0, 5.0, 10.0, 20.0]
    scales += [round(float(value), 6) for value in torch.linspace(20, 200, 10).tolist()]
    return tuple(sorted(set(scales)))


DEFAULT_SCALES = default_scales()


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` in float32; ``ConfigError`` for a zero vector."""
    vector = torch.as_tensor(vector).reshape(-1).float()
    length = vector.norm()
    if not torch.isfinite(length) or length == 0:
        raise ConfigError("the vector is zero or not finite: it has no direction to patch or steer with")
    return vector / length


def replace_last_position(replacement: torch.Tensor):
    """A forward hook on a decoder block that replaces its output at the last position by ``replacement [batch, d]``."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, -1] = replacement.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def last_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position ``[batch, vocab]`` (float32), computing only those when the model allows."""
    mask = torch.ones_like(input_ids)
    try:
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
    except TypeError:
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return logits[:, -1].float()


@torch.no_grad()
def patched_distributions(
    vector: torch.Tensor,
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    scales: Sequence[float],
    *,
    norm: float,
    prompts: Sequence[str] = IDENTITY_PROMPTS,
) -> torch.Tensor:
    """Next-token probabilities ``[n_prompts, n_scales, vocab]`` with ``s · norm · v̂`` as block ``layer``'s output at
    each prompt's last position."""
    direction = unit(vector)
    block = decoder_blocks(model)[layer]
    patches = torch.tensor([float(s) for s in scales])[:, None] * float(norm) * direction[None]  # [S, d]
    device = model.device
    result = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"].to(device)
        handle = block.register_forward_hook(replace_last_position(patches.to(device)))
        try:
            logits = last_logits(model, ids.repeat(len(patches), 1))
        finally:
            handle.remove()
        result.append(torch.softmax(logits, dim=-1).cpu())
    return torch.stack(result)


@torch.no_grad()
def patchscope(
    vector: torch.Tensor,
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    norm: float | None = None,
    prompts: Sequence[str] = IDENTITY_PROMPTS,
    top_k: int = 16_384,
    keep: int = 20,
    grader: Grader | None = None,
) -> dict[str, Any]:
    """Patchscope of ``vector`` at ``layer`` over ``scales`` (docs/methods.md §10.3).

    ``norm`` is the patched model's mean activation norm (``MeanDifferences.norms``); None takes ``‖vector‖``. Returns
    ``{"scale", "tokens", "token_ids", "probs", "grader", "reason", "norm", "scales": [{"scale", "tokens",
    "token_ids", "probs", "agreement"}, …]}`` where the top-level tokens are those of the chosen scale."""
    if not scales:
        raise ConfigError("no Patchscope scales given")
    if top_k < 1 or keep < 1:
        raise ConfigError("top_k and keep must be positive")
    norm = float(torch.as_tensor(vector).float().norm()) if norm is None else float(norm)
    grader = grader or OfflineGrader()
    probs = patched_distributions(vector, model, tokenizer, layer, scales, norm=norm, prompts=prompts)
    n_prompts, _, vocab = probs.shape
    top_sets = torch.zeros_like(probs, dtype=torch.bool)
    top_sets.scatter_(-1, probs.topk(min(top_k, vocab), dim=-1).indices, True)
    in_all = top_sets.all(dim=0)  # [S, vocab]
    averaged = (probs * in_all).mean(dim=0)  # [S, vocab]
    own_top = probs.topk(min(keep, vocab), dim=-1).indices  # [P, S, keep]
    candidates = []
    for index, scale in enumerate(scales):
        values, ids = averaged[index].topk(min(keep, vocab))
        ids, values = ids[values > 0], values[values > 0]
        kept = set(ids.tolist())
        agreement = (
            sum(len(kept & set(own_top[p, index].tolist())) for p in range(n_prompts)) / (n_prompts * len(kept))
            if kept
            else 0.0
        )
        candidates.append(
            {
                "scale": float(scale),
                "tokens": decode_tokens(tokenizer, ids.tolist()),
                "token_ids": ids.tolist(),
                "probs": [float(p) for p in values],
                "agreement": float(agreement),
            }
        )
    chosen, reason = grader.choose_scale(candidates)
    best = candidates[chosen]
    return {
        "scale": best["scale"],
        "tokens": best["tokens"],
        "token_ids": best["token_ids"],
        "probs": best["probs"],
        "grader": grader.name,
        "reason": reason,
        "norm": norm,
        "scales": candidates,
    }
