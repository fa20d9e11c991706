"""Building the model organism once and loading it from its cache afterwards.

The cache folder (``default_root``) holds::

    base/                 config.json, model.safetensors, generation_config.json, tokenizer files
    chat/                 the same for the finetuned model; the tokenizer files are identical to base's
    data/general.jsonl    {"text": ...}: every general document (the base model's pretraining text), shuffled
    data/chat.jsonl       {"messages": [{"role", "content"}, ...]}: held-out conversations, never finetuned on
    organism.json         settings and losses; written last, so its presence marks a complete build

A build happens in a sibling folder ``.<name>.partial-<pid>`` that is renamed into place at the end: an
interrupted build leaves no half-written cache behind, and its leftovers are removed by the next build. When two
processes build the same organism at once, the first rename wins and the other process uses that build.

The default build takes about 75 s on 2 CPU cores. Held-out losses (nats; uniform is ln 2048 = 7.62):

    base on general text 4.29, chat on general text 5.34   (the finetune keeps most of the general text)
    base on baking chats 8.58, chat on baking chats 3.88   (and learns the domain)

With ``general_mix=0.5`` the chat model's losses are about 4.31 (general) and 4.37 (domain).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, LlamaForCausalLM

from crosscoder.errors import ConfigError
from crosscoder.organism.corpus import organism_data, write_datasets
from crosscoder.organism.settings import (
    DEFAULT_SETTINGS,
    DOMAIN,
    DOMAIN_WORDS,
    VERSION,
    OrganismSettings,
    settings_digest,
)
from crosscoder.organism.tokenizer import CHAT_MARKERS, SPECIAL_TOKENS, build_tokenizer, llama_config, render_chat
from crosscoder.organism.training import heldout_losses, pretrain_and_finetune
from crosscoder.progress import library_progress_bars
from crosscoder.user_cache import user_cache_root


@dataclass(frozen=True)
class ModelOrganism:
    """A built (or cached) model organism; every path is inside ``root``."""

    root: Path
    base_path: Path
    """``AutoModelForCausalLM`` / ``AutoTokenizer`` folder of the base model."""
    chat_path: Path
    """``AutoModelForCausalLM`` / ``AutoTokenizer`` folder of the finetuned chat model (same tokenizer)."""
    general_data: Path
    """JSON lines with a ``text`` column: ``datasets.load_dataset("json", data_files=str(general_data))``."""
    chat_data: Path
    """JSON lines with a ``messages`` column of held-out conversations, rendered by the chat template."""
    domain: str
    """The finetuning domain in words (``DOMAIN``)."""
    domain_words: tuple[str, ...]
    """Words that chat-only latents' top contexts should contain (``DOMAIN_WORDS``)."""
    layer: int
    """Recommended layer to diff (residual output of this block, ``hidden_states[layer + 1]``)."""
    seed: int
    general_mix: float
    settings: OrganismSettings
    losses: dict[str, float]
    """Mean next-token loss (nats) of ``base``/``chat`` on held-out ``general``/``domain`` text, e.g.
    ``losses["chat_domain"]``; ``uniform`` is ln(vocab size)."""
    build_seconds: float
    """Wall time of the build that produced this cache."""

    def stream_sources(self) -> dict[str, Any]:
        """What a paired stream of this organism reads: its models, datasets (general text, held-out baking
        chats), recommended layer and the chat markers' token ids (dropped from the stream)."""
        markers = AutoTokenizer.from_pretrained(self.chat_path).convert_tokens_to_ids(list(CHAT_MARKERS))
        return {
            "base_model": str(self.base_path),
            "chat_model": str(self.chat_path),
            "datasets": (str(self.general_data), str(self.chat_data)),
            "layers": (self.layer,),
            "drop_token_ids": tuple(sorted(markers)),
        }


def default_root(seed: int = 0, general_mix: float = 0.0, settings: OrganismSettings = DEFAULT_SETTINGS) -> Path:
    """``$CROSSCODER_CACHE/organism/<version>-seed<seed>-mix<general_mix>`` (default cache ``~/.cache/crosscoder``);
    non-default settings add a short hash of the settings to the name."""
    cache = user_cache_root()
    name = f"{VERSION}-seed{seed}-mix{general_mix:g}"
    if settings != DEFAULT_SETTINGS:
        name += f"-{settings_digest(settings)}"
    return cache / "organism" / name


def build_model_organism(
    root: Path | None = None,
    *,
    seed: int = 0,
    general_mix: float = 0.0,
    progress: bool = True,
    settings: OrganismSettings = DEFAULT_SETTINGS,
) -> ModelOrganism:
    """Load the model organism from ``root``, building it first if no complete build is there.

    The data (documents, conversations, splits, file contents) depends only on ``seed`` and ``settings``; the
    weights also on ``general_mix`` and, slightly, on the CPU's float summation order. A build takes about 75 s
    on 2 CPU cores; about 25 s where a build of the same seed and settings at another ``general_mix`` is in the
    same parent folder, whose base model it finetunes (pretraining does not depend on the mix; the chat model is
    the same, bit for bit, as a build from scratch on the same machine and software gives). ``root`` defaults to
    ``default_root(seed, general_mix, settings)``. Raises ``ConfigError`` for a ``general_mix`` outside [0, 1] or
    a ``root`` that holds an organism built with other arguments.
    """
    if not 0.0 <= general_mix <= 1.0:
        raise ConfigError(f"general_mix={general_mix} must be in [0, 1]: it is the fraction of general text")
    root = Path(root) if root is not None else default_root(seed, general_mix, settings)
    requested = {"version": VERSION, "seed": seed, "general_mix": general_mix, "settings": dataclasses.asdict(settings)}
    marker = root / "organism.json"
    if not marker.exists():
        _remove_stale_partial_builds(root)
        if root.exists():  # a folder without the marker: an interrupted build from before the atomic rename
            shutil.rmtree(root)
        partial = root.parent / f".{root.name}.partial-{os.getpid()}"
        bases = _built_bases(root.parent, requested)
        if progress:
            took = f"about 25 s: it finetunes the base of {bases[0].parent}" if bases else "about 75 s on 2 CPU cores"
            print(f"Building the model organism in {root} (once; {took})")
        _build(partial, seed=seed, general_mix=general_mix, settings=settings, progress=progress, bases=bases)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.rename(root)
        except OSError:  # another process finished the same build first: keep theirs
            shutil.rmtree(partial)
    recorded = json.loads(marker.read_text())
    found = {key: recorded.get(key) for key in requested}
    if found != requested:
        raise ConfigError(
            f"{root} holds a model organism built with {found}, not the requested {requested}: "
            "pass another root, or delete that folder to rebuild it"
        )
    return ModelOrganism(
        root=root,
        base_path=root / "base",
        chat_path=root / "chat",
        general_data=root / "data" / "general.jsonl",
        chat_data=root / "data" / "chat.jsonl",
        domain=recorded["domain"],
        domain_words=tuple(recorded["domain_words"]),
        layer=recorded["layer"],
        seed=seed,
        general_mix=general_mix,
        settings=settings,
        losses=recorded["losses"],
        build_seconds=recorded["build_seconds"],
    )


def _build(
    folder: Path, *, seed: int, general_mix: float, settings: OrganismSettings, progress: bool, bases: list[Path]
) -> None:
    """Build everything into ``folder``, writing ``organism.json`` last; the first of ``bases`` (built base models
    of this seed and these settings) that loads replaces pretraining."""
    start = time.perf_counter()
    data = organism_data(seed, settings)
    write_datasets(data, folder / "data", seed)
    chat_train_texts = [render_chat(messages) for messages in data.chat_train]
    tokenizer = build_tokenizer(data.general_train + chat_train_texts, settings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, settings))
    with library_progress_bars(progress):
        pretrained, base_from = _pretrained_weights(bases, model)
        pretrain_and_finetune(
            model,
            tokenizer,
            data,
            folder,
            seed=seed,
            general_mix=general_mix,
            settings=settings,
            progress=progress,
            pretrained=pretrained,
        )
        losses = heldout_losses(folder, tokenizer, data, settings)
    record = {
        "version": VERSION,
        "seed": seed,
        "general_mix": general_mix,
        "settings": dataclasses.asdict(settings),
        "domain": DOMAIN,
        "domain_words": list(DOMAIN_WORDS),
        "layer": settings.recommended_layer,
        "special_token_ids": {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS},
        "losses": losses,
        "build_seconds": time.perf_counter() - start,
        "base_from": base_from,
    }
    (folder / "organism.json").write_text(json.dumps(record, indent=2) + "\n")


def _built_bases(parent: Path, requested: dict[str, Any]) -> list[Path]:
    """The base models of the complete builds in ``parent`` that match ``requested`` at any ``general_mix``:
    pretraining depends on nothing else, so a build at another mix finetunes one of them instead (about two thirds
    of a build's time). Builds in progress (hidden ``.<name>.partial-<pid>`` folders) are not complete."""
    wanted = {key: value for key, value in requested.items() if key != "general_mix"}
    bases = []
    for marker in sorted(parent.glob("*/organism.json")):
        if marker.parent.name.startswith("."):
            continue
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(recorded, dict) and all(recorded.get(key) == value for key, value in wanted.items()):
            bases.append(marker.parent / "base")
    return bases


def _pretrained_weights(
    bases: list[Path], model: LlamaForCausalLM
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The weights of the first of ``bases`` that loads completely with ``model``'s shapes and the name of its
    build, else (None, None); each one skipped is named in a warning."""
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    for base in bases:
        try:
            loaded, loading = LlamaForCausalLM.from_pretrained(base, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            problem = str(error)
        else:
            weights = loaded.state_dict()
            incomplete = {kind: sorted(keys) for kind, keys in loading.items() if keys}
            if not incomplete and {name: tensor.shape for name, tensor in weights.items()} == shapes:
                return weights, base.parent.name
            problem = f"incomplete: {incomplete}" if incomplete else "its shapes are not these settings'"
        warnings.warn(f"skipped the built base model in {base}, which cannot be read ({problem})", stacklevel=4)
    return None, None


def _remove_stale_partial_builds(root: Path) -> None:
    """Delete ``.<name>.partial-<pid>`` folders beside ``root`` whose process is gone (interrupted builds)."""
    if not root.parent.exists():
        return
    for partial in root.parent.glob(f".{root.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        builder_running = pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))
        if not builder_running:
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
