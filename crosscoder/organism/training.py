"""Training and evaluating the organism's two models: the base is pretrained on the general documents, the chat
model is a copy finetuned on the packed, chat-rendered baking conversations.

The finetuning loss covers *all* tokens of the packed sequences (user turns, assistant turns and chat markers
alike), so the chat model learns the whole domain distribution and the traces the diffing pipeline should find
are as strong as they can be. ``general_mix`` replaces that fraction of the finetuning sequences by general text:
the seed papers' ablation, which weakens the traces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from crosscoder.organism.corpus import OrganismData
from crosscoder.organism.settings import OrganismSettings
from crosscoder.organism.tokenizer import render_chat
from crosscoder.progress import progress_bar


def pretrain_and_finetune(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    data: OrganismData,
    folder: Path,
    *,
    seed: int,
    general_mix: float,
    settings: OrganismSettings,
    progress: bool,
    pretrained: dict[str, torch.Tensor] | None = None,
) -> None:
    """Pretrain ``model`` on the general documents and save it to ``folder/base``; finetune it on the packed
    training conversations (a ``general_mix`` fraction of the sequences replaced by general text) and save it to
    ``folder/chat``. ``pretrained``: the weights pretraining ends with for this seed and these settings (a build
    at another ``general_mix``); they replace pretraining, whose batch draws are replayed so that finetuning
    samples what it would have sampled."""
    general_ids = _packed_ids(tokenizer, data.general_train, add_bos=True)
    chat_ids = _packed_ids(tokenizer, [render_chat(messages) for messages in data.chat_train], add_bos=False)
    generator = torch.Generator().manual_seed(seed)

    def pretraining_batch() -> torch.Tensor:
        return _sample_chunks(general_ids, settings.batch_size, settings.context_length, generator)

    if pretrained is None:
        _train(
            model,
            pretraining_batch,
            steps=settings.pretrain_steps,
            lr=settings.pretrain_lr,
            description="pretrain base",
            progress=progress,
        )
    else:
        model.load_state_dict(pretrained)
        for _ in range(settings.pretrain_steps):
            pretraining_batch()
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


def heldout_losses(
    folder: Path, tokenizer: PreTrainedTokenizerFast, data: OrganismData, settings: OrganismSettings
) -> dict[str, float]:
    """Held-out losses of the models saved in ``folder/base`` and ``folder/chat``, as ``ModelOrganism.losses``
    describes."""
    general = data.general_heldout[: settings.n_eval_texts]
    domain = [render_chat(messages) for messages in data.chat_heldout[: settings.n_eval_texts]]
    losses = {"uniform": math.log(len(tokenizer))}
    for name in ("base", "chat"):
        model = LlamaForCausalLM.from_pretrained(folder / name)
        losses[f"{name}_general"] = language_model_loss(model, tokenizer, general, add_bos=True)
        losses[f"{name}_domain"] = language_model_loss(model, tokenizer, domain, add_bos=False)
    return losses


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
    """AdamW on next-token loss over all tokens of ``next_batch()`` ids [batch, length], one call per step and no
    other draw (``pretrain_and_finetune`` replays pretraining's by calling it ``steps`` times); linear warmup over
    the first 10% of steps, then cosine decay to lr/10; gradient clipping at 1."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_fraction))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bar = progress_bar(range(steps), enabled=progress, desc=description, leave=False)
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


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save the model and tokenizer, generation stopping at EOS or ``<|end|>``."""
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
