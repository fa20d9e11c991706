"""Causal effect of a difference direction (docs/methods.md §10.7).

At block ``layer`` of the chat model each token's component along the unit direction ``v̂`` is removed
(``project_out``: ``h − (h·v̂) v̂``) or set to the base model's value on the same tokens (``base_projection``:
``h − (h·v̂) v̂ + (h^base·v̂) v̂``); the chat model's mean next-token loss is measured on each dataset with and
without the change, and against the same changes along two control families: random unit directions and random
activation differences (``h^chat − h^base`` on one token of a general text, normalised). Every loss is given over
all scored tokens and over those after each row's first ``skip = 20``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crosscoder.errors import ConfigError, DataError
from crosscoder.eval.adl.differences import NORM_SKIP_POSITIONS, pad_right
from crosscoder.eval.adl.patchscope import unit
from crosscoder.eval.adl.relevance import document_text
from crosscoder.eval.kl import assistant_token_mask
from crosscoder.models import decoder_blocks, residual_outputs
from crosscoder.progress import progress_bar

VARIANTS = ("project_out", "base_projection")

SKIP_TOKENS = 20
"""The losses are also reported over the tokens after each row's first this many (docs/methods.md §10.7)."""


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


@torch.no_grad()
def random_activation_differences(
    base: nn.Module,
    chat: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    n: int,
    seed: int,
    *,
    max_length: int = 256,
    skip: int = NORM_SKIP_POSITIONS,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``n`` unit vectors ``[n, d_model]``: ``(h^chat − h^base) / ‖h^chat − h^base‖`` at block ``layer`` on one token
    each, drawn at random (seeded, without replacement while enough tokens exist) among positions ``≥ skip`` of the
    first ``max_length`` tokens of ``texts`` (the attention-sink positions the mean norm skips are left out,
    docs/methods.md §10.1); and the ``(text, position)`` drawn."""
    encode = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)
    rows = [list(ids) for ids in encode["input_ids"]]
    candidates = [(row, position) for row, ids in enumerate(rows) for position in range(skip, len(ids))]
    if not candidates:
        raise DataError(f"no general text has more than {skip} tokens to draw random activation differences from")
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(candidates), generator=generator) for _ in range(-(-n // len(candidates)))])
    drawn = [candidates[int(index)] for index in order[:n]]
    used = sorted({row for row, _ in drawn})
    input_ids, mask = pad_right([rows[row] for row in used], tokenizer.pad_token_id or 0)
    hidden = [
        residual_outputs(model, input_ids.to(model.device), mask.to(model.device), [layer])[:, :, 0].float().cpu()
        for model in (base, chat)
    ]  # each [texts, length, d]
    slot = {row: index for index, row in enumerate(used)}
    differences = torch.stack(
        [hidden[1][slot[row], position] - hidden[0][slot[row], position] for row, position in drawn]
    )
    return torch.stack([unit(difference) for difference in differences]), drawn


def _projection_hook(direction: torch.Tensor, base_hidden: torch.Tensor | None):
    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        u = direction.to(hidden.device, hidden.dtype)
        hidden = hidden - (hidden @ u)[..., None] * u
        if base_hidden is not None:
            hidden = hidden + (base_hidden.to(hidden.dtype) @ u)[..., None] * u
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _loss_sums(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, skip: int):
    """Summed next-token cross-entropy over the targets that are not -100, ``[2]`` float64 on the CPU: all of
    them, and those of tokens at positions ``≥ skip``."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # [batch, S − 1]
    return torch.stack([losses.sum(), losses[:, max(skip - 1, 0) :].sum()]).double().cpu()


@torch.no_grad()
def _losses(
    base: nn.Module,
    chat: nn.Module,
    rows: list[tuple[list[int], list[bool]]],
    layer: int,
    directions: torch.Tensor,
    batch_size: int,
    pad_id: int,
    skip: int,
    progress: bool,
    description: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss sums, each over all scored tokens and over those at positions ``≥ skip``: unpatched ``[2]``, patched
    ``[2, len(VARIANTS), n_directions]``; the numbers of scored tokens ``[2]``."""
    block = decoder_blocks(chat)[layer]
    device = chat.device
    plain = torch.zeros(2, dtype=torch.float64)
    patched = torch.zeros(2, len(VARIANTS), len(directions), dtype=torch.float64)
    n_tokens = torch.zeros(2, dtype=torch.long)
    for first in progress_bar(range(0, len(rows), batch_size), desc=description, unit="batch", enabled=progress):
        group = rows[first : first + batch_size]
        input_ids, mask = pad_right([ids for ids, _ in group], pad_id)
        scored = pad_right([score for _, score in group], False)[0].bool()
        targets = input_ids[:, 1:].masked_fill(~scored[:, 1:], -100).to(device)
        counted = targets != -100
        n_tokens += torch.stack([counted.sum(), counted[:, max(skip - 1, 0) :].sum()]).cpu()
        input_ids, mask = input_ids.to(device), mask.to(device)

        plain += _loss_sums(chat, input_ids, mask, targets, skip)
        h_base = residual_outputs(base, input_ids.to(base.device), mask.to(base.device), [layer])[:, :, 0].to(device)
        for v, variant in enumerate(VARIANTS):
            for d, direction in enumerate(directions):
                hook = _projection_hook(direction, h_base if variant == "base_projection" else None)
                handle = block.register_forward_hook(hook)
                try:
                    patched[:, v, d] += _loss_sums(chat, input_ids, mask, targets, skip)
                finally:
                    handle.remove()
    return plain, patched, n_tokens


def _summary(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation, maximum and the values of a control family's losses."""
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "max": float("nan"), "values": []}
    tensor = torch.tensor(values, dtype=torch.float64)
    std = float(tensor.std()) if len(values) > 1 else 0.0
    return {"mean": float(tensor.mean()), "std": std, "max": float(tensor.max()), "values": values}


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
    n_random_differences: int = 0,
    difference_texts: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 256,
    skip: int = SKIP_TOKENS,
    progress: bool = False,
    description: str = "causal effect",
) -> dict[str, dict[str, Any]]:
    """The chat model's loss on each dataset of ``data`` (name → rows) with ``v̂`` projected out at ``layer`` or set
    to the base model's projection, against two control families (docs/methods.md §10.7): ``n_random`` random unit
    directions and ``n_random_differences`` random activation differences drawn from ``difference_texts``
    (``random_activation_differences``).

    Per dataset: ``{"tokens", "chat", "project_out", "base_projection", "random_project_out": {"mean", "std",
    "max", "values"}, "random_base_projection": {…}, "random_difference_project_out": {…},
    "random_difference_base_projection": {…}, "after_first": {"skip", the same fields over the tokens at
    positions ≥ skip}}`` (mean loss in nats over the scored tokens). With ``progress``, a bar per dataset named
    ``description (<name> data)`` counts its batches."""
    if n_random < 0 or n_random_differences < 0 or batch_size < 1 or max_length < 2 or skip < 0:
        raise ConfigError("n_random and n_random_differences must be ≥ 0, batch_size ≥ 1, max_length ≥ 2, skip ≥ 0")
    if n_random_differences and not difference_texts:
        raise ConfigError("random activation differences need general texts to draw them from (difference_texts)")
    d_model = chat.config.get_text_config().hidden_size
    families = {"": random_directions(d_model, n_random, seed)}
    if n_random_differences:
        families["difference_"] = random_activation_differences(
            base, chat, tokenizer, difference_texts, layer, n_random_differences, seed, max_length=max_length
        )[0]
    directions = torch.cat([unit(vector)[None], *families.values()])
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
            base, chat, prepared, layer, directions, batch_size, pad_id, skip, progress, f"{description} ({name} data)"
        )
        scopes = []
        for part in range(2):
            mean = patched[part] / n_tokens[part] if n_tokens[part] else torch.full_like(patched[part], float("nan"))
            scope: dict[str, Any] = {
                "tokens": int(n_tokens[part]),
                "chat": float(plain[part] / n_tokens[part]) if n_tokens[part] else float("nan"),
            }
            for v, variant in enumerate(VARIANTS):
                scope[variant] = float(mean[v, 0])
                first = 1
                for prefix, family in families.items():
                    scope[f"random_{prefix}{variant}"] = _summary(mean[v, first : first + len(family)].tolist())
                    first += len(family)
            scopes.append(scope)
        results[name] = {**scopes[0], "after_first": {"skip": skip, **scopes[1]}}
    return results
