"""One command from a dictionary to a report folder: ``python -m crosscoder.eval DICTIONARY --out DIR``.

Writes ``report.json``, ``delta_norm_histogram.png``, ``nu_scatter.png`` and ``dashboard.html``. Models and data
default to those the dictionary was trained on (its ``train_config`` metadata); flags override them. Each
analysis streams the same activations afresh (the stream is deterministic), so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from crosscoder.activations import PairedActivationStream
from crosscoder.chunks import ActivationChunk
from crosscoder.config import TrainConfig
from crosscoder.dictionary import BatchTopKSAE, SparseDictionary
from crosscoder.eval.dashboard import render_dashboard
from crosscoder.eval.exclusivity import CHAT_ONLY, SHARED, decoder_cosine, latent_classes, relative_norm_difference
from crosscoder.eval.inspection import PAD, top_contexts
from crosscoder.eval.kl import crosscoder_patch, diff_sae_patch, downstream_kl, latent_subset_patch
from crosscoder.eval.latent_scaling import compute_betas, compute_sae_betas
from crosscoder.eval.plots import delta_norm_histogram, nu_scatter
from crosscoder.eval.reconstruction import reconstruction
from crosscoder.hub import load_dictionary


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained dictionary: exclusivity, Latent Scaling, reconstruction, downstream KL, top contexts."""

    dictionary: tyro.conf.Positional[str]
    """Dictionary to evaluate: a folder written by save_pretrained or a Hub repo id."""
    out: Path = Path("eval")
    """Output folder (report.json, plots, dashboard.html)."""
    num_tokens: int = 200_000
    """Tokens of paired activations streamed for reconstruction, Latent Scaling and top contexts."""
    n_top: int = 10
    """Top-activating contexts per latent."""
    n_shared_baseline: int | None = None
    """Shared latents sampled as the Latent Scaling baseline (None = as many as chat-only latents)."""
    n_leaning: int = 10
    """With no chat-only latent, the most chat-leaning latents are analysed instead (this many)."""
    kl_conversations: int = 64
    """Chat conversations (from the datasets' messages column) for the downstream KL."""
    first_tokens: int = 5
    """Assistant tokens reported separately in the KL."""
    base_model: str | None = None
    """Override the base model of the dictionary's training config."""
    chat_model: str | None = None
    """Override the chat model of the dictionary's training config."""
    datasets: tuple[str, ...] | None = None
    """Override the datasets of the dictionary's training config."""
    device: str | None = None
    """Override the device (default: the training config's)."""
    seed: int = 0
    """Seed of the shared-latent sample."""
    progress: bool = True
    """Show progress bars."""


def data_config(dictionary: SparseDictionary, config: EvalConfig) -> TrainConfig:
    """The stream settings: the dictionary's training config with this evaluation's overrides."""
    saved = dictionary.metadata.get("train_config")
    base = TrainConfig.from_dict(saved) if saved else TrainConfig()
    overrides = {
        key: value
        for key, value in (
            ("base_model", config.base_model),
            ("chat_model", config.chat_model),
            ("datasets", config.datasets),
            ("device", config.device),
        )
        if value is not None
    }
    data = dataclasses.replace(base, prefetch_blocks=0, progress=config.progress, **overrides)
    if data.model_organism and not data.base_model:
        from crosscoder.demo import organism_config
        from crosscoder.organism import build_model_organism

        data = organism_config(data, build_model_organism(seed=data.seed, progress=config.progress))
    if not (data.base_model and data.chat_model):
        raise ValueError(
            "the evaluation streams activations from both models: the dictionary's metadata names none, so pass "
            "--base-model, --chat-model and --datasets"
        )
    return data


def evaluate(config: EvalConfig) -> dict:
    """Run every analysis and write the report folder; returns the report."""
    dictionary = load_dictionary(config.dictionary)
    stream = PairedActivationStream.from_config(data_config(dictionary, config))
    if stream.d_model != dictionary.d_model:
        raise ValueError(
            f"the dictionary has d_model={dictionary.d_model} but the models have {stream.d_model}: evaluate it on "
            "the models (and layer) it was trained on"
        )
    dictionary = dictionary.to(stream.chat_model.device)
    start = stream.state_dict()

    def chunks() -> Iterator[ActivationChunk]:
        stream.load_state_dict(start)
        seen = 0
        for chunk in stream.chunks():
            yield chunk
            seen += len(chunk.token_ids)
            if seen >= config.num_tokens:
                return

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    is_crosscoder = dictionary.n_sources == 2
    report: dict = {
        "dictionary": config.dictionary,
        "class": type(dictionary).__name__,
        "dict_size": dictionary.dict_size,
        "d_model": dictionary.d_model,
    }
    images = []
    rows: list[dict[str, object]] = []

    def inputs(chunk: ActivationChunk) -> torch.Tensor:
        x = chunk.activations.float()
        if is_crosscoder:
            return x
        return x[:, 0] - x[:, 1] if dictionary.input_description.startswith("base") else x[:, 1] - x[:, 0]

    recon = reconstruction(dictionary, (inputs(chunk) for chunk in chunks()), progress=config.progress)
    report["reconstruction"] = recon.to_dict()
    frequencies = recon.frequencies

    if is_crosscoder:
        delta = relative_norm_difference(dictionary)
        cosine = decoder_cosine(dictionary)
        classes = latent_classes(delta)
        counts = {label: classes.count(label) for label in sorted(set(classes))}
        report["exclusivity"] = {"counts": counts}
        images.append(delta_norm_histogram(delta, out / "delta_norm_histogram.png"))
        chat_only = [j for j, label in enumerate(classes) if label == CHAT_ONLY]
        shared = [j for j, label in enumerate(classes) if label == SHARED and frequencies[j] > 0]
        generator = torch.Generator().manual_seed(config.seed)
        n_baseline = min(len(shared), config.n_shared_baseline or max(len(chat_only), config.n_leaning))
        baseline = [shared[i] for i in torch.randperm(len(shared), generator=generator)[:n_baseline].tolist()]
        focus = chat_only or delta.argsort(descending=True)[: config.n_leaning].tolist()
        report["exclusivity"]["analysed"] = "chat-only" if chat_only else f"{len(focus)} most chat-leaning"
        latents = focus + [j for j in baseline if j not in focus]
        groups = ["chat-only" if chat_only else "chat-leaning"] * len(focus) + ["shared"] * (len(latents) - len(focus))
        scaling = compute_betas(
            dictionary, (c.activations.float() for c in chunks()), latents, progress=config.progress
        )
        verdicts = scaling.verdicts()
        images.append(nu_scatter(scaling.nu_error, scaling.nu_recon, groups, out / "nu_scatter.png"))
        report["latent_scaling"] = {
            "genuine_chat_latents": sum(v == "genuine" for v, g in zip(verdicts, groups, strict=True) if g != "shared"),
            "analysed_chat_latents": len(focus),
        }
        for position, latent in enumerate(latents):
            rows.append(
                {
                    "latent": latent,
                    "group": groups[position],
                    "delta_norm": float(delta[latent]),
                    "class": classes[latent],
                    "cosine": float(cosine[latent]),
                    "nu_error": float(scaling.nu_error[position]),
                    "nu_recon": float(scaling.nu_recon[position]),
                    "verdict": verdicts[position],
                    "frequency": float(frequencies[latent]),
                }
            )
        patches = {"crosscoder": crosscoder_patch(dictionary)}
        if focus:
            patches["chat_latents"] = latent_subset_patch(dictionary, focus)
    else:
        latents = frequencies.argsort(descending=True)[: 2 * config.n_leaning].tolist()
        beta_base, beta_chat, nu = compute_sae_betas(dictionary, (c.activations.float() for c in chunks()), latents)
        for position, latent in enumerate(latents):
            rows.append(
                {
                    "latent": latent,
                    "nu_act": float(nu[position]),
                    "beta_base": float(beta_base[position]),
                    "beta_chat": float(beta_chat[position]),
                    "frequency": float(frequencies[latent]),
                }
            )
        patches = {"diff_sae": diff_sae_patch(dictionary)} if isinstance(dictionary, BatchTopKSAE) else {}

    examples = top_contexts(dictionary, chunks(), latents, n_top=config.n_top, progress=config.progress)
    tokenizer = stream.tokenizer
    for row in rows:
        centre_tokens = [
            tokenizer.decode([example.token_ids[example.center]])
            for example in examples[int(row["latent"])]
            if example.token_ids[example.center] != PAD
        ]
        row["top_tokens"] = " ".join(repr(token) for token in dict.fromkeys(centre_tokens))[:120]

    conversations = _conversations(stream, config)
    if conversations and patches:
        kl = downstream_kl(
            stream.base_model,
            stream.chat_model,
            tokenizer,
            conversations,
            stream.settings.layers[0],
            patches,
            first_tokens=config.first_tokens,
            progress=config.progress,
        )
        report["downstream_kl"] = dataclasses.asdict(kl)
    else:
        report["downstream_kl"] = "skipped: no dataset with a messages column"
    report["latents"] = rows
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    render_dashboard(
        out / "dashboard.html",
        f"{type(dictionary).__name__}: {config.dictionary}",
        rows,
        examples,
        lambda token: tokenizer.decode([token]),
        images,
        {
            "FVE": f"{recon.fve:.4f}",
            "L0": f"{recon.l0:.2f}",
            "dead fraction": f"{recon.dead_fraction:.3f}",
            **({"latent classes": report["exclusivity"]["counts"]} if is_crosscoder else {}),
        },
    )
    return report


def _conversations(stream: PairedActivationStream, config: EvalConfig) -> list[list[dict[str, str]]]:
    """The first ``kl_conversations`` conversations of the datasets that have a messages column."""
    column = stream.settings.messages_column
    found: list[list[dict[str, str]]] = []
    for cursor in stream.cursors:
        dataset = cursor.dataset
        for row in itertools.islice(iter(dataset), 10 * config.kl_conversations):
            if row.get(column):
                found.append(row[column])
            if len(found) >= config.kl_conversations:
                return found
    return found
