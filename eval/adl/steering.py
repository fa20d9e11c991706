"""Steering the chat model with a difference vector (docs/methods.md §10.6).

``strength · norm · v̂`` is added to block ``layer``'s output at every position — the prompt's and each generated
token's — while the chat model samples answers to generic prompts rendered with its chat template. The strength is
found by binary search for the largest strength whose samples stay coherent (a grader's judgement, offline:
``LossCoherence``): in ``[0, 100]`` on a first prompt, then in ``[0, 2×]`` that on two more, averaged
(``search_strength``). Steered and unsteered samples are compared by their bag-of-tokens cosine with the finetuning
data.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crosscoder.errors import ConfigError
from crosscoder.eval.adl.patchscope import unit
from crosscoder.eval.adl.relevance import is_generic
from crosscoder.models import decoder_blocks


@lru_cache(maxsize=1)
def steering_prompts() -> tuple[str, ...]:
    """The generic prompts shipped with the package (``steering_prompts.json``)."""
    text = resources.files("crosscoder.eval.adl").joinpath("steering_prompts.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


@dataclass(frozen=True)
class Generation:
    """One sampled continuation: its text, the prompt's ids and the generated ids (up to the first stop token,
    included)."""

    text: str
    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]


Judge = Callable[[str, list[Generation]], list[bool]]
"""Coherence judgement of each generation for a prompt."""


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """The prompt as a user message in the chat template with the assistant turn opened (plain text with special
    tokens when the tokenizer has no template or ``chat_template`` is False)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def add_to_output(addition: torch.Tensor):
    """A forward hook on a decoder block that adds ``addition [d]`` to its output at every position."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + addition.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    strength: float = 0.0,
    norm: float | None = None,
    n_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.2,
    seed: int = 0,
    chat_template: bool = True,
) -> list[Generation]:
    """``n_samples`` continuations of ``prompt``, steered by ``strength · norm · v̂`` at ``layer`` when a vector is
    given (``norm`` None: ``‖vector‖``). Sampling is seeded without touching the global random state."""
    if n_samples < 1 or max_new_tokens < 1:
        raise ConfigError("n_samples and max_new_tokens must be positive")
    ids = prompt_ids(tokenizer, prompt, chat_template)
    device = model.device
    input_ids = torch.tensor([ids] * n_samples, device=device)
    handle = None
    if vector is not None and strength != 0:
        if layer is None:
            raise ConfigError("steering needs the layer to add the vector at")
        scale = float(torch.as_tensor(vector).float().norm()) if norm is None else float(norm)
        handle = decoder_blocks(model)[layer].register_forward_hook(add_to_output(strength * scale * unit(vector)))
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    sampling = {"do_sample": True, "temperature": temperature}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
    finally:
        if handle is not None:
            handle.remove()
    generations = []
    for row in output[:, len(ids) :].tolist():
        end = next((index + 1 for index, token in enumerate(row) if token in stops), len(row))
        kept = row[:end]
        generations.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), tuple(ids), tuple(kept)))
    return generations


def steer(
    model: nn.Module,
    tokenizer: Any,
    vector: torch.Tensor,
    layer: int,
    strength: float,
    prompts: Sequence[str] | None = None,
    *,
    norm: float | None = None,
    n_samples: int = 2,
    max_new_tokens: int = 32,
    temperature: float = 1.2,
    seed: int = 0,
    chat_template: bool = True,
) -> list[dict[str, Any]]:
    """Steered generations (docs/methods.md §10.6): per prompt ``{"prompt", "strength", "samples": [text, …]}``.

    ``norm`` is the chat model's mean activation norm at ``layer`` (``MeanDifferences.norms["chat"][layer]``); None
    takes ``‖vector‖``. ``prompts`` default to ``steering_prompts()``."""
    results = []
    for index, prompt in enumerate(prompts or steering_prompts()):
        generations = generate(
            model,
            tokenizer,
            prompt,
            vector=vector,
            layer=layer,
            strength=strength,
            norm=norm,
            n_samples=n_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + index,
            chat_template=chat_template,
        )
        results.append({"prompt": prompt, "strength": float(strength), "samples": [g.text for g in generations]})
    return results


# ---------------------------------------------------------------------------- the offline coherence criterion
@torch.no_grad()
def continuation_losses(model: nn.Module, generations: Sequence[Generation]) -> list[float]:
    """The (unsteered) model's mean next-token loss on each generation's tokens given its prompt; NaN for an empty
    generation."""
    rows = [(list(g.prompt_ids) + list(g.ids), len(g.prompt_ids)) for g in generations]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, start) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = torch.tensor(ids[start:], dtype=torch.long)
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
    targets = labels[:, 1:].to(device)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1)
    return [float(total / count) if count else math.nan for total, count in zip(losses.sum(dim=1), counts, strict=True)]


class LossCoherence:
    """Offline coherence (docs/methods.md §10.6): a steered generation is coherent when the unsteered chat model's
    mean per-token loss on it is at most ``factor`` times its mean loss on unsteered generations for the same
    prompt (``set_reference``)."""

    def __init__(self, model: nn.Module, factor: float = 1.5) -> None:
        self.model, self.factor = model, factor
        self.references: dict[str, float] = {}

    def set_reference(self, prompt: str, unsteered: Sequence[Generation]) -> float:
        losses = [loss for loss in continuation_losses(self.model, unsteered) if not math.isnan(loss)]
        self.references[prompt] = sum(losses) / len(losses) if losses else math.inf
        return self.references[prompt]

    def losses(self, generations: Sequence[Generation]) -> list[float]:
        return continuation_losses(self.model, generations)

    def __call__(self, prompt: str, generations: list[Generation]) -> list[bool]:
        if prompt not in self.references:
            raise ConfigError(f"no unsteered reference loss for the prompt {prompt!r}: call set_reference first")
        limit = self.factor * self.references[prompt]
        return [not math.isnan(loss) and loss <= limit for loss in self.losses(generations)]


def find_strength(
    model: nn.Module,
    tokenizer: Any,
    vector: torch.Tensor,
    layer: int,
    prompt: str,
    judge: Judge,
    *,
    norm: float | None = None,
    low: float = 0.0,
    high: float = 100.0,
    steps: int = 10,
    n_samples: int = 10,
    coherent_fraction: float = 0.75,
    max_new_tokens: int = 32,
    temperature: float = 1.2,
    seed: int = 0,
    chat_template: bool = True,
) -> dict[str, Any]:
    """Binary search in ``[low, high]`` for the largest strength at which at least ``coherent_fraction`` of the
    samples for ``prompt`` are coherent (docs/methods.md §10.6): ``{"strength", "trials": [{"strength",
    "coherent", "example"}]}``; each trial samples with the same seed."""
    if not high > low:
        raise ConfigError(f"the strength search needs high > low, got [{low}, {high}]")
    trials = []
    for _ in range(steps):
        middle = (low + high) / 2
        generations = generate(
            model,
            tokenizer,
            prompt,
            vector=vector,
            layer=layer,
            strength=middle,
            norm=norm,
            n_samples=n_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            chat_template=chat_template,
        )
        verdicts = judge(prompt, generations)
        fraction = sum(verdicts) / len(verdicts)
        trials.append({"strength": middle, "coherent": fraction, "example": generations[0].text})
        if fraction >= coherent_fraction:
            low = middle
        else:
            high = middle
    return {"strength": low, "trials": trials}


def search_strength(
    model: nn.Module,
    tokenizer: Any,
    vector: torch.Tensor,
    layer: int,
    prompts: Sequence[str],
    judge: Judge,
    *,
    high: float = 100.0,
    n_prompts: int = 3,
    seed: int = 0,
    **search: Any,
) -> dict[str, Any]:
    """The steering strength over several prompts (docs/methods.md §10.6): ``find_strength`` in ``[0, high]`` on
    the first prompt gives ``s₁``, then in ``[0, 2 s₁]`` on each of the next ``n_prompts − 1`` prompts (no search
    when ``s₁ = 0``: their threshold is 0 too); the strength is the mean of the per-prompt thresholds.

    ``search`` goes to ``find_strength`` (``norm``, ``steps``, ``n_samples``, …); prompt ``i`` samples with seed
    ``seed + i``. Returns ``{"strength", "per_prompt": [{"prompt", "range", "strength", "trials"}]}``."""
    if n_prompts < 1 or not prompts:
        raise ConfigError(
            f"the strength search needs --search-prompts ≥ 1 and a prompt (got {n_prompts} and {len(prompts)} prompts)"
        )
    per_prompt = []
    upper = high
    for index, prompt in enumerate(list(prompts)[:n_prompts]):
        if upper > 0:
            found = find_strength(
                model, tokenizer, vector, layer, prompt, judge, high=upper, seed=seed + index, **search
            )
        else:
            found = {"strength": 0.0, "trials": []}
        per_prompt.append({"prompt": prompt, "range": [0.0, upper], **found})
        if index == 0:
            upper = 2 * found["strength"]
    return {"strength": sum(p["strength"] for p in per_prompt) / len(per_prompt), "per_prompt": per_prompt}


# ---------------------------------------------------------------------------- similarity to the finetuning data
def bag_of_tokens(tokenizer: Any, texts: Iterable[str]) -> Counter:
    """Counts of the non-generic tokens of ``texts`` (docs/methods.md §10.5's generic tokens left out)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return content_tokens(tokenizer, counts)


def content_tokens(tokenizer: Any, counts: Counter) -> Counter:
    """``counts`` without special and generic tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return Counter(
        {
            token: count
            for token, count in counts.items()
            if token not in special and not is_generic(tokenizer.decode([token]))
        }
    )


def cosine(first: Counter, second: Counter) -> float:
    """Cosine similarity of two bags of tokens (0 when either is empty)."""
    dot = sum(count * second.get(token, 0) for token, count in first.items())
    norms = math.sqrt(sum(c * c for c in first.values())) * math.sqrt(sum(c * c for c in second.values()))
    return dot / norms if norms else 0.0
