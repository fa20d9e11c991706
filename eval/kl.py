"""Downstream KL: how much of the chat model's behaviour a dictionary's difference explains (docs/methods.md §8).

In the chat model at layer L the residual stream is replaced by a patch built from both models' activations
``h_base, h_chat: [tokens, d_model]``, the chat model is continued, and ``KL(P_chat ‖ P_patched)`` is averaged
over assistant tokens — the first ``first_tokens`` of each assistant message and the rest separately. The
reference patch ``h_base`` gives the gap ``KL(P_chat ‖ P_base-patched)``; a patch closes the fraction
``1 − KL_patch / KL_gap`` of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crosscoder.dictionary import BatchTopKSAE, SparseDictionary
from crosscoder.dictionary_input import BASE, CHAT
from crosscoder.errors import ConfigError, DataError
from crosscoder.eval.directions import decoder_directions
from crosscoder.models import decoder_blocks, residual_outputs
from crosscoder.progress import progress_bar

Patch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BASE_PATCH = "base"


def crosscoder_patch(crosscoder: SparseDictionary) -> Patch:
    """``h_base + (x̂^chat − x̂^base)``: the crosscoder's full reconstruction of the difference."""

    def patch(h_base: torch.Tensor, h_chat: torch.Tensor) -> torch.Tensor:
        paired = crosscoder.input_from_pair(torch.stack([h_base, h_chat], dim=1).float())
        x_hat = crosscoder.decode(crosscoder.encode(paired))
        return h_base + (x_hat[:, CHAT] - x_hat[:, BASE]).to(h_base.dtype)

    return patch


def latent_subset_patch(crosscoder: SparseDictionary, latents: torch.Tensor | list[int]) -> Patch:
    """``h_base + Σ_{j∈S} f_j (d_j^chat − d_j^base)`` with raw-space decoder rows."""
    ids = torch.as_tensor(latents, dtype=torch.long)
    if ids.numel() == 0:
        raise ConfigError("the latent set is empty: name at least one latent to patch")
    directions = decoder_directions(crosscoder, ids)
    difference = directions["chat"] - directions["base"]  # [|S|, d]

    def patch(h_base: torch.Tensor, h_chat: torch.Tensor) -> torch.Tensor:
        paired = crosscoder.input_from_pair(torch.stack([h_base, h_chat], dim=1).float())
        codes = crosscoder.encode(paired)[:, ids.to(h_base.device)]
        return h_base + (codes @ difference.to(codes.device)).to(h_base.dtype)

    return patch


def diff_sae_patch(sae: BatchTopKSAE) -> Patch:
    """``h_base + SAE(h_chat − h_base)`` for a chat − base SAE; ``h_base − SAE(h_base − h_chat)`` for a base − chat
    one (either way the patch estimates h_chat from h_base and the SAE's reconstruction of the difference)."""
    sign = _difference_sign(sae)

    def patch(h_base: torch.Tensor, h_chat: torch.Tensor) -> torch.Tensor:
        difference = sae.input_from_pair(torch.stack([h_base, h_chat], dim=1).float())
        return h_base + (sign * sae(difference)).to(h_base.dtype)

    return patch


def sae_latent_subset_patch(sae: BatchTopKSAE, latents: torch.Tensor | list[int]) -> Patch:
    """``h_base ± Σ_{j∈S} f_j d_j`` with raw-space decoder rows: the part of a diff-SAE's reconstruction of the
    difference that the latents S carry (``+`` for a chat − base SAE, ``−`` for base − chat)."""
    ids = torch.as_tensor(latents, dtype=torch.long)
    if ids.numel() == 0:
        raise ConfigError("the latent set is empty: name at least one latent to patch")
    _difference_sign(sae)  # a difference SAE only
    directions = decoder_directions(sae, ids)["chat"]  # [|S|, d], signed to point from base to chat

    def patch(h_base: torch.Tensor, h_chat: torch.Tensor) -> torch.Tensor:
        difference = sae.input_from_pair(torch.stack([h_base, h_chat], dim=1).float())
        codes = sae.encode(difference)[:, ids.to(h_base.device)]
        return h_base + (codes @ directions.to(codes.device)).to(h_base.dtype)

    return patch


def _difference_sign(sae: BatchTopKSAE) -> float:
    """+1 when the SAE reads chat − base, −1 for base − chat (h_chat ≈ h_base + sign · difference)."""
    if not sae.input.is_difference:
        raise ConfigError(
            f"the KL patch needs a difference SAE, but this SAE reads {sae.input.describe()}: train it with "
            "input chat_minus_base (or base_minus_chat)"
        )
    return 1.0 if sae.input.kind == "chat_minus_base" else -1.0


def assistant_token_mask(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and, per token, its position within an assistant message
    (-1 outside assistant messages). Positions come from rendering growing prefixes of the conversation."""
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    positions = [-1] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: index + 1], add_generation_prompt=False))
        for position in range(start, min(end, len(ids))):
            positions[position] = position - start
    return ids, positions


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclass(frozen=True)
class KLResult:
    """Mean KL(P_chat ‖ P_patched) in nats per patch, on the first assistant tokens and on the rest, and the
    fraction of the base-patch gap each patch closes (on all assistant tokens)."""

    first_tokens: dict[str, float]
    rest: dict[str, float]
    all_tokens: dict[str, float]
    gap_closed: dict[str, float]
    n_first: int
    n_rest: int


@torch.no_grad()
def downstream_kl(
    base_model: nn.Module,
    chat_model: nn.Module,
    tokenizer: Any,
    conversations: Iterable[list[dict[str, str]]],
    layer: int,
    patches: dict[str, Patch],
    *,
    first_tokens: int = 5,
    batch_size: int = 8,
    max_length: int = 1024,
    progress: bool = False,
) -> KLResult:
    """KL of the chat model's next-token distribution under each patch at ``layer`` (block output L)."""
    if BASE_PATCH in patches:
        raise ConfigError(f"'{BASE_PATCH}' names the reference patch h_base; call yours something else")
    all_patches = {BASE_PATCH: lambda h_base, h_chat: h_base, **patches}
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in all_patches}
    counts = torch.zeros(2, dtype=torch.long)
    rendered = [assistant_token_mask(tokenizer, messages) for messages in conversations]
    rendered = [(ids[:max_length], pos[:max_length]) for ids, pos in rendered if any(p >= 0 for p in pos)]
    if not rendered:
        raise DataError("no conversation has an assistant message: KL is measured on assistant tokens")
    block = decoder_blocks(chat_model)[layer]
    for first in progress_bar(range(0, len(rendered), batch_size), desc="downstream KL", enabled=progress):
        group = rendered[first : first + batch_size]
        length = max(len(ids) for ids, _ in group)
        input_ids = torch.zeros(len(group), length, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        position = torch.full_like(input_ids, -1)
        for row, (ids, pos) in enumerate(group):
            input_ids[row, : len(ids)], attention[row, : len(ids)] = torch.tensor(ids), 1
            position[row, : len(ids)] = torch.tensor(pos)
        device = chat_model.device
        input_ids, attention = input_ids.to(device), attention.to(device)
        h_base = residual_outputs(
            base_model, input_ids.to(base_model.device), attention.to(base_model.device), [layer]
        )[:, :, 0].to(device)
        h_chat = residual_outputs(chat_model, input_ids, attention, [layer])[:, :, 0]
        chat_logprobs = F.log_softmax(chat_model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
        # the distribution at position t predicts token t + 1: score t when token t + 1 is an assistant token
        predicted = torch.cat([position[:, 1:], torch.full_like(position[:, :1], -1)], dim=1)
        scored = predicted >= 0
        is_first = scored & (predicted < first_tokens)
        counts += torch.stack([is_first.sum(), (scored & ~is_first).sum()])
        flat_base, flat_chat = h_base.reshape(-1, h_base.shape[-1]), h_chat.reshape(-1, h_chat.shape[-1])
        for name, patch in all_patches.items():
            patched = patch(flat_base, flat_chat).reshape(h_chat.shape)
            handle = block.register_forward_hook(_replace_output(patched))
            try:
                logits = chat_model(input_ids=input_ids, attention_mask=attention).logits.float()
            finally:
                handle.remove()
            kl = (chat_logprobs.exp() * (chat_logprobs - F.log_softmax(logits, -1))).sum(-1).cpu().double()
            sums[name] += torch.stack([kl[is_first].sum(), kl[scored & ~is_first].sum()])
    first_mean = {name: float(value[0] / max(int(counts[0]), 1)) for name, value in sums.items()}
    rest_mean = {name: float(value[1] / max(int(counts[1]), 1)) for name, value in sums.items()}
    total = {name: float(value.sum() / counts.sum()) for name, value in sums.items()}
    gap = total[BASE_PATCH]
    closed = {
        name: (1 - value / gap) if gap > 0 else float("nan") for name, value in total.items() if name != BASE_PATCH
    }
    return KLResult(first_mean, rest_mean, total, closed, int(counts[0]), int(counts[1]))


def _replace_output(replacement: torch.Tensor):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (replacement.to(output[0].dtype), *output[1:])
        return replacement.to(output.dtype)

    return hook
