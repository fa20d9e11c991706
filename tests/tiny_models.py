"""Real tiny transformers models, a real BPE tokenizer and real local datasets, built offline for tests."""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def corpus() -> list[str]:
    """Paragraphs of real English text from the Python docs shipped with every Python."""
    text = " ".join(pydoc_data.topics.topics.values())
    words = text.split()
    return [" ".join(words[i : i + 40]) for i in range(0, 20_000, 40)]


def build_tokenizer(vocab_size: int = 400, extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE with BOS prepended and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _llama_style(vocab_size: int, hidden: int, layers: int) -> dict:
    """The config fields Llama, Gemma-2 and Qwen-3 share, for a tiny model."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def llama(vocab_size: int, hidden: int = 32, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_llama_style(vocab_size, hidden, layers))).eval()


def gemma2(vocab_size: int, hidden: int = 32, layers: int = 4, seed: int = 0) -> Gemma2ForCausalLM:
    """Gemma-2's quirks made to matter: sliding-window layers shorter than the prompts, a small final softcap."""
    torch.manual_seed(seed)
    config = Gemma2Config(
        **_llama_style(vocab_size, hidden, layers), head_dim=8, sliding_window=4, final_logit_softcapping=5.0
    )
    return Gemma2ForCausalLM(config).eval()


def qwen3(vocab_size: int, hidden: int = 32, layers: int = 4, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**_llama_style(vocab_size, hidden, layers), head_dim=8)).eval()


def gpt2(vocab_size: int, hidden: int = 32, layers: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def finetuned_copy(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """A "chat" model: the base with its blocks perturbed (same architecture, same width)."""
    chat = type(model)(model.config).eval()
    chat.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in chat.named_parameters():
            if "layers" in name or ".h." in name:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return chat


def save_pair(root: Path, base: torch.nn.Module, chat: torch.nn.Module, tokenizer) -> tuple[Path, Path]:
    paths = []
    for name, model in (("base", base), ("chat", chat)):
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths.append(folder)
    return paths[0], paths[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict]:
    """Conversations in the ``messages`` format."""
    topics = ["bread", "ovens", "flour", "yeast", "butter", "sugar"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"How much {topics[i % 6]} do I need for recipe {i}?"},
                {"role": "assistant", "content": f"Use {i % 5 + 1} cups of {topics[(i + 1) % 6]} and bake it well."},
            ]
        }
        for i in range(n)
    ]


def local_pair_config(root: Path, tokenizer, *, scale: float = 0.05, documents: int = 200, **overrides):
    """A TrainConfig streaming from a saved tiny Llama pair (chat = base perturbed by ``scale``) over local
    jsonl files of general text and chats (``documents`` each), with small streaming settings."""
    from crosscoder import TrainConfig

    base = llama(len(tokenizer))
    base_path, chat_path = save_pair(root / "models", base, finetuned_copy(base, scale=scale), tokenizer)
    general = write_jsonl(root / "general.jsonl", [{"text": text} for text in corpus()[:documents]])
    chats = write_jsonl(root / "chat.jsonl", chat_rows(documents))
    values = dict(
        base_model=str(base_path),
        chat_model=str(chat_path),
        datasets=(str(general), str(chats)),
        layers=(2,),
        model_dtype="float32",
        context_length=32,
        block_sequences=16,
        k=4,
        dict_size=64,
        batch_size=64,
        normalization_tokens=256,
        warmup_steps=5,
        threshold_start_step=10,
        progress=False,
        output_dir=root,
    )
    values.update(overrides)
    return TrainConfig(**values)
