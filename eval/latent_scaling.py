"""Latent Scaling: is a "chat-only" latent really absent from the base model? (docs/methods.md §7)

For latent j with chat decoder vector ``d = d_j^chat``, fit per target ``y`` the scalar
``β = dᵀ(Σ_i f_j(x_i) y_i) / (‖d‖² Σ_i f_j(x_i)²)`` — the least-squares β in ``y_i ≈ β f_j(x_i) d`` — over a
stream of activations, with ``f`` from the inference threshold. Targets for each model m ∈ {base, chat}:

- error ``ε_i^m = x_i^m − x̂_i^m + f_j(x_i) d_j^m`` (what the rest of the dictionary leaves for latent j),
- reconstruction ``r_i^m = x̂_i^m``.

``ν^ε = β^{ε,base} / β^{ε,chat}`` (high ⇒ *complete shrinkage*: the base model has the latent's information but
the sparsity penalty shrank its base decoder) and ``ν^r = β^{r,base} / β^{r,chat}`` (high ⇒ *latent decoupling*:
other latents reconstruct it in base). A chat-only latent is genuine when ``ν^ε < 0.2`` and ``ν^r < 0.5``.
Only the entries where ``f_ij ≠ 0`` contribute (a sampled product), so all latents are fitted in one pass with
memory O(dict_size). Everything is in the dictionary's normalised space (decoder as trained, activations
normalised per source), so a difference in the two models' activation scales does not bias the ratios ν;
without normalisation (as in the reference crosscoders) this is the raw space.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from crosscoder.dictionary import BatchTopKSAE, SparseDictionary
from crosscoder.dictionary_input import BASE, CHAT
from crosscoder.errors import ConfigError, DataError
from crosscoder.progress import progress_bar

GENUINE, COMPLETE_SHRINKAGE, LATENT_DECOUPLING = "genuine", "complete shrinkage", "latent decoupling"
ERROR_RATIO_LIMIT, RECONSTRUCTION_RATIO_LIMIT = 0.2, 0.5


@dataclass(frozen=True)
class LatentScaling:
    """β per latent and model, and the ratios ν. Every tensor is [n_latents], aligned with ``latents``;
    β is NaN for a latent that never fired."""

    latents: torch.Tensor
    beta_error_base: torch.Tensor
    beta_error_chat: torch.Tensor
    beta_recon_base: torch.Tensor
    beta_recon_chat: torch.Tensor
    count_active: torch.Tensor

    @property
    def nu_error(self) -> torch.Tensor:
        """ν^ε = β^{ε,base} / β^{ε,chat}."""
        return self.beta_error_base / self.beta_error_chat

    @property
    def nu_recon(self) -> torch.Tensor:
        """ν^r = β^{r,base} / β^{r,chat}."""
        return self.beta_recon_base / self.beta_recon_chat

    def verdicts(self) -> list[str]:
        """Per latent: genuine, complete shrinkage, latent decoupling (both joined by " + "), or "never fired"."""
        result = []
        for nu_error, nu_recon, count in zip(
            self.nu_error.tolist(), self.nu_recon.tolist(), self.count_active.tolist(), strict=True
        ):
            if count == 0:
                result.append("never fired")
                continue
            problems = [
                name
                for name, value, limit in (
                    (COMPLETE_SHRINKAGE, nu_error, ERROR_RATIO_LIMIT),
                    (LATENT_DECOUPLING, nu_recon, RECONSTRUCTION_RATIO_LIMIT),
                )
                if not value < limit  # NaN counts as a problem: the ratio is undefined
            ]
            result.append(" + ".join(problems) if problems else GENUINE)
        return result


def _latent_ids(dictionary: SparseDictionary, latents: torch.Tensor | list[int] | None) -> torch.Tensor:
    if latents is None:
        return torch.arange(dictionary.dict_size)
    ids = torch.as_tensor(latents, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ConfigError("the latent set is empty: pass at least one latent id (or None for all latents)")
    bad = ids[(ids < 0) | (ids >= dictionary.dict_size)]
    if bad.numel():
        raise ConfigError(
            f"latent ids {bad[:10].tolist()} are out of range for a dictionary of {dictionary.dict_size} latents"
        )
    return ids


@torch.no_grad()
def compute_betas(
    crosscoder: SparseDictionary,
    batches: Iterable[torch.Tensor],
    latents: torch.Tensor | list[int] | None = None,
    *,
    base: int = 0,
    chat: int = 1,
    progress: bool = False,
) -> LatentScaling:
    """Latent Scaling of a crosscoder over raw batches x: [batch, n_sources, d_model] (normalised internally),
    for ``latents`` (ids; None = all), in one streaming pass using the inference threshold."""
    if crosscoder.n_sources < 2:
        raise ConfigError(
            f"Latent Scaling of a crosscoder needs two sources, got a {type(crosscoder).__name__} with "
            f"{crosscoder.n_sources}: use compute_sae_betas for SAEs and diff-SAEs"
        )
    ids = _latent_ids(crosscoder, latents)
    decoder = crosscoder.W_dec.detach()[ids].double().cpu()  # [n, S, d]
    direction = decoder[:, chat]  # d = d_j^chat for every target
    # f_j · (d · d_j^m): the latent's own contribution to the error target, projected on d.
    own = {m: (direction * decoder[:, m]).sum(-1) for m in (base, chat)}
    sums = {key: torch.zeros(len(ids), dtype=torch.float64) for key in ("eb", "ec", "rb", "rc", "ff", "n")}
    tokens = 0
    for x in progress_bar(batches, desc="latent scaling", enabled=progress, unit="batch"):
        x = crosscoder.normalize(x.to(crosscoder.b_dec.device))
        codes = crosscoder.select_with_threshold(crosscoder.activations_normalized(x))
        reconstruction = crosscoder.decode_normalized(codes).double()
        f = codes[:, ids.to(codes.device)].double().cpu()  # [B, n]
        rows, columns = f.nonzero(as_tuple=True)
        values = f[rows, columns]
        x, reconstruction = x.double().cpu(), reconstruction.cpu()
        for m, error_key, recon_key in ((base, "eb", "rb"), (chat, "ec", "rc")):
            d = direction[columns]  # [nnz, d]
            recon_dot = (reconstruction[rows, m] * d).sum(-1)
            residual_dot = ((x[rows, m] - reconstruction[rows, m]) * d).sum(-1)
            sums[recon_key].index_add_(0, columns, values * recon_dot)
            sums[error_key].index_add_(0, columns, values * (residual_dot + values * own[m][columns]))
        sums["ff"].index_add_(0, columns, values.pow(2))
        sums["n"].index_add_(0, columns, torch.ones_like(values))
        tokens += x.shape[0]
    if tokens == 0:
        raise DataError("no activations were given: the batches are empty (did filtering drop every token?)")
    scale = direction.pow(2).sum(-1) * sums["ff"]  # ‖d‖² Σ f²; 0 → NaN β for latents that never fired
    beta = {key: (sums[key] / scale).float() for key in ("eb", "ec", "rb", "rc")}
    return LatentScaling(ids, beta["eb"], beta["ec"], beta["rb"], beta["rc"], sums["n"].float())


@torch.no_grad()
def compute_sae_betas(
    sae: BatchTopKSAE,
    paired_batches: Iterable[torch.Tensor],
    latents: torch.Tensor | list[int] | None = None,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAE / diff-SAE variant: ``ν_act = β^{base act} / β^{chat act}`` with the SAE decoder vector as ``d`` and the
    models' raw activations as targets (an SAE has a single input scale, so raw space is its own space).
    paired_batches: [batch, 2, d_model] (0 = base, 1 = chat; the SAE reads its input from them, ``input_from_pair``).
    Returns (β base, β chat, ν_act), each [n_latents]."""
    if sae.n_sources != 1:
        raise ConfigError(f"compute_sae_betas takes a BatchTopKSAE, got a {type(sae).__name__}")
    ids = _latent_ids(sae, latents)
    direction = (sae.W_dec.detach()[ids, 0] / sae.input_scale[0]).double().cpu()  # [n, d], raw space
    numerator = {m: torch.zeros(len(ids), dtype=torch.float64) for m in (BASE, CHAT)}
    squares = torch.zeros(len(ids), dtype=torch.float64)
    for x in progress_bar(paired_batches, desc="latent scaling", enabled=progress, unit="batch"):
        x = x.to(sae.W_dec.device)
        f = sae.encode(sae.input_from_pair(x), use_threshold=True)[:, ids.to(x.device)].double().cpu()
        rows, columns = f.nonzero(as_tuple=True)
        values = f[rows, columns]
        for m in (BASE, CHAT):
            dots = (x[rows.to(x.device), m].double().cpu() * direction[columns]).sum(-1)
            numerator[m].index_add_(0, columns, values * dots)
        squares.index_add_(0, columns, values.pow(2))
    scale = direction.pow(2).sum(-1) * squares
    beta_base, beta_chat = (numerator[BASE] / scale).float(), (numerator[CHAT] / scale).float()
    return beta_base, beta_chat, beta_base / beta_chat
