"""Sparse decode ``out[b] = Σ_{e in row b} values[e] · weight[latents[e]]`` and its sparse backward
(docs/methods.md §4.4).

Shapes: values (nnz,), codes: ``SparseCodes`` over (B, F), weight (F, D), out (B, D).
Backward: ``grad_values[e] = ⟨grad_out[rows[e]], weight[latents[e]]⟩`` and
``grad_weight[j] = Σ_{e: latents[e] = j} values[e] · grad_out[rows[e]]`` (zero rows for inactive latents).

Three primitives do all the work, here and in the sparse encoder backward (``sparse_encoder.py``):

- ``row_gather_sum``: per row, the value-weighted sum of gathered table rows (decode forward, ``∂x``);
- ``latent_scatter_sum``: per latent, the same over the latent-sorted view: a segmented sum, so the scatter-add
  into latent rows is deterministic without atomics (``∂W_dec``, ``∂W_enc``; ``latent_value_sums`` gives ``∂b_enc``,
  ``latent_scatter_rows`` only the rows of latents with entries);
- ``entry_dot``: per active entry, a dot product of a row of one matrix with a latent row of another (``∂values``).

Each has a Triton kernel and a plain-PyTorch reference (the CPU path, see ``backend.py``); both accumulate in
float32 (float64 for float64 inputs) and return the input dtype. On CPU the rows' and the latents' float32 sums (and
the decode backward's entry dots beside the latents') run the C kernel ``segment_sums.c`` (compiled by ``native``; the
references where it cannot), equal to the references to rounding. Work is proportional to ``nnz · D``: no ``[B, F]``
matrix and no ``[nnz, D]`` temporary is ever formed.

Triton designs (block sizes are module constants):

- segmented gather-sum, grid ``(n_segments, cdiv(D, BLOCK_D))``: a program walks its segment ``BLOCK_ENTRIES``
  entries at a time, gathers a ``[BLOCK_ENTRIES, BLOCK_D]`` tile of table rows, accumulates value × tile in a
  2-D float32 register tile and reduces it once at the end. Empty segments write zeros, so the dense
  ``[F, D]`` gradient needs no separate memset and inactive latents cost one store.
- entry dot, grid ``(B,)``: a program takes a row's entries ``BLOCK_ENTRIES`` at a time and sweeps D in
  ``BLOCK_D`` chunks, reading the row of ``left`` once per chunk for all its entries.

The reference path uses ``F.embedding_bag(mode="sum", per_sample_weights=...)`` for the rows' gather-sums, MKL's
sparse × dense ``addmm`` (β = 0) into a given output for the latents' segmented sums (a training step hands it the
previous step's gradient, whose pages are then not faulted in afresh), and ``torch.sparse.sampled_addmm`` over the
latent-sorted view for the entry dots: the fastest exact CPU options measured at B=4096, F=16384, D=1024,
nnz=262144 on 2 cores (fp32; ranges over noisy runs): gather-sum 12–24 ms (``torch.sparse.mm`` on CSR 17–62 ms),
scatter-sum 24–29 ms with ``embedding_bag``, 16 ms with ``addmm`` into a reused output (CSR-transpose ``sparse.mm``
58–127 ms), entry dot 15–17 ms (45–53 ms in row order); chunked ``index_add_`` / gather-multiply paths take
0.8–2.5 s, a dense [4096, 16384] × [16384, 1024] GEMM 0.8–1.5 s. float16/bfloat16 inputs are upcast to float32 there
(those ops lack half-precision CPU kernels).
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosscoder.kernels.backend import (
    HAS_TRITON,
    accumulation_dtype,
    c_kernel_allowed,
    check_float_tensor,
    check_same_dtype,
    resolve_backend,
)
from crosscoder.kernels.native import native_library
from crosscoder.kernels.row_projection import project_out_rows
from crosscoder.kernels.sparse_codes import SparseCodes

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK_ENTRIES = 16
"""Active entries handled together by one kernel iteration."""
BLOCK_D_MAX = 128
"""Columns of the model dimension per program (smaller for narrow tables: next power of two ≥ 16)."""

if HAS_TRITON:

    @triton.jit
    def _segment_gather_sum_kernel(
        offsets_ptr,  # (n_segments + 1,) int64
        index_ptr,  # (nnz,) int64: table row of each entry, in segment order
        order_ptr,  # (nnz,) int64: where each entry's value sits in values (read only if HAS_ORDER)
        values_ptr,  # (nnz,)
        table_ptr,  # (n_table_rows, D)
        out_ptr,  # (n_segments, D)
        D,
        table_stride,
        out_stride,
        HAS_ORDER: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """out[s, :] = Σ_{p in offsets[s]:offsets[s+1]} values[order[p]] · table[index[p], :]."""
        segment = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        column_mask = columns < D
        start = tl.load(offsets_ptr + segment)
        end = tl.load(offsets_ptr + segment + 1)
        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=acc_dtype)
        for first in range(start, end, BLOCK_E):
            entries = first + tl.arange(0, BLOCK_E)
            entry_mask = entries < end
            table_rows = tl.load(index_ptr + entries, mask=entry_mask, other=0)
            value_positions = tl.load(order_ptr + entries, mask=entry_mask, other=0) if HAS_ORDER else entries
            values = tl.load(values_ptr + value_positions, mask=entry_mask, other=0.0).to(acc_dtype)
            tile = tl.load(
                table_ptr + table_rows[:, None] * table_stride + columns[None, :],
                mask=entry_mask[:, None] & column_mask[None, :],
                other=0.0,
            ).to(acc_dtype)
            acc += tile * values[:, None]
        total = tl.sum(acc, axis=0)
        out_row = out_ptr + segment.to(tl.int64) * out_stride
        tl.store(out_row + columns, total.to(out_ptr.dtype.element_ty), mask=column_mask)

    @triton.jit
    def _row_entry_dot_kernel(
        row_offsets_ptr,  # (B + 1,) int64
        latents_ptr,  # (nnz,) int64
        left_ptr,  # (B, D)
        right_ptr,  # (F, D)
        out_ptr,  # (nnz,)
        D,
        left_stride,
        right_stride,
        ACC_FP64: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """out[e] = ⟨left[b, :], right[latents[e], :]⟩ for the entries e of row b = program_id(0)."""
        row = tl.program_id(0)
        start = tl.load(row_offsets_ptr + row)
        end = tl.load(row_offsets_ptr + row + 1)
        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        left_row = left_ptr + row.to(tl.int64) * left_stride
        for first in range(start, end, BLOCK_E):
            entries = first + tl.arange(0, BLOCK_E)
            entry_mask = entries < end
            latents = tl.load(latents_ptr + entries, mask=entry_mask, other=0)
            acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=acc_dtype)
            for first_column in range(0, D, BLOCK_D):
                columns = first_column + tl.arange(0, BLOCK_D)
                column_mask = columns < D
                left = tl.load(left_row + columns, mask=column_mask, other=0.0).to(acc_dtype)
                tile = tl.load(
                    right_ptr + latents[:, None] * right_stride + columns[None, :],
                    mask=entry_mask[:, None] & column_mask[None, :],
                    other=0.0,
                ).to(acc_dtype)
                acc += tile * left[None, :]
            dots = tl.sum(acc, axis=1)
            tl.store(out_ptr + entries, dots.to(out_ptr.dtype.element_ty), mask=entry_mask)


def _block_d(d: int) -> int:
    return min(BLOCK_D_MAX, max(16, triton.next_power_of_2(d)))


# ---------------------------------------------------------------------------------------------- Triton launchers
def _segment_gather_sum_triton(
    offsets: torch.Tensor,
    index: torch.Tensor,
    order: torch.Tensor | None,
    values: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n_segments, d = offsets.numel() - 1, table.shape[1]
    if out is None:
        out = torch.empty(n_segments, d, dtype=table.dtype, device=table.device)
    if n_segments == 0 or d == 0:
        return out
    block_d = _block_d(d)
    _segment_gather_sum_kernel[(n_segments, triton.cdiv(d, block_d))](
        offsets,
        index,
        index if order is None else order,
        values,
        table,
        out,
        d,
        table.stride(0),
        out.stride(0),
        HAS_ORDER=order is not None,
        ACC_FP64=table.dtype == torch.float64,
        BLOCK_E=BLOCK_ENTRIES,
        BLOCK_D=block_d,
    )
    return out


def _entry_dot_triton(codes: SparseCodes, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.nnz, dtype=left.dtype, device=left.device)
    d = left.shape[1]
    if codes.nnz == 0:
        return out
    if d == 0:
        return out.zero_()
    _row_entry_dot_kernel[(codes.batch_size,)](
        codes.row_offsets,
        codes.latents,
        left,
        right,
        out,
        d,
        left.stride(0),
        right.stride(0),
        ACC_FP64=left.dtype == torch.float64,
        BLOCK_E=BLOCK_ENTRIES,
        BLOCK_D=_block_d(d),
    )
    return out


# ---------------------------------------------------------------------------------------------- references (CPU path)
def _segment_gather_sum_reference(
    offsets: torch.Tensor, index: torch.Tensor, order: torch.Tensor | None, values: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """``F.embedding_bag`` sums each segment's value-weighted table rows without an [nnz, D] temporary."""
    acc = accumulation_dtype(table.dtype)
    weights = values if order is None else values.index_select(0, order)
    out = F.embedding_bag(
        index,
        table.to(acc),
        offsets,
        mode="sum",
        per_sample_weights=weights.to(acc),
        include_last_offset=True,
    )
    return out.to(table.dtype)


def _latent_scatter_sum_reference(
    offsets: torch.Tensor,
    index: torch.Tensor,
    order: torch.Tensor,
    values: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The latents' segmented sums by MKL's sparse × dense product (``addmm`` with β = 0, the segments as CSR rows)
    into ``out`` (or a new tensor: the first step of a run, with no gradient kept yet, takes the same path, so a
    resumed run stays bitwise equal to one run straight through); ``_segment_gather_sum_reference`` where torch has no
    MKL or the sums need a wider dtype (timings: the module's docstring)."""
    if table.dtype != accumulation_dtype(table.dtype) or not torch.backends.mkl.is_available():
        summed = _segment_gather_sum_reference(offsets, index, order, values, table)
        return summed if out is None else out.copy_(summed)
    if out is None:
        out = table.new_empty(len(offsets) - 1, table.shape[1])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the op is exact and tested here
        warnings.simplefilter("ignore", UserWarning)
        segments = torch.sparse_csr_tensor(
            offsets, index, values.index_select(0, order), (len(out), table.shape[0]), check_invariants=False
        )
        return torch.addmm(out, segments, table, beta=0.0, out=out)


@dataclass
class AlongWeight:
    """What a decode's backward asks of the latents' sums beside them, with its weight's rows ``weight`` (F, D): the
    entries' dot products with them written into ``dots`` (nnz,) — ∂values, ``entry_dot(codes, table, weight)`` —
    and, with ``project``, each latent's sum without its component along its row, ``g_j − ⟨g_j, w_j⟩ w_j`` (the
    unit-norm decoder's gradient projection, ``row_projection``). On the CPU's C kernel both come from the same sweep
    as the sums."""

    weight: torch.Tensor
    dots: torch.Tensor | None = None
    project: bool = False


def _segment_sums_native(
    offsets: torch.Tensor,
    index: torch.Tensor,
    order: torch.Tensor | None,
    values: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor | None = None,
    along: AlongWeight | None = None,
    stream: bool = False,
    squares: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The segments' sums by the C kernel ``segment_sums.c`` (float32 on CPU) into ``out`` (or a new tensor), with
    ``along`` (one weight row per segment) and each sum's squared norm into ``squares`` (float64 [n_segments], or
    None) in the same sweep, and non-temporal stores with ``stream``; None where the kernel cannot run. At the
    paper's width (F = 73,728, D = 2 × 2,304, B = 1,024, k = 100) the latents' sums (streamed) took 51–58 ms against
    MKL's 95–98, the rows' (the decode) 69 against ``embedding_bag``'s 88–93; at B = 4,096, F = 16,384, D = 1,024,
    k = 64 either as fast as its reference."""
    library = _segment_sums_library() if table.dtype == torch.float32 else None
    indices = [tensor for tensor in (offsets, index, order) if tensor is not None]
    if library is None or any(tensor.dtype != torch.int64 for tensor in indices):
        return None
    if out is None:
        out = table.new_empty(len(offsets) - 1, table.shape[1])
    offsets, index, values, table = (tensor.contiguous() for tensor in (offsets, index, values, table))
    order = None if order is None else order.contiguous()
    weight = None if along is None else along.weight.contiguous()
    dots = None if along is None else along.dots
    status = library.segment_sums(
        *(None if tensor is None else tensor.data_ptr() for tensor in (offsets, index, order, values, table)),
        len(offsets) - 1,
        table.shape[1],
        out.data_ptr(),
        None if weight is None else weight.data_ptr(),
        None if dots is None else dots.data_ptr(),
        int(along is not None and along.project),
        int(stream),
        None if squares is None else squares.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"segment_sums could not allocate a row buffer of {table.shape[1]} floats per thread")
    return out


SEGMENT_SUMS_SIGNATURES = (
    (
        "segment_sums",
        ctypes.c_int64,
        (
            *(ctypes.c_void_p,) * 5,
            ctypes.c_int64,
            ctypes.c_int64,
            *(ctypes.c_void_p,) * 3,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
        ),
    ),
    ("row_squares", None, (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)),
)
"""``segment_sums.c``'s functions as ``ctypes`` declares them."""


def _segment_sums_library() -> ctypes.CDLL | None:
    return native_library("segment_sums", SEGMENT_SUMS_SIGNATURES)


def _latent_sums(
    codes: SparseCodes,
    offsets: torch.Tensor,
    values: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor | None = None,
    along: AlongWeight | None = None,
    squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """The segments ``offsets`` of the latent-sorted view summed (``latent_scatter_sum``): Triton, the C kernel
    (CPU, float32; streamed), or the reference; ``along`` and ``squares`` as ``latent_scatter_sum`` takes them."""
    index, order = codes.rows_by_latent, codes.latent_order
    if resolve_backend(codes.device) == "triton":
        sums = _segment_gather_sum_triton(offsets, index, order, values, table, out)
    else:
        fused = None
        if c_kernel_allowed(codes.device):
            fused = _segment_sums_native(offsets, index, order, values, table, out, along, True, squares)
        if fused is not None:
            return fused
        sums = _latent_scatter_sum_reference(offsets, index, order, values, table, out)
    if along is not None and along.dots is not None:
        along.dots.copy_(entry_dot(codes, table, along.weight))
    if along is not None and along.project:
        project_out_rows(along.weight, sums)
    if squares is not None:  # a pass of its own here
        squares.copy_(row_squared_norms(sums))
    return sums


def row_squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's squared L2 norm, float64 [n_rows], of ``rows`` [n_rows, width]: a float32 sum of squares (on CPU
    ``segment_sums.c``'s ``row_squares``, ``square_sum.h``'s 64 lanes: the same doubles the weight gradients' sweep sums
    beside the rows it writes, ``latent_scatter_sum``'s ``squares``), widened. Elsewhere torch's ``vecdot``, equal to
    rounding."""
    if rows.dim() != 2 or not rows.dtype.is_floating_point:
        raise ValueError(f"rows has shape {list(rows.shape)}, dtype {rows.dtype}: need a [n_rows, width] float matrix")
    library = _segment_sums_library() if rows.dtype == torch.float32 and c_kernel_allowed(rows.device) else None
    if library is None or rows.shape[1] == 1:  # one value a row: its square, widened (the kernel's too)
        return torch.linalg.vecdot(rows, rows).double()
    rows = rows.contiguous()
    out = torch.empty(len(rows), dtype=torch.float64)
    library.row_squares(rows.data_ptr(), len(rows), rows.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def _entry_dot_reference(codes: SparseCodes, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``torch.sparse.sampled_addmm`` computes ``(right @ left.T)`` at the active entries of the latent-sorted view
    (CSR over latents): each latent's row of ``right`` is read once for all its entries, and the rows of ``left``
    they meet (B · D, cache-sized) are gathered — 3× faster than the row-sorted order's gathers of ``right``. The
    dot products are the same, put back in CSR order."""
    acc = accumulation_dtype(left.dtype)
    if codes.nnz == 0 or left.shape[1] == 0:
        return left.new_zeros(codes.nnz)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the op is exact and tested here
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            codes.latent_offsets,
            codes.rows_by_latent,
            left.new_zeros(codes.nnz, dtype=acc),
            (codes.dict_size, codes.batch_size),
            check_invariants=False,
        )
        by_latent = torch.sparse.sampled_addmm(pattern, right.to(acc), left.to(acc).T, beta=0.0).values()
    out = torch.empty_like(by_latent).index_copy_(0, codes.latent_order, by_latent)
    return out.to(left.dtype)


# ---------------------------------------------------------------------------------------------- primitives
def row_gather_sum(values: torch.Tensor, codes: SparseCodes, table: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_{e in row b} values[e] · table[latents[e]]. values (nnz,), table (F, D) → (B, D).

    Rows without active latents are zero. The decode forward (table = W_dec) and the encoder's ``∂x``
    (values = ∂pre-activations, table = W_enc).
    """
    check_float_tensor("values", values, (codes.nnz,), codes.device)
    check_float_tensor("table", table, (codes.dict_size, None), codes.device)
    check_same_dtype(values=values, table=table)
    if resolve_backend(codes.device) == "triton":
        return _segment_gather_sum_triton(codes.row_offsets, codes.latents, None, values, table)
    summed = None
    if c_kernel_allowed(codes.device):
        summed = _segment_sums_native(codes.row_offsets, codes.latents, None, values, table)
    if summed is None:
        summed = _segment_gather_sum_reference(codes.row_offsets, codes.latents, None, values, table)
    return summed


def latent_scatter_sum(
    values: torch.Tensor,
    codes: SparseCodes,
    table: torch.Tensor,
    out: torch.Tensor | None = None,
    along: AlongWeight | None = None,
    squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[j] = Σ_{e: latents[e] = j} values[e] · table[rows[e]]. values (nnz,), table (B, D) → (F, D).

    A segmented sum over the latent-sorted view: deterministic, inactive latents get zero rows. ``∂W_dec``
    (table = ∂out) and ``∂W_enc`` (values = ∂pre-activations, table = x). ``out``: a contiguous (F, D) tensor of the
    table's dtype to write the sums into and return (what it held is ignored: a training step hands the previous
    step's gradient, so that no fresh memory is paged in), or None for a new one. ``along``: the decode backward's
    requests beside the sums (``AlongWeight``: ∂values, the SAE's projection). ``squares``: a float64 (F,) tensor
    that gets each returned row's squared L2 norm (the C kernel sums them in the same sweep, the others in a pass of
    their own), or None.
    """
    check_float_tensor("values", values, (codes.nnz,), codes.device)
    check_float_tensor("table", table, (codes.batch_size, None), codes.device)
    check_same_dtype(values=values, table=table)
    if out is not None:
        check_float_tensor("out", out, (codes.dict_size, table.shape[1]), codes.device)
        check_same_dtype(out=out, table=table)
    if along is not None:
        check_float_tensor("weight", along.weight, (codes.dict_size, table.shape[1]), codes.device)
        check_same_dtype(weight=along.weight, table=table)
        if along.dots is not None:
            check_float_tensor("dots", along.dots, (codes.nnz,), codes.device)
            check_same_dtype(dots=along.dots, table=table)
    if squares is not None and (squares.shape != (codes.dict_size,) or squares.dtype != torch.float64):
        raise ValueError(
            f"squares has shape {list(squares.shape)}, dtype {squares.dtype}: need [{codes.dict_size}] float64"
        )
    return _latent_sums(codes, codes.latent_offsets, values, table, out, along, squares)


def latent_scatter_rows(
    values: torch.Tensor, codes: SparseCodes, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``latent_scatter_sum`` that can be non-zero: (the latents with at least one entry [n] ascending,
    their sums [n, D]), without the [F, D] tensor (AuxK's few dead latents: ``crosscoder.step_buffers``). Listing
    them is a host sync on a GPU (AuxK's forward already makes one to list its picks)."""
    check_float_tensor("values", values, (codes.nnz,), codes.device)
    check_float_tensor("table", table, (codes.batch_size, None), codes.device)
    check_same_dtype(values=values, table=table)
    offsets = codes.latent_offsets
    latents = (offsets[1:] > offsets[:-1]).nonzero().squeeze(1)
    segments = torch.cat([offsets.index_select(0, latents), offsets[-1:]])  # their entries stay contiguous
    return latents, _latent_sums(codes, segments, values, table)


def latent_value_sums(values: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """out[j] = Σ_{e: latents[e] = j} values[e]. values (nnz,) → (F,): ``latent_scatter_sum`` against ones."""
    ones = values.new_ones(codes.batch_size, 1)
    return latent_scatter_sum(values, codes, ones).view(codes.dict_size)


def entry_dot(codes: SparseCodes, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """out[e] = ⟨left[rows[e]], right[latents[e]]⟩. left (B, D), right (F, D) → (nnz,).

    ``(left @ right.T)`` sampled at the active entries, without forming the (B, F) product.
    """
    check_float_tensor("left", left, (codes.batch_size, None), codes.device)
    check_float_tensor("right", right, (codes.dict_size, left.shape[1]), codes.device)
    check_same_dtype(left=left, right=right)
    if resolve_backend(codes.device) == "triton":
        return _entry_dot_triton(codes, left, right)
    return _entry_dot_reference(codes, left, right)


# ---------------------------------------------------------------------------------------------- autograd
WeightGradient = Callable[..., torch.Tensor | None]
"""How a sparse backward materialises its weight's gradient, ``latent_scatter_sum(values, codes, table, along=...)``
— the caller's choice (``crosscoder.step_buffers.SharedGradient``: into the previous step's gradient, or added to
another backward's): called once with (values, codes, table) and ``along`` (an ``AlongWeight``, or None), it does
what ``along`` asks and returns that gradient, or None where it was added to another backward's gradient of the same
weight. None in its place: a new tensor."""


class SparseDecode(torch.autograd.Function):
    """out (B, D) = codes-as-matrix (B, F) @ weight (F, D), with values (nnz,) at the active pairs of ``codes``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        values: torch.Tensor,
        codes: SparseCodes,
        weight: torch.Tensor,
        weight_gradient: WeightGradient | None,
        project_gradient: bool,
    ) -> torch.Tensor:
        ctx.codes, ctx.weight_gradient, ctx.project_gradient = codes, weight_gradient, project_gradient
        ctx.save_for_backward(values, weight)
        return row_gather_sum(values, codes, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None]:  # type: ignore[override]
        values, weight = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad_out = grad_out.contiguous().to(weight.dtype)
        grad_values = grad_weight = None
        if ctx.needs_input_grad[2]:  # ∂values (if needed) in the same sweep over ∂out's rows
            grad_values = grad_out.new_empty(codes.nnz) if ctx.needs_input_grad[0] else None
            materialise = latent_scatter_sum if ctx.weight_gradient is None else ctx.weight_gradient
            along = AlongWeight(weight, grad_values, ctx.project_gradient)
            grad_weight = materialise(values, codes, grad_out, along=along)
        elif ctx.needs_input_grad[0]:
            grad_values = entry_dot(codes, grad_out, weight)
        return grad_values, None, grad_weight, None, None


def sparse_decode(
    values: torch.Tensor,
    codes: SparseCodes,
    weight: torch.Tensor,
    weight_gradient: WeightGradient | None = None,
    project_gradient: bool = False,
) -> torch.Tensor:
    """Decode sparse codes: out[b] = Σ_{e in row b} values[e] · weight[latents[e]].

    values: (nnz,) code values aligned with ``codes``' entries; weight: (F, D) contiguous decoder
    (``W_dec.flatten(1)``), same dtype as values. Returns (B, D) in that dtype (float32 accumulation for
    half types). Differentiable in values and weight; both gradients cost O(nnz · D). ``weight_gradient``: how the
    backward materialises ∂weight (``WeightGradient``; None: a new tensor); ``project_gradient``: ∂weight's rows
    without their components along the weight's rows (``AlongWeight.project``: the SAE's unit-norm decoder).
    """
    if not isinstance(codes, SparseCodes):
        raise TypeError(f"codes must be SparseCodes, got {type(codes).__name__}: build with SparseCodes.from_mask")
    return SparseDecode.apply(values, codes, weight, weight_gradient, project_gradient)


def prefix_decode(
    values: torch.Tensor,
    codes: SparseCodes,
    weight: torch.Tensor,
    prefix_sizes: tuple[int, ...],
    weight_gradient: WeightGradient | None = None,
    project_gradient: bool = False,
) -> torch.Tensor:
    """Decodes of nested prefixes of the latents (Matryoshka, docs/methods.md §12.1):
    ``out[i, b] = Σ_{e in row b, latents[e] < prefix_sizes[i]} values[e] · weight[latents[e]]``.

    values: (nnz,); weight: (F, D); prefix_sizes: increasing, ending at F → (n_prefixes, B, D), a tensor of its own
    (not a view: the training step turns it into the reconstruction errors in place). Each entry is decoded once,
    into the block of latents ``[prefix_sizes[i-1], prefix_sizes[i])`` it falls in (one ``sparse_decode`` over
    ``n_prefixes · B`` block rows), and the block decodes are summed cumulatively: O(nnz · D + n_prefixes · B · D),
    no (B, F) matrix. One prefix is the plain decode. ``weight_gradient`` and ``project_gradient`` as for
    ``sparse_decode``.
    """
    if len(prefix_sizes) == 1:
        return sparse_decode(values, codes, weight, weight_gradient, project_gradient).unsqueeze_(0)
    boundaries = torch.tensor(prefix_sizes[:-1], dtype=codes.latents.dtype, device=codes.device)
    blocks = torch.bucketize(codes.latents, boundaries, right=True)  # entry e lies in block i: m_{i-1} ≤ j_e < m_i
    blocks, order = torch.sort(blocks, stable=True)  # (block, row, latent) order: the block rows' CSR
    block_codes = SparseCodes.from_sorted_indices(
        blocks * codes.batch_size + codes.rows.index_select(0, order),
        codes.latents.index_select(0, order),
        len(prefix_sizes) * codes.batch_size,
        codes.dict_size,
    )
    partial = sparse_decode(values.index_select(0, order), block_codes, weight, weight_gradient, project_gradient)
    return partial.view(len(prefix_sizes), codes.batch_size, -1).cumsum(dim=0)
