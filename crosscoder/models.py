"""The language models of a pair: loading a causal LM with its tokenizer, finding its decoder blocks, and reading
residual-stream outputs of chosen blocks without running the rest of the model.

"Layer L" is the residual stream *output* of decoder block L, i.e. ``hidden_states[L + 1]`` (docs/architecture.md
§5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosscoder.errors import DataError, InputNotFoundError
from crosscoder.hub import can_be_hub_id
from crosscoder.progress import library_progress_bars

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_causal_lm(
    name: str, *, revision: str | None, dtype: str, device: str, trust_remote_code: bool
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local folder or a Hub id (offline: from the HF cache); refuses a
    checkpoint that lacks weights the model's config declares (transformers would initialise them randomly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(name).exists() and not can_be_hub_id(name):
        raise InputNotFoundError(
            f"model folder {name} does not exist: pass a folder written by save_pretrained, or a Hub id ('owner/name')"
        )
    try:
        with library_progress_bars(enabled=True):
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
            model, loading = AutoModelForCausalLM.from_pretrained(
                name,
                revision=revision,
                dtype=_DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except OSError as error:
        if Path(name).is_dir():
            raise DataError(
                f"model folder {name} cannot be loaded: {error} It must hold a transformers model as "
                "save_pretrained writes it (a valid config.json, the weights, the tokenizer files)"
            ) from error
        raise InputNotFoundError(
            f"model '{name}' is neither a local folder nor in the Hugging Face cache, or the Hub cannot be reached "
            f"({type(error).__name__}): download it where there is network (`hf download {name}`) and copy the cache "
            "(HF_HOME) here, or pass a local folder"
        ) from error
    missing = sorted(loading["missing_keys"])
    if missing:
        raise DataError(
            f"model {name}: {len(missing)} weights its config.json declares are not in its checkpoint (e.g. "
            f"{', '.join(missing[:3])}) and would be random: use the checkpoint that matches the config (e.g. "
            "num_hidden_layers in config.json must count the layers the weights hold)"
        )
    return model.to(device).eval(), tokenizer


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (Llama, Gemma, Qwen, GPT-2, …)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise DataError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}")


class _StopForward(Exception):
    """Raised by the capture hook after the deepest requested layer: the rest of the model is not run."""


@torch.no_grad()
def residual_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]):
    """Residual stream outputs of the given blocks, stopping after the deepest.

    input_ids, attention_mask: [batch, seq] → [batch, seq, len(layers), d_model] in the model's dtype.
    """
    blocks = decoder_blocks(model)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in set(layers)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[layer] for layer in layers], dim=2)
