"""The offline *model organism*: a tiny base language model and a copy narrowly finetuned on baking chats.

``python train.py`` with no arguments diffs these two models (``docs/architecture.md`` §9). Everything is built
locally on CPU from text that ships with Python, so the demo needs no network:

1. General text: the Python documentation in ``pydoc_data.topics``, cut into documents (``general.py``).
2. Domain text: baking conversations from a seeded template generator whose texts are the JSON tables in
   ``data/`` (``baking.py``), rendered with the chat template.
3. A byte-level BPE tokenizer trained on both, with BOS/EOS/padding and chat-marker special tokens
   (``tokenizer.py``).
4. The **base** model, a ``LlamaForCausalLM`` pretrained from scratch on the general documents, and the **chat**
   model, a copy finetuned on the baking conversations (``training.py``).

``build_model_organism`` (``build.py``) builds both once into a cache folder and loads them from there. The layer
to diff is the middle of the network, ``OrganismSettings.recommended_layer`` = 1: the residual output of block 1,
i.e. ``hidden_states[2]`` in transformers, width ``d_model`` = 128.
"""

from crosscoder.organism.baking import baking_conversations
from crosscoder.organism.build import ModelOrganism, build_model_organism, default_root
from crosscoder.organism.corpus import OrganismData, organism_data, write_datasets
from crosscoder.organism.general import general_documents
from crosscoder.organism.settings import DEFAULT_SETTINGS, DOMAIN, DOMAIN_WORDS, VERSION, OrganismSettings
from crosscoder.organism.tokenizer import (
    BOS_TOKEN,
    CHAT_MARKERS,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Messages,
    build_tokenizer,
    llama_config,
    render_chat,
)
from crosscoder.organism.training import language_model_loss

__all__ = [
    "BOS_TOKEN",
    "CHAT_MARKERS",
    "CHAT_TEMPLATE",
    "DEFAULT_SETTINGS",
    "DOMAIN",
    "DOMAIN_WORDS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "VERSION",
    "Messages",
    "ModelOrganism",
    "OrganismData",
    "OrganismSettings",
    "baking_conversations",
    "build_model_organism",
    "build_tokenizer",
    "default_root",
    "general_documents",
    "language_model_loss",
    "llama_config",
    "organism_data",
    "render_chat",
    "write_datasets",
]
