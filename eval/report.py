"""One command from a dictionary to a report folder: ``python -m crosscoder.eval DICTIONARY --out DIR``.

Writes ``report.json``, ``delta_norm_histogram.png``, ``nu_scatter.png``, the activation store (``store/``) and the
latent workspace (``index.html``, docs/methods.md §11). Models and data default to those the dictionary was trained
on (its provenance record, ``crosscoder.provenance``); flags override them. Each analysis streams the same
activations afresh (the stream is deterministic), so memory stays bounded; ``--no-models`` writes what the weights
alone give.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from crosscoder.activations import PairedActivationStream, StreamSettings
from crosscoder.chunks import ActivationChunk
from crosscoder.dictionary import BatchTopKSAE, SparseDictionary
from crosscoder.errors import ConfigError, CrosscoderError, DataError
from crosscoder.eval.exclusivity import (
    CHAT_ONLY,
    SHARED,
    class_counts,
    decoder_cosine,
    latent_classes,
    relative_norm_difference,
)
from crosscoder.eval.kl import crosscoder_patch, diff_sae_patch, downstream_kl, latent_subset_patch
from crosscoder.eval.latent_scaling import compute_betas, compute_sae_betas
from crosscoder.eval.plots import delta_norm_histogram, nu_scatter
from crosscoder.eval.reconstruction import reconstruction
from crosscoder.eval.workspace import (
    StoreSettings,
    WorkspaceContent,
    checked_latents,
    collect_store,
    export_json,
    latent_columns,
    model_analyses,
    write_workspace,
)
from crosscoder.hub import load_dictionary
from crosscoder.models import resolve_device
from crosscoder.provenance import Provenance


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained dictionary: exclusivity, Latent Scaling, reconstruction, downstream KL, top contexts."""

    dictionary: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="DICTIONARY")]
    """Dictionary to evaluate: a folder written by save_pretrained or a Hub repo id."""
    out: Path = Path("eval")
    """Output folder (report.json, plots, the activation store and the workspace index.html)."""
    num_tokens: int = 200_000
    """Tokens of paired activations streamed for reconstruction, Latent Scaling and top contexts."""
    n_top: int = 10
    """Top-activating contexts per latent."""
    n_quantiles: int = 5
    """Activation quantile buckets per latent in the workspace."""
    per_quantile: int = 4
    """Examples per quantile bucket."""
    latents: tuple[int, ...] | None = None
    """Latents for the expensive per-latent analyses (KL effect, steering); default: those carrying most of the
    difference (frequency · mean activation · decoder difference)."""
    n_effects: int = 16
    """Latents whose KL effect is measured when --latents is not given."""
    n_steer: int = 4
    """Of those, latents steered with."""
    steer_multiple: float = 4.0
    """Steering strength as a multiple of the latent's maximum activation."""
    no_models: tyro.conf.FlagCreatePairsOff[bool] = False
    """Build only what the weights give (Δnorm, classes, cosines, norms): no model is loaded, no data streamed."""
    export_json: bool = False
    """Also write the per-latent records as JSON files (out/export/shard_NNNNN.json)."""
    shard_size: int = 256
    """Latents per workspace shard (loaded on demand by the page)."""
    n_shared_baseline: int | None = None
    """Shared latents sampled as the Latent Scaling baseline (None = as many as chat-only latents)."""
    n_leaning: int = 10
    """With no chat-only latent, the most chat-leaning latents are analysed instead (this many)."""
    kl_conversations: int = 64
    """Chat conversations (from the datasets' messages column) for the downstream KL."""
    first_tokens: int = 5
    """Assistant tokens reported separately in the KL."""
    base_model: str | None = None
    """Base model (Hub id or local folder); default: the one in the dictionary's provenance record."""
    chat_model: str | None = None
    """Chat model (Hub id or local folder); default: the one in the dictionary's provenance record."""
    datasets: tuple[str, ...] | None = None
    """Datasets to stream; default: those in the dictionary's provenance record."""
    layers: tuple[int, ...] | None = None
    """Override the layer(s) of the dictionary's provenance record."""
    model_dtype: Literal["bfloat16", "float32", "float16"] | None = None
    """dtype the models run in (default: as recorded, else float32)."""
    trust_remote_code: bool = False
    """Allow model code from the Hub (yours to decide: never taken from the dictionary's files)."""
    device: str = "auto"
    """Torch device (auto = cuda when available)."""
    seed: int = 0
    """Seed of the shared-latent sample."""
    progress: bool = True
    """Show progress bars."""


def open_stream(dictionary: SparseDictionary, config: EvalConfig) -> PairedActivationStream:
    """The paired stream to evaluate on: the models, layers, datasets and filters of the dictionary's provenance
    record, each overridden by this evaluation's flags. Code is loaded from the Hub only with the user's own
    ``--trust-remote-code``, never because a saved file asks for it."""
    provenance = Provenance.from_metadata(dictionary.metadata, config.dictionary)
    recorded = provenance.activations if provenance else {}
    reading = provenance.reading if provenance else {}
    base_model, chat_model = config.base_model, config.chat_model
    datasets = config.datasets
    recorded_base = recorded.get("base_model")
    organism_elsewhere = not (recorded_base and Path(recorded_base).exists())  # e.g. saved on another machine
    if provenance is not None and provenance.model_organism and organism_elsewhere and not (base_model or chat_model):
        from crosscoder.organism import build_model_organism

        organism = build_model_organism(seed=int(reading.get("seed") or 0), progress=config.progress)
        sources = organism.stream_sources()
        base_model, chat_model = sources["base_model"], sources["chat_model"]
        datasets = datasets or sources["datasets"]
        recorded = {
            **recorded,
            "layers": recorded.get("layers") or list(sources["layers"]),
            "drop_token_ids": sorted(set(recorded.get("drop_token_ids") or ()) | set(sources["drop_token_ids"])),
        }
    base_model = base_model or recorded.get("base_model")
    chat_model = chat_model or recorded.get("chat_model")
    datasets = datasets or tuple(recorded.get("datasets") or ())
    if not (base_model and chat_model and datasets):
        where = (
            f"its provenance names {provenance.data_source}" if provenance is not None else "it records no provenance"
        )
        raise ConfigError(
            f"the evaluation streams activations from both models, but {config.dictionary} does not say which ("
            f"{where}): pass --base-model, --chat-model and --datasets"
        )
    overridden = bool(config.base_model or config.chat_model)
    settings = StreamSettings(
        layers=config.layers or tuple(recorded.get("layers") or ()),
        context_length=int(recorded.get("context_length") or _default_context(base_model, config.trust_remote_code)),
        block_sequences=64,
        model_batch_size=16,
        drop_first_tokens=int(recorded.get("drop_first_tokens", 1)),
        drop_token_ids=tuple(recorded.get("drop_token_ids") or ()),
        outlier_norm_factor=float(recorded.get("outlier_norm_factor", 100.0)),
        text_column=reading.get("text_column") or "text",
        messages_column=reading.get("messages_column") or "messages",
        seed=int(reading.get("seed") or 0) + 1,  # the datasets in another order than training read them
    )
    device = resolve_device(config.device)
    dtypes = recorded.get("dtype") or ["float32", "float32"]
    return PairedActivationStream.from_models(
        base_model=base_model,
        chat_model=chat_model,
        datasets=datasets,
        settings=settings,
        batch_size=4096,
        base_revision=None if overridden else recorded.get("base_revision"),
        chat_revision=None if overridden else recorded.get("chat_revision"),
        dtypes=(config.model_dtype or dtypes[0], config.model_dtype or dtypes[1]),
        devices=(device, device),
        trust_remote_code=config.trust_remote_code,
        dataset_weights=reading.get("dataset_weights") if not config.datasets else None,
        dataset_split=reading.get("dataset_split") or "train",
        dataset_streaming=True,
        prefetch_blocks=0,
    )


def evaluate(config: EvalConfig) -> dict:
    """Run every analysis and write the report folder; returns the report. An error of the user's input leaves no
    empty ``--out`` folder behind that this call created."""
    created = _check_out(config.out)
    try:
        return _evaluate(config)
    except CrosscoderError:
        if created and not any(config.out.iterdir()):
            config.out.rmdir()
        raise


def _evaluate(config: EvalConfig) -> dict:
    dictionary = load_dictionary(config.dictionary)
    if config.latents:  # before any compute: the per-latent analyses come last
        checked_latents(dictionary, config.latents)
    if config.no_models:
        if config.latents:
            warnings.warn(
                f"--latents {list(config.latents)} choose the latents of the KL effects and steering, which need the "
                "models: --no-models writes the weights-only workspace of every latent without them",
                stacklevel=2,
            )
        return _weights_only(dictionary, config)
    stream = open_stream(dictionary, config)
    if stream.d_model != dictionary.d_model:
        raise DataError(
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
    is_crosscoder = dictionary.n_sources == 2
    report = _report_header(dictionary, config)
    images = []
    rows: list[dict[str, object]] = []

    recon = reconstruction(
        dictionary,
        (dictionary.input_from_pair(chunk.activations.float()) for chunk in chunks()),
        progress=config.progress,
    )
    report["reconstruction"] = recon.to_dict()
    frequencies = recon.frequencies

    if is_crosscoder:
        delta = relative_norm_difference(dictionary)
        cosine = decoder_cosine(dictionary)
        classes = latent_classes(delta)
        report["exclusivity"] = class_counts(dictionary, classes)
        images.append(delta_norm_histogram(delta, out / "delta_norm_histogram.png"))
        chat_only = [j for j, label in enumerate(classes) if label == CHAT_ONLY]
        shared = [j for j, label in enumerate(classes) if label == SHARED and frequencies[j] > 0]
        generator = torch.Generator().manual_seed(config.seed)
        n_baseline = min(len(shared), config.n_shared_baseline or max(len(chat_only), config.n_leaning))
        baseline = [shared[i] for i in torch.randperm(len(shared), generator=generator)[:n_baseline].tolist()]
        focus = chat_only or delta.argsort(descending=True)[: config.n_leaning].tolist()
        report["exclusivity"]["analysed"] = "chat-only" if chat_only else "most chat-leaning"
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

    stream.load_state_dict(start)
    settings = StoreSettings(
        dictionary.dict_size, config.n_top, config.n_quantiles, config.per_quantile, seed=config.seed
    )
    store = collect_store(
        dictionary, stream, out / "store", settings, max_tokens=config.num_tokens, progress=config.progress
    )
    tokenizer = stream.tokenizer
    centre_tokens = store.top_centre_tokens()
    for row in rows:
        names = dict.fromkeys(repr(tokenizer.decode([token])) for token in centre_tokens[int(row["latent"])])
        row["top_tokens"] = " ".join(names)[:120]

    conversations = _conversations(stream, config)
    layer = stream.settings.layers[0]
    if conversations and patches:
        kl = downstream_kl(
            stream.base_model,
            stream.chat_model,
            tokenizer,
            conversations,
            layer,
            patches,
            first_tokens=config.first_tokens,
            progress=config.progress,
        )
        report["downstream_kl"] = dataclasses.asdict(kl)
    else:
        report["downstream_kl"] = "skipped: no dataset with a messages column"
    analyses = model_analyses(
        dictionary,
        store,
        stream.base_model,
        stream.chat_model,
        tokenizer,
        layer,
        conversations,
        latents=config.latents,
        n_effects=config.n_effects,
        n_steer=config.n_steer,
        steer_multiple=config.steer_multiple,
        first_tokens=config.first_tokens,
        progress=config.progress,
    )
    report["latents"] = rows
    report["latent_effects"] = {str(latent): effect for latent, effect in analyses.kl.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    summary = {
        "FVE": f"{recon.fve:.4f}",
        "L0": f"{recon.l0:.2f}",
        "dead fraction": f"{recon.dead_fraction:.3f}",
        "tokens": store.tokens,
        **({"latent classes": report["exclusivity"]["counts"]} if is_crosscoder else {}),
    }
    _write(
        config,
        WorkspaceContent(
            f"{type(dictionary).__name__}: {config.dictionary}",
            dictionary.dict_size,
            latent_columns(dictionary, store, rows, analyses.kl),
            summary,
            [image.name for image in images],
            store,
            lambda token: tokenizer.decode([token]),
            analyses.readout,
            analyses.readout_latents,
            analyses.kl,
            analyses.steering,
        ),
    )
    return report


def _report_header(dictionary: SparseDictionary, config: EvalConfig) -> dict:
    """What every report starts with: which dictionary, its class and shape."""
    return {
        "dictionary": config.dictionary,
        "class": type(dictionary).__name__,
        "dict_size": dictionary.dict_size,
        "d_model": dictionary.d_model,
    }


def _weights_only(dictionary: SparseDictionary, config: EvalConfig) -> dict:
    """``--no-models``: the report and workspace of what the weights alone give."""
    report = _report_header(dictionary, config)
    images = []
    if dictionary.n_sources == 2:
        delta = relative_norm_difference(dictionary)
        classes = latent_classes(delta)
        report["exclusivity"] = class_counts(dictionary, classes)
        images.append(delta_norm_histogram(delta, config.out / "delta_norm_histogram.png").name)
    (config.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    summary = {"weights only": "no model was loaded (--no-models)", **report.get("exclusivity", {})}
    title = f"{type(dictionary).__name__}: {config.dictionary}"
    columns = latent_columns(dictionary, None)
    _write(config, WorkspaceContent(title, dictionary.dict_size, columns, summary, images))
    return report


def _write(config: EvalConfig, content: WorkspaceContent) -> None:
    """The workspace (and its JSON export with ``--export-json``)."""
    write_workspace(config.out, content, shard_size=config.shard_size, progress=config.progress)
    if config.export_json:
        export_json(config.out, config.out / "export")


def _check_out(out: Path) -> bool:
    """Refuse, before any compute, an ``--out`` that is a file or cannot be created or written; creates it, and says
    whether it did."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a folder for the report")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ConfigError(
            f"--out {out} cannot be created or written ({error.strerror or type(error).__name__}): pass a writable "
            "folder for the report"
        ) from error
    return created


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


def _default_context(model: str, trust_remote_code: bool) -> int:
    """For a dictionary that records no context length: 1024 tokens, or fewer if the model takes fewer (a model
    that cannot be read is reported when it is loaded)."""
    from transformers import AutoConfig

    try:
        limit = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).max_position_embeddings
    except (OSError, ValueError, AttributeError):
        return 1024
    return min(1024, limit) if isinstance(limit, int) else 1024
