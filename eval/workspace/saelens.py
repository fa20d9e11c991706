"""A diff-SAE in SAELens's folder layout: ``cfg.json`` + ``sae_weights.safetensors`` (docs/methods.md §11.6).

A ``BatchTopKSAE`` at inference keeps ``f_j = ReLU(W_enc (x_n − b_dec) + b_enc)_j`` where ``f_j > θ`` (its
decoder rows are unit-norm, so ``c_j = 1``), with ``x_n = (x − μ) · s``. That is a JumpReLU SAE on raw input with
every normalisation folded in:

    W_enc' = s · W_encᵀ   [d_in, d_sae]        b_dec' = μ + b_dec / s   [d_in]
    W_dec' = W_dec / s    [d_sae, d_in]        b_enc' = b_enc,  threshold' = max(θ, 0) per latent

so ``f = JumpReLU_θ'((x − b_dec') W_enc' + b_enc')`` and ``x̂ = f W_dec' + b_dec'`` (SAELens's
``apply_b_dec_to_input``). An SAE that has not estimated θ (θ < 0) keeps every positive activation: threshold 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from crosscoder.dictionary import BatchTopKSAE, SparseDictionary
from crosscoder.errors import ConfigError
from crosscoder.provenance import Provenance

CONFIG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"


@torch.no_grad()
def saelens_weights(sae: BatchTopKSAE) -> dict[str, torch.Tensor]:
    """``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]``, float32."""
    scale, mean = float(sae.input_scale[0]), sae.input_mean[0].detach().float().cpu()
    threshold = max(float(sae.threshold), 0.0)
    return {
        "W_enc": (scale * sae.W_enc.detach()[:, 0].float().cpu().T).contiguous(),
        "b_enc": sae.b_enc.detach().float().cpu().clone(),
        "W_dec": (sae.W_dec.detach()[:, 0].float().cpu() / scale).contiguous(),
        "b_dec": mean + sae.b_dec.detach()[0].float().cpu() / scale,
        "threshold": torch.full((sae.dict_size,), threshold),
    }


def export_saelens(dictionary: SparseDictionary, folder: str | Path, *, hook_name: str | None = None) -> Path:
    """Write ``dictionary`` (a ``BatchTopKSAE``) to ``folder`` in SAELens's layout; returns the folder."""
    if not isinstance(dictionary, BatchTopKSAE):
        raise ConfigError(
            f"SAELens export takes a BatchTopKSAE (a diff-SAE), got a {type(dictionary).__name__}: a crosscoder has "
            "one decoder per model, which SAELens's single-decoder layout cannot hold"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(saelens_weights(dictionary), str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(saelens_config(dictionary, hook_name), indent=2) + "\n")
    return folder


def saelens_config(sae: BatchTopKSAE, hook_name: str | None) -> dict[str, Any]:
    """SAELens's ``cfg.json`` fields for a JumpReLU SAE; the input (e.g. chat − base) and the models are recorded
    under ``metadata`` (SAELens hooks one model, so a difference SAE's input must be formed by the user)."""
    provenance = Provenance.from_metadata(sae.metadata)
    activations = provenance.activations if provenance is not None else {}
    layers = activations.get("layers") or [None]
    name = hook_name or (f"blocks.{layers[0]}.hook_resid_post" if layers[0] is not None else "unknown")
    metadata = {
        "model_name": activations.get("chat_model"),
        "hook_name": name,
        "hook_layer": layers[0],
        "context_size": activations.get("context_length"),
        "crosscoder_input": str(sae.input),
        "crosscoder_input_description": sae.input.describe(),
        "base_model": activations.get("base_model"),
        "chat_model": activations.get("chat_model"),
        "k": sae.k,
    }
    return {
        "architecture": "jumprelu",
        "d_in": sae.d_model,
        "d_sae": sae.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "activation_fn_str": "relu",
        "finetuning_scaling_factor": False,
        "hook_head_index": None,
        "prepend_bos": True,
        "model_name": metadata["model_name"],
        "hook_name": name,
        "hook_layer": layers[0],
        "context_size": metadata["context_size"],
        "metadata": metadata,
    }
