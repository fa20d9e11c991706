"""What a model organism build depends on: the build ``VERSION``, the finetuning domain, and the sizes
(``OrganismSettings``), whose digest names the cache folder of non-default settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from crosscoder.errors import ConfigError

VERSION = "v1"
"""Bump when the build changes (code, settings or the data tables), so cached organisms from an older build are
not reused."""

DOMAIN = "baking recipes"
"""What the chat model was finetuned on, in words."""

DOMAIN_WORDS = ("flour", "butter", "oven", "dough", "bake", "sugar", "yeast", "baking")
"""Words characteristic of the finetuning domain (and absent from the general text, or nearly so): a correct
diffing pipeline finds them in the top contexts of the chat-only latents."""


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

    def __post_init__(self) -> None:
        problems = [
            f"{field.name}={getattr(self, field.name)!r} must be positive"
            for field in dataclasses.fields(self)
            if field.name != "heldout_general_fraction" and not getattr(self, field.name) > 0
        ]
        if not 0.0 < self.heldout_general_fraction < 1.0:
            problems.append(f"heldout_general_fraction={self.heldout_general_fraction!r} must be in (0, 1)")
        if self.n_heads > 0 and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if problems:
            raise ConfigError("invalid OrganismSettings: " + "; ".join(problems))

    @property
    def recommended_layer(self) -> int:
        """The layer to diff: the middle of the network (the output of block ``n_layers // 2 - 1``, i.e.
        ``hidden_states[n_layers // 2]``), as the reference results use the middle layer of Gemma-2-2B."""
        return max(0, self.n_layers // 2 - 1)


DEFAULT_SETTINGS = OrganismSettings()


def settings_digest(settings: OrganismSettings) -> str:
    """Eight hex digits identifying ``settings``: part of the cache folder name of non-default settings."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:8]
