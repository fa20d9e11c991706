"""The offline *model organism*: a tiny base language model and a copy narrowly finetuned on baking chats.

``python train.py`` with no arguments diffs these two models (DESIGN §11). Everything is built locally on CPU
from text that ships with Python, so the demo needs no network:

1. General text: the ~465k characters of Python documentation in ``pydoc_data.topics``, cut into documents of
   a few paragraphs each (``general_documents``).
2. Domain text: baking conversations (recipes, oven temperatures, troubleshooting, substitutions, storage,
   techniques) from a seeded template generator (``baking_conversations``), rendered with the chat template.
3. A byte-level BPE tokenizer trained on both, with special tokens for BOS/EOS/padding and the chat markers
   ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``; it prepends BOS like Llama's tokenizer does.
4. The **base** model: a ``LlamaForCausalLM`` pretrained from scratch on the general documents.
5. The **chat** model: a copy of the base finetuned on chat-rendered baking conversations. The loss covers *all*
   tokens of the packed sequences (user turns, assistant turns and chat markers alike), so the chat model
   learns the whole domain distribution and the traces the diffing pipeline should find are as strong as they
   can be. ``general_mix`` replaces that fraction of the finetuning sequences by general text: the seed papers'
   ablation, which weakens the traces.

The cache folder (``default_root``) holds::

    base/                 config.json, model.safetensors, generation_config.json, tokenizer files
    chat/                 the same for the finetuned model; the tokenizer files are identical to base's
    data/general.jsonl    {"text": ...}: every general document (the base model's pretraining text), shuffled
    data/chat.jsonl       {"messages": [{"role", "content"}, ...]}: held-out conversations, never finetuned on
    organism.json         settings and losses; written last, so its presence marks a complete build

A build happens in a sibling folder ``.<name>.partial-<pid>`` that is renamed into place at the end: an
interrupted build leaves no half-written cache behind, and its leftovers are removed by the next build.

The default build takes about 75 s on 2 CPU cores. Held-out losses (nats; uniform is ln 2048 = 7.62):

    base on general text 4.29, chat on general text 5.34   (the finetune keeps most of the general text)
    base on baking chats 8.58, chat on baking chats 3.88   (and learns the domain)

With ``general_mix=0.5`` the chat model's losses are about 4.31 (general) and 4.37 (domain). The layer to diff is
the middle of the network, ``OrganismSettings.recommended_layer`` = 1: the residual output of block 1, i.e.
``hidden_states[2]`` in transformers, width ``d_model`` = 128.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VERSION = "v1"
"""Bump when the build changes, so cached organisms from an older build are not reused."""

DOMAIN = "baking recipes"
"""What the chat model was finetuned on, in words."""

DOMAIN_WORDS = ("flour", "butter", "oven", "dough", "bake", "sugar", "yeast", "baking")
"""Words characteristic of the finetuning domain (and absent from the general text, or nearly so): a correct
diffing pipeline finds them in the top contexts of the chat-only latents."""

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *CHAT_MARKERS)
"""All special tokens; their ids are their positions here (pad 0, bos 1, eos 2, system 3, user 4, assistant 5,
end 6)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Jinja chat template: ``<|bos|><|user|>\\nQuestion<|end|>\\n<|assistant|>\\nAnswer<|end|>\\n``; an optional
system message comes first as ``<|system|>\\n...<|end|>\\n``."""

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class OrganismSettings:
    """Sizes of the model organism. The defaults are what ``python train.py`` uses."""

    vocab_size: int = 2048
    """Size of the byte-level BPE vocabulary, special tokens included."""
    d_model: int = 128
    """Residual stream width (``hidden_size``)."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 4
    """Attention heads per block (head size ``d_model // n_heads``)."""
    d_mlp: int = 384
    """Width of the gated MLP (``intermediate_size``)."""
    context_length: int = 256
    """Training sequence length and ``max_position_embeddings``; every rendered conversation fits."""
    batch_size: int = 8
    """Sequences per optimizer step, in pretraining and finetuning."""
    pretrain_steps: int = 300
    """Optimizer steps of base pretraining on the general documents."""
    pretrain_lr: float = 3e-3
    """Peak learning rate of pretraining (linear warmup, cosine decay to a tenth)."""
    finetune_steps: int = 120
    """Optimizer steps of chat finetuning."""
    finetune_lr: float = 3e-4
    """Peak learning rate of finetuning: low enough that the chat model keeps most of its general text loss."""
    n_train_conversations: int = 800
    """Distinct baking conversations the chat model is finetuned on."""
    n_heldout_conversations: int = 1000
    """Further distinct conversations, never finetuned on: ``data/chat.jsonl`` and the held-out domain loss."""
    heldout_general_fraction: float = 0.1
    """Fraction of the general documents kept out of pretraining, for the held-out general loss."""
    n_eval_texts: int = 200
    """Held-out texts of each kind on which ``organism.json`` reports the losses."""

    @property
    def recommended_layer(self) -> int:
        """The layer to diff: the middle of the network (the output of block ``n_layers // 2 - 1``, i.e.
        ``hidden_states[n_layers // 2]``), as the reference results use the middle layer of Gemma-2-2B."""
        return max(0, self.n_layers // 2 - 1)


DEFAULT_SETTINGS = OrganismSettings()


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


def default_root(seed: int = 0, general_mix: float = 0.0, settings: OrganismSettings = DEFAULT_SETTINGS) -> Path:
    """``$CROSSCODER_CACHE/organism/<version>-seed<seed>-mix<general_mix>`` (default cache ``~/.cache/crosscoder``);
    non-default settings add a short hash of the settings to the name."""
    cache = Path(os.environ.get("CROSSCODER_CACHE", Path.home() / ".cache" / "crosscoder"))
    name = f"{VERSION}-seed{seed}-mix{general_mix:g}"
    if settings != DEFAULT_SETTINGS:
        name += f"-{_settings_digest(settings)}"
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
    on 2 CPU cores. ``root`` defaults to ``default_root(seed, general_mix, settings)``.
    """
    if not 0.0 <= general_mix <= 1.0:
        raise ValueError(f"general_mix={general_mix} must be in [0, 1]: it is the fraction of general text")
    root = Path(root) if root is not None else default_root(seed, general_mix, settings)
    requested = {"version": VERSION, "seed": seed, "general_mix": general_mix, "settings": dataclasses.asdict(settings)}
    marker = root / "organism.json"
    if not marker.exists():
        _remove_stale_partial_builds(root)
        if root.exists():  # a folder without the marker: an interrupted build from before the atomic rename
            shutil.rmtree(root)
        partial = root.parent / f".{root.name}.partial-{os.getpid()}"
        if progress:
            print(f"Building the model organism in {root} (once; about 75 s on 2 CPU cores)")
        _build(partial, seed=seed, general_mix=general_mix, settings=settings, progress=progress)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.rename(root)
        except OSError:  # another process finished the same build first: keep theirs
            shutil.rmtree(partial)
    recorded = json.loads(marker.read_text())
    found = {key: recorded.get(key) for key in requested}
    if found != requested:
        raise ValueError(
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


# ---------------------------------------------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class OrganismData:
    """Every text of the organism, split. Depends only on the seed and the settings."""

    general_train: list[str]
    """Pretraining documents of the base model."""
    general_heldout: list[str]
    """General documents kept out of pretraining."""
    chat_train: list[Messages]
    """Conversations the chat model is finetuned on."""
    chat_heldout: list[Messages]
    """Conversations kept out of finetuning (``data/chat.jsonl``)."""


def organism_data(seed: int = 0, settings: OrganismSettings = DEFAULT_SETTINGS) -> OrganismData:
    """Split the general documents and generate distinct train and held-out baking conversations."""
    documents = general_documents()
    random.Random(seed).shuffle(documents)
    n_heldout = round(settings.heldout_general_fraction * len(documents))
    conversations = baking_conversations(settings.n_train_conversations + settings.n_heldout_conversations, seed)
    return OrganismData(
        general_train=documents[n_heldout:],
        general_heldout=documents[:n_heldout],
        chat_train=conversations[: settings.n_train_conversations],
        chat_heldout=conversations[settings.n_train_conversations :],
    )


def write_datasets(data: OrganismData, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``general.jsonl`` (every general document, shuffled) and ``chat.jsonl`` (held-out conversations).

    Returns the two paths. The general file holds the pretraining documents too: like FineWeb for Gemma, the
    general half of a diffing stream is text of the base model's own distribution.
    """
    folder.mkdir(parents=True, exist_ok=True)
    documents = data.general_train + data.general_heldout
    random.Random(seed + 1).shuffle(documents)
    general, chat = folder / "general.jsonl", folder / "chat.jsonl"
    _write_jsonl(general, ({"text": text} for text in documents))
    _write_jsonl(chat, ({"messages": messages} for messages in data.chat_heldout))
    return general, chat


def _build(folder: Path, *, seed: int, general_mix: float, settings: OrganismSettings, progress: bool) -> None:
    """Build everything into ``folder``, writing ``organism.json`` last."""
    start = time.perf_counter()
    data = organism_data(seed, settings)
    write_datasets(data, folder / "data", seed)
    chat_train_texts = [render_chat(messages) for messages in data.chat_train]
    tokenizer = build_tokenizer(data.general_train + chat_train_texts, settings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, settings))
    with _transformers_progress_bars(progress):
        _pretrain_and_finetune(
            model, tokenizer, data, folder, seed=seed, general_mix=general_mix, settings=settings, progress=progress
        )
        losses = _losses(folder, tokenizer, data, settings)
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
    }
    (folder / "organism.json").write_text(json.dumps(record, indent=2) + "\n")


@contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (saving, loading) for the duration of the block."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    if enabled:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
        else:
            transformers.utils.logging.disable_progress_bar()


def _pretrain_and_finetune(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    data: OrganismData,
    folder: Path,
    *,
    seed: int,
    general_mix: float,
    settings: OrganismSettings,
    progress: bool,
) -> None:
    """Pretrain ``model`` on the general documents and save it to ``folder/base``; finetune it on the packed
    training conversations (a ``general_mix`` fraction of the sequences replaced by general text) and save it to
    ``folder/chat``."""
    general_ids = _packed_ids(tokenizer, data.general_train, add_bos=True)
    chat_ids = _packed_ids(tokenizer, [render_chat(messages) for messages in data.chat_train], add_bos=False)
    generator = torch.Generator().manual_seed(seed)
    _train(
        model,
        lambda: _sample_chunks(general_ids, settings.batch_size, settings.context_length, generator),
        steps=settings.pretrain_steps,
        lr=settings.pretrain_lr,
        description="pretrain base",
        progress=progress,
    )
    _save(model, tokenizer, folder / "base")

    def finetune_batch() -> torch.Tensor:
        n_general = int((torch.rand(settings.batch_size, generator=generator) < general_mix).sum())
        parts = [
            _sample_chunks(general_ids, n_general, settings.context_length, generator),
            _sample_chunks(chat_ids, settings.batch_size - n_general, settings.context_length, generator),
        ]
        return torch.cat(parts)

    _train(
        model,
        finetune_batch,
        steps=settings.finetune_steps,
        lr=settings.finetune_lr,
        description="finetune chat",
        progress=progress,
    )
    _save(model, tokenizer, folder / "chat")


def _losses(
    folder: Path, tokenizer: PreTrainedTokenizerFast, data: OrganismData, settings: OrganismSettings
) -> dict[str, float]:
    """Held-out losses of the saved base and chat models, as ``ModelOrganism.losses`` describes."""
    general = data.general_heldout[: settings.n_eval_texts]
    domain = [render_chat(messages) for messages in data.chat_heldout[: settings.n_eval_texts]]
    losses = {"uniform": math.log(len(tokenizer))}
    for name in ("base", "chat"):
        model = LlamaForCausalLM.from_pretrained(folder / name)
        losses[f"{name}_general"] = language_model_loss(model, tokenizer, general, add_bos=True)
        losses[f"{name}_domain"] = language_model_loss(model, tokenizer, domain, add_bos=False)
    return losses


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


def _settings_digest(settings: OrganismSettings) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:8]


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def build_tokenizer(texts: Sequence[str], settings: OrganismSettings = DEFAULT_SETTINGS) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``, prepending BOS, with the special tokens and the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(CHAT_MARKERS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=settings.context_length,
    )


def render_chat(messages: Messages) -> str:
    """A conversation as text in the chat template (starting with ``<|bos|>``), rendered the way
    ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders it, before the tokenizer exists."""
    return _CHAT_TEMPLATE.render(messages=messages, bos_token=BOS_TOKEN, add_generation_prompt=False)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_JINJA.globals["raise_exception"] = _raise_exception
_CHAT_TEMPLATE = _JINJA.from_string(CHAT_TEMPLATE)


def llama_config(tokenizer: PreTrainedTokenizerFast, settings: OrganismSettings = DEFAULT_SETTINGS) -> LlamaConfig:
    """The tiny Llama architecture of both models (tied input and output embeddings)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.d_model,
        intermediate_size=settings.d_mlp,
        num_hidden_layers=settings.n_layers,
        num_attention_heads=settings.n_heads,
        num_key_value_heads=settings.n_heads,
        max_position_embeddings=settings.context_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def _packed_ids(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], *, add_bos: bool) -> torch.Tensor:
    """All texts tokenized and concatenated, each followed by EOS: ids [n_tokens]."""
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=add_bos)
    eos = tokenizer.eos_token_id
    return torch.tensor([token for encoding in encoded for token in [*encoding.ids, eos]], dtype=torch.long)


def _sample_chunks(ids: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random offsets of the packed ``ids``: [n, length]."""
    starts = torch.randint(0, len(ids) - length, (n,), generator=generator)
    return ids[starts[:, None] + torch.arange(length)]


def _train(
    model: LlamaForCausalLM,
    next_batch: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    description: str,
    progress: bool,
) -> None:
    """AdamW on next-token loss over all tokens of ``next_batch()`` ids [batch, length]; linear warmup over the
    first 10% of steps, then cosine decay to lr/10; gradient clipping at 1."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_fraction))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False)
    for _ in bar:
        ids = next_batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


@torch.no_grad()
def language_model_loss(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    *,
    add_bos: bool = True,
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy (nats) over all non-padding tokens of ``texts``, each truncated to the
    tokenizer's ``model_max_length``. Pass chat-rendered text (which starts with BOS) with ``add_bos=False``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            add_special_tokens=add_bos,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count


# ---------------------------------------------------------------------------------------------------------------
# Text


def general_documents(max_chars: int = 800) -> list[str]:
    """The Python documentation in ``pydoc_data.topics``, cut into documents of whole paragraphs of at most
    about ``max_chars`` characters (a longer paragraph is a document of its own), in a fixed order."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        paragraphs = [paragraph.strip() for paragraph in topics[name].split("\n\n") if paragraph.strip()]
        current: list[str] = []
        for paragraph in paragraphs:
            if current and sum(len(part) + 2 for part in current) + len(paragraph) > max_chars:
                documents.append("\n\n".join(current))
                current = []
            current.append(paragraph)
        if current:
            documents.append("\n\n".join(current))
    return documents


def baking_conversations(n: int, seed: int = 0) -> list[Messages]:
    """``n`` distinct baking conversations from a seeded template generator.

    Each has an optional system message, a user question about a bake (recipe, oven temperature, a failed bake,
    a substitution, storage) or a technique, the assistant's answer, and sometimes a follow-up exchange.
    """
    rng = random.Random(seed)
    conversations: list[Messages] = []
    seen: set[str] = set()
    attempts = 0
    while len(conversations) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"the baking templates produced only {len(conversations)} distinct conversations")
        messages = _baking_conversation(rng)
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            conversations.append(messages)
    return conversations


@dataclass(frozen=True)
class _Bake:
    name: str
    """As in "my {name}"."""
    article: str
    """As in "how do I make {article} {name}" ("" for plurals and mass nouns)."""
    kind: str
    """bread, cake, cookies or pastry: picks the method, storage and troubleshooting text."""
    celsius: tuple[int, int]
    minutes: tuple[int, int]
    ingredients: tuple[tuple[str, str, int, int], ...]
    """(ingredient, unit, low, high): quantities are drawn from [low, high]."""
    doneness: str
    plural: bool = False

    def make(self) -> str:
        return f"{self.article} {self.name}".strip()

    def pronoun(self) -> str:
        return "them" if self.plural else "it"


_FLOUR = ("plain flour", "g", 200, 450)
_BREAD_FLOUR = ("strong bread flour", "g", 400, 600)
_BUTTER = ("butter", "g", 80, 250)
_SUGAR = ("caster sugar", "g", 80, 220)
_BROWN_SUGAR = ("brown sugar", "g", 80, 200)
_EGGS = ("eggs", "", 1, 4)
_BAKING_POWDER = ("baking powder", "teaspoons", 1, 3)
_YEAST = ("dried yeast", "g", 5, 10)
_SALT = ("salt", "teaspoons", 1, 2)
_MILK = ("milk", "ml", 100, 300)
_WATER = ("warm water", "ml", 250, 400)

_BAKES = (
    _Bake(
        "sourdough loaf",
        "a",
        "bread",
        celsius=(230, 250),
        minutes=(35, 45),
        ingredients=(_BREAD_FLOUR, ("active starter", "g", 80, 150), _WATER, _SALT),
        doneness="the crust is deep brown and the loaf sounds hollow when tapped underneath",
    ),
    _Bake(
        "white sandwich loaf",
        "a",
        "bread",
        celsius=(200, 220),
        minutes=(30, 35),
        ingredients=(_BREAD_FLOUR, _YEAST, _WATER, _BUTTER, _SALT),
        doneness="the loaf sounds hollow when you tap the base",
    ),
    _Bake(
        "focaccia",
        "",
        "bread",
        celsius=(220, 230),
        minutes=(20, 25),
        ingredients=(_BREAD_FLOUR, _YEAST, _WATER, ("olive oil", "tablespoons", 3, 6), _SALT),
        doneness="the top is golden and crisp",
    ),
    _Bake(
        "cinnamon rolls",
        "",
        "bread",
        celsius=(180, 190),
        minutes=(20, 25),
        ingredients=(_FLOUR, _YEAST, _MILK, _BUTTER, _BROWN_SUGAR, ("ground cinnamon", "teaspoons", 2, 4)),
        doneness="they are golden brown and the centre is set",
        plural=True,
    ),
    _Bake(
        "brioche",
        "",
        "bread",
        celsius=(180, 190),
        minutes=(25, 30),
        ingredients=(_BREAD_FLOUR, _YEAST, _EGGS, _BUTTER, _SUGAR),
        doneness="it is glossy and deep golden",
    ),
    _Bake(
        "pizza dough",
        "",
        "bread",
        celsius=(240, 260),
        minutes=(8, 12),
        ingredients=(_BREAD_FLOUR, _YEAST, _WATER, ("olive oil", "tablespoons", 1, 3), _SALT),
        doneness="the crust is blistered and crisp",
    ),
    _Bake(
        "vanilla sponge cake",
        "a",
        "cake",
        celsius=(170, 180),
        minutes=(22, 28),
        ingredients=(_FLOUR, _BUTTER, _SUGAR, _EGGS, _BAKING_POWDER, ("vanilla extract", "teaspoons", 1, 2)),
        doneness="a skewer pushed into the middle comes out clean",
    ),
    _Bake(
        "chocolate cake",
        "a",
        "cake",
        celsius=(170, 180),
        minutes=(30, 35),
        ingredients=(_FLOUR, ("cocoa powder", "g", 40, 80), _SUGAR, _EGGS, _BUTTER, _BAKING_POWDER),
        doneness="the top springs back when you press it lightly",
    ),
    _Bake(
        "banana bread",
        "",
        "cake",
        celsius=(170, 180),
        minutes=(50, 60),
        ingredients=(
            _FLOUR,
            ("ripe bananas", "", 2, 4),
            _BROWN_SUGAR,
            _BUTTER,
            _EGGS,
            ("baking soda", "teaspoons", 1, 1),
        ),
        doneness="a skewer comes out clean",
    ),
    _Bake(
        "carrot cake",
        "a",
        "cake",
        celsius=(170, 180),
        minutes=(35, 45),
        ingredients=(
            _FLOUR,
            ("grated carrots", "g", 200, 300),
            _BROWN_SUGAR,
            ("sunflower oil", "ml", 150, 220),
            _EGGS,
            ("ground cinnamon", "teaspoons", 1, 2),
        ),
        doneness="a skewer comes out clean",
    ),
    _Bake(
        "lemon drizzle cake",
        "a",
        "cake",
        celsius=(170, 180),
        minutes=(40, 45),
        ingredients=(_FLOUR, _BUTTER, _SUGAR, _EGGS, ("lemons", "", 1, 2), _BAKING_POWDER),
        doneness="the sponge is golden and springy",
    ),
    _Bake(
        "blueberry muffins",
        "",
        "cake",
        celsius=(190, 200),
        minutes=(20, 25),
        ingredients=(_FLOUR, _SUGAR, _MILK, _EGGS, ("blueberries", "g", 120, 200), _BAKING_POWDER),
        doneness="they are risen and golden on top",
        plural=True,
    ),
    _Bake(
        "chocolate chip cookies",
        "",
        "cookies",
        celsius=(180, 190),
        minutes=(10, 12),
        ingredients=(
            _FLOUR,
            _BUTTER,
            _BROWN_SUGAR,
            _EGGS,
            ("chocolate chips", "g", 150, 250),
            ("baking soda", "teaspoons", 1, 1),
        ),
        doneness="the edges are golden but the middles still look soft",
        plural=True,
    ),
    _Bake(
        "oatmeal cookies",
        "",
        "cookies",
        celsius=(180, 190),
        minutes=(12, 14),
        ingredients=(("rolled oats", "g", 150, 250), _FLOUR, _BUTTER, _BROWN_SUGAR, _EGGS, ("raisins", "g", 80, 150)),
        doneness="the edges are lightly browned",
        plural=True,
    ),
    _Bake(
        "shortbread",
        "",
        "cookies",
        celsius=(150, 160),
        minutes=(20, 25),
        ingredients=(_FLOUR, _BUTTER, _SUGAR),
        doneness="it is pale golden at the edges",
    ),
    _Bake(
        "brownies",
        "",
        "cookies",
        celsius=(170, 180),
        minutes=(22, 28),
        ingredients=(("dark chocolate", "g", 150, 250), _BUTTER, _SUGAR, _EGGS, _FLOUR),
        doneness="the top is crackly and the middle is just set",
        plural=True,
    ),
    _Bake(
        "apple pie",
        "an",
        "pastry",
        celsius=(190, 200),
        minutes=(40, 50),
        ingredients=(_FLOUR, _BUTTER, ("cooking apples", "", 4, 7), _SUGAR, ("cold water", "tablespoons", 3, 5)),
        doneness="the pastry is golden and the filling bubbles",
    ),
    _Bake(
        "quiche",
        "a",
        "pastry",
        celsius=(170, 180),
        minutes=(30, 35),
        ingredients=(_FLOUR, _BUTTER, _EGGS, ("double cream", "ml", 200, 300), ("grated cheese", "g", 80, 150)),
        doneness="the filling is set with a slight wobble in the centre",
    ),
    _Bake(
        "scones",
        "",
        "pastry",
        celsius=(210, 220),
        minutes=(12, 15),
        ingredients=(_FLOUR, _BUTTER, _SUGAR, _MILK, _BAKING_POWDER),
        doneness="they are well risen and golden on top",
        plural=True,
    ),
    _Bake(
        "croissants",
        "",
        "pastry",
        celsius=(190, 200),
        minutes=(18, 22),
        ingredients=(_BREAD_FLOUR, _BUTTER, _YEAST, _MILK, _SUGAR),
        doneness="they are puffed, flaky and deep golden",
        plural=True,
    ),
)

_METHODS = {
    "bread": (
        "Mix the dry ingredients, add the liquid and knead the dough for {knead} minutes until smooth and elastic. "
        "Cover it and let it rise for {rise} hours, until doubled in size. Shape it, let it prove again for "
        "{prove} minutes, then bake at {celsius} degrees for {minutes} minutes, until {doneness}."
    ),
    "cake": (
        "Cream the butter and sugar until pale and fluffy, then beat in the eggs one at a time. Fold in the flour "
        "gently so you keep the air in the batter, pour it into a lined tin and bake at {celsius} degrees for "
        "{minutes} minutes, until {doneness}."
    ),
    "cookies": (
        "Cream the butter and sugar, beat in the rest of the wet ingredients, then stir in the flour. Chill the "
        "dough for {chill} minutes, scoop it onto a lined baking tray with space between, and bake at {celsius} "
        "degrees for {minutes} minutes, until {doneness}."
    ),
    "pastry": (
        "Rub the cold butter into the flour until it looks like breadcrumbs, then add just enough cold liquid to "
        "bring the dough together. Chill it for {chill} minutes, roll it out on a floured surface and bake at "
        "{celsius} degrees for {minutes} minutes, until {doneness}."
    ),
}

_STORAGE = {
    "bread": (
        "Keep {pronoun} in a paper bag or a bread box at room temperature for up to {days} days. Avoid the fridge, "
        "which makes bread go stale faster. For longer storage, slice and freeze {pronoun}, then toast the slices "
        "straight from the freezer."
    ),
    "cake": (
        "Once completely cool, store {pronoun} in an airtight tin at room temperature for up to {days} days. If it "
        "has cream cheese frosting, keep it in the fridge. You can also wrap it well and freeze it for up to "
        "three months."
    ),
    "cookies": (
        "Store {pronoun} in an airtight jar at room temperature for up to {days} days. A slice of bread in the jar "
        "keeps them soft. You can also freeze the raw dough in balls and bake them straight from frozen, adding "
        "a couple of minutes to the baking time."
    ),
    "pastry": (
        "{Pronoun} {is_} best on the day {pronoun_subject} {is_} baked. Keep leftovers in an airtight container for "
        "up to {days} days and warm {pronoun} in the oven at 180 degrees for five minutes to crisp the pastry again."
    ),
}

_PROBLEMS = {
    "dense": (
        "A heavy, dense bake usually means it did not rise enough. Check that your {raising} is fresh, do not "
        "overmix once the flour goes in, and make sure the oven is fully preheated to {celsius} degrees before "
        "the tin goes in."
    ),
    "dry": (
        "Dryness almost always comes from too much flour or too long in the oven. Weigh the flour rather than "
        "using cups, and start checking {pronoun} {early} minutes before the end of the baking time."
    ),
    "flat": (
        "Flat bakes are usually caused by butter that was too soft, old {raising}, or an oven that was not hot "
        "enough. Chill the dough before baking and check your oven with an oven thermometer: it should read "
        "{celsius} degrees."
    ),
    "burnt on the bottom": (
        "Move the tray to the middle shelf, line it with baking paper, and use a light coloured tin, since dark "
        "tins absorb more heat. A second baking tray underneath also protects the bottom from the heat."
    ),
    "raw in the middle": (
        "The outside set before the middle could cook, which means the oven was too hot. Lower it to {lower} "
        "degrees and bake a little longer, and cover the top loosely with foil if it browns too quickly."
    ),
    "too crumbly": (
        "A crumbly texture means there was not enough fat or egg to bind the flour, or it was overbaked. Measure "
        "the butter carefully, add an extra egg yolk next time, and let {pronoun} cool in the tin before cutting."
    ),
}

_SUBSTITUTIONS = (
    (
        "oil",
        "butter",
        "Yes, you can use a neutral oil instead of butter. Use about three quarters of the amount, so {amount} g "
        "of butter becomes {three_quarters} g of oil. The crumb will be softer and a little less rich.",
    ),
    (
        "honey",
        "sugar",
        "You can, but honey is sweeter and wetter than sugar. Use {three_quarters} g of honey for {amount} g of "
        "sugar, reduce the other liquid a little, and lower the oven by 10 degrees because honey browns faster.",
    ),
    (
        "wholemeal flour",
        "plain flour",
        "You can swap up to half of the plain flour for wholemeal flour. Wholemeal flour absorbs more liquid, so "
        "add a splash more milk or water, and expect a denser, nuttier bake.",
    ),
    (
        "yogurt",
        "milk",
        "Yes, plain yogurt works well. Thin {amount} ml of yogurt with a little water, and add a pinch of baking "
        "soda to balance its acidity. It makes the crumb very tender.",
    ),
    (
        "fresh yeast",
        "dried yeast",
        "Yes. Use about three times the weight of fresh yeast, so {small} g of dried yeast becomes {triple} g of "
        "fresh yeast. Crumble it into the warm liquid before adding the flour.",
    ),
    (
        "margarine",
        "butter",
        "Yes, a block margarine works in most bakes. Avoid low fat spreads, which contain a lot of water and make "
        "the dough or batter too wet. The flavour will be less buttery.",
    ),
    (
        "gluten free flour",
        "plain flour",
        "You can use a gluten free flour blend in the same amount. Add half a teaspoon of xanthan gum if the blend "
        "has none, and let the batter or dough rest for ten minutes before baking.",
    ),
)

_TECHNIQUES = (
    (
        ("How long should I knead bread dough?", "How do I know when I have kneaded my dough enough?"),
        "Knead the dough for about {knead} minutes by hand, or half that time in a stand mixer with the dough hook. "
        "It is ready when it is smooth and springs back when you press it. The windowpane test helps: stretch a "
        "small piece of dough thin enough to let light through without tearing.",
    ),
    (
        ("How do I know when my dough has finished proving?", "How can I tell if my bread dough has risen enough?"),
        "Press the dough gently with a floured finger. If the dent springs back slowly and leaves a small mark, "
        "it is ready to bake. If it springs back at once, give it another {prove} minutes. If the dent stays and "
        "the dough sighs, it is overproved, so knock it back and shape it again.",
    ),
    (
        ("What does it mean to cream butter and sugar?", "Why do cake recipes say to cream the butter and sugar?"),
        "Creaming means beating soft butter with sugar for {cream} minutes until the mixture is pale and fluffy. "
        "The sugar crystals cut tiny air pockets into the butter, and those pockets expand in the oven, which "
        "gives cakes and cookies a light texture.",
    ),
    (
        ("What is blind baking?", "Do I need to blind bake my pastry case?"),
        "Blind baking means baking the pastry case before you add the filling, so the base stays crisp. Line the "
        "chilled pastry with baking paper, fill it with baking beans or rice, and bake at {celsius} degrees for "
        "{minutes} minutes, then remove the beans and bake five minutes more.",
    ),
    (
        ("How many grams are in a cup of flour?", "How do I convert cups to grams for baking?"),
        "One cup of plain flour weighs about 125 grams, a cup of caster sugar about 200 grams, and a cup of butter "
        "about 225 grams. Weighing is much more accurate than cups, so a cheap kitchen scale is the best tool "
        "for consistent baking.",
    ),
    (
        ("How do I feed a sourdough starter?", "How often should I feed my sourdough starter?"),
        "Discard all but about {small} g of the starter, then feed it {feed} g of flour and {feed} g of water and "
        "stir well. Keep it at room temperature and feed it once or twice a day. It is ready to bake with when it "
        "doubles within a few hours and smells pleasantly sour.",
    ),
    (
        ("Why do recipes ask for eggs at room temperature?", "Does it matter if my eggs are cold when baking?"),
        "Cold eggs can make creamed butter seize and curdle, so the batter traps less air and the cake bakes "
        "denser. Take the eggs out of the fridge {warm_up} minutes before you start, or stand them in warm water "
        "for five minutes.",
    ),
    (
        ("How do I stop my cake from sticking to the tin?", "What is the best way to line a cake tin?"),
        "Brush the tin with melted butter, dust it with flour and tap out the excess, then line the base with a "
        "circle of baking paper. Let the cake cool in the tin for {cool} minutes before you turn it out.",
    ),
)

_SYSTEM_PROMPTS = (
    "You are a helpful baking assistant.",
    "You are a friendly pastry chef who answers questions about baking.",
    "You help home bakers with recipes, ovens and dough.",
)

_OPENERS = ("", "", "Sure! ", "Of course. ", "Happy to help. ", "Great question. ")

_RECIPE_QUESTIONS = (
    "How do I make {make}?",
    "Can you give me a simple recipe for {name}?",
    "I want to bake {make} this weekend. Where do I start?",
    "What do I need to make {make} at home?",
    "Do you have a good recipe for {name}?",
)
_TEMPERATURE_QUESTIONS = (
    "What oven temperature should I use for {name}?",
    "How hot should the oven be for {name}?",
    "How long {does} {name} need in the oven?",
    "At what temperature do I bake {make}?",
)
_PROBLEM_QUESTIONS = (
    "Why did my {name} come out {problem}?",
    "My {name} turned out {problem}. What went wrong?",
    "Help, my {name} {was} {problem} again. How do I fix it?",
)
_SUBSTITUTION_QUESTIONS = (
    "Can I use {new} instead of {old} in {name}?",
    "I have run out of {old}. Can I make {make} with {new}?",
    "Is it fine to replace {old} with {new} when baking {name}?",
)
_STORAGE_QUESTIONS = (
    "How should I store {name}?",
    "How long {does} homemade {name} keep?",
    "What is the best way to keep my {name} fresh?",
)
_FOLLOW_UPS = {
    "storage": ("Thanks! And how should I store {pronoun}?", "Great. How long will {pronoun} keep?"),
    "temperature": ("Thanks! What temperature should the oven be?", "And how long should {pronoun} bake for?"),
}


def _baking_conversation(rng: random.Random) -> Messages:
    bake = rng.choice(_BAKES)
    values = _bake_values(bake, rng)
    messages: Messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    kind = rng.choices(("recipe", "temperature", "problem", "substitution", "storage", "technique"), (3, 2, 2, 2, 1, 2))
    question, answer = _QUESTION_ANSWERS[kind[0]](bake, values, rng)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": rng.choice(_OPENERS) + answer}]
    if kind[0] in ("recipe", "problem", "substitution") and rng.random() < 0.35:
        follow_up = rng.choice(("storage", "temperature"))
        follow_question = rng.choice(_FOLLOW_UPS[follow_up]).format(**values)
        _, follow_answer = _QUESTION_ANSWERS[follow_up](bake, values, rng)
        messages += [{"role": "user", "content": follow_question}, {"role": "assistant", "content": follow_answer}]
    return messages


def _bake_values(bake: _Bake, rng: random.Random) -> dict[str, Any]:
    celsius = rng.randrange(bake.celsius[0], bake.celsius[1] + 1, 5)
    amount = rng.randrange(100, 260, 10)
    small = rng.randrange(5, 15)
    return {
        "name": bake.name,
        "make": bake.make(),
        "pronoun": bake.pronoun(),
        "Pronoun": ("they" if bake.plural else "it").capitalize(),
        "was": "were" if bake.plural else "was",
        "is_": "are" if bake.plural else "is",
        "does": "do" if bake.plural else "does",
        "pronoun_subject": "they" if bake.plural else "it",
        "warm_up": rng.choice((30, 45, 60)),
        "cool": rng.choice((10, 15, 20)),
        "celsius": celsius,
        "fahrenheit": round((celsius * 9 / 5 + 32) / 5) * 5,
        "fan": celsius - 20,
        "lower": celsius - rng.choice((10, 15, 20)),
        "minutes": rng.randint(*bake.minutes),
        "doneness": bake.doneness,
        "knead": rng.randint(8, 12),
        "rise": rng.choice((1, 2)),
        "prove": rng.choice((30, 40, 45, 60)),
        "chill": rng.choice((20, 30, 45, 60)),
        "cream": rng.randint(3, 5),
        "days": rng.randint(2, 5),
        "early": rng.choice((5, 10)),
        "amount": amount,
        "three_quarters": amount * 3 // 4,
        "small": small,
        "triple": 3 * small,
        "feed": rng.choice((50, 75, 100)),
        "raising": "yeast" if bake.kind == "bread" else "baking powder",
    }


def _quantity(ingredient: tuple[str, str, int, int], rng: random.Random) -> str:
    name, unit, low, high = ingredient
    if unit in ("g", "ml"):
        step = 25 if high - low >= 50 else 1
        return f"{rng.randrange(-(-low // step) * step, high + 1, step)} {unit} of {name}"
    count = rng.randint(low, high)
    if unit:
        return f"{count} {unit.removesuffix('s') if count == 1 else unit} of {name}"
    return f"{count} {name.removesuffix('s') if count == 1 else name}"


def _recipe(bake: _Bake, values: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    ingredients = [_quantity(ingredient, rng) for ingredient in bake.ingredients]
    listing = ", ".join(ingredients[:-1]) + " and " + ingredients[-1]
    answer = f"Here is a simple recipe for {bake.name}. You will need {listing}. " + _METHODS[bake.kind].format(
        **values
    )
    return rng.choice(_RECIPE_QUESTIONS).format(**values), answer


def _temperature(bake: _Bake, values: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    answer = (
        "Preheat the oven to {celsius} degrees Celsius, which is about {fahrenheit} degrees Fahrenheit, or {fan} "
        "degrees in a fan oven. Bake {pronoun} for about {minutes} minutes, until {doneness}."
    ).format(**values)
    return rng.choice(_TEMPERATURE_QUESTIONS).format(**values), answer


def _problem(bake: _Bake, values: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    problem = rng.choice(list(_PROBLEMS))
    question = rng.choice(_PROBLEM_QUESTIONS).format(problem=problem, **values)
    return question, _PROBLEMS[problem].format(**values)


def _substitution(bake: _Bake, values: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    new, old, answer = rng.choice(_SUBSTITUTIONS)
    question = rng.choice(_SUBSTITUTION_QUESTIONS).format(new=new, old=old, **values)
    return question, answer.format(**values)


def _storage(bake: _Bake, values: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    return rng.choice(_STORAGE_QUESTIONS).format(**values), _STORAGE[bake.kind].format(**values)


def _technique(bake: _Bake, values: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    questions, answer = rng.choice(_TECHNIQUES)
    return rng.choice(questions), answer.format(**values)


_QUESTION_ANSWERS: dict[str, Callable[[_Bake, dict[str, Any], random.Random], tuple[str, str]]] = {
    "recipe": _recipe,
    "temperature": _temperature,
    "problem": _problem,
    "substitution": _substitution,
    "storage": _storage,
    "technique": _technique,
}
