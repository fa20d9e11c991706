"""The organism's tokenizer, chat template and model architecture.

Both models share one byte-level BPE tokenizer that prepends BOS like Llama's does, with special tokens for
BOS/EOS/padding and the chat markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from crosscoder.errors import DataError
from crosscoder.organism.settings import DEFAULT_SETTINGS, OrganismSettings

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
"""A conversation: ``{"role": "system" | "user" | "assistant", "content": ...}`` dicts in order."""


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
    ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders it, before the tokenizer exists.

    Raises ``DataError`` for a role other than system, user or assistant."""
    return _CHAT_TEMPLATE.render(messages=messages, bos_token=BOS_TOKEN, add_generation_prompt=False)


def _raise_exception(message: str) -> None:
    raise DataError(message)


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
