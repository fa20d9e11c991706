"""Reconstruction statistics accumulated over batches without host-device syncs (training logs, validation,
evaluation)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ReconstructionStats:
    """Running FVE (total and per source), L0 and latent firing counts over any number of batches.

    ``update`` takes x, x_hat: [batch, n_sources, d_model] and active: [dict_size], the number of the batch's
    tokens on which each latent fired (``active_counts(codes)`` for dense codes). FVE is
    ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` with x̄ the mean over all tokens seen, per source and in total.
    """

    ROWS_PER_CHUNK = 256

    def __init__(self) -> None:
        self.tokens = 0
        self._residual: torch.Tensor | None = None  # [n_sources]
        self._sum: torch.Tensor | None = None  # [n_sources, d_model]
        self._sum_squares: torch.Tensor | None = None  # [n_sources]
        self._active: torch.Tensor | None = None  # [dict_size]

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, active: torch.Tensor) -> None:
        """One batch: x, x_hat [batch, n_sources, d_model], active [dict_size]."""
        self.add_inputs(x)
        self._add_residual(_square_sums(x.detach(), x_hat.detach()), active)

    @torch.no_grad()
    def add_inputs(self, x: torch.Tensor) -> None:
        """The input half of ``update`` (x [batch, n_sources, d_model]), for a caller that frees x before it has the
        reconstruction: ``add_errors`` then takes the other half."""
        x = x.detach()
        batch_sum, batch_squares = x.sum(dim=0).double(), _square_sums(x)
        if self._sum is None:
            self._sum, self._sum_squares = batch_sum, batch_squares
        else:
            self._sum += batch_sum
            self._sum_squares += batch_squares
        self.tokens += x.shape[0]

    @torch.no_grad()
    def add_errors(self, error: torch.Tensor, active: torch.Tensor) -> None:
        """The other half: error = x̂ − x [batch, n_sources, d_model] (``TrainingOutput.reconstruction_error``),
        active [dict_size]."""
        self._add_residual(_square_sums(error.detach()), active)

    def _add_residual(self, residual: torch.Tensor, active: torch.Tensor) -> None:
        if self._residual is None:
            self._residual, self._active = residual, active
        else:
            self._residual += residual
            self._active += active

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the accumulated statistics over processes (every process must call it)."""
        self._require_data()
        for name in ("_residual", "_sum", "_sum_squares", "_active"):
            setattr(self, name, reduce(getattr(self, name)))
        self.tokens = int(reduce(torch.tensor(self.tokens, device=self._residual.device)))

    def gather_latents(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Latent sharding: every process saw the same tokens but counted only its own latents; concatenate the
        per-latent counts (every process must call it)."""
        self._require_data()
        self._active = gather(self._active)

    def _require_data(self) -> None:
        if self._residual is None:
            raise ValueError("no batches were accumulated: nothing to report")

    def _total_variance(self) -> torch.Tensor:
        return self._sum_squares - self._sum.pow(2).sum(dim=-1) / self.tokens

    def fve_per_source(self) -> torch.Tensor:
        """[n_sources] fraction of variance explained per source."""
        self._require_data()
        return 1 - self._residual / self._total_variance().clamp_min(1e-12)

    def fve(self) -> torch.Tensor:
        """0-d fraction of variance explained over all sources together."""
        self._require_data()
        return 1 - self._residual.sum() / self._total_variance().sum().clamp_min(1e-12)

    def latent_frequencies(self) -> torch.Tensor:
        """[dict_size] fraction of tokens on which each latent fired."""
        self._require_data()
        return self._active.double() / self.tokens

    def l0(self) -> torch.Tensor:
        """0-d mean number of active latents per token."""
        return self.latent_frequencies().sum()

    def summary(self) -> dict[str, float]:
        """Python floats (one host sync): fve, fve_source_<s>, l0."""
        values = {"fve": self.fve(), "l0": self.l0()}
        values.update({f"fve_source_{s}": value for s, value in enumerate(self.fve_per_source())})
        return {name: float(value) for name, value in values.items()}


def active_counts(codes: torch.Tensor) -> torch.Tensor:
    """[dict_size] tokens on which each latent is non-zero. codes: [batch, dict_size]."""
    return (codes.detach() != 0).sum(dim=0)


def _square_sums(x: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """[n_sources] float64: Σ over rows and d of x² (or of (x − minus)²), summed in x's dtype over chunks of
    ``ReconstructionStats.ROWS_PER_CHUNK`` rows (on the training hot path: one chunk-sized temporary, not one of x's
    size while the step's gradients are held) and accumulated in float64. x, minus: [batch, n_sources, d_model]."""
    sums = x.new_zeros(x.shape[1], dtype=torch.float64)
    rows_per_chunk = ReconstructionStats.ROWS_PER_CHUNK
    chunk = x.new_empty(min(len(x), rows_per_chunk), *x.shape[1:])
    for start in range(0, len(x), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        out = chunk[: len(x[rows])]
        squares = torch.mul(x[rows], x[rows], out=out) if minus is None else torch.sub(x[rows], minus[rows], out=out)
        sums += (squares if minus is None else squares.square_()).sum(dim=(0, 2))
    return sums
