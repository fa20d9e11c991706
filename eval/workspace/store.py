"""The activation store: per-latent statistics and examples of every latent from one streamed pass
(docs/methods.md §11.1).

For each latent the store keeps its firing count and activation sum, a histogram of its activations on fixed
log-spaced bins, its ``n_top`` strongest activations and a uniform sample of ``n_quantiles · per_quantile`` of its
activations (bottom-k of a hash priority), each with a window of token ids and the latent's activation on every
window token. Quantile buckets are read from the sample: sorted by activation and cut into ``n_quantiles`` equal
groups. Every part is a sum or a bottom-k under a total order on (rank key, token key), so two partial stores of
disjoint tokens merge exactly into the store of their union (``merge``), whatever the order of the tokens.
Memory is ``O(dict_size · (n_top + n_quantiles · per_quantile) · window)``, whatever the stream length.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from crosscoder.errors import ConfigError, DataError
from crosscoder.eval.inspection import PAD, Example

BINS_PER_DECADE, LOWEST_DECADE, DECADES = 8, -4, 8
"""Histogram bins: ``10^(LOWEST_DECADE + i / BINS_PER_DECADE)`` for ``i = 0 … 64``; values outside land in the end
bins."""
N_BINS = BINS_PER_DECADE * DECADES
MASK31 = (1 << 31) - 1
T = TypeVar("T")
ROW_BITS = 24
"""A token's key is ``chunk_index · 2^ROW_BITS + row``: unique and equal for a token whichever process saw it."""


@dataclass(frozen=True)
class StoreSettings:
    """What the store keeps per latent; part of its saved identity (a store is reused only with equal settings)."""

    dict_size: int
    n_top: int = 10
    n_quantiles: int = 5
    per_quantile: int = 4
    before: int = 12
    after: int = 4
    seed: int = 0

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    @property
    def n_sample(self) -> int:
        return self.n_quantiles * self.per_quantile


def histogram_bins(values: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each positive activation: ``floor((log10 v − LOWEST_DECADE) · BINS_PER_DECADE)``, clamped."""
    position = (values.double().log10() - LOWEST_DECADE) * BINS_PER_DECADE
    return position.floor().clamp(0, N_BINS - 1).long()


def histogram_edges() -> list[float]:
    """The ``N_BINS + 1`` bin edges (activation values)."""
    return [10 ** (LOWEST_DECADE + i / BINS_PER_DECADE) for i in range(N_BINS + 1)]


def sample_priority(keys: torch.Tensor, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random priority in ``[0, 2^31)`` per (token key, latent): a 31-bit integer hash (xor-shift and
    multiply rounds). The sample keeps each latent's lowest priorities, a uniform sample of its activations."""
    mixed = ((keys & MASK31) * 0x2C1B3C6D + (keys >> 31) * 0x297A2D39 + latents * 0x5BD1E995 + seed) & MASK31
    for _ in range(3):
        mixed = mixed ^ (mixed >> 15)
        mixed = (mixed * 0x2C1B3C6D) & MASK31
    return mixed ^ (mixed >> 16)


def quantile_buckets(items: list[T], activation: Callable[[T], float], n_quantiles: int) -> list[list[T]]:
    """Items sorted by activation (stable) and cut into ``min(n_quantiles, len(items))`` near-equal buckets."""
    ordered = sorted(items, key=activation)
    if not ordered:
        return []
    parts = torch.tensor_split(torch.arange(len(ordered)), min(n_quantiles, len(ordered)))
    return [[ordered[i] for i in part.tolist()] for part in parts]


class Reservoir:
    """Per latent, the ``capacity`` entries of lowest (rank, key) seen so far, each with its value and window.

    ranks, keys, values: [dict_size, capacity] (empty slots: rank +inf, key −1, value 0); window_ids (int32, ``PAD``
    outside the sequence) and window_activations: [dict_size, capacity, width]. Slots are in (rank, key) order.
    """

    def __init__(self, dict_size: int, capacity: int, width: int) -> None:
        self.capacity = capacity
        self.ranks = torch.full((dict_size, capacity), float("inf"), dtype=torch.float64)
        self.keys = torch.full((dict_size, capacity), -1, dtype=torch.long)
        self.values = torch.zeros(dict_size, capacity)
        self.window_ids = torch.full((dict_size, capacity, width), PAD, dtype=torch.int32)
        self.window_activations = torch.zeros(dict_size, capacity, width)

    def offer(
        self,
        latents: torch.Tensor,
        ranks: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        window_ids: torch.Tensor,
        window_activations: torch.Tensor,
    ) -> None:
        """Merge candidates (each [n], windows [n, width]) into the kept entries of the latents they name."""
        if latents.numel() == 0:
            return
        touched = latents.unique()
        held = self.keys[touched] >= 0  # [t, capacity]
        slot_latent = touched[:, None].expand_as(held)[held]
        slot_index = torch.arange(self.capacity).expand_as(held)[held]
        all_latents = torch.cat([slot_latent, latents])
        all_ranks = torch.cat([self.ranks[slot_latent, slot_index], ranks.double()])
        all_keys = torch.cat([self.keys[slot_latent, slot_index], keys])
        all_values = torch.cat([self.values[slot_latent, slot_index], values.float()])
        all_ids = torch.cat([self.window_ids[slot_latent, slot_index], window_ids.to(torch.int32)])
        all_activations = torch.cat([self.window_activations[slot_latent, slot_index], window_activations.float()])
        order = _lexicographic_order(all_latents, all_ranks, all_keys)
        sorted_latents = all_latents[order]
        group_start = torch.searchsorted(sorted_latents, sorted_latents)
        slot = torch.arange(len(order)) - group_start
        kept = slot < self.capacity
        chosen, slot = order[kept], slot[kept]
        latent = all_latents[chosen]
        self.ranks[touched], self.keys[touched], self.values[touched] = float("inf"), -1, 0.0
        self.window_ids[touched], self.window_activations[touched] = PAD, 0.0
        self.ranks[latent, slot], self.keys[latent, slot] = all_ranks[chosen], all_keys[chosen]
        self.values[latent, slot] = all_values[chosen]
        self.window_ids[latent, slot] = all_ids[chosen]
        self.window_activations[latent, slot] = all_activations[chosen]

    def merge(self, other: Reservoir) -> None:
        """Add the entries of another reservoir (a partial store of other tokens)."""
        held = other.keys >= 0
        latents = torch.arange(other.keys.shape[0])[:, None].expand_as(held)[held]
        self.offer(
            latents,
            other.ranks[held],
            other.keys[held],
            other.values[held],
            other.window_ids[held],
            other.window_activations[held],
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": getattr(self, name) for name in _RESERVOIR_FIELDS}

    def load(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for name in _RESERVOIR_FIELDS:
            setattr(self, name, tensors[f"{prefix}.{name}"].clone())


_RESERVOIR_FIELDS = ("ranks", "keys", "values", "window_ids", "window_activations")


def _lexicographic_order(latents: torch.Tensor, ranks: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by (latent, rank, key), by stable sorts from the last key to the first."""
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(ranks[order], stable=True)]
    return order[torch.argsort(latents[order], stable=True)]


class ActivationStore:
    """Frequency, histogram, top contexts and quantile-bucket samples of every latent (docs/methods.md §11.1).

    counts: [dict_size] int64 tokens on which each latent fired; activation_sum: [dict_size] float64;
    histogram: [dict_size, N_BINS] int64; ``top`` ranks by −activation, ``sample`` by ``sample_priority``.
    """

    def __init__(self, settings: StoreSettings) -> None:
        if settings.dict_size <= 0 or settings.n_top <= 0 or settings.n_sample <= 0:
            raise ConfigError(f"{settings} keeps nothing: dict_size, n_top, n_quantiles, per_quantile must be positive")
        self.settings = settings
        self.tokens = 0
        self.counts = torch.zeros(settings.dict_size, dtype=torch.long)
        self.activation_sum = torch.zeros(settings.dict_size, dtype=torch.float64)
        self.histogram = torch.zeros(settings.dict_size, N_BINS, dtype=torch.long)
        self.top = Reservoir(settings.dict_size, settings.n_top, settings.width)
        self.sample = Reservoir(settings.dict_size, settings.n_sample, settings.width)

    @torch.no_grad()
    def update(
        self, codes: torch.Tensor, token_ids: torch.Tensor, sequence_ids: torch.Tensor | None, chunk_index: int
    ) -> None:
        """Add one chunk. codes: [tokens, dict_size] inference codes on consecutive tokens; token_ids,
        sequence_ids: [tokens] (None = one sequence); chunk_index: the chunk's place in the whole stream."""
        codes = codes.detach().float().cpu()
        tokens, settings = codes.shape[0], self.settings
        if codes.dim() != 2 or codes.shape[1] != settings.dict_size:
            raise DataError(f"expected codes [tokens, {settings.dict_size}], got {list(codes.shape)}")
        if tokens >= 1 << ROW_BITS:
            raise DataError(f"a chunk of {tokens} tokens is too long for the store's keys: split it below 2^{ROW_BITS}")
        self.tokens += tokens
        rows, latents = codes.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        values = codes[rows, latents]
        self.counts += torch.bincount(latents, minlength=settings.dict_size)
        self.activation_sum.index_add_(0, latents, values.double())
        flat = latents * N_BINS + histogram_bins(values)
        self.histogram.view(-1).index_add_(0, flat, torch.ones_like(flat))
        keys = chunk_index * (1 << ROW_BITS) + rows
        sequence_ids = torch.zeros(tokens, dtype=torch.long) if sequence_ids is None else sequence_ids.cpu()
        windows = _Windows(codes, token_ids.cpu(), sequence_ids, settings.before, settings.after)
        for reservoir, rank in (
            (self.top, -values.double()),
            (self.sample, sample_priority(keys, latents, settings.seed).double()),
        ):
            # only candidates that beat the latent's current last kept entry can enter: build windows for those
            last = reservoir.ranks[latents, -1]
            candidate = (rank < last) | ((rank == last) & (keys < reservoir.keys[latents, -1]))
            candidate |= reservoir.keys[latents, -1] < 0
            chosen = candidate.nonzero().squeeze(1)
            ids, activations = windows.around(rows[chosen], latents[chosen])
            reservoir.offer(latents[chosen], rank[chosen], keys[chosen], values[chosen], ids, activations)

    def merge(self, other: ActivationStore) -> None:
        """Add another store of disjoint tokens with the same settings: the result equals one pass over both."""
        if other.settings != self.settings:
            raise ConfigError(f"cannot merge stores with different settings: {other.settings} vs {self.settings}")
        self.tokens += other.tokens
        self.counts += other.counts
        self.activation_sum += other.activation_sum
        self.histogram += other.histogram
        self.top.merge(other.top)
        self.sample.merge(other.sample)

    # ------------------------------------------------------------------ reading
    @property
    def frequencies(self) -> torch.Tensor:
        """[dict_size] fraction of tokens on which each latent fired."""
        return self.counts.double() / max(self.tokens, 1)

    @property
    def max_activations(self) -> torch.Tensor:
        """[dict_size] the largest activation seen (0 for a latent that never fired)."""
        return self.top.values[:, 0].clone()

    def mean_activations(self) -> torch.Tensor:
        """[dict_size] mean activation over the tokens where the latent fired (0 where it never fired)."""
        return self.activation_sum / self.counts.clamp_min(1)

    def top_examples(self, latent: int) -> list[Example]:
        """The latent's strongest activations, strongest first."""
        return _examples(self.top, latent, self.settings.before)

    def top_centre_tokens(self) -> list[list[int]]:
        """Per latent the distinct tokens its strongest activations fire on, strongest first (empty: never fired)."""
        centres = self.top.window_ids[:, :, self.settings.before].tolist()
        held = (self.top.keys >= 0).tolist()
        return [
            list(dict.fromkeys(token for token, kept in zip(tokens, slots, strict=True) if kept and token != PAD))
            for tokens, slots in zip(centres, held, strict=True)
        ]

    def quantile_examples(self, latent: int) -> list[list[Example]]:
        """The sampled activations cut into ``n_quantiles`` buckets of equal size, weakest bucket first (fewer or
        empty buckets when the latent fired fewer times than the sample holds)."""
        examples = _examples(self.sample, latent, self.settings.before)
        return quantile_buckets(examples, lambda example: example.activation, self.settings.n_quantiles)

    # ------------------------------------------------------------------ files
    def save(self, folder: Path, extra: dict | None = None) -> None:
        """Write ``store.safetensors`` and ``store.json`` (settings, tokens, ``extra``) atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "counts": self.counts,
            "activation_sum": self.activation_sum,
            "histogram": self.histogram,
            **self.top.tensors("top"),
            **self.sample.tensors("sample"),
        }
        temporary = folder / "store.safetensors.tmp"
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary))
        temporary.replace(folder / "store.safetensors")
        meta = {"settings": asdict(self.settings), "tokens": self.tokens, **(extra or {})}
        (folder / "store.json.tmp").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        (folder / "store.json.tmp").replace(folder / "store.json")

    @classmethod
    def load(cls, folder: Path) -> tuple[ActivationStore, dict]:
        """A saved store and its ``store.json`` record."""
        try:
            meta = json.loads((folder / "store.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "store.safetensors"))
        except (OSError, ValueError) as error:
            raise DataError(
                f"cannot read the activation store in {folder} ({error}): delete the folder to rebuild it"
            ) from error
        store = cls(StoreSettings(**meta["settings"]))
        store.tokens = int(meta["tokens"])
        store.counts, store.activation_sum = tensors["counts"].clone(), tensors["activation_sum"].clone()
        store.histogram = tensors["histogram"].clone()
        store.top.load(tensors, "top")
        store.sample.load(tensors, "sample")
        return store, meta


class _Windows:
    """Context windows of a chunk: token ids and a latent's activations ``before`` + 1 + ``after`` around a token,
    cut at sequence and chunk boundaries."""

    def __init__(
        self, codes: torch.Tensor, token_ids: torch.Tensor, sequence_ids: torch.Tensor, before: int, after: int
    ) -> None:
        tokens = codes.shape[0]
        positions = torch.arange(tokens)[:, None] + torch.arange(-before, after + 1)  # [tokens, width]
        inside = (positions >= 0) & (positions < tokens)
        self.clipped = positions.clamp(0, tokens - 1)
        self.inside = inside & (sequence_ids[self.clipped] == sequence_ids[:, None])
        self.codes, self.token_ids = codes, token_ids

    def around(self, rows: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of (row, latent) pairs: ids [n, width] int32 and activations [n, width]."""
        positions, inside = self.clipped[rows], self.inside[rows]
        ids = torch.where(inside, self.token_ids[positions], PAD).to(torch.int32)
        activations = torch.where(inside, self.codes[positions, latents[:, None]], 0.0)
        return ids, activations


def _examples(reservoir: Reservoir, latent: int, before: int) -> list[Example]:
    held = (reservoir.keys[latent] >= 0).nonzero().squeeze(1).tolist()
    return [
        Example(
            float(reservoir.values[latent, slot]),
            reservoir.window_ids[latent, slot].tolist(),
            reservoir.window_activations[latent, slot].tolist(),
            before,
        )
        for slot in held
    ]
