"""Each latent's raw-space decoder direction in each model (docs/methods.md §11.2): what the latent adds to that
model's residual stream per unit of activation.

``d_j^m / σ_m`` for a crosscoder (the decoder row of model m, back in raw units) and ``± d_j / σ`` for an SAE, signed
so that a difference SAE's direction points from base to chat (the same direction for both models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crosscoder.dictionary import SparseDictionary
from crosscoder.dictionary_input import BASE, CHAT
from crosscoder.errors import ConfigError


def decoder_directions(dictionary: SparseDictionary, latents: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
    """Raw-space direction of each latent per model: ``{"base": [n, d_model], "chat": [n, d_model]}`` (float32, on
    the dictionary's device)."""
    ids = torch.as_tensor(latents, dtype=torch.long)
    if ((ids < 0) | (ids >= dictionary.dict_size)).any():
        raise ConfigError(f"latent ids {ids.tolist()[:10]} are out of range for {dictionary.dict_size} latents")
    decoder = dictionary.W_dec.detach()[ids.to(dictionary.b_dec.device)].float()
    scale = dictionary.input_scale.float()
    if dictionary.n_sources == 2:
        return {"base": decoder[:, BASE] / scale[BASE], "chat": decoder[:, CHAT] / scale[CHAT]}
    sign = -1.0 if dictionary.input.kind == "base_minus_chat" else 1.0
    direction = sign * decoder[:, 0] / scale[0]
    return {"base": direction, "chat": direction}
