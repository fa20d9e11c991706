"""Sparse dictionaries over paired activations: BatchTopK and L1 crosscoders, and the BatchTopK SAE; and the
variants made for diffing, Matryoshka (crosscoder and SAE) and dedicated-feature crosscoders.

The three base classes follow docs/methods.md §1, the variants docs/methods.md §12. Layout is latent-major so a
latent's weights are contiguous: ``W_enc, W_dec: [dict_size, n_sources, d_model]``, ``b_enc: [dict_size]``,
``b_dec: [n_sources, d_model]``. Source order is part of the config; for diffing, 0 = base and 1 = chat.

The public API is raw-in / raw-out: ``encode``, ``decode`` and ``forward`` apply the stored per-source
normalisation ``x_n = (x - input_mean) * input_scale`` internally. Training works in the normalised space
(``normalize`` once, then ``training_forward``).

One concept, kept in one module (~1,060 lines): the classes share every pass — inference encode/decode, the
sparse training forward and AuxK's dead-latent decode — and differ only in a few overrides (a variant: its
prefixes or its structural zeros); the model card (``crosscoder.model_card``), loading (``crosscoder.hub``) and
the input choice (``crosscoder.dictionary_input``) live elsewhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from crosscoder.blocked_selection import select_in_latent_blocks
from crosscoder.dictionary_input import CHAT_MINUS_BASE, PAIRED, DictionaryInput
from crosscoder.distributed import Distributed, SumGradientsOverProcesses, SumOverProcesses
from crosscoder.errors import ConfigError, DataError, DictionaryFormatError
from crosscoder.kernels.backend import resolve_backend
from crosscoder.kernels.batch_topk import batch_topk
from crosscoder.kernels.row_projection import normalise_rows, project_out_rows
from crosscoder.kernels.sparse_codes import SparseCodes
from crosscoder.kernels.sparse_decode import WeightGradient, prefix_decode, sparse_decode
from crosscoder.kernels.sparse_encoder import gather_active, pre_activations
from crosscoder.model_card import MODEL_CARD_TEMPLATE, model_card_fields
from crosscoder.step_buffers import SharedGradient, StepBuffers

FORMAT_NAME = "crosscoder"
FORMAT_VERSION = 3
"""Version 2: a BatchTopKSAE records its input as ``input`` (``DictionaryInput``) instead of the free-text
``input_description`` of version 1. Version 3: a DedicatedCrossCoder stores each model's decoder rows
(``W_dec_base``, ``W_dec_chat``) instead of a dense ``W_dec`` with structural zeros. Both migrated on load by
``crosscoder.hub``."""


@dataclass
class TrainingInput:
    """What the training forward encodes, formed from x̃ by ``SparseDictionary.training_input``. A caller that hands
    the forward this instead of x̃ can drop x̃ first: a dictionary whose encoder reads x̃ − b_dec (the SAE) then holds
    that copy only (docs/methods.md §4.2).

    encoder_input: [batch, n_sources · d_model] what the encoder multiplies (x̃ flattened, a view, or x̃ − b_dec);
    center: [n_sources · d_model] ``b_dec`` when ``encoder_input`` is ``x̃ − b_dec`` formed without autograd: the
    encoder's gradient reaches ``b_dec`` through it (``gather_active``'s ``center``), else None;
    target: [batch, n_sources · d_model] x̃ flattened, what the reconstruction is compared with; None when
    ``center`` is given (then ``x̂ − x̃ = decode − encoder_input``).
    """

    encoder_input: torch.Tensor
    center: torch.Tensor | None
    target: torch.Tensor | None


@dataclass
class TrainingOutput:
    """What one training forward pass returns (normalised space), in the sparse format of the kernels.

    codes: the selected (row, latent) pairs; values: [nnz] their unscaled activations (with gradients);
    prefix_decodes: [n_prefixes, batch, n_sources · d_model] the decodes of the selected latents below each of
    ``prefix_sizes`` without ``b_dec`` (one prefix, the whole dictionary, except for Matryoshka dictionaries), with
    gradients: ``prefix_reconstructions`` adds ``b_dec``, ``reconstruction_errors`` forms ``x̂ − x̃`` over them in place;
    decoder_bias: [n_sources, d_model] ``b_dec``;
    scores: [batch, dict_size] the ranked ``f · c`` without gradients (BatchTopK, else None; held in the
    ``StepBuffers`` when the call got them, so overwritten by the next such call; None when the CPU training forward
    selected without forming them, ``crosscoder.blocked_selection``);
    input: what the encoder read (``TrainingInput``);
    min_kept_score: smallest kept ``f · c`` (BatchTopK only, else None) for the θ EMA: 0-d, or one per partition
    ([3]) for a dedicated crosscoder with per-partition budgets;
    dead_columns: from that blocked forward, the dead latents (ascending, [n_dead]) and their scores [batch, n_dead]
    (AuxK ranks them); else None;
    shared_gradients: with ``StepBuffers``, the ``SharedGradient`` of ``W_enc`` and of each decoder parameter, by
    ``id`` of the parameter (AuxK adds its share of them there); else None.
    """

    codes: SparseCodes
    values: torch.Tensor
    prefix_decodes: torch.Tensor
    decoder_bias: torch.Tensor
    scores: torch.Tensor | None
    input: TrainingInput
    min_kept_score: torch.Tensor | None
    dead_columns: tuple[torch.Tensor, torch.Tensor] | None = None
    shared_gradients: dict[int, SharedGradient] | None = None
    _errors: torch.Tensor | None = field(default=None, repr=False)

    @property
    def prefix_reconstructions(self) -> torch.Tensor:
        """[n_prefixes, batch, n_sources, d_model] each prefix's reconstruction ``decode + b_dec`` (a new tensor)."""
        return self._reconstruct(self._decodes())

    @property
    def reconstruction(self) -> torch.Tensor:
        """[batch, n_sources, d_model] the reconstruction from every selected latent (the last prefix; a new tensor)."""
        return self._reconstruct(self._decodes()[-1:])[0]

    def _decodes(self) -> torch.Tensor:
        if self._errors is not None:
            raise ValueError("reconstruction_errors() turned the decodes into the reconstruction errors in place")
        return self.prefix_decodes

    def _reconstruct(self, decodes: torch.Tensor) -> torch.Tensor:
        return decodes.view(*decodes.shape[:2], *self.decoder_bias.shape) + self.decoder_bias

    def reconstruction_error(self) -> torch.Tensor:
        """``x̂ − x̃`` [batch, n_sources, d_model] of the reconstruction from every selected latent (the last prefix of
        ``reconstruction_errors``)."""
        return self.reconstruction_errors()[-1]

    def reconstruction_errors(self) -> torch.Tensor:
        """``x̂ − x̃`` of every prefix: [n_prefixes, batch, n_sources, d_model], with gradients, formed in place over
        ``prefix_decodes`` on the first call (the training step's only tensor of that size: no separate x̂; after it
        ``prefix_reconstructions`` is unavailable) and returned again by later calls. The same values as
        ``prefix_reconstructions − x̃``; from ``x̃ − b_dec`` (``input.center`` given) ``decode − (x̃ − b_dec)``, equal
        up to rounding. The ``mse`` loss (``reconstruction_losses``) spends them: its backward scales them in place
        into their own gradient, so after a backward through it they hold that gradient."""
        if self._errors is None:
            decodes, shape = self.prefix_decodes, (*self.prefix_decodes.shape[:2], *self.decoder_bias.shape)
            if self.input.center is not None:
                errors = _CentredReconstructionError.apply(decodes, self.input.encoder_input, self.decoder_bias)
            else:
                errors = decodes.add_(self.decoder_bias.flatten()).sub_(self.input.target)
            self._errors = errors.view(shape)
        return self._errors

    def dense_codes(self) -> torch.Tensor:
        """[batch, dict_size] codes with zeros where nothing was selected."""
        return self.codes.to_dense(self.values)

    def active_counts(self) -> torch.Tensor:
        """[dict_size] tokens of the batch on which each latent was selected."""
        return torch.bincount(self.codes.latents, minlength=self.codes.dict_size)


class _CentredReconstructionError(torch.autograd.Function):
    """``x̂ − x̃ = (decode + b_dec) − x̃ = decode − (x̃ − b_dec)`` in place over the decodes [n_prefixes, batch, width],
    from the encoder's input ``x̃ − b_dec`` [batch, width] formed without autograd: the decodes' gradient is the
    error's, ``b_dec``'s [n_sources, d_model] the sum over prefixes and rows (the reconstruction's ``+ b_dec``)."""

    @staticmethod
    def forward(ctx, decodes: torch.Tensor, centred: torch.Tensor, decoder_bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mark_dirty(decodes)
        ctx.bias_shape = decoder_bias.shape
        return decodes.sub_(centred)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:  # type: ignore[override]
        return grad, None, grad.sum(dim=(0, 1)).view(ctx.bias_shape)


class SparseDictionary(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="crosscoder",
    tags=["crosscoder", "model-diffing", "sparse-dictionary", "interpretability"],
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """Shared encoder over ``n_sources`` stacked activations, one decoder per source (docs/methods.md §1.1–§1.3).

    Subclasses choose the sparsity (``uses_batch_topk``), whether the code norms are identically one
    (``unit_code_norms``) and whether ``b_dec`` is subtracted before encoding.
    """

    uses_batch_topk: ClassVar[bool] = True
    unit_code_norms: ClassVar[bool] = False
    """Whether ``c_j ≡ 1`` (the SAE's unit-norm decoder rows): the scores ``f · c`` are then the activations themselves,
    and the training forward ranks them without scaling them."""
    subtracts_decoder_bias: bool = False
    """Whether the encoder reads ``x̃ − b_dec`` (the SAE; a crosscoder built with ``centered_encoder=True``)."""
    input: DictionaryInput = PAIRED
    """What the dictionary reads from a paired batch (``input_from_pair``)."""

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        n_sources: int,
        k: int | None,
        init_decoder_norm: float,
        source_names: list[str] | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("dict_size", dict_size)
        _check_positive_int("n_sources", n_sources)
        if self.uses_batch_topk and (not isinstance(k, int) or isinstance(k, bool) or not 0 < k < dict_size):
            raise ConfigError(
                f"k={k!r} is invalid: BatchTopK keeps k latents per token on average, so k must be an "
                f"integer with 0 < k < dict_size={dict_size}"
            )
        if source_names is not None and len(source_names) != n_sources:
            raise ConfigError(
                f"source_names has {len(source_names)} entries but n_sources={n_sources}: name every source"
            )
        if not init_decoder_norm > 0:
            raise ConfigError(f"init_decoder_norm must be positive, got {init_decoder_norm}")
        self.d_model = d_model
        self.dict_size = dict_size
        self.n_sources = n_sources
        self.k = k
        self.init_decoder_norm = float(init_decoder_norm)
        self.source_names = list(source_names) if source_names is not None else None
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.prefix_sizes: tuple[int, ...] = (dict_size,)
        """Nested prefixes of the latent index whose reconstructions training fits (Matryoshka; else the whole)."""

        self.W_enc = nn.Parameter(torch.empty(dict_size, n_sources, d_model))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self._register_decoder()
        self.b_dec = nn.Parameter(torch.zeros(n_sources, d_model))
        self.register_buffer("input_scale", torch.ones(n_sources))
        self.register_buffer("input_mean", torch.zeros(n_sources, d_model))
        # θ < 0 means "not estimated yet": inference then keeps every positive activation.
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    def _register_decoder(self) -> None:
        """Register the decoder's parameters: ``W_dec`` [dict_size, n_sources, d_model]."""
        self.W_dec = nn.Parameter(torch.empty(self.dict_size, self.n_sources, self.d_model))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit directions scaled to ``init_decoder_norm`` per latent and source; encoder = decoder."""
        directions = self._random_directions(generator)
        self.W_dec.copy_(directions)
        self.W_enc.copy_(directions)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def _random_directions(self, generator: torch.Generator | None) -> torch.Tensor:
        """Random directions of norm ``init_decoder_norm``: [dict_size, n_sources, d_model]."""
        directions = torch.randn(self.W_enc.shape, generator=generator)
        return directions / directions.norm(dim=-1, keepdim=True) * self.init_decoder_norm

    # ------------------------------------------------------------------ shapes and normalisation
    def input_from_pair(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The raw input this dictionary reads, from a paired batch x: [batch, n_sources, d_model] (see
        ``crosscoder.dictionary_input``): the batch itself for a crosscoder, e.g. x_chat − x_base for a diff-SAE
        (written into ``out`` [batch, d_model] if given)."""
        return self.input.from_pair(x, out)

    def as_sources(self, x: torch.Tensor) -> torch.Tensor:
        """Validate raw input and view it as [batch, n_sources, d_model]."""
        expected = (self.n_sources, self.d_model)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise DataError(
                f"expected activations of shape [batch, n_sources={self.n_sources}, d_model={self.d_model}], "
                f"got {list(x.shape)}: stack the sources on dim 1 in the order of the dictionary's config"
            )
        return x

    def from_sources(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``as_sources`` for outputs."""
        return x

    def normalize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw activations → training space. x: raw input (see ``encode``) → [batch, n_sources, d_model] (a new
        tensor, or ``out``, which may be x itself)."""
        x = self.as_sources(x).to(self.W_enc.dtype)
        return torch.sub(x, self.input_mean, out=out).mul_(self.input_scale[:, None])

    def denormalize(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """Training space → raw activations. x_normalized: [batch, n_sources, d_model]."""
        return self.from_sources(x_normalized / self.input_scale[:, None] + self.input_mean)

    # ------------------------------------------------------------------ the dictionary
    def decoder_norms(self) -> torch.Tensor:
        """Per-source decoder norms ``‖W_dec[j, s]‖₂``: [dict_size, n_sources]."""
        return self.W_dec.norm(dim=-1)

    def code_norms(self) -> torch.Tensor:
        """Code normalisation ``c_j = Σ_s ‖W_dec[j, s]‖₂`` (docs/methods.md §1.4), or ones with ``unit_code_norms``:
        [dict_size]."""
        if self.unit_code_norms:
            return torch.ones(self.dict_size, dtype=self.W_dec.dtype, device=self.W_dec.device)
        return self.decoder_norms().sum(dim=-1)

    def encoder_input(self, x_normalized: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """What the encoder multiplies: [batch, n_sources · d_model] (minus ``b_dec`` for the SAE: a new tensor, or
        written over x_normalized with ``overwrite``)."""
        if self.subtracts_decoder_bias:
            x_normalized = torch.sub(x_normalized, self.b_dec, out=x_normalized if overwrite else None)
        return x_normalized.flatten(1)

    def activations_normalized(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """ReLU activations before any selection. x_normalized: [batch, n_sources, d_model] → [batch, dict_size]."""
        return F.relu(pre_activations(self.encoder_input(x_normalized), self.W_enc.flatten(1), self.b_enc))

    def decode_normalized(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [batch, dict_size] → reconstruction [batch, n_sources, d_model] in training space."""
        flat = codes.to(self.W_dec.dtype) @ self.W_dec.flatten(1)
        return flat.view(-1, self.n_sources, self.d_model) + self.b_dec

    def select_with_threshold(self, activations: torch.Tensor) -> torch.Tensor:
        """Inference sparsity: keep ``f_j`` where ``f_j · c_j > θ``. activations: [batch, dict_size]."""
        if not self.uses_batch_topk:
            return activations
        return activations * (activations * self.code_norms() > self.latent_thresholds())

    def latent_thresholds(self) -> torch.Tensor:
        """θ of every latent: the 0-d global θ (it broadcasts over ``[dict_size]``; a dedicated crosscoder with
        per-partition budgets has one per partition)."""
        return self.threshold

    def threshold_metrics(self) -> dict[str, float]:
        """θ as logged during training: ``{"threshold": θ}``."""
        return {"threshold": float(self.threshold)}

    def select_batch_topk(self, activations: torch.Tensor, k: int) -> torch.Tensor:
        """Training-time BatchTopK on dense activations (no gradients needed): keep the ``k · batch`` largest
        scores ``f · c`` of the whole batch. activations: [batch, dict_size] → codes (unscaled kept values)."""
        codes, _ = self._select(activations * self.code_norms(), k, Distributed())
        return codes.to_dense(codes.gather(activations))

    @torch.no_grad()
    def _select(self, scores: torch.Tensor, k: int, context: Distributed) -> tuple[SparseCodes, torch.Tensor]:
        """BatchTopK on scores [batch, dict_size] (``f · c ≥ 0``): the ``k · B`` largest of the global batch (B rows
        over every data-parallel process; with latent sharding over every process's latents), by radix select (see
        ``crosscoder.kernels``). Returns the kept entries and the smallest kept score (0-d), the input of the θ EMA."""
        selection = batch_topk(
            scores,
            _n_keep(k, scores.shape[0], context),
            context.all_reduce if context.enabled else None,
            rank=context.rank,
            world_size=context.world_size,
        )
        codes = SparseCodes.from_sorted_indices(selection.rows, selection.latents, *scores.shape)
        return codes, selection.threshold

    @property
    def keeps_gradients_between_steps(self) -> bool:
        """Whether the training step lends the previous step's gradients to its backward (``StepBuffers``): not with
        nested prefixes, whose backward allocates its [n_prefixes, batch, n_sources · d_model] temporaries while they
        are held — at B = 4,096, F = 16,384 on 2026-12-04's machine the step then took 1,250 instead of 772 ms and
        its peak rose from 1.44 to 1.68× its state (docs/methods.md §4.2)."""
        return len(self.prefix_sizes) == 1

    selects_in_latent_blocks: ClassVar[bool] = True
    """Whether the training forward on CPU may select without the whole score matrix (``select_in_latent_blocks``):
    one BatchTopK over all latents (a dedicated crosscoder with per-partition budgets selects per partition)."""

    def training_forward(
        self,
        x_normalized: torch.Tensor | TrainingInput,
        k: int | None = None,
        context: Distributed | None = None,
        buffers: StepBuffers | None = None,
        dead: torch.Tensor | None = None,
    ) -> TrainingOutput:
        """Training-time pass in normalised space on the sparse kernels. x_normalized: [batch, n_sources, d_model],
        or what ``training_input`` formed from it (a caller that drops x̃ first); ``k`` overrides the configured k
        (k-annealing); with a data-parallel ``context`` the BatchTopK selection runs over the global batch (its
        radix-select histograms are all-reduced); ``buffers``: reuse the large temporaries of the previous call (the
        training loop's; the returned scores are then overwritten by the next), and on the reference (CPU) backend
        select without forming the whole score matrix (``crosscoder.blocked_selection``), keeping the columns of the
        ``dead`` latents ([dict_size] bool) for AuxK.

        The only dense work is the encoder GEMM (without autograd): the selection, the gathering of the kept
        activations (whose backward is the sparse encoder gradient) and the decode are sparse.
        """
        prepared = x_normalized
        if not isinstance(prepared, TrainingInput):
            prepared = self.training_input(prepared, context)
        del x_normalized
        encoder_input, center = prepared.encoder_input, prepared.center
        W_enc = self.W_enc.flatten(1)
        scores = min_kept = dead_columns = None
        with torch.no_grad():
            if self.uses_batch_topk:
                # the scores f · c = ReLU(x · W_enc[j] + b_enc[j]) · c_j, scaled after the GEMM as inference scales
                # them (select_with_threshold); the kept f are recovered as scores / c on the kept entries only (with
                # c ≡ 1 the scores are the activations)
                c = None if self.unit_code_norms else self.code_norms()
                context = context or Distributed()
                in_blocks = buffers is not None and resolve_backend(encoder_input.device) == "reference"
                if in_blocks and self.selects_in_latent_blocks:
                    n_keep = _n_keep(k or self.k, encoder_input.shape[0], context)
                    found = select_in_latent_blocks(encoder_input, W_enc, self.b_enc, c, n_keep, context, buffers, dead)
                    selection, kept, scores = found.selection, found.kept_scores, found.scores
                    codes = SparseCodes.from_sorted_indices(
                        selection.rows, selection.latents, selection.batch_size, selection.dict_size
                    )
                    min_kept, dead_columns = selection.threshold, found.dead_columns
                else:
                    shape = (encoder_input.shape[0], W_enc.shape[0])
                    scores = None if buffers is None else buffers.get("scores", shape, W_enc)
                    scores = pre_activations(encoder_input, W_enc, self.b_enc, out=scores).relu_()
                    if c is not None:
                        scores.mul_(c)
                    codes, min_kept = self._select(scores, k or self.k, context)
                    kept = codes.gather(scores)
                if c is not None:
                    kept = kept / c.index_select(0, codes.latents)
            else:
                pre = pre_activations(encoder_input, W_enc, self.b_enc)
                codes = SparseCodes.from_mask(pre > 0)
                kept = codes.gather(pre)
        # with buffers the backward writes ∂W_enc and the decoders' gradients into the previous step's, if the step
        # kept them, and AuxK adds its share there (docs/methods.md §4.2)
        shared = None
        if buffers is not None:
            weights = (self.W_enc, *self._decoder_weights())
            shared = {id(weight): buffers.shared_gradient(weight, weight.flatten(1).shape) for weight in weights}
        encoder_gradient = None if shared is None else shared[id(self.W_enc)].primary
        values = F.relu(gather_active(kept, encoder_input, W_enc, self.b_enc, codes, center, encoder_gradient))
        primary = None if shared is None else (lambda weight: shared[id(weight)].primary)
        decoded = _sum_shards(self._decode_entries(values, codes, self.prefix_sizes, primary), context)
        return TrainingOutput(codes, values, decoded, self.b_dec, scores, prepared, min_kept, dead_columns, shared)

    def training_input(
        self, x_normalized: torch.Tensor, context: Distributed | None = None, overwrite: bool = False
    ) -> TrainingInput:
        """What the training forward encodes, from x_normalized: [batch, n_sources, d_model] (``TrainingInput``;
        ``overwrite``: x_normalized is scratch, which an encoder reading x̃ − b_dec may overwrite with it).

        An encoder reading ``x̃ − b_dec`` of an ``x̃`` without gradient (training) gets that input without autograd
        and ``b_dec`` [n_sources · d_model] as the center: b_dec's encoder gradient is then ``−∂b_enc @ W_enc``
        (F · d work) instead of the batch sum of a sparse ``∂(x̃ − b_dec)`` (nnz · d; docs/methods.md §4.4).
        Otherwise the input keeps its graph and the center is None. Under latent sharding the gradient of what
        feeds every process's latents (the center, or an input needing a gradient) is summed over processes.
        """
        sharded = context is not None and context.latent_parallel
        if self.subtracts_decoder_bias and not x_normalized.requires_grad:
            with torch.no_grad():
                encoder_input = self.encoder_input(x_normalized, overwrite)
            center = self.b_dec.flatten()
            return TrainingInput(
                encoder_input, SumGradientsOverProcesses.apply(center, context) if sharded else center, None
            )
        encoder_input = self.encoder_input(x_normalized)
        if sharded and encoder_input.requires_grad:
            encoder_input = SumGradientsOverProcesses.apply(encoder_input, context)
        return TrainingInput(encoder_input, None, x_normalized.flatten(1))

    def dead_latent_reconstruction(
        self, out: TrainingOutput, dead: torch.Tensor, k_aux: int, context: Distributed | None = None
    ) -> torch.Tensor | None:
        """AuxK's ``ê``: each token decodes its top-``k_aux`` dead latents by score ``f · c``, *without* ``b_dec``
        (docs/methods.md §2.4). dead: [dict_size] bool. Returns [batch, n_sources, d_model], or None when no latent is
        dead (checked only on CPU, where it costs no device sync; elsewhere the reconstruction is then zero). With
        latent sharding the top-``k_aux`` runs over every process's latents (ties at the cut may add a few).

        Only the picks with a positive score are decoded (a dead latent rarely fires: most of a token's ``k_aux``
        picks are often zeros); listing them is the one host sync (see ``_top_dead_latents`` for the ranking)."""
        k_aux = min(k_aux, self.dict_size)
        sharded = context is not None and context.latent_parallel
        if k_aux <= 0 or (dead.device.type == "cpu" and not sharded and not bool(dead.any())):
            return None
        batch = out.input.encoder_input.shape[0]
        with torch.no_grad():
            if out.scores is not None:
                picks, picked_scores = _top_dead_latents(out.scores, dead, k_aux, columns=dead.device.type == "cpu")
            elif out.dead_columns is not None:  # the blocked forward kept the dead latents' columns
                picks, picked_scores = _top_of_columns(*out.dead_columns, k_aux)
            elif bool(dead.any()):
                raise ValueError(
                    "training_forward selected without the whole scores but was not given the dead latents"
                )
            else:  # none dead here (others may be, on other processes' latents)
                no_latent = dead.nonzero().squeeze(1)
                picks, picked_scores = _top_of_columns(no_latent, out.input.encoder_input.new_zeros(batch, 0), k_aux)
            keep = picked_scores > 0
            if sharded:  # keep only what also ranks among the top k_aux of all processes' dead latents
                padded = F.pad(picked_scores, (0, k_aux - picked_scores.shape[1]), value=-1.0)  # same shape everywhere
                gathered = context.all_gather_rows(padded).view(context.world_size, batch, k_aux)
                everyone = gathered.permute(1, 0, 2).reshape(batch, -1)
                keep &= picked_scores >= everyone.topk(k_aux, dim=-1).values[:, -1:]
            rows, slots = keep.nonzero(as_tuple=True)  # row-major, latents ascending within a row
            codes = SparseCodes.from_sorted_indices(rows, picks[rows, slots], batch, self.dict_size)
            kept = picked_scores[rows, slots]
            if not self.unit_code_norms:
                kept = kept / self.code_norms().index_select(0, codes.latents)
        shared = out.shared_gradients
        encoder_gradient = None if shared is None else shared[id(self.W_enc)].secondary
        values = F.relu(
            gather_active(
                kept,
                out.input.encoder_input,
                self.W_enc.flatten(1),
                self.b_enc,
                codes,
                out.input.center,
                encoder_gradient,
            )
        )
        secondary = None if shared is None else (lambda weight: shared[id(weight)].secondary)
        decoded = self._decode_entries(values, codes, (self.dict_size,), secondary)[0]
        return _sum_shards(decoded, context).view(-1, self.n_sources, self.d_model)

    def _decoder_weights(self) -> tuple[nn.Parameter, ...]:
        """The decoder's parameters, each ``[rows, n_sources or fewer, d_model]`` (``W_dec``)."""
        return (self.W_dec,)

    def _decode_entries(
        self,
        values: torch.Tensor,
        codes: SparseCodes,
        prefix_sizes: tuple[int, ...],
        weight_gradient: Callable[[nn.Parameter], WeightGradient] | None = None,
    ) -> torch.Tensor:
        """The sparse decode of the kept entries (values: [nnz], differentiable) into each prefix's reconstruction
        without ``b_dec``: [len(prefix_sizes), batch, n_sources · d_model] (one prefix: the whole decode);
        ``weight_gradient``: each decoder parameter's ``WeightGradient`` (None: new tensors)."""
        gradient = None if weight_gradient is None else weight_gradient(self.W_dec)
        projects = self.training_decode_projects_gradient
        return prefix_decode(values, codes, self.W_dec.flatten(1), prefix_sizes, gradient, projects)

    def encode(self, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """Sparse codes of raw activations: [batch, dict_size] (unscaled values).

        ``use_threshold=True`` (inference, the default) keeps ``f_j`` where ``f_j · c_j > θ``;
        ``False`` applies training-time BatchTopK over this batch (``k · batch`` entries).
        """
        activations = self.activations_normalized(self.normalize(x))
        if not self.uses_batch_topk:
            return activations
        if use_threshold:
            return self.select_with_threshold(activations)
        return self.select_batch_topk(activations, self.k)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [batch, dict_size] → raw reconstruction (same layout as the input of ``encode``)."""
        if codes.dim() != 2 or codes.shape[1] != self.dict_size:
            raise ConfigError(f"expected codes of shape [batch, dict_size={self.dict_size}], got {list(codes.shape)}")
        return self.denormalize(self.decode_normalized(codes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw reconstruction ``decode(encode(x))`` with the inference threshold."""
        return self.decode(self.encode(x, use_threshold=True))

    # ------------------------------------------------------------------ training hooks (no-ops by default)
    training_decode_projects_gradient: ClassVar[bool] = False
    """Whether the training forward's sparse decode (``_decode_entries``) hands back the decoder's gradient already
    projected as ``before_optimizer_step`` projects it (the SAE: in the same sweep as its sums on CPU)."""

    def before_optimizer_step(self, decoder_gradient_projected: bool = False) -> list[nn.Parameter]:
        """Adjust gradients before the optimizer step (the SAE removes the decoder-parallel component, unless
        ``decoder_gradient_projected``: the training decode did); returns the parameters whose gradients it changed."""
        return []

    def after_optimizer_step(self, latents: slice | None = None) -> None:
        """Re-impose constraints after the optimizer step (the SAE renormalises its decoder) on ``latents`` (default:
        all; a sharded optimizer's processes that share the parameters each constrain the latents they updated)."""

    # ------------------------------------------------------------------ saving
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this dictionary (written as ``config.json``)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dict_class": type(self).__name__,
            **self._init_kwargs(),
        }

    def _init_kwargs(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "dict_size": self.dict_size,
            "n_sources": self.n_sources,
            "k": self.k,
            "init_decoder_norm": self.init_decoder_norm,
            "source_names": self.source_names,
            "metadata": self.metadata,
        }

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and a model card (``README.md``) to a folder.

        The config is always derived from the dictionary; ``config`` exists only for the Hub mixin's
        signature and must be None or equal to ``self.config()``.
        """
        if config is not None and config != self.config():
            raise ValueError("a dictionary's config is derived from the dictionary itself; do not pass one")
        (Path(save_directory) / "README.md").unlink(missing_ok=True)  # the card is derived: regenerate it
        card = {**model_card_fields(self, repo_id or Path(save_directory).name), **(model_card_kwargs or {})}
        return super().save_pretrained(
            save_directory,
            config=self.config(),
            repo_id=repo_id,
            push_to_hub=push_to_hub,
            model_card_kwargs=card,
            **push_to_hub_kwargs,
        )

    def push_to_hub(  # type: ignore[override]
        self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """Upload to the Hub (token from the ``huggingface_hub`` login or ``HF_TOKEN``).

        The mixin saves into ``<tmp>/<owner>/<name>`` without passing ``repo_id`` on, so the card's usage
        snippet would name the folder ("name"), not the repo ("owner/name"): pass it here.
        """
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def describe(self) -> str:
        """One sentence for the model card."""
        names = self.source_names or [f"source {s}" for s in range(self.n_sources)]
        centered = ", whose encoder reads the activations minus `b_dec`" if self.subtracts_decoder_bias else ""
        return f"A crosscoder over {self.n_sources} sources (in order: {', '.join(names)}){centered}."

    def usage_snippet(self) -> str:
        """Python lines for the model card's usage section."""
        return (
            f"x = ...  # raw activations [batch, {self.n_sources}, {self.d_model}]\n"
            "codes = dictionary.encode(x)         # [batch, dict_size], inference threshold\n"
            "x_hat = dictionary.decode(codes)     # [batch, n_sources, d_model]\n"
            "norms = dictionary.decoder_norms()   # [dict_size, n_sources]"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> SparseDictionary:  # type: ignore[override]
        """Load a dictionary of this class from a local folder or a Hub repo id (see ``load_dictionary``)."""
        from crosscoder.hub import load_dictionary

        dictionary = load_dictionary(pretrained_model_name_or_path, **kwargs)
        if not isinstance(dictionary, cls):
            raise DictionaryFormatError(
                f"{pretrained_model_name_or_path} holds a {type(dictionary).__name__}, not a {cls.__name__}: "
                "use crosscoder.load_dictionary to load whatever class it holds"
            )
        return dictionary


class BatchTopKCrossCoder(SparseDictionary):
    """Crosscoder with BatchTopK sparsity ranked by ``f · c`` and an inference threshold θ (docs/methods.md §1.5–§1.6).

    ``centered_encoder``: encode ``x̃ − b_dec`` as the SAE does, instead of ``x̃`` as the reference crosscoders do
    (docs/methods.md §1.3). x: [batch, n_sources, d_model] raw activations; codes: [batch, dict_size].
    """

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        k: int,
        n_sources: int = 2,
        init_decoder_norm: float = 1.0,
        source_names: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        centered_encoder: bool = False,
    ) -> None:
        if not isinstance(centered_encoder, bool):
            raise ConfigError(f"centered_encoder must be true or false, got {centered_encoder!r}")
        self.subtracts_decoder_bias = centered_encoder
        super().__init__(d_model, dict_size, n_sources, k, init_decoder_norm, source_names, metadata)

    def _init_kwargs(self) -> dict[str, Any]:
        kwargs = super()._init_kwargs()
        if self.subtracts_decoder_bias:  # written only when set: other crosscoders' files stay as they were
            kwargs["centered_encoder"] = True
        return kwargs


class L1CrossCoder(SparseDictionary):
    """Crosscoder with ReLU codes and an L1 penalty ``λ · mean_b Σ_j f_j c_j`` (docs/methods.md §1.7).

    x: [batch, n_sources, d_model] raw activations; codes: [batch, dict_size].
    """

    uses_batch_topk = False

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        n_sources: int = 2,
        init_decoder_norm: float = 0.05,
        source_names: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(d_model, dict_size, n_sources, None, init_decoder_norm, source_names, metadata)

    def _init_kwargs(self) -> dict[str, Any]:
        kwargs = super()._init_kwargs()
        del kwargs["k"]
        return kwargs


class BatchTopKSAE(SparseDictionary):
    """SAE with BatchTopK on ``f = ReLU(W_enc (x − b_dec) + b_enc)`` and unit-norm decoder rows (docs/methods.md §1.8).

    ``input`` says what it reads from a paired batch: ``chat_minus_base`` (a difference SAE, the default),
    ``base_minus_chat`` or ``source:<i>`` (a plain SAE on one model). x: [batch, d_model] raw activations
    (``input_from_pair`` takes them from a paired batch); codes: [batch, dict_size]. Stored as one source.
    """

    subtracts_decoder_bias = True
    unit_code_norms = True  # decoder rows are unit-norm, so BatchTopK ranks the activations themselves

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        k: int,
        input: str | DictionaryInput = CHAT_MINUS_BASE,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        chosen = DictionaryInput.parse(input) if isinstance(input, str) else input
        if chosen.kind == "paired":
            raise ConfigError("a BatchTopKSAE reads one vector per token: input must not be 'paired'")
        super().__init__(d_model, dict_size, 1, k, 1.0, [str(chosen)], metadata)
        self.input = chosen

    def _init_kwargs(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "dict_size": self.dict_size,
            "k": self.k,
            "input": str(self.input),
            "metadata": self.metadata,
        }

    def as_sources(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise DataError(
                f"expected activations of shape [batch, d_model={self.d_model}], got {list(x.shape)}: "
                "a BatchTopKSAE takes one vector per token (for a diff-SAE, x_chat − x_base)"
            )
        return x[:, None, :]

    def from_sources(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, :]

    training_decode_projects_gradient = True

    @torch.no_grad()
    def before_optimizer_step(self, decoder_gradient_projected: bool = False) -> list[nn.Parameter]:
        """Remove the gradient component parallel to each decoder row (keeps rows on the unit sphere), in place:
        ``g_j ← g_j − ⟨g_j, w_j⟩ w_j`` (``crosscoder.kernels.row_projection``) — unless
        ``decoder_gradient_projected``: the training decode's backward projected each row as it summed it
        (``training_decode_projects_gradient``; a pass over the decoder and its gradient saved: 50 ms a step at
        73,728 × 2,304 on CPU)."""
        if self.W_dec.grad is None or decoder_gradient_projected:
            return []
        project_out_rows(self.W_dec.detach().flatten(1), self.W_dec.grad.flatten(1))
        return [self.W_dec]

    @torch.no_grad()
    def after_optimizer_step(self, latents: slice | None = None) -> None:
        """Renormalise the decoder rows of ``latents`` (default: all) to unit norm, in place
        (``crosscoder.kernels.row_projection.normalise_rows``)."""
        normalise_rows(self.W_dec.detach()[slice(None) if latents is None else latents].flatten(1))

    def describe(self) -> str:
        """One sentence for the model card."""
        return f"A BatchTopK SAE on `{self.input.describe()}` activations."

    def usage_snippet(self) -> str:
        """Python lines for the model card's usage section."""
        return (
            f"x = dictionary.input_from_pair(paired)  # [batch, {self.d_model}]: {self.input.describe()}\n"
            "codes = dictionary.encode(x)         # [batch, dict_size], inference threshold\n"
            "x_hat = dictionary.decode(codes)     # [batch, d_model]"
        )


class _Nested:
    """Matryoshka training on top of a BatchTopK dictionary (docs/methods.md §12.1): one BatchTopK selection over all
    latents; the loss averages the reconstruction losses of the selected latents below each of ``prefix_sizes``;
    inference as the plain dictionary (one global θ)."""

    prefix_sizes: tuple[int, ...]
    dict_size: int

    def _init_kwargs(self) -> dict[str, Any]:
        return {**super()._init_kwargs(), "prefix_sizes": list(self.prefix_sizes)}  # type: ignore[misc]

    def _nesting(self) -> str:
        return f"trained as a Matryoshka dictionary on the nested prefixes {list(self.prefix_sizes)} of its latents"


class MatryoshkaCrossCoder(_Nested, BatchTopKCrossCoder):
    """BatchTopK crosscoder trained on nested prefixes of its latents (docs/methods.md §12.1).

    prefix_sizes: increasing latent counts ending at dict_size, e.g. [F/16, F/8, F/4, F/2, F]. x: [batch, n_sources,
    d_model] raw activations; codes: [batch, dict_size].
    """

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        k: int,
        prefix_sizes: list[int],
        n_sources: int = 2,
        init_decoder_norm: float = 1.0,
        source_names: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        centered_encoder: bool = False,
    ) -> None:
        super().__init__(
            d_model, dict_size, k, n_sources, init_decoder_norm, source_names, metadata,
            centered_encoder=centered_encoder,
        )  # fmt: skip
        self.prefix_sizes = _checked_prefix_sizes(prefix_sizes, dict_size)

    def describe(self) -> str:
        """One sentence for the model card."""
        return f"{super().describe()[:-1]}, {self._nesting()}."


class MatryoshkaSAE(_Nested, BatchTopKSAE):
    """BatchTopK SAE (e.g. a diff-SAE) trained on nested prefixes of its latents (docs/methods.md §12.1).

    prefix_sizes: increasing latent counts ending at dict_size. x: [batch, d_model] raw activations.
    """

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        k: int,
        prefix_sizes: list[int],
        input: str | DictionaryInput = CHAT_MINUS_BASE,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(d_model, dict_size, k, input, metadata)
        self.prefix_sizes = _checked_prefix_sizes(prefix_sizes, dict_size)

    def describe(self) -> str:
        """One sentence for the model card."""
        return f"{super().describe()[:-1]}, {self._nesting()}."


class DedicatedCrossCoder(BatchTopKCrossCoder):
    """Dedicated-feature crosscoder (docs/methods.md §12.2): latents ``[0, n_shared)`` are shared, the next
    ``exclusive_sizes[0]`` base-only and the last ``exclusive_sizes[1]`` chat-only. An exclusive latent has no
    decoder row for the other model: each model's decoder holds the rows of its own latents only, ``W_dec_base``
    [n_shared + n_base_only, n_sources/2, d_model] (the shared then the base-only latents) and ``W_dec_chat``
    [n_shared + n_chat_only, n_sources/2, d_model] (the shared then the chat-only latents), so the structural zeros
    are neither stored, trained nor decoded; ``W_dec`` is the dense [dict_size, n_sources, d_model] view assembled
    from them (zeros in the other model's blocks, ``structural_zeros``) for every reader. With
    ``exclusive_encoder="own"`` an exclusive latent's encoder rows for the other model are zero too (dense in
    ``W_enc``: zero from initialisation, their gradient removed before every optimizer step). BatchTopK ranks all
    partitions together in one budget ``k · B``; with ``exclusive_k`` = [k_base, k_chat] each partition has its own
    (``partition_budgets``) and its own inference threshold: ``threshold`` is then [3], θ of the shared, base-only
    and chat-only partitions.

    Sources ``[0, S/2)`` belong to the base model, ``[S/2, S)`` to the chat model (one source each for one layer).
    x: [batch, n_sources, d_model] raw activations; codes: [batch, dict_size].
    """

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        k: int,
        exclusive_sizes: list[int],
        exclusive_encoder: str = "own",
        n_sources: int = 2,
        init_decoder_norm: float = 1.0,
        source_names: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        centered_encoder: bool = False,
        exclusive_k: list[int] | None = None,
    ) -> None:
        sizes = list(exclusive_sizes) if isinstance(exclusive_sizes, (list, tuple)) else None
        if (
            sizes is None
            or len(sizes) != 2
            or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sizes)
            or (isinstance(dict_size, int) and sum(sizes) >= dict_size)
        ):
            raise ConfigError(
                f"exclusive_sizes={exclusive_sizes!r} is invalid: give two latent counts ≥ 0 [base-only, chat-only] "
                f"that leave some of dict_size={dict_size!r} latents shared"
            )
        if exclusive_encoder not in ("own", "both"):
            raise ConfigError(
                f"exclusive_encoder={exclusive_encoder!r} is invalid: 'own' (an exclusive latent reads its own "
                "model only) or 'both'"
            )
        if not isinstance(n_sources, int) or n_sources % 2:
            raise ConfigError(
                f"a DedicatedCrossCoder needs the base sources then the chat sources, an even n_sources, got "
                f"{n_sources!r}"
            )
        # read by reset_parameters, which the base initialiser calls
        self.exclusive_sizes, self.exclusive_encoder = (sizes[0], sizes[1]), exclusive_encoder
        super().__init__(
            d_model, dict_size, k, n_sources, init_decoder_norm, source_names, metadata,
            centered_encoder=centered_encoder,
        )  # fmt: skip
        self.exclusive_k = _checked_exclusive_k(exclusive_k, self.exclusive_sizes, k)
        if self.exclusive_k is not None:
            self.threshold = torch.full((3,), -1.0)  # one θ per partition, none estimated yet

    def partitions(self) -> dict[str, slice]:
        """The latents of each partition: ``shared``, ``base-only``, ``chat-only`` (contiguous, in that order)."""
        n_base, n_chat = self.exclusive_sizes
        n_shared = self.dict_size - n_base - n_chat
        return {
            "shared": slice(0, n_shared),
            "base-only": slice(n_shared, n_shared + n_base),
            "chat-only": slice(n_shared + n_base, self.dict_size),
        }

    def structural_zeros(self) -> list[tuple[slice, slice]]:
        """The (latents, sources) blocks of ``W_dec`` that are structurally zero (and of ``W_enc`` with
        ``exclusive_encoder="own"``): base-only latents × chat sources, chat-only latents × base sources."""
        half = self.n_sources // 2
        partitions = self.partitions()
        return [(partitions["base-only"], slice(half, None)), (partitions["chat-only"], slice(0, half))]

    def _register_decoder(self) -> None:
        n_base, n_chat = self.exclusive_sizes
        n_shared, half = self.dict_size - n_base - n_chat, self.n_sources // 2
        self.W_dec_base = nn.Parameter(torch.empty(n_shared + n_base, half, self.d_model))
        self.W_dec_chat = nn.Parameter(torch.empty(n_shared + n_chat, half, self.d_model))

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        """The dense decoder [dict_size, n_sources, d_model], assembled from ``W_dec_base`` and ``W_dec_chat`` with
        zeros in the structural blocks (differentiable; a new tensor: write to the per-model parameters)."""
        return self.assemble_decoder(self.W_dec_base, self.W_dec_chat)

    def assemble_decoder(self, base_rows: torch.Tensor, chat_rows: torch.Tensor) -> torch.Tensor:
        """Per-model rows laid out like ``W_dec_base`` and ``W_dec_chat`` (any trailing dims) → the dense
        [dict_size, n_sources, ...] layout of ``W_dec``, zeros in the structural blocks (differentiable)."""
        n_base, n_chat = self.exclusive_sizes
        n_shared = self.dict_size - n_base - n_chat
        base_half = torch.cat([base_rows, base_rows.new_zeros((n_chat, *base_rows.shape[1:]))])
        chat_half = torch.cat(
            [chat_rows[:n_shared], chat_rows.new_zeros((n_base, *chat_rows.shape[1:])), chat_rows[n_shared:]]
        )
        return torch.cat([base_half, chat_half], dim=1)

    def split_decoder(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``assemble_decoder``: a dense [dict_size, n_sources, ...] tensor → (base model's rows, chat
        model's rows), the structural blocks dropped (a dense ``W_dec`` or its Adam moments of format version 2)."""
        partitions, half = self.partitions(), self.n_sources // 2
        base_rows = dense[: partitions["base-only"].stop, :half]
        chat_rows = torch.cat([dense[partitions["shared"], half:], dense[partitions["chat-only"], half:]])
        return base_rows.contiguous(), chat_rows.contiguous()

    def decoder_norms(self) -> torch.Tensor:
        """``‖W_dec[j, s]‖₂`` [dict_size, n_sources] from the per-model rows (0 in the structural blocks)."""
        return self.assemble_decoder(self.W_dec_base.norm(dim=-1), self.W_dec_chat.norm(dim=-1))

    def decode_normalized(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [batch, dict_size] → [batch, n_sources, d_model]: each model decodes its own latents only."""
        partitions, half = self.partitions(), self.n_sources // 2
        codes = codes.to(self.W_dec_base.dtype)
        base = codes[:, : partitions["base-only"].stop] @ self.W_dec_base.flatten(1)
        chat_codes = torch.cat([codes[:, partitions["shared"]], codes[:, partitions["chat-only"]]], dim=1)
        chat = chat_codes @ self.W_dec_chat.flatten(1)
        return torch.cat([base.view(-1, half, self.d_model), chat.view(-1, half, self.d_model)], dim=1) + self.b_dec

    def _decoder_weights(self) -> tuple[nn.Parameter, ...]:
        return (self.W_dec_base, self.W_dec_chat)

    def _decode_entries(
        self,
        values: torch.Tensor,
        codes: SparseCodes,
        prefix_sizes: tuple[int, ...],
        weight_gradient: Callable[[nn.Parameter], WeightGradient] | None = None,
    ) -> torch.Tensor:
        """Each model's sources decode the entries of its own latents from its own rows (an exclusive latent's
        entries skip the other model's half: no zeros are multiplied): [1, batch, n_sources · d_model], each row the
        base model's sources then the chat model's."""
        outputs = []
        for (taken, model_codes), rows in zip(
            self._model_codes(codes), (self.W_dec_base, self.W_dec_chat), strict=True
        ):
            gradient = None if weight_gradient is None else weight_gradient(rows)
            outputs.append(sparse_decode(values[taken], model_codes, rows.flatten(1), gradient)[None])
        return torch.cat(outputs, dim=2)

    def _model_codes(self, codes: SparseCodes) -> list[tuple[torch.Tensor, SparseCodes]]:
        """For the base then the chat model: the entries of ``codes`` it decodes (their positions, [n]) and their
        codes over that model's decoder rows (the shared latents, then its exclusive ones renumbered after them)."""
        partitions = self.partitions()
        latents = codes.latents
        base_taken = (latents < partitions["base-only"].stop).nonzero().squeeze(1)
        chat_only = latents >= partitions["chat-only"].start
        chat_taken = ((latents < partitions["shared"].stop) | chat_only).nonzero().squeeze(1)
        chat_latents = latents - chat_only * self.exclusive_sizes[0]
        return [
            (taken, SparseCodes.from_sorted_indices(codes.rows[taken], model_latents[taken], codes.batch_size, n_rows))
            for taken, model_latents, n_rows in (
                (base_taken, latents, self.W_dec_base.shape[0]),
                (chat_taken, chat_latents, self.W_dec_chat.shape[0]),
            )
        ]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The base initialisation (the same random directions), each model's decoder keeping its own latents' rows;
        with ``exclusive_encoder="own"`` the encoder's structural blocks zeroed."""
        directions = self._random_directions(generator)
        for parameter, rows in zip((self.W_dec_base, self.W_dec_chat), self.split_decoder(directions), strict=True):
            parameter.copy_(rows)
        self.W_enc.copy_(directions)
        if self.exclusive_encoder == "own":
            for latents, sources in self.structural_zeros():
                self.W_enc[latents, sources] = 0
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def before_optimizer_step(self, decoder_gradient_projected: bool = False) -> list[nn.Parameter]:
        """With ``exclusive_encoder="own"``: remove the gradient of the encoder's structural zeros, so that no
        optimizer moves them (Adam's moments stay 0)."""
        if self.exclusive_encoder != "own" or self.W_enc.grad is None:
            return []
        for latents, sources in self.structural_zeros():
            self.W_enc.grad[latents, sources] = 0
        return [self.W_enc]

    @property
    def selects_in_latent_blocks(self) -> bool:  # type: ignore[override]
        """One budget for all partitions selects in latent blocks; per-partition budgets select per partition."""
        return self.exclusive_k is None

    def partition_budgets(self, k: int) -> tuple[int, int, int]:
        """Per-token budgets (shared, base-only, chat-only) when the dictionary keeps ``k`` latents per token (the
        configured k, or k-annealing's k_t): each of ``exclusive_k`` scaled by ``k / self.k`` and rounded (Python's
        ``round``), the shared partition the rest (docs/methods.md §12.2)."""
        if self.exclusive_k is None:
            raise ConfigError("this dedicated crosscoder ranks all partitions in one budget: it has no exclusive_k")
        base, chat = (round(budget * k / self.k) for budget in self.exclusive_k)
        return k - base - chat, base, chat

    def latent_thresholds(self) -> torch.Tensor:
        """θ of every latent: [dict_size], each partition's θ, with ``exclusive_k``; else the 0-d global θ."""
        if self.exclusive_k is None:
            return self.threshold
        sizes = [part.stop - part.start for part in self.partitions().values()]
        return self.threshold.repeat_interleave(
            torch.tensor(sizes, device=self.threshold.device), output_size=self.dict_size
        )

    def threshold_metrics(self) -> dict[str, float]:
        """θ as logged during training: one per partition with ``exclusive_k`` (``threshold_shared``,
        ``threshold_base_only``, ``threshold_chat_only``)."""
        if self.exclusive_k is None:
            return super().threshold_metrics()
        names = [f"threshold_{name.replace('-', '_')}" for name in self.partitions()]
        return {name: float(theta) for name, theta in zip(names, self.threshold, strict=True)}

    @torch.no_grad()
    def _select(self, scores: torch.Tensor, k: int, context: Distributed) -> tuple[SparseCodes, torch.Tensor]:
        """With ``exclusive_k``: BatchTopK within each partition, its ``k_p · B`` largest scores among its own latents
        (``k_p`` from ``partition_budgets(k)``; a budget of 0 keeps nothing), merged in CSR order; the smallest kept
        score of each partition ([3]; 0 where nothing is kept; no candidate bound). Without: one BatchTopK over all
        latents."""
        if self.exclusive_k is None:
            return super()._select(scores, k, context)
        rows, latents, smallest = [], [], []
        for part, budget in zip(self.partitions().values(), self.partition_budgets(k), strict=True):
            if budget == 0:
                smallest.append(scores.new_zeros(()))
                continue
            codes, threshold = super()._select(scores[:, part].contiguous(), budget, context)
            rows.append(codes.rows)
            latents.append(codes.latents + part.start)
            smallest.append(threshold)
        all_rows, all_latents = torch.cat(rows), torch.cat(latents)
        order = torch.argsort(all_rows * self.dict_size + all_latents)
        codes = SparseCodes.from_sorted_indices(all_rows[order], all_latents[order], *scores.shape)
        return codes, torch.stack(smallest)

    def _init_kwargs(self) -> dict[str, Any]:
        kwargs = {
            **super()._init_kwargs(),
            "exclusive_sizes": list(self.exclusive_sizes),
            "exclusive_encoder": self.exclusive_encoder,
        }
        if self.exclusive_k is not None:  # written only when set: one-budget dictionaries' files stay as they were
            kwargs["exclusive_k"] = list(self.exclusive_k)
        return kwargs

    def describe(self) -> str:
        """One sentence for the model card."""
        n_base, n_chat = self.exclusive_sizes
        sentence = (
            f"{super().describe()[:-1]}, with dedicated features: {n_base} base-only and {n_chat} chat-only latents "
            f"whose decoders for the other model are fixed at zero ({self.dict_size - n_base - n_chat} shared)"
        )
        if self.exclusive_k is not None:
            shared, base, chat = self.partition_budgets(self.k)
            sentence += f"; BatchTopK keeps {shared} shared, {base} base-only and {chat} chat-only latents per token"
        return sentence + "."


DICTIONARY_CLASSES: dict[str, type[SparseDictionary]] = {
    cls.__name__: cls
    for cls in (
        BatchTopKCrossCoder,
        L1CrossCoder,
        BatchTopKSAE,
        MatryoshkaCrossCoder,
        MatryoshkaSAE,
        DedicatedCrossCoder,
    )
}


def _checked_prefix_sizes(prefix_sizes: object, dict_size: int) -> tuple[int, ...]:
    """``prefix_sizes`` as a tuple when they are increasing positive latent counts ending at ``dict_size``."""
    sizes = tuple(prefix_sizes) if isinstance(prefix_sizes, (list, tuple)) else ()
    valid = (
        sizes
        and all(isinstance(size, int) and not isinstance(size, bool) for size in sizes)
        and sizes[0] > 0
        and all(small < large for small, large in itertools.pairwise(sizes))
        and sizes[-1] == dict_size
    )
    if not valid:
        raise ConfigError(
            f"prefix_sizes={prefix_sizes!r} is invalid: give increasing latent counts > 0 ending at "
            f"dict_size={dict_size}, e.g. {[dict_size // 4, dict_size // 2, dict_size]}"
        )
    return sizes


def _checked_exclusive_k(exclusive_k: object, exclusive_sizes: tuple[int, int], k: int) -> tuple[int, int] | None:
    """``exclusive_k`` as a tuple when it holds the per-token budgets [base-only, chat-only] of partitions of
    ``exclusive_sizes`` latents: each at least 1 and at most its partition's size (0 for an empty partition), together
    less than ``k`` (the shared partition keeps the rest); None stays None (one budget for all partitions)."""
    if exclusive_k is None:
        return None
    budgets = tuple(exclusive_k) if isinstance(exclusive_k, (list, tuple)) else ()
    valid = (
        len(budgets) == 2
        and all(isinstance(budget, int) and not isinstance(budget, bool) for budget in budgets)
        and all(
            0 < budget <= size or budget == size == 0 for budget, size in zip(budgets, exclusive_sizes, strict=True)
        )
        and sum(budgets) < k
    )
    if not valid:
        raise ConfigError(
            f"exclusive_k={exclusive_k!r} is invalid: give the per-token BatchTopK budgets [base-only, chat-only] of "
            f"the exclusive partitions of {list(exclusive_sizes)} latents, each at least 1 and at most its partition's "
            f"latent count (0 for an empty partition), summing to less than k={k} (the shared latents keep the rest); "
            "or None for one budget over all latents"
        )
    return budgets[0], budgets[1]


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _top_dead_latents(
    scores: torch.Tensor, dead: torch.Tensor, k_aux: int, columns: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k_aux`` highest-scoring dead latents (fewer if fewer are dead), sorted by latent: (latents,
    their scores), each [batch, ≤ k_aux]; a pick scoring ≤ 0 is not a candidate. scores: [batch, dict_size].

    ``columns``: rank only the dead latents' columns (listing them syncs with the device, free on CPU, where it
    spares ranking the whole matrix); else rank every column with the live ones pushed below zero (no sync)."""
    if columns:
        dead_latents = dead.nonzero().squeeze(1)  # ascending, so column order is latent order
        return _top_of_columns(dead_latents, scores[:, dead_latents], k_aux)
    top = torch.where(dead, scores, -1.0).topk(min(k_aux, scores.shape[1]), dim=-1)
    latents, order = top.indices.sort(dim=-1)
    return latents, top.values.gather(-1, order)


def _top_of_columns(
    latents: torch.Tensor, column_scores: torch.Tensor, k_aux: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k_aux`` highest of the columns of ``latents`` [n] (column_scores: [batch, n]), sorted by latent:
    (latents, their scores), each [batch, ≤ k_aux]."""
    top = column_scores.topk(min(k_aux, latents.numel()), dim=-1)
    picked, order = latents[top.indices].sort(dim=-1)
    return picked, top.values.gather(-1, order)


def _n_keep(k: int, batch: int, context: Distributed) -> int:
    """BatchTopK's budget ``k · B`` over the global batch: B rows on every data-parallel process."""
    return k * batch * (context.world_size if context.data_parallel else 1)


def _sum_shards(partial: torch.Tensor, context: Distributed | None) -> torch.Tensor:
    """With latent sharding, the decode of this process's latents summed over processes; else as is."""
    return SumOverProcesses.apply(partial, context) if context is not None and context.latent_parallel else partial
