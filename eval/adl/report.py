"""One command from a base/chat pair to a lens folder (docs/methods.md §10.8):
``python -m crosscoder.eval.adl --base-model … --chat-model … --datasets … [--domain-data FILE] --out DIR``.

Mean differences on the general datasets (§10.1), then for every layer and position the logit lens (§10.2) and
Patchscope (§10.3) of δ and of the base and chat means, their token relevance to the finetuning data (§10.5),
steering with δ (§10.6) and its causal effect (§10.7). Everything lands in ``report.json``; the file names are
``LensPaths``'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from crosscoder.documents import check_dataset_exists
from crosscoder.errors import ConfigError, OutputExistsError
from crosscoder.eval.adl.causal import causal_effect
from crosscoder.eval.adl.differences import (
    check_pair,
    check_positions,
    mean_differences,
    resolve_layers,
)
from crosscoder.eval.adl.graders import PERMUTATIONS, Grader, LLMGrader, OfflineGrader
from crosscoder.eval.adl.html import render_html
from crosscoder.eval.adl.inputs import domain_rows, general_texts, read_prompts
from crosscoder.eval.adl.patchscope import DEFAULT_SCALES
from crosscoder.eval.adl.paths import LensPaths
from crosscoder.eval.adl.plots import difference_norm_plot, relevance_plot
from crosscoder.eval.adl.reading import Reader, chat_variant
from crosscoder.eval.adl.relevance import frequent_tokens, token_counts
from crosscoder.eval.adl.steering import (
    LossCoherence,
    bag_of_tokens,
    content_tokens,
    cosine,
    generate,
    search_strength,
)
from crosscoder.models import load_causal_lm, resolve_device
from crosscoder.progress import progress_bar

FORMAT = "activation-difference-lens"
FORMAT_VERSION = 2
"""2: ``steering.search`` is a list of per-prompt searches (docs/methods.md §10.6)."""


@dataclass(frozen=True)
class LensConfig:
    """Run the Activation Difference Lens on a base/chat pair and write a report folder."""

    base_model: str
    """Base model: Hub id or local folder."""
    chat_model: str
    """Finetuned (chat) model: Hub id or local folder."""
    datasets: tuple[str, ...]
    """General (unrelated) text: Hub ids or local .jsonl/.parquet/.txt files, read in turn."""
    out: Path = Path("adl")
    """Output folder (report.json, means, plots, report.html)."""
    domain_data: str | None = None
    """A sample of the finetuning data (jsonl with a text or messages column): token relevance, steering similarity,
    the causal effect on domain data. Without it those parts are skipped."""
    description: str | None = None
    """What the finetune was about, in a sentence or two: with --grader-url the LLM labels each top token RELEVANT or
    IRRELEVANT given it (docs/methods.md §10.5); without it only the offline relevance is computed."""
    chat_data: str | None = None
    """Conversations (jsonl with a messages column): also average around the assistant turn, over the last
    --chat-k tokens before it and its first --n-positions tokens (off by default)."""
    chat_k: int = 3
    """Tokens before the assistant turn averaged in the chat-data variant (positions −k … −1)."""
    layers: tuple[int, ...] | None = None
    """Layers (0-based block outputs); default int(0.5 · (n_layers − 1))."""
    positions: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Positions read with the lens, steered with and ablated."""
    n_positions: int = 128
    """Tokens averaged per text (texts with fewer are dropped)."""
    max_samples: int = 10_000
    """Texts averaged at most."""
    batch_size: int = 16
    """Texts per paired forward."""
    text_column: str = "text"
    """Column of the general datasets holding the text."""
    dataset_split: str = "train"
    """Split of Hub datasets."""
    lens_k: int = 100
    """Logit-lens tokens stored per vector."""
    relevance_k: int = 20
    """Top tokens scored for relevance."""
    min_count: int = 10
    """Occurrences that make a finetuning-data token frequent."""
    domain_samples: int = 1000
    """Rows of the finetuning data read for its frequent tokens and the steering similarity."""
    patchscope_scales: tuple[float, ...] = DEFAULT_SCALES
    """Patchscope scales (multiples of the patched model's mean activation norm)."""
    patchscope_top_k: int = 16_384
    """Tokens each identity prompt keeps before the intersection."""
    patchscope_keep: int = 20
    """Tokens kept per scale."""
    steering: bool = True
    """Steer with δ at every layer and position."""
    steering_prompts_file: Path | None = None
    """Prompts to steer (a JSON list of strings or one prompt a line); default: the shipped generic prompts. The
    strength is searched on the first --search-prompts of them."""
    steer_samples: int = 10
    """Samples per strength and prompt."""
    steer_tokens: int = 128
    """Tokens generated per sample."""
    steer_temperature: float = 1.2
    """Sampling temperature."""
    search_steps: int = 10
    """Binary-search steps for the strength, per prompt."""
    max_strength: float = 100.0
    """Upper end of the strength search on the first prompt (the next prompts search up to twice its threshold)."""
    search_prompts: int = 3
    """Prompts the strength is searched on (the first ones); the strength is the mean of their thresholds."""
    coherent_fraction: float = 0.75
    """Fraction of coherent samples a strength needs."""
    coherence_factor: float = 1.5
    """Offline coherence: a steered sample's loss under the unsteered chat model may be this many times its loss on
    unsteered samples."""
    causal: bool = True
    """Measure the causal effect of δ's direction at every layer and position."""
    causal_texts: int = 64
    """Rows of general and of finetuning data the causal effect is measured on."""
    causal_random: int = 8
    """Random unit directions as controls (the paper: 64)."""
    causal_random_differences: int = 8
    """Random activation differences (chat − base on one token of a general text, normalised) as a second control
    family (the paper: 64)."""
    causal_skip: int = 20
    """The losses are also reported over the tokens after each row's first this many."""
    causal_max_length: int = 256
    """Tokens per row in the causal effect."""
    grader_url: str | None = None
    """OpenAI-compatible endpoint (…/v1) that chooses Patchscope scales and judges coherence; default offline."""
    grader_model: str | None = None
    """Model name sent to the grader endpoint."""
    grader_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the grader's API key (read at each request, never written)."""
    grader_timeout: float = 60.0
    """Seconds to wait for the grader."""
    model_dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """dtype the models run in (auto: bfloat16 on GPU, float32 on CPU)."""
    base_revision: str | None = None
    """Base model revision."""
    chat_revision: str | None = None
    """Chat model revision."""
    trust_remote_code: bool = False
    """Allow model code from the Hub."""
    device: str = "auto"
    """Torch device (auto = cuda when available)."""
    seed: int = 0
    """Seed of sampling and random directions."""
    overwrite: bool = False
    """Replace an existing report in --out."""
    progress: bool = True
    """Show progress bars."""


# ---------------------------------------------------------------------------- graders
def make_grader(config: LensConfig) -> Grader:
    """The offline grader, or the LLM grader when ``--grader-url`` is given."""
    if config.grader_url is None:
        return OfflineGrader()
    if not config.grader_model:
        raise ConfigError("--grader-url needs --grader-model (the model name the endpoint serves)")
    return LLMGrader(
        config.grader_url, config.grader_model, api_key_env=config.grader_key_env, timeout=config.grader_timeout
    )


def describe_grader(grader: Grader) -> dict[str, Any]:
    describe = getattr(grader, "describe", None)
    return describe() if callable(describe) else {"name": grader.name}


# ---------------------------------------------------------------------------- steering of one vector
class _Steering:
    """Unsteered samples and reference losses per prompt, computed once and shared by every layer and position."""

    def __init__(self, chat, tokenizer, config: LensConfig, grader: Grader, domain_bag) -> None:
        self.chat, self.tokenizer, self.config, self.grader = chat, tokenizer, config, grader
        self.prompts = read_prompts(config.steering_prompts_file)
        self.loss_judge = LossCoherence(chat, config.coherence_factor)
        self.domain_bag = domain_bag
        self.unsteered: dict[str, list[str]] = {}
        prompts = progress_bar(self.prompts, desc="unsteered samples", unit="prompt", enabled=config.progress)
        for index, prompt in enumerate(prompts):
            generations = self._generate(prompt, None, None, 0.0, self._seed(index))
            self.unsteered[prompt] = [g.text for g in generations]
            if index < config.search_prompts:
                self.loss_judge.set_reference(prompt, generations)

    def _seed(self, index: int) -> int:
        return self.config.seed * 1000 + index

    def _generate(self, prompt, vector, layer, strength, seed, norm=None):
        config = self.config
        return generate(
            self.chat,
            self.tokenizer,
            prompt,
            vector=vector,
            layer=layer,
            strength=strength,
            norm=norm,
            n_samples=config.steer_samples,
            max_new_tokens=config.steer_tokens,
            temperature=config.steer_temperature,
            seed=seed,
        )

    def judge(self, prompt, generations) -> list[bool]:
        return self.grader.coherent(prompt, [g.text for g in generations], lambda: self.loss_judge(prompt, generations))

    def run(self, vector: torch.Tensor, layer: int, norm: float, description: str) -> dict[str, Any]:
        """Steer with ``vector`` at ``layer``: the strength search, then samples for every prompt; a progress bar
        (``description``) counts the generations: ``--search-prompts × --search-steps`` trials and one per prompt."""
        config = self.config
        n_trials = min(config.search_prompts, len(self.prompts)) * config.search_steps
        bar = progress_bar(
            total=n_trials + len(self.prompts), desc=description, unit="generation", enabled=config.progress
        )

        def judge_trial(prompt, generations) -> list[bool]:
            bar.update()
            return self.judge(prompt, generations)

        search = search_strength(
            self.chat,
            self.tokenizer,
            vector,
            layer,
            self.prompts,
            judge_trial,
            high=config.max_strength,
            n_prompts=config.search_prompts,
            norm=norm,
            steps=config.search_steps,
            n_samples=config.steer_samples,
            coherent_fraction=config.coherent_fraction,
            max_new_tokens=config.steer_tokens,
            temperature=config.steer_temperature,
            seed=self._seed(0),
        )
        strength = search["strength"]
        bar.update(n_trials - bar.n)  # the trials a search skipped (its first prompt's threshold was 0)
        samples = []
        for index, prompt in enumerate(self.prompts):
            steered = self._generate(prompt, vector, layer, strength, self._seed(index), norm)
            unsteered = self.unsteered[prompt]
            samples.append({"prompt": prompt, "steered": [g.text for g in steered], "unsteered": unsteered})
            bar.update()
        bar.close()
        result: dict[str, Any] = {
            "strength": strength,
            "norm": norm,
            "search": search["per_prompt"],
            "samples": samples,
        }
        if self.domain_bag is not None:
            steered_bag = bag_of_tokens(self.tokenizer, (t for s in samples for t in s["steered"]))
            unsteered_bag = bag_of_tokens(self.tokenizer, (t for s in samples for t in s["unsteered"]))
            result["similarity"] = {
                "steered": cosine(steered_bag, self.domain_bag),
                "unsteered": cosine(unsteered_bag, self.domain_bag),
                "per_prompt": [
                    {
                        "prompt": s["prompt"],
                        "steered": cosine(bag_of_tokens(self.tokenizer, s["steered"]), self.domain_bag),
                        "unsteered": cosine(bag_of_tokens(self.tokenizer, s["unsteered"]), self.domain_bag),
                    }
                    for s in samples
                ],
            }
        return result


# ---------------------------------------------------------------------------- the run
def _dtype(config: LensConfig, device: str) -> str:
    if config.model_dtype != "auto":
        return config.model_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def run_lens(config: LensConfig) -> dict[str, Any]:
    """Run every part of the lens and write the folder (``LensPaths(config.out)``); returns the report."""
    paths = LensPaths(Path(config.out))
    if paths.report.exists() and not config.overwrite:
        raise OutputExistsError(f"{paths.report} exists: pass --overwrite to replace it, or another --out")
    if not config.datasets:
        raise ConfigError("name at least one general dataset with --datasets (Hub ids or local .jsonl/.txt files)")
    check_positions(config.positions, config.n_positions)
    for spec in [*config.datasets, config.domain_data, config.chat_data]:  # before the models load
        if spec is not None:
            check_dataset_exists(spec)
    grader = make_grader(config)
    device = resolve_device(config.device)
    dtype = _dtype(config, device)
    base, base_tokenizer = load_causal_lm(
        config.base_model,
        revision=config.base_revision,
        dtype=dtype,
        device=device,
        trust_remote_code=config.trust_remote_code,
    )
    chat, tokenizer = load_causal_lm(
        config.chat_model,
        revision=config.chat_revision,
        dtype=dtype,
        device=device,
        trust_remote_code=config.trust_remote_code,
    )
    check_pair(base, chat, tokenizer, base_tokenizer)
    layers = resolve_layers(chat, config.layers)
    domain = domain_rows(config)

    means = mean_differences(
        base,
        chat,
        tokenizer,
        general_texts(config),
        layers,
        config.n_positions,
        config.max_samples,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    paths.out.mkdir(parents=True, exist_ok=True)
    means.metadata.update(
        {"base_model": config.base_model, "chat_model": config.chat_model, "datasets": list(config.datasets)}
    )
    means.save(paths.out)

    frequent = frequent_tokens(tokenizer, domain, config.min_count) if domain else None
    domain_bag = content_tokens(tokenizer, token_counts(tokenizer, domain)) if domain else None
    steering = _Steering(chat, tokenizer, config, grader, domain_bag) if config.steering else None
    causal_data: dict[str, list[Any]] = {}
    if config.causal:
        if domain:
            causal_data["domain"] = domain[: config.causal_texts]
        causal_data["general"] = list(itertools.islice(general_texts(config), config.causal_texts))

    report: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": config.base_model,
        "chat_model": config.chat_model,
        "datasets": list(config.datasets),
        "domain_data": config.domain_data,
        "description": config.description,
        "layers": layers,
        "positions": list(config.positions),
        "n_positions": config.n_positions,
        "counts": {"samples": means.n_samples, "dropped_short": means.n_dropped},
        "norms": {model: {str(k): v for k, v in values.items()} for model, values in means.norms.items()},
        "norm_skip": means.norm_skip,
        "grader": None,
        "frequent_tokens": (
            [tokenizer.decode([token]) for token in list(frequent)[:100]] if frequent is not None else None
        ),
        "settings": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in dataclasses.asdict(config).items()
        },
        "results": {},
    }
    reader = Reader(base, chat, tokenizer, config, grader, frequent, report["frequent_tokens"] or [])
    tasks = [(layer, position) for layer in layers for position in config.positions]
    for layer, position in progress_bar(tasks, desc="lens", unit="position", enabled=config.progress):
        chat_norm, base_norm = means.norms["chat"][layer], means.norms["base"][layer]
        entry = reader.read(means, layer, position, {"base": base_norm, "chat": chat_norm})
        delta = means.vector("delta", layer, position)
        where = f"layer {layer}, position {position}"
        entry["steering"] = (
            steering.run(delta, layer, chat_norm, f"steering ({where})") if steering else "skipped: --no-steering"
        )
        if config.causal:
            entry["causal_effect"] = causal_effect(
                base,
                chat,
                tokenizer,
                delta,
                layer,
                causal_data,
                n_random=config.causal_random,
                n_random_differences=config.causal_random_differences,
                difference_texts=causal_data["general"],
                seed=config.seed,
                max_length=config.causal_max_length,
                skip=config.causal_skip,
                progress=config.progress,
                description=f"causal effect, {where}",
            )
        else:
            entry["causal_effect"] = "skipped: --no-causal"
        result = report["results"].setdefault(
            str(layer), {"difference_norms": means.difference_norms(layer), "positions": {}}
        )
        result["positions"][str(position)] = entry
    report["relevance_labels"] = (
        f"trivial (top {config.relevance_k} tokens among the finetuning data's frequent tokens); llm: {grader.name} "
        f"given --description, {PERMUTATIONS} cyclic permutations, relevant when all agree"
        if reader.labels_with_llm
        else "trivial only (the LLM labels need --grader-url and --description)"
    )
    if config.chat_data is not None:
        report["chat_data"] = chat_variant(config, reader, layers, means.norms)
    report["grader"] = describe_grader(grader)
    if steering is not None:
        report["steering_coherence"] = (
            f"offline: a sample is coherent when the unsteered chat model's mean token loss on it is ≤ "
            f"{config.coherence_factor} × its loss on unsteered samples"
            if grader.name == "offline"
            else f"{grader.name} (offline loss criterion as fallback)"
        )
    write_outputs(report, paths)
    return report


def write_outputs(report: dict[str, Any], paths: LensPaths) -> dict[str, Path]:
    """Plots, ``report.json`` and ``report.html`` for a finished report; returns the files written by role."""
    paths.out.mkdir(parents=True, exist_ok=True)
    written = {"means": paths.means, "means_meta": paths.means_meta}
    if "chat_data" in report:
        written.update({"chat_means": paths.chat_means, "chat_means_meta": paths.chat_means_meta})
    images = [difference_norm_plot(report, paths.difference_norms_plot)]
    written["difference_norms_plot"] = images[0]
    if report["domain_data"] is not None:
        images.append(relevance_plot(report, paths.relevance_plot))
        written["relevance_plot"] = images[1]
    written.update({"report": paths.report, "html": paths.html})
    report["files"] = {role: path.name for role, path in written.items()}
    paths.report.write_text(json.dumps(report, indent=1, default=float) + "\n", encoding="utf-8")
    render_html(report, paths.html, images)
    return written
