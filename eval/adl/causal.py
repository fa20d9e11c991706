"""Causal effect of a difference direction (docs/methods.md §10.7).

At block ``layer`` of the chat model each token's component along the unit direction ``v̂`` is removed
(``project_out``: ``h − (h·v̂) v̂``) or set to the base model's value on the same tokens (``base_projection``:
``h − (h·v̂) v̂ + (h^base·v̂) v̂``); the chat model's mean next-token loss is measured on each dataset with and
without the change, and against the same changes along random unit directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crosscoder.errors import ConfigError, DataError
from crosscoder.eval.adl.patchscope import unit
from crosscoder.eval.adl.relevance import document_text
from crosscoder.eval.kl import assistant_token_mask
from crosscoder.models import decoder_blocks, residual_outputs
from crosscoder.progress import progress_bar

VARIANTS = ("project_out", "base_projection")


def scored_tokens(tokenizer: Any, row: Any, max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids of a data row and which of them the loss scores: every token of a text (``str`` or ``{"text"}``),
    the assistant tokens of a conversation (``{"messages"}`` or a message list, rendered with the chat template)."""
    messages = row.get("messages") if isinstance(row, dict) and "text" not in row else row
    if isinstance(messages, list) and getattr(tokenizer, "chat_template", None):
        ids, positions = assistant_token_mask(tokenizer, messages)
        scored = [position >= 0 for position in positions]
    else:
        encoded = tokenizer(document_text(row), add_special_tokens=True, truncation=True, max_length=max_length)
        ids = list(encoded["input_ids"])
        scored = [True] * len(ids)
    return ids[:max_length], scored[:max_length]


def random_directions(d_model: int, n: int, seed: int) -> torch.Tensor:
    """``n`` random unit vectors ``[n, d_model]`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, d_model, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True)


def _projection_hook(direction: torch.Tensor, base_hidden: torch.Tensor | None):
    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        u = direction.to(hidden.device, hidden.dtype)
        hidden = hidden - (hidden @ u)[..., None] * u
        if base_hidden is not None:
            hidden = hidden + (base_hidden.to(hidden.dtype) @ u)[..., None] * u
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _loss_sum(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets that are not -100 (float64, on the CPU)."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum").double().cpu()


@torch.no_grad()
def _losses(
    base: nn.Module,
    chat: nn.Module,
    rows: list[tuple[list[int], list[bool]]],
    layer: int,
    directions: torch.Tensor,
    batch_size: int,
    pad_id: int,
    progress: bool,
    description: str,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Loss sums: unpatched (scalar) and ``[len(VARIANTS), n_directions]``; the number of scored tokens."""
    block = decoder_blocks(chat)[layer]
    device = chat.device
    plain = torch.zeros((), dtype=torch.float64)
    patched = torch.zeros(len(VARIANTS), len(directions), dtype=torch.float64)
    n_tokens = 0
    for first in progress_bar(range(0, len(rows), batch_size), desc=description, enabled=progress):
        group = rows[first : first + batch_size]
        length = max(len(ids) for ids, _ in group)
        input_ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        scored = torch.zeros(len(group), length, dtype=torch.bool)
        for row, (ids, score) in enumerate(group):
            input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
            scored[row, : len(ids)] = torch.tensor(score)
        targets = input_ids[:, 1:].masked_fill(~scored[:, 1:], -100).to(device)
        n_tokens += int((targets != -100).sum())
        input_ids, mask = input_ids.to(device), mask.to(device)

        plain += _loss_sum(chat, input_ids, mask, targets)
        h_base = residual_outputs(base, input_ids.to(base.device), mask.to(base.device), [layer])[:, :, 0].to(device)
        for v, variant in enumerate(VARIANTS):
            for d, direction in enumerate(directions):
                hook = _projection_hook(direction, h_base if variant == "base_projection" else None)
                handle = block.register_forward_hook(hook)
                try:
                    patched[v, d] += _loss_sum(chat, input_ids, mask, targets)
                finally:
                    handle.remove()
    return plain, patched, n_tokens


@torch.no_grad()
def causal_effect(
    base: nn.Module,
    chat: nn.Module,
    tokenizer: Any,
    vector: torch.Tensor,
    layer: int,
    data: dict[str, Sequence[Any]],
    *,
    n_random: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """The chat model's loss on each dataset of ``data`` (name → rows) with ``v̂`` projected out at ``layer`` or set
    to the base model's projection, against ``n_random`` random unit directions (docs/methods.md §10.7).

    Per dataset: ``{"tokens", "chat", "project_out", "base_projection", "random_project_out": {"mean", "max",
    "values"}, "random_base_projection": {…}}`` (mean loss in nats over the scored tokens)."""
    if n_random < 0 or batch_size < 1 or max_length < 2:
        raise ConfigError("n_random must be ≥ 0, batch_size ≥ 1 and max_length ≥ 2")
    d_model = chat.config.get_text_config().hidden_size
    directions = torch.cat([unit(vector)[None], random_directions(d_model, n_random, seed)])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: dict[str, dict[str, Any]] = {}
    for name, rows in data.items():
        prepared = [scored_tokens(tokenizer, row, max_length) for row in rows]
        prepared = [(ids, score) for ids, score in prepared if len(ids) >= 2 and any(score[1:])]
        if not prepared:
            raise DataError(
                f"the {name} data has no tokens to score: a text needs ≥ 2 tokens, a conversation an assistant token "
                f"within its first {max_length} tokens (raise --causal-max-length)"
            )
        plain, patched, n_tokens = _losses(
            base, chat, prepared, layer, directions, batch_size, pad_id, progress, f"causal effect ({name})"
        )
        mean = patched / n_tokens
        entry: dict[str, Any] = {"tokens": n_tokens, "chat": float(plain / n_tokens)}
        for v, variant in enumerate(VARIANTS):
            entry[variant] = float(mean[v, 0])
            values = mean[v, 1:].tolist()
            entry[f"random_{variant}"] = {
                "mean": sum(values) / len(values) if values else float("nan"),
                "max": max(values) if values else float("nan"),
                "values": values,
            }
        results[name] = entry
    return results
