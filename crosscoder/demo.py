"""The default run (``python train.py`` with no arguments): diff the offline model organism.

The organism (``crosscoder.organism``) is a tiny base LM and a copy finetuned narrowly on baking recipes,
built offline on the first run and cached. Its activations at the recommended layer are streamed from both
models over a 50/50 mixture of general text and held-out baking chats, a BatchTopK crosscoder and a diff-SAE
are trained side by side, and a summary says what the diff found.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from typing import Any

from transformers import AutoTokenizer

from crosscoder.activations import PairedActivationStream
from crosscoder.config import TrainConfig
from crosscoder.dictionary import SparseDictionary
from crosscoder.eval.exclusivity import BASE_ONLY, CHAT_ONLY, SHARED, latent_classes, relative_norm_difference
from crosscoder.eval.inspection import PAD, top_contexts
from crosscoder.eval.latent_scaling import compute_betas
from crosscoder.organism import build_model_organism
from crosscoder.organism_source import organism_config


def summary(dictionaries: dict[str, SparseDictionary]) -> list[str]:
    """Lines reporting each dictionary's metrics and, for crosscoders, its latent classes."""
    lines = []
    for name, dictionary in dictionaries.items():
        metrics = dictionary.metadata.get("metrics", {})
        figures = ", ".join(
            f"{key}={metrics[key]:.4g}"
            for key in ("fve", "fve_source_0", "fve_source_1", "l0", "dead_fraction")
            if key in metrics
        )
        lines.append(f"{name}: {figures}")
        if dictionary.n_sources == 2:
            counts = Counter(latent_classes(relative_norm_difference(dictionary)))
            lines.append(
                f"  latents: {counts[CHAT_ONLY]} chat-only, {counts[BASE_ONLY]} base-only, {counts[SHARED]} shared "
                f"of {dictionary.dict_size} (by relative decoder norm)"
            )
    return lines


def lens_summary(config: TrainConfig, n_texts: int = 100, n_positions: int = 32, n_tokens: int = 8) -> list[str]:
    """What the Activation Difference Lens reads off the organism (docs/methods.md §10), in a few seconds: the mean
    chat − base activation δ at positions 0–4 of general text, through the chat model's logit lens and Patchscope,
    with the share of its top tokens that are frequent in the baking chats (and the same for the controls). The
    report is written to ``run_dir/adl``."""
    from crosscoder.eval.adl import LensConfig, run_lens

    organism = build_model_organism(seed=config.seed, progress=False)
    sources = organism.stream_sources()
    report = run_lens(
        LensConfig(
            base_model=sources["base_model"],
            chat_model=sources["chat_model"],
            datasets=(str(organism.general_data),),
            domain_data=str(organism.chat_data),
            out=config.run_dir / "adl",
            layers=tuple(config.layers or sources["layers"]),
            n_positions=n_positions,
            max_samples=n_texts,
            steering=False,
            causal=False,
            overwrite=True,
            progress=False,
        )
    )
    lines = [
        f"Activation Difference Lens (δ = mean chat − base activation over {report['counts']['samples']} general "
        f"texts; relevance = share of the top 20 tokens frequent in the baking chats, δ vs the base/chat means):"
    ]
    for layer, result in report["results"].items():
        for position, item in result["positions"].items():
            lens, scope = item["logit_lens"]["delta"], item["patchscope"]["delta"]
            relevance = item["relevance"]
            shares = {kind: relevance["logit_lens"][kind]["share"] for kind in ("delta", "base_mean", "chat_mean")}
            lines.append(
                f"  layer {layer} position {position}: logit lens {_tokens(lens['tokens'][:n_tokens])}; Patchscope "
                f"(×{scope['scale']:g}) {_tokens(scope['tokens'][:n_tokens])}; relevance {shares['delta']:.0%} vs "
                f"{shares['base_mean']:.0%} / {shares['chat_mean']:.0%}"
            )
    return lines


def _tokens(tokens: list[str]) -> str:
    return ", ".join(repr(token.strip()) for token in tokens)


def explain(
    dictionaries: dict[str, SparseDictionary], config: TrainConfig, n_blocks: int = 6, n_latents: int = 6
) -> list[str]:
    """What each dictionary found, briefly: for a crosscoder its chat-only latents (or, if none passes Δnorm > 0.9,
    the most chat-leaning ones) with Δnorm, Latent Scaling verdict and the tokens they fire on most; for a diff-SAE
    its most active latents and the tokens they fire on. At most ``n_latents`` lines per dictionary."""
    organism = build_model_organism(seed=config.seed, progress=config.progress)
    stream_config = dataclasses.replace(organism_config(config, organism), prefetch_blocks=0)
    stream = PairedActivationStream.from_config(stream_config)
    chunks = list(itertools.islice(stream.chunks(), n_blocks))
    tokenizer = AutoTokenizer.from_pretrained(organism.chat_path)
    lines = [f"What each dictionary found (over {sum(len(c.token_ids) for c in chunks)} tokens of general text and "
             "baking chats):"]  # fmt: skip
    for name, dictionary in dictionaries.items():
        explained = _explain_crosscoder if dictionary.input.kind == "paired" else _explain_sae
        lines += explained(name, dictionary, chunks, tokenizer, n_latents)
    return lines


def _explain_crosscoder(
    name: str, crosscoder: SparseDictionary, chunks: list, tokenizer: Any, n_latents: int
) -> list[str]:
    delta = relative_norm_difference(crosscoder)
    chat_only = (delta > 0.9).nonzero().flatten()
    chosen = delta.argsort(descending=True)[: min(n_latents, len(chat_only)) if len(chat_only) else n_latents]
    title = (
        f"{len(chat_only)} chat-only latents (Δnorm > 0.9); the {len(chosen)} most chat-leaning"
        if len(chat_only)
        else f"no latent passes Δnorm > 0.9; the {len(chosen)} most chat-leaning"
    )
    scaling = compute_betas(crosscoder, [chunk.activations.float() for chunk in chunks], chosen)
    examples = top_contexts(crosscoder, chunks, chosen, n_top=12)
    lines = [f"{name}: {title}:"]
    for position, (latent, verdict) in enumerate(zip(chosen.tolist(), scaling.verdicts(), strict=True)):
        lines.append(
            f"  latent {latent}: Δnorm={delta[latent]:.2f} ν^ε={scaling.nu_error[position]:.2f} "
            f"ν^r={scaling.nu_recon[position]:.2f} ({verdict}); fires on {_top_tokens(examples[latent], tokenizer)}"
        )
    return lines


def _explain_sae(name: str, sae: SparseDictionary, chunks: list, tokenizer: Any, n_latents: int) -> list[str]:
    counts = sum((sae.encode(sae.input_from_pair(chunk.activations.float())) > 0).sum(0) for chunk in chunks)
    chosen = counts.argsort(descending=True)[:n_latents]
    examples = top_contexts(sae, chunks, chosen, n_top=12)
    lines = [f"{name}: the {len(chosen)} most active latents (of {sae.input.describe()}):"]
    total = sum(len(chunk.token_ids) for chunk in chunks)
    for latent in chosen.tolist():
        frequency = float(counts[latent]) / total
        lines.append(
            f"  latent {latent}: fires on {frequency:.1%} of tokens, most on {_top_tokens(examples[latent], tokenizer)}"
        )
    return lines


def _top_tokens(examples: list, tokenizer: Any) -> str:
    """The tokens a latent's top examples centre on, most frequent first (e.g. ``'oven'×3, 'flour'``)."""
    tokens = Counter(
        tokenizer.decode([example.token_ids[example.center]]).strip()
        for example in examples
        if example.token_ids[example.center] != PAD
    )
    return ", ".join(f"{token!r}×{count}" if count > 1 else repr(token) for token, count in tokens.most_common(6)) or (
        "nothing"
    )
