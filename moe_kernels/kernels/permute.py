"""Token -> expert-row permutation: expert histograms, contiguous and masked layouts, row scatter.

Every function here stays on the device: no host synchronisation (no ``.item()``, ``.tolist()``,
boolean-mask indexing or ``nonzero``), so the whole MoE forward can be captured in a CUDA graph.

A *slot* is one (token, k) pair of ``topk_ids [T, K]``; slot ``s = t * K + k``. Expert ids are local
ids in ``[0, E)``; ``-1`` (and, defensively, any id outside ``[0, E)``) means "no expert" and the
slot is ignored everywhere.

The rank of a slot inside its expert comes from an atomic counter, so the order of rows inside an
expert segment is not deterministic. Results stay deterministic because :func:`weighted_gather`
sums each token's slots in fixed ``k`` order and every row is computed independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import fp8

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    cdiv,
    check_same_device,
    check_tensor,
    interpreting,
    next_power_of_2,
    pick_row_block,
)
from .quant import check_group, check_scale_out, quantize_groups, row_tiles, scale_row_offset, scale_strides

_SLOT_BLOCK = 256


@dataclass(frozen=True)
class ContiguousLayout:
    """Rows of all experts packed one segment after another (DeepGEMM "contiguous" layout).

    Expert ``e`` owns rows ``[expert_start[e], expert_start[e] + align_up(counts[e], alignment))``;
    the first ``counts[e]`` rows hold its tokens, the rest are padding.

    Attributes:
        counts: ``[E] int32``, number of slots routed to each expert.
        expert_start: ``[E] int64``, first row of each segment (exclusive cumsum of
            ``align_up(counts, alignment)``), so every segment starts on a multiple of ``alignment``.
        segment_ends: ``[E] int32``, ``expert_start + counts``: the cumulative end offsets that
            ``torch._grouped_mm(..., offs=segment_ends)`` takes. With ``alignment > 1`` group ``e``
            of that call also covers the padding rows in front of segment ``e``; they are computed
            with expert ``e``'s weights and never read, so the result is still correct.
        dst_row: ``[T, K] int64``, layout row of each slot, ``-1`` where the slot has no expert.
        grouped_layout: ``[num_rows_bound] int32``, expert id of each row, ``-1`` for padding rows
            and for rows past the last segment (DeepGEMM ``m_grouped_*_contiguous`` convention).
        num_rows_bound: host-side upper bound on the rows the layout uses, see
            :func:`contiguous_rows_bound`; buffers of this many rows always suffice.
        alignment: the segment alignment the layout was built with.
    """

    counts: torch.Tensor
    expert_start: torch.Tensor
    segment_ends: torch.Tensor
    dst_row: torch.Tensor
    grouped_layout: torch.Tensor
    num_rows_bound: int
    alignment: int


@dataclass(frozen=True)
class MaskedLayout:
    """Fixed-capacity per-expert buffers ``[E, capacity, H]`` (DeepGEMM "masked" layout).

    A token takes at most one row per expert: a slot whose expert already appears at an earlier
    ``k`` of the same token shares that slot's row (``weighted_gather`` then adds both weights to
    the one expert output, which is what the plain per-slot loop computes). An expert therefore
    receives at most ``T`` rows, and :func:`masked_layout` requires ``capacity >= T``, so no slot
    is ever dropped.

    Attributes:
        counts: ``[E] int32``, rows filled in each expert's buffer: the number of tokens routed to
            the expert at least once (DeepGEMM's ``masked_m``).
        dst_row: ``[T, K] int64``, ``e * capacity + rank``: the row of the slot in the buffer viewed
            as ``[E * capacity, H]``; ``-1`` for slots without an expert.
        capacity: rows per expert buffer.
    """

    counts: torch.Tensor
    dst_row: torch.Tensor
    capacity: int


@triton.jit
def _count_rank_kernel(
    ids_ptr, counts_ptr, dst_ptr, n_slots, num_experts, WRITE_DST: tl.constexpr, BLOCK: tl.constexpr
):
    """Histogram of expert ids; with WRITE_DST the counter value each slot's atomic returns is
    stored as its rank, which ``_place_kernel`` turns into a row."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = slots < n_slots
    ids = tl.load(ids_ptr + slots, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=valid)
    if WRITE_DST:
        tl.store(dst_ptr + slots, tl.where(valid, rank.to(tl.int64), -1), mask=in_range)


@triton.jit
def _masked_rank_kernel(
    ids_ptr,
    counts_ptr,
    dst_ptr,
    num_tokens,
    top_k,
    num_experts,
    capacity,
    BLOCK_T: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """Rows of the masked layout for BLOCK_T whole tokens: only the first occurrence of an expert
    in a token takes a row (atomic rank); later repeats point at that row."""
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, K_PAD)
    in_range = (toks[:, None] < num_tokens) & (ks[None, :] < top_k)
    slots = toks[:, None] * top_k + ks[None, :]
    ids = tl.load(ids_ptr + slots, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    # same[t, k, j]: slot j of token t is valid and names the expert of slot k. A valid slot
    # matches itself, so its first occurrence is at most k.
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    first = tl.min(tl.where(same, ks[None, None, :], K_PAD), axis=2)
    owner = valid & (first == ks[None, :])
    rank = tl.where(owner, tl.atomic_add(counts_ptr + ids, 1, mask=owner), 0)
    # Registers cannot be indexed: pick the owner's rank with a one-hot sum over j.
    rank = tl.sum(tl.where(ks[None, None, :] == first[:, :, None], rank[:, None, :], 0), axis=2)
    dst = ids.to(tl.int64) * capacity + rank
    tl.store(dst_ptr + slots, tl.where(valid, dst, -1), mask=in_range)


@triton.jit
def _expert_start_kernel(counts_ptr, start_ptr, ends_ptr, num_experts, alignment, E_PAD: tl.constexpr):
    # A single program: E is small and a scan across programs would need a second pass.
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0).to(tl.int64)
    padded = (counts + alignment - 1) // alignment * alignment
    start = tl.cumsum(padded, 0) - padded
    tl.store(start_ptr + experts, start, mask=experts < num_experts)
    tl.store(ends_ptr + experts, (start + counts).to(tl.int32), mask=experts < num_experts)


@triton.jit
def _place_kernel(
    ids_ptr,
    start_ptr,
    dst_ptr,
    layout_ptr,
    row_slot_ptr,
    block_expert_ptr,
    slot_index_ptr,
    n_slots,
    num_experts,
    block_m,
    WRITE_LAYOUT: tl.constexpr,
    WRITE_SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Turn ranks into contiguous-layout rows; WRITE_LAYOUT marks each row with its expert id,
    WRITE_SLOTS records the slot of each row, the expert of each row block and each slot's index."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = slots < n_slots
    ids = tl.load(ids_ptr + slots, mask=in_range, other=-1).to(tl.int32)
    rank = tl.load(dst_ptr + slots, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < num_experts) & (rank >= 0)
    dst = tl.load(start_ptr + ids, mask=valid, other=0) + rank
    tl.store(dst_ptr + slots, dst, mask=valid)
    if WRITE_LAYOUT:
        tl.store(layout_ptr + dst, ids, mask=valid)
    if WRITE_SLOTS:
        tl.store(row_slot_ptr + dst, slots.to(tl.int32), mask=valid)
        # Every block of a segment holds at least one real row, so these (identical, racing)
        # writes cover all blocks in use; the rest keep the -1 fill.
        tl.store(block_expert_ptr + dst // block_m, ids, mask=valid)
        tl.store(slot_index_ptr + slots, tl.where(valid, slots, -1), mask=in_range)


@triton.jit
def _scatter_rows_kernel(
    x_ptr,
    dst_ptr,
    out_ptr,
    s_ptr,
    top_k,
    n_cols,
    n_groups,
    stride_xm,
    stride_om,
    scale_rows_per_group,
    stride_se,
    stride_sm,
    stride_sk,
    IDENTITY: tl.constexpr,
    QUANT: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    GROUP: tl.constexpr,
    G: tl.constexpr,
):
    # One program per (token, column block): the token's row is read (and quantized) once and
    # written to each of its K destinations (IDENTITY: to its own row).
    tok = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1).to(tl.int64) * G + tl.arange(0, G)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    vals = tl.load(x_ptr + tok * stride_xm + cols, mask=cols < n_cols, other=0)
    scale = tl.zeros([G], dtype=tl.float32)
    if QUANT:
        vals, scale = quantize_groups(vals.to(tl.float32), EXACT_CAST)
    vals = vals.to(out_ptr.dtype.element_ty)
    for k in range(1 if IDENTITY else top_k):
        if IDENTITY:
            row = tok
        else:
            row = tl.load(dst_ptr + tok * top_k + k)
        # Scalar condition folded into the bounds (a scalar-bool & vector mask trips the triton
        # 3.9 interpreter).
        tl.store(out_ptr + row * stride_om + cols, vals, mask=cols < tl.where(row >= 0, n_cols, 0))
        if QUANT:
            s_row = s_ptr + scale_row_offset(row, scale_rows_per_group, stride_se, stride_sm)
            tl.store(s_row + groups * stride_sk, scale, mask=groups < tl.where(row >= 0, n_groups, 0))


def _check_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    check_tensor("topk_ids", topk_ids, dtypes=INDEX_DTYPES, ndim=2)
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")


def _count_and_rank(topk_ids: torch.Tensor, dst: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    counts = torch.zeros(num_experts, dtype=torch.int32, device=topk_ids.device)
    n_slots = topk_ids.numel()
    if n_slots:
        _count_rank_kernel[(cdiv(n_slots, _SLOT_BLOCK),)](
            topk_ids, counts, dst, n_slots, num_experts, WRITE_DST=dst is not None, BLOCK=_SLOT_BLOCK
        )
    return counts


def contiguous_rows_bound(num_slots: int, num_experts: int, alignment: int) -> int:
    """Host-side upper bound on the rows of a contiguous layout, without looking at the routing.

    With ``N = num_slots`` valid slots at most ``min(E, N)`` experts are non-empty and each pads
    fewer than ``alignment`` rows, so the layout uses at most ``N + min(E, N) * (alignment - 1)``
    rows. The real row count is a sum of multiples of ``alignment``, hence the bound is that
    number rounded *down* to a multiple of ``alignment``.
    """
    if alignment < 1:
        raise ValueError(f"alignment: expected >= 1, got {alignment}")
    worst = num_slots + min(num_experts, num_slots) * (alignment - 1)
    return worst // alignment * alignment


def _sorted_rows(
    topk_ids: torch.Tensor,
    num_experts: int,
    alignment: int,
    grouped_layout: torch.Tensor | None,
    slot_maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, rank and place every slot; fill the optional row -> expert and row -> slot maps.

    Returns ``(counts, expert_start, segment_ends, dst_row)``.
    """
    device = topk_ids.device
    n_slots = topk_ids.numel()
    dst_row = torch.empty(topk_ids.shape, dtype=torch.int64, device=device)
    counts = _count_and_rank(topk_ids, dst_row, num_experts)
    expert_start = torch.empty(num_experts, dtype=torch.int64, device=device)
    segment_ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    _expert_start_kernel[(1,)](
        counts,
        expert_start,
        segment_ends,
        num_experts,
        alignment,
        E_PAD=next_power_of_2(num_experts),
    )
    row_slot, block_expert, slot_index = slot_maps if slot_maps is not None else (None, None, None)
    if n_slots:
        _place_kernel[(cdiv(n_slots, _SLOT_BLOCK),)](
            topk_ids,
            expert_start,
            dst_row,
            grouped_layout,
            row_slot,
            block_expert,
            slot_index,
            n_slots,
            num_experts,
            alignment,
            WRITE_LAYOUT=grouped_layout is not None,
            WRITE_SLOTS=slot_maps is not None,
            BLOCK=_SLOT_BLOCK,
        )
    return counts, expert_start, segment_ends, dst_row


def contiguous_layout(topk_ids: torch.Tensor, num_experts: int, alignment: int) -> ContiguousLayout:
    """Build the contiguous (expert-sorted, segment-aligned) layout of the routed slots.

    Args:
        topk_ids: ``[T, K]`` int32/int64, contiguous, local expert ids or ``-1``.
        num_experts: ``E``.
        alignment: every expert segment starts on a multiple of this many rows (use a multiple of
            the grouped GEMM's BLOCK_M, ``grouped_gemm.BLOCK_M`` by default).

    Returns:
        A :class:`ContiguousLayout`; three small Triton kernels plus two fills, no host sync.
    """
    _check_ids(topk_ids, num_experts)
    num_rows = contiguous_rows_bound(topk_ids.numel(), num_experts, alignment)
    grouped_layout = torch.full((num_rows,), -1, dtype=torch.int32, device=topk_ids.device)
    counts, expert_start, segment_ends, dst_row = _sorted_rows(topk_ids, num_experts, alignment, grouped_layout, None)
    return ContiguousLayout(
        counts=counts,
        expert_start=expert_start,
        segment_ends=segment_ends,
        dst_row=dst_row,
        grouped_layout=grouped_layout,
        num_rows_bound=num_rows,
        alignment=alignment,
    )


def contiguous_slot_rows(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot-indexed maps of the contiguous layout with segments aligned to ``block_m``.

    The multi-launch build for any number of slots (atomic ranks, so the order of rows inside a
    segment is not deterministic); ``fused_moe.gather_layout`` uses it above its one-program
    limit and documents the maps.

    Args:
        topk_ids: ``[T, K]`` int32/int64, contiguous, local expert ids or ``-1``.
        num_experts: ``E``.
        block_m: the row block of the GEMMs that read the layout, ``>= 1``.

    Returns:
        ``(slot_row [T, K] int64, row_slot [R] int32, block_expert [R // block_m] int32,
        slot_index [T, K] int64)`` with ``R = contiguous_rows_bound(T * K, E, block_m)``; three
        Triton kernels plus three fills, no host sync.
    """
    _check_ids(topk_ids, num_experts)
    num_rows = contiguous_rows_bound(topk_ids.numel(), num_experts, block_m)
    device = topk_ids.device
    row_slot = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    block_expert = torch.full((num_rows // block_m,), -1, dtype=torch.int32, device=device)
    slot_index = torch.empty(topk_ids.shape, dtype=torch.int64, device=device)
    slot_row = _sorted_rows(topk_ids, num_experts, block_m, None, (row_slot, block_expert, slot_index))[3]
    return slot_row, row_slot, block_expert, slot_index


def masked_layout(topk_ids: torch.Tensor, num_experts: int, capacity: int) -> MaskedLayout:
    """Assign every slot a row in fixed-capacity per-expert buffers ``[E, capacity, H]``.

    Each token takes at most one row per expert (a repeated id shares the first occurrence's
    row), so an expert receives at most ``T`` rows and ``capacity >= T`` always suffices.

    Args:
        topk_ids: ``[T, K]`` int32/int64, contiguous, local expert ids or ``-1``.
        num_experts: ``E``.
        capacity: rows per expert buffer, ``>= max(T, 1)``.

    Returns:
        A :class:`MaskedLayout`; one Triton kernel plus one fill, no host sync.
    """
    _check_ids(topk_ids, num_experts)
    if capacity < 1:
        raise ValueError(f"capacity: expected >= 1, got {capacity}")
    num_tokens, top_k = topk_ids.shape
    if capacity < num_tokens:
        raise ValueError(
            f"capacity ({capacity}) must be >= the tokens ({num_tokens}): an expert may receive one row per token"
        )
    device = topk_ids.device
    dst_row = torch.empty(topk_ids.shape, dtype=torch.int64, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    if topk_ids.numel():
        k_pad = next_power_of_2(top_k)
        # The [tokens, K, K] comparison tile stays near 2048 elements.
        block_t = max(1, min(256, 2048 // (k_pad * k_pad)))
        _masked_rank_kernel[(cdiv(num_tokens, block_t),)](
            topk_ids,
            counts,
            dst_row,
            num_tokens,
            top_k,
            num_experts,
            capacity,
            BLOCK_T=block_t,
            K_PAD=k_pad,
        )
    return MaskedLayout(counts=counts, dst_row=dst_row, capacity=capacity)


def resolve_dst_row(dst_row: torch.Tensor | ContiguousLayout | MaskedLayout) -> torch.Tensor:
    """The ``[T, K] int64`` slot -> row map held by a layout (or the tensor itself)."""
    if isinstance(dst_row, (ContiguousLayout, MaskedLayout)):
        return dst_row.dst_row
    return dst_row


def scatter_rows(
    x: torch.Tensor,
    dst_row: torch.Tensor | ContiguousLayout | MaskedLayout,
    out: torch.Tensor,
    *,
    scale_out: torch.Tensor | None = None,
    group: int = fp8.SCALE_BLOCK,
) -> torch.Tensor:
    """Copy ``x[t]`` into ``out[dst_row[t, k]]`` for every slot with ``dst_row >= 0`` -- quantized
    to fp8 on the way when ``scale_out`` is given (each token quantized once, one scale per
    ``group`` columns written to ``scale_out[dst_row[t, k]]``).

    Args:
        x: ``[T, H]`` bf16/fp16/fp32, unit stride along H.
        dst_row: ``[T, K] int64`` contiguous (or a layout carrying one). Rows must lie inside
            ``out``; both layouts guarantee that for their own buffers.
        out: ``[R, H]`` or ``[E, capacity, H]`` (masked layout), contiguous, ``x``'s dtype or
            float8_e4m3fn with ``scale_out``. Rows no slot maps to keep their previous contents;
            zero-fill them first if they are ever read.
        scale_out: ``[R, ceil(H / group)]`` or ``[E, capacity, ceil(H / group)]`` float32, any
            strides (:mod:`moe_kernels.mlp.act_quant`); untouched where ``out`` is.
        group: columns per scale, a power of two.

    Returns:
        ``out``.
    """
    dst_row = resolve_dst_row(dst_row)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False)
    if x.stride(1) != 1 and x.numel():
        raise ValueError(f"x: expected unit stride along the hidden dim, got strides {x.stride()}")
    num_tokens, hidden = x.shape
    check_tensor("dst_row", dst_row, dtypes=(torch.int64,), shape=(num_tokens, None))
    _scatter(x, dst_row, out, scale_out, group)
    return out


def quantize_rows(
    x: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor, *, group: int = fp8.SCALE_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group fp8 cast: ``q_out = x / scale``, one scale per row and ``group`` columns.

    Args:
        x: ``[M, K]`` (unit stride along K) or ``[E, M, K]`` (contiguous), bf16/fp16/fp32.
        q_out: same shape as ``x``, float8_e4m3fn, contiguous.
        scale_out: ``[..., ceil(K / group)]`` float32, any strides (:mod:`moe_kernels.mlp.act_quant`).
        group: columns per scale, a power of two (128 for DeepGEMM and the GEMMs here).

    Returns:
        ``(q_out, scale_out)``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, contiguous=x.dim() == 3)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected shape [M, K] or [E, M, K], got {list(x.shape)}")
    if x.stride(-1) != 1 and x.numel():
        raise ValueError(f"x: expected unit stride along K, got strides {x.stride()}")
    check_tensor("q_out", q_out, dtypes=(fp8.FP8_DTYPE,), shape=tuple(x.shape))
    # rows are addressed as one run: a 3-D x is dense (checked above)
    _scatter(x.reshape(-1, x.shape[-1]), None, q_out, scale_out, group)
    return q_out, scale_out


def _scatter(
    x: torch.Tensor, dst_row: torch.Tensor | None, out: torch.Tensor, scale_out: torch.Tensor | None, group: int
) -> None:
    """The one launch behind :func:`scatter_rows` and :func:`quantize_rows` (``dst_row`` None:
    row ``t`` goes to row ``t``)."""
    num_tokens, hidden = x.shape
    quant = scale_out is not None
    check_tensor("out", out, dtypes=(fp8.FP8_DTYPE,) if quant else (x.dtype,))
    if out.dim() < 2 or out.shape[-1] != hidden:
        raise ValueError(f"out: expected shape [..., {hidden}], got {list(out.shape)}")
    if quant:
        check_group(group)
        check_scale_out(scale_out, out.shape[:-1], cdiv(hidden, group))
    check_same_device(x=x, dst_row=dst_row, out=out, scale_out=scale_out)
    if num_tokens == 0 or hidden == 0:
        return
    block, num_warps = pick_row_block(num_tokens, hidden)
    tile, per_program, grid_cols = row_tiles(num_tokens, hidden, block, group if quant else None)
    _scatter_rows_kernel[(num_tokens, grid_cols)](
        x,
        dst_row,
        out,
        scale_out,
        1 if dst_row is None else dst_row.shape[1],
        hidden,
        cdiv(hidden, group),
        x.stride(0),
        hidden,
        *scale_strides(scale_out),
        IDENTITY=dst_row is None,
        QUANT=quant,
        EXACT_CAST=quant and interpreting(),
        GROUP=tile,
        G=per_program,
        num_warps=num_warps,
    )
