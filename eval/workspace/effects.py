"""What each latent does to the chat model: the KL cost of removing it from the patched chat model, and steering
the chat model along it (docs/methods.md §11.3–§11.4).

**KL effect.** The full patch ``p`` (the crosscoder's difference reconstruction, or the diff-SAE's) puts the chat
model's difference back on top of ``h^base``; removing latent j subtracts its own term,
``p_{−j} = p − (p_{{j}} − h^base)`` with ``p_{{j}}`` the one-latent subset patch of ``crosscoder.eval.kl``. The effect
of j is ``KL(P_chat ‖ P_{p−j}) − KL(P_chat ‖ P_p)`` on assistant tokens, and its share of the base→chat gap that
effect divided by ``KL(P_chat ‖ P_base-patched)``.

**Steering.** The chat model samples answers to generic prompts with ``multiple · max_j · d_j^chat`` added to the
block output at every position (``crosscoder.eval.adl.steering.generate``), next to unsteered samples of the same
seed; ``max_j`` is the latent's largest activation in the activation store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from crosscoder.dictionary import BatchTopKSAE, SparseDictionary
from crosscoder.errors import ConfigError
from crosscoder.eval.adl.steering import generate, steering_prompts
from crosscoder.eval.directions import decoder_directions
from crosscoder.eval.kl import (
    BASE_PATCH,
    Patch,
    crosscoder_patch,
    diff_sae_patch,
    downstream_kl,
    latent_subset_patch,
    sae_latent_subset_patch,
)

FULL_PATCH = "full"


def removal_patches(dictionary: SparseDictionary, latents: Sequence[int]) -> dict[str, Patch]:
    """The full patch (``"full"``) and, per latent j, the full patch without j's term (``"without j"``)."""
    if isinstance(dictionary, BatchTopKSAE):
        full, subset = diff_sae_patch(dictionary), sae_latent_subset_patch
    elif dictionary.n_sources == 2:
        full, subset = crosscoder_patch(dictionary), latent_subset_patch
    else:
        raise ConfigError(
            f"a {type(dictionary).__name__} has no patch of the chat model: pass a crosscoder or a diff-SAE"
        )

    def without(latent: int) -> Patch:
        own = subset(dictionary, [latent])
        return lambda h_base, h_chat: full(h_base, h_chat) - (own(h_base, h_chat) - h_base)

    return {FULL_PATCH: full, **{f"without {latent}": without(latent) for latent in latents}}


def kl_effects(
    base_model: nn.Module,
    chat_model: nn.Module,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    layer: int,
    dictionary: SparseDictionary,
    latents: Sequence[int],
    *,
    first_tokens: int = 5,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Per latent ``{"kl_effect": nats, "gap_share": fraction of the base→chat KL gap}`` (docs/methods.md §11.3)."""
    result = downstream_kl(
        base_model,
        chat_model,
        tokenizer,
        conversations,
        layer,
        removal_patches(dictionary, latents),
        first_tokens=first_tokens,
        progress=progress,
    )
    kl, gap = result.all_tokens, result.all_tokens[BASE_PATCH]
    effects = {}
    for latent in latents:
        effect = kl[f"without {latent}"] - kl[FULL_PATCH]
        effects[int(latent)] = {"kl_effect": effect, "gap_share": effect / gap if gap > 0 else float("nan")}
    return effects


def steer_latent(
    chat_model: nn.Module,
    tokenizer: Any,
    dictionary: SparseDictionary,
    latent: int,
    layer: int,
    max_activation: float,
    *,
    multiple: float = 4.0,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> dict[str, Any]:
    """Steered and unsteered samples of the chat model for ``latent`` (docs/methods.md §11.4):
    ``{"multiple", "strength", "samples": [{"prompt", "steered", "unsteered"}]}`` (strength = multiple · max)."""
    direction = decoder_directions(dictionary, [latent])["chat"][0].cpu()
    strength = multiple * float(max_activation)
    samples = []
    for index, prompt in enumerate(prompts or steering_prompts()[:3]):
        options = {"layer": layer, "max_new_tokens": max_new_tokens, "seed": seed + index}
        steered = generate(
            chat_model, tokenizer, prompt, vector=direction, strength=strength, norm=float(direction.norm()), **options
        )
        plain = generate(chat_model, tokenizer, prompt, **options)
        samples.append({"prompt": prompt, "steered": steered[0].text, "unsteered": plain[0].text})
    return {"multiple": multiple, "strength": strength, "samples": samples}


def carried_difference(dictionary: SparseDictionary, mean_contribution: torch.Tensor) -> torch.Tensor:
    """A cheap ranking of how much of the difference each latent carries before any KL is run:
    ``frequency · mean activation · ‖d_j^chat − d_j^base‖`` (raw space; ``‖d_j‖`` for a diff-SAE).
    mean_contribution: [dict_size] ``activation_sum / tokens``. Returns [dict_size]."""
    directions = decoder_directions(dictionary, torch.arange(dictionary.dict_size))
    if dictionary.n_sources == 2:
        size = (directions["chat"] - directions["base"]).norm(dim=-1)
    else:
        size = directions["chat"].norm(dim=-1)
    return mean_contribution.to(size.device).float() * size
