"""``SparseCodes``: which latents are active in which rows of a batch, in CSR order (docs/methods.md §4.4).

BatchTopK keeps ``k · B`` entries of the whole ``[B, F]`` code matrix, so rows hold a variable number of active
latents: the pattern is stored as coordinate lists sorted by row then latent (CSR), with ``row_offsets`` giving
each row's slice. The values live in a separate ``[nnz]`` tensor aligned with the entries, so one pattern serves
the codes, their gradients and the active pre-activations alike.

The latent-sorted view (CSC: ``latent_order``, ``latent_offsets``, ``rows_by_latent``) is computed on first use
and cached; scatter-adds into latent rows are segmented sums over it, so they are deterministic. On CPU a counting
sort in C computes it (``sparse_codes.c``: 262,144 entries in ~1 ms against 6–8 ms for ``torch.sort``), unless the
kernel backend is ``"reference"`` or no C compiler is at hand; its reference is the stable ``torch.sort``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cached_property

import torch

from crosscoder.kernels.backend import c_kernel_allowed
from crosscoder.kernels.native import native_library


@dataclass(frozen=True, eq=False)
class SparseCodes:
    """Active (row, latent) pairs of a ``[batch_size, dict_size]`` code matrix, sorted by row then latent.

    rows: [nnz] int64, non-decreasing; latents: [nnz] int64, increasing within a row;
    row_offsets: [batch_size + 1] int64, row ``b``'s entries are ``row_offsets[b]:row_offsets[b + 1]``.
    Build with ``from_mask`` or ``from_indices`` (which validate), or ``from_sorted_indices`` for pairs known to be
    valid; the constructor checks only dtypes and shapes.
    """

    rows: torch.Tensor
    latents: torch.Tensor
    row_offsets: torch.Tensor
    batch_size: int
    dict_size: int

    def __post_init__(self) -> None:
        _check_size("batch_size", self.batch_size)
        _check_size("dict_size", self.dict_size)
        expected = {"rows": None, "latents": None, "row_offsets": self.batch_size + 1}
        for name, length in expected.items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {tensor.dtype}: convert with .long()")
            if tensor.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {list(tensor.shape)}")
            if not tensor.is_contiguous():
                raise ValueError(f"{name} must be contiguous: pass {name}.contiguous()")
            if tensor.device != self.rows.device:
                raise ValueError(f"{name} is on {tensor.device} but rows is on {self.rows.device}")
            if length is not None and tensor.numel() != length:
                raise ValueError(f"{name} has {tensor.numel()} entries but batch_size + 1 = {length} were expected")
        if self.latents.numel() != self.rows.numel():
            raise ValueError(f"rows has {self.rows.numel()} entries but latents has {self.latents.numel()}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> SparseCodes:
        """The True entries of a ``[batch_size, dict_size]`` bool mask (e.g. BatchTopK's kept entries)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a 2-D bool tensor [batch_size, dict_size], got {shape}")
        rows, latents = mask.nonzero(as_tuple=True)  # row-major: sorted by row, then latent
        batch_size, dict_size = mask.shape
        return cls(rows, latents, _segment_offsets(rows, batch_size), batch_size, dict_size)

    @classmethod
    def from_indices(cls, rows: torch.Tensor, latents: torch.Tensor, batch_size: int, dict_size: int) -> SparseCodes:
        """Active pairs given as coordinate lists, already sorted by row then latent and free of duplicates.

        Checks (one host sync) that every index is in range and the order is strictly increasing; to sort
        unordered pairs use ``order = (rows * dict_size + latents).argsort()`` and apply it to the values too.
        """
        for name, tensor in (("rows", rows), ("latents", latents)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64:
                got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must be an int64 tensor, got {got}: convert with .long()")
            if tensor.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {list(tensor.shape)}")
        if rows.numel() != latents.numel():
            raise ValueError(f"rows has {rows.numel()} entries but latents has {latents.numel()}")
        _check_size("batch_size", batch_size)
        _check_size("dict_size", dict_size)
        codes = cls.from_sorted_indices(rows, latents, batch_size, dict_size)
        codes.validate()
        return codes

    @classmethod
    def from_sorted_indices(
        cls, rows: torch.Tensor, latents: torch.Tensor, batch_size: int, dict_size: int
    ) -> SparseCodes:
        """``from_indices`` without its validation (no host sync), for pairs sorted, unique and in range by
        construction, like a BatchTopK selection's output on the training hot path."""
        return cls(rows, latents, _segment_offsets(rows, batch_size), batch_size, dict_size)

    def validate(self) -> None:
        """Check indices are in range and entries strictly sorted by (row, latent) (host sync; from_indices)."""
        if self.nnz == 0:
            return
        for name, tensor, bound in (("rows", self.rows, self.batch_size), ("latents", self.latents, self.dict_size)):
            low, high = tensor.min().item(), tensor.max().item()
            if low < 0 or high >= bound:
                size = "batch_size" if name == "rows" else "dict_size"
                raise ValueError(f"{name} holds indices in [{low}, {high}], outside [0, {size}={bound})")
        key = self.rows * self.dict_size + self.latents
        if not bool((key[1:] > key[:-1]).all()):
            raise ValueError(
                "entries must be sorted by row then latent without duplicates: sort with "
                "order = (rows * dict_size + latents).argsort() (and apply the order to the values)"
            )

    # ------------------------------------------------------------------ basic facts
    @property
    def nnz(self) -> int:
        """Number of active (row, latent) pairs."""
        return self.rows.numel()

    @property
    def device(self) -> torch.device:
        return self.rows.device

    # ------------------------------------------------------------------ latent-sorted view (CSC), cached
    @cached_property
    def _latent_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        library = _sparse_codes_library() if c_kernel_allowed(self.device) else None
        if library is not None:
            order, rows_by_latent = torch.empty_like(self.latents), torch.empty_like(self.rows)
            offsets = torch.empty(self.dict_size + 1, dtype=torch.int64)
            pointers = (tensor.data_ptr() for tensor in (self.latents, self.rows))
            outputs = (tensor.data_ptr() for tensor in (order, offsets, rows_by_latent))
            if library.latent_view(*pointers, self.nnz, self.dict_size, *outputs) == 0:
                return order, offsets, rows_by_latent
            # a latent out of range (codes built unchecked): the reference's answer, whatever it makes of them
        sorted_latents, order = torch.sort(self.latents, stable=True)
        return order, _segment_offsets(sorted_latents, self.dict_size), self.rows.index_select(0, order)

    @property
    def latent_order(self) -> torch.Tensor:
        """[nnz] int64: entry indices sorted by latent (stable, so rows stay ascending within a latent)."""
        return self._latent_view[0]

    @property
    def latent_offsets(self) -> torch.Tensor:
        """[dict_size + 1] int64: latent ``j``'s entries are ``latent_order[latent_offsets[j]:latent_offsets[j+1]]``."""
        return self._latent_view[1]

    @property
    def rows_by_latent(self) -> torch.Tensor:
        """[nnz] int64: ``rows[latent_order]``, the row of each entry in latent order."""
        return self._latent_view[2]

    # ------------------------------------------------------------------ dense conversions
    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """values: [nnz] → the dense ``[batch_size, dict_size]`` matrix with zeros where inactive."""
        self._check_values(values)
        dense = values.new_zeros(self.batch_size, self.dict_size)
        dense[self.rows, self.latents] = values
        return dense

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """dense: [batch_size, dict_size] → its [nnz] entries at the active pairs (e.g. the active pre-activations)."""
        if tuple(dense.shape) != (self.batch_size, self.dict_size):
            raise ValueError(
                f"dense has shape {list(dense.shape)} but these codes are [{self.batch_size}, {self.dict_size}]"
            )
        return dense[self.rows, self.latents]

    def _check_values(self, values: torch.Tensor) -> None:
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != self.nnz:
            shape = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"values must be a 1-D tensor with nnz={self.nnz} entries, got {shape}")


def _sparse_codes_library() -> ctypes.CDLL | None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    signature = ("latent_view", size, (pointer, pointer, size, size, pointer, pointer, pointer))
    return native_library("sparse_codes", (signature,))


def _check_size(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _segment_offsets(sorted_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Offsets [n_segments + 1] of the runs of equal ids in a sorted id list (ids outside the range are ignored)."""
    boundaries = torch.arange(n_segments + 1, device=sorted_ids.device, dtype=torch.int64)
    return torch.searchsorted(sorted_ids, boundaries)
