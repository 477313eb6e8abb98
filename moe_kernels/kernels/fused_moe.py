"""Fused decode path of the expert MLPs: no scatter, four launches (three when ``top_k == 1``).

::

    gather_layout        slot -> expert-sorted rows, segments aligned to block_m (one program)
    fused_gemm1          act[r] = act(x[t] @ gate[e].T, x[t] @ up[e].T), x read through row_slot
    fused_gemm2_weighted y[s]   = w[s] * (act[r] @ w2[e].T), written slot-major (or token-major, K == 1)
    weighted_gather      out[t] = sum_k y[t * K + k], fixed k order, fp32

At decode the expert weights are the only large operand, so the GEMMs stream each used expert's
weights once and the launches' fixed cost (1-4 us each inside a CUDA graph) is what remains to
cut: the permuted copy of ``x`` and its scatter launch disappear because GEMM1 loads its A tile
straight from ``x`` through the layout. Nothing here reads a device value on the host, so the
whole path can be captured in a CUDA graph; sizes come from host-side bounds and the programs
beyond the real work exit at once.

Measured on an H100 (triton 3.6, bf16, CUDA graphs, :func:`default_configs`), against vLLM's
Triton ``fused_experts`` with its default config: Qwen3-30B-A3B T = 1 35.6 us (vLLM 38.0),
T = 128 430 us (450); DeepSeek-V3 at 32 local experts T = 1 244 us (251), T = 128 999 us
(1025), T = 512 1360 us (1489).

Layout, per expert ``e``: rows ``[start_e, start_e + align_up(count_e, block_m))``, the first
``count_e`` holding its slots, the rest padding. Every row block of ``block_m`` rows therefore
belongs to one expert, which the GEMMs look up once per program in ``block_expert``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import fp8
from moe_kernels.mlp.activations import SILU, Activation

from ._common import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_same_device, check_tensor, interpreting, next_power_of_2
from .activation import apply_activation
from .bias import bias_args, bias_row
from .dequant import PackedWeight, check_packed, groups_per_tile, load_weight_tile, packed_constant, tile_dot
from .gather import weighted_gather
from .grouped_gemm import weight_scale
from .permute import contiguous_rows_bound, contiguous_slot_rows

# Above this many slots the one-program layout falls back to the multi-kernel atomic build. The
# one program sorts the next power of two of the slots inside one CTA (n log^2 n); the fallback
# costs ~6 launches whatever the size. In CUDA graphs on an H100 (triton 3.6, E = 128): one
# program 2.0 us at <= 64 slots, 4.7-5.3 us at 256-512, 9.5 us at 1024, 21.7 us at 2048; the
# fallback 7.6-9.6 us throughout. gather_layout takes the limit as an argument.
ONE_LAUNCH_MAX_SLOTS = 512
_FILL_BLOCK = 1024


@dataclass(frozen=True)
class GatherLayout:
    """Expert-sorted rows of the routed slots, each expert's segment starting on a multiple of
    ``block_m``. A *slot* is ``s = t * K + k`` of ``topk_ids [T, K]``.

    Attributes:
        row_slot: ``[R] int32``, the slot held by each row, ``-1`` for padding rows and rows past
            the last segment.
        block_expert: ``[R // block_m] int32``, the expert of each row block, ``-1`` for blocks
            past the last segment.
        slot_row: ``[T, K] int64``, the row of each slot, ``-1`` where the slot has no expert
            (any id outside ``[0, E)``); the inverse of ``row_slot``.
        slot_index: ``[T, K] int64``, ``t * K + k`` where the slot has an expert, ``-1``
            elsewhere: the map ``weighted_gather`` takes to sum slot-major rows ``[T * K, H]``.
        num_rows: ``R = contiguous_rows_bound(T * K, E, block_m)``, a host-side bound (a multiple
            of ``block_m``) on the rows any routing can use.
        block_m: the segment alignment, the row block of both GEMMs.
        single_launch: True when the one-program kernel built the layout (rows inside a segment
            in slot order), False for the multi-kernel fallback (order set by atomics).
    """

    row_slot: torch.Tensor
    block_expert: torch.Tensor
    slot_row: torch.Tensor
    slot_index: torch.Tensor
    num_rows: int
    block_m: int
    single_launch: bool

    @property
    def top_k(self) -> int:
        return self.slot_row.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.num_rows // self.block_m


@dataclass(frozen=True)
class FusedConfig:
    """Tiling of one fused GEMM. GEMM1 and GEMM2 of a call share ``block_m`` (their layout's
    alignment).

    Attributes:
        block_m: rows per program, a power of two >= 16 (tl.dot's smallest M).
        block_n: output columns per program, a power of two >= 16.
        block_k: reduction step, a power of two >= 16.
        num_warps: warps per program.
        num_stages: software-pipeline depth of the K loop (weight tiles in flight).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: expected >= 1, got {self.num_stages}")


# ----------------------------------------------------------------------------- layout


@triton.jit
def _gather_layout_kernel(
    ids_ptr,
    row_slot_ptr,
    block_expert_ptr,
    slot_row_ptr,
    slot_index_ptr,
    base_ptr,
    n_slots,
    num_experts,
    num_rows,
    num_blocks,
    BLOCK_M: tl.constexpr,
    SLOTS: tl.constexpr,
    BINS: tl.constexpr,
    FILL: tl.constexpr,
):
    """The whole layout in one program: histogram -> aligned segment starts -> sort -> scatter."""
    fill = tl.arange(0, FILL)
    for r0 in range(0, num_rows, FILL):
        tl.store(row_slot_ptr + r0 + fill, -1, mask=r0 + fill < num_rows)
    for b0 in range(0, num_blocks, FILL):
        tl.store(block_expert_ptr + b0 + fill, -1, mask=b0 + fill < num_blocks)

    lanes = tl.arange(0, SLOTS)
    ids = tl.load(ids_ptr + lanes, mask=lanes < n_slots, other=-1).to(tl.int32)
    # Slots without an expert (and lanes past the slots) go to bin E: counted apart, sorted last.
    bins = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    experts = tl.arange(0, BINS)
    counts = tl.where(experts < num_experts, tl.histogram(bins, BINS), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    # Row of the i-th slot in (expert, slot) order: start[e] + (i - first[e]).
    base = (tl.cumsum(padded, 0) - padded) - (tl.cumsum(counts, 0) - counts)
    tl.store(base_ptr + experts, base)
    # Registers cannot be indexed by a tensor (tl.gather of a short source by a long index trips
    # triton's layout pass), so base[expert] goes through memory; the barrier also orders the
    # -1 fills above before the scatters below, which may hit the same rows.
    tl.debug_barrier()

    keys = tl.sort(bins * SLOTS + lanes)
    expert = keys // SLOTS
    slot = keys % SLOTS
    placed = expert < num_experts
    row = lanes + tl.load(base_ptr + expert, mask=placed, other=0)
    is_slot = slot < n_slots
    tl.store(slot_row_ptr + slot, tl.where(placed, row, -1).to(tl.int64), mask=is_slot)
    tl.store(slot_index_ptr + slot, tl.where(placed, slot, -1).to(tl.int64), mask=is_slot)
    tl.store(row_slot_ptr + row, slot, mask=placed)
    # Every block of a segment holds at least one real row, so these writes (equal values where
    # they collide) cover all blocks in use.
    tl.store(block_expert_ptr + row // BLOCK_M, expert, mask=placed)


def gather_layout(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    max_one_launch_slots: int = ONE_LAUNCH_MAX_SLOTS,
) -> GatherLayout:
    """Expert-sorted layout of the routed slots with ``block_m``-aligned segments.

    Args:
        topk_ids: ``[T, K]`` int32/int64, contiguous, local expert ids; ``-1`` (or any id outside
            ``[0, E)``) means no expert. Ids may repeat within a token: each slot gets its own row.
        num_experts: ``E``.
        block_m: segment alignment, the ``block_m`` of both fused GEMMs.
        max_one_launch_slots: up to this many slots ``T * K`` one program builds everything (one
            launch, rows in slot order inside each segment); above it the multi-kernel atomic
            build of :mod:`.permute` runs (6 launches).

    Returns:
        A :class:`GatherLayout`; no host sync, so it can be captured in a CUDA graph.
    """
    check_tensor("topk_ids", topk_ids, dtypes=INDEX_DTYPES, ndim=2)
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
    if block_m < 1:
        raise ValueError(f"block_m: expected >= 1, got {block_m}")
    n_slots = topk_ids.numel()
    num_rows = contiguous_rows_bound(n_slots, num_experts, block_m)
    lanes = max(32, next_power_of_2(n_slots))
    # Sort keys are expert * lanes + slot in int32.
    single = n_slots <= max_one_launch_slots and (num_experts + 1) * lanes < 2**31
    if not single:
        slot_row, row_slot, block_expert, slot_index = contiguous_slot_rows(topk_ids, num_experts, block_m)
        return GatherLayout(row_slot, block_expert, slot_row, slot_index, num_rows, block_m, single_launch=False)

    return _one_launch_layout(topk_ids, num_experts, block_m, num_rows, lanes)


def _one_launch_layout(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, num_rows: int, lanes: int
) -> GatherLayout:
    """:func:`gather_layout` built by one program over ``lanes`` (a power of two >= the slots)."""
    n_slots = topk_ids.numel()
    device = topk_ids.device
    row_slot = torch.empty(num_rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_rows // block_m, dtype=torch.int32, device=device)
    slot_row = torch.empty(topk_ids.shape, dtype=torch.int64, device=device)
    slot_index = torch.empty(topk_ids.shape, dtype=torch.int64, device=device)
    if n_slots:
        # triton's histogram lowering splits the bins over a warp's 32 lanes: at least 32 bins.
        bins = max(32, next_power_of_2(num_experts + 1))
        base = torch.empty(bins, dtype=torch.int32, device=device)
        _gather_layout_kernel[(1,)](
            topk_ids,
            row_slot,
            block_expert,
            slot_row,
            slot_index,
            base,
            n_slots,
            num_experts,
            num_rows,
            num_rows // block_m,
            BLOCK_M=block_m,
            SLOTS=lanes,
            BINS=bins,
            FILL=_FILL_BLOCK,
            # >= 32 lanes per warp keeps the histogram input free of replicated elements.
            num_warps=max(1, min(8, lanes // 256)),
        )
    return GatherLayout(row_slot, block_expert, slot_row, slot_index, num_rows, block_m, single_launch=True)


# ----------------------------------------------------------------------------- GEMMs


@triton.jit
def _weight_dot(
    acc,
    a,
    w_ptrs,
    w_mask,
    k0,
    k_dim,
    col_ok,
    w_scale_ptr,
    w_zero_ptr,
    scale_offs,
    stride_wsk,
    scale_bk,
    a_dtype: tl.constexpr,
    FP8: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    GROUPS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc`` plus the A tile ``[BLOCK_M, BLOCK_K]`` times the weight tile ``[BLOCK_K, BLOCK_N]`` at
    ``w_ptrs`` of the K tile from ``k0``, both in ``a_dtype``: 4-bit weights dequantized in the load
    (:func:`.dequant.load_weight_tile`: at decode tiles the group scales on the product), fp8 ones upcast
    (exact in bf16) and a fresh fp32 partial per K tile times the scales ``[1, BLOCK_N]`` of their
    columns' rows, at ``scale_offs`` from ``w_scale_ptr``; a K tile lies in one scale block."""
    w, w_odd, w_scale, w_zero = load_weight_tile(w_ptrs, w_mask, k0, k_dim, col_ok, w_scale_ptr, w_zero_ptr,
                                                 scale_offs, stride_wsk, scale_bk, a_dtype, PACKED, HAS_ZERO, GROUPS,
                                                 INTERPRETED, a.shape[0], BLOCK_K)  # fmt: skip
    if FP8:
        w = w.to(a_dtype)
        if INTERPRETED:  # the interpreter's low-precision tl.dot is wrong (triton 3.9); upcasting is exact
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        w_scale = weight_scale(w_scale_ptr + scale_offs, k0 // scale_bk, stride_wsk, col_ok, True)
        acc += tl.dot(a, w, input_precision=INPUT_PRECISION) * w_scale
    else:
        acc = tile_dot(acc, a, w, w_odd, w_scale, w_zero, PACKED, HAS_ZERO, GROUPS, INTERPRETED, INPUT_PRECISION)
    return acc


@triton.jit
def _zero_empty_slots(
    out_ptr, slot_row_ptr, first_slot, n_slots, stride_om, cols, col_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Write zeros into the rows of the slots ``[first_slot, first_slot + BLOCK_M)`` that have no expert."""
    slots = first_slot + tl.arange(0, BLOCK_M)
    in_range = slots < n_slots
    empty = in_range & (tl.load(slot_row_ptr + slots, mask=in_range, other=0) < 0)
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + slots[:, None] * stride_om + cols[None, :], zeros, mask=empty[:, None] & col_ok[None, :])


@triton.jit
def _fused_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    row_slot_ptr,
    block_expert_ptr,
    weights_ptr,
    slot_row_ptr,
    top_k,
    num_blocks,
    n_slots,
    n_out,
    k_dim,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    up_offset,
    w_scale_ptr,
    stride_wse,
    stride_wsn,
    stride_wsk,
    scale_bn,
    scale_bk,
    up_scale_offset,
    w_zero_ptr,
    bias_ptr,
    stride_bias_e,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    PACK: tl.constexpr,
    GROUPS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ZERO_EMPTY: tl.constexpr,
    INTERPRETED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Both fused GEMMs over the row blocks of a :class:`GatherLayout`.

    ``GATED`` (GEMM1): A row ``r`` is ``x[row_slot[r] // top_k]``; the gate tile and the up tile (``up_offset``,
    ``up_scale_offset`` further) are accumulated side by side and ``act(gate, up)`` is stored at row ``r``. Else
    (GEMM2): A row ``r`` is ``act[r]``; the product, times the router weight of slot ``s = row_slot[r]``
    (``HAS_WEIGHTS``), is stored at row ``s``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    # The programs past the row blocks zero the rows of slots without an expert, so that with
    # top_k == 1 GEMM2's output needs no further pass.
    if ZERO_EMPTY:
        if pid_m >= num_blocks:
            first_slot = (pid_m - num_blocks).to(tl.int64) * BLOCK_M
            _zero_empty_slots(out_ptr, slot_row_ptr, first_slot, n_slots, stride_om, cols, col_ok, BLOCK_M, BLOCK_N)
            return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(row_slot_ptr + rows)
    row_ok = slots >= 0
    if GATED:
        # The A rows come straight from x: row r computes token row_slot[r] // K.
        a_rows = tl.where(row_ok, slots // top_k, 0).to(tl.int64)
    else:
        a_rows = rows
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    # w is [N, K] per expert, K contiguous: a [BLOCK_K, BLOCK_N] tile of it is w^T, so
    # tl.dot(a, tile) = a @ w^T without a transpose. (packed: the BLOCK_K / 2 bytes of a column's
    # K tile, read contiguously and unpacked in registers)
    offs_kw = tl.arange(0, BLOCK_K // PACK)
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_kw[:, None]
    # the offsets of each output column's (gate) row scales; the up row's are up_scale_offset further
    scale_offs = expert.to(tl.int64) * stride_wse + (cols // scale_bn).to(tl.int64) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = offs_k < k_dim - k0
        # Padding rows (never written in GEMM1's output) are masked: stale values never enter the dot.
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = (offs_kw < (k_dim - k0) // PACK)[:, None] & col_ok[None, :]
        acc = _weight_dot(acc, a, w_ptrs, w_mask, k0, k_dim, col_ok, w_scale_ptr, w_zero_ptr, scale_offs,
                          stride_wsk, scale_bk, a_ptr.dtype.element_ty, FP8, PACKED, HAS_ZERO, GROUPS, INTERPRETED,
                          INPUT_PRECISION, BLOCK_K)  # fmt: skip
        if GATED:
            up_acc = _weight_dot(up_acc, a, w_ptrs + up_offset, w_mask, k0, k_dim, col_ok, w_scale_ptr,
                                 w_zero_ptr, scale_offs + up_scale_offset, stride_wsk, scale_bk,
                                 a_ptr.dtype.element_ty, FP8, PACKED, HAS_ZERO, GROUPS, INTERPRETED, INPUT_PRECISION,
                                 BLOCK_K)  # fmt: skip
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // PACK
    if HAS_BIAS:
        acc += bias_row(bias_ptr, expert, cols, col_ok, stride_bias_e)[None, :]
        if GATED:  # gate columns, then up columns n_out further
            up_acc += bias_row(bias_ptr + n_out, expert, cols, col_ok, stride_bias_e)[None, :]
    if GATED:
        acc = apply_activation(acc, up_acc, ACT)
        out_rows = rows
    else:
        out_rows = tl.where(row_ok, slots, 0).to(tl.int64)
        if HAS_WEIGHTS:
            acc *= tl.load(weights_ptr + out_rows, mask=row_ok, other=0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check_layout(layout: GatherLayout, config: FusedConfig, device: torch.device) -> None:
    if not isinstance(layout, GatherLayout):
        raise TypeError(f"layout: expected a GatherLayout, got {type(layout).__name__}")
    if layout.block_m != config.block_m:
        raise ValueError(f"config.block_m: expected the layout's block_m = {layout.block_m}, got {config.block_m}")
    if layout.row_slot.device != device:
        raise ValueError(f"layout: expected tensors on {device}, got {layout.row_slot.device}")


#: ``(rows, cols)`` of a weight one scale covers (:meth:`moe_kernels.mlp.formats.Fp8Scaled.scale_block`)
ScaleBlock = tuple[int, int]
BLOCK_SCALES: ScaleBlock = (fp8.SCALE_BLOCK, fp8.SCALE_BLOCK)


_UNSCALED = {"w_scale_ptr": None, "stride_wse": 0, "stride_wsn": 0, "stride_wsk": 0, "scale_bn": 1, "scale_bk": 1,
             "w_zero_ptr": None, "FP8": False, "PACKED": 0, "HAS_ZERO": False, "PACK": 1, "GROUPS": 1}  # fmt: skip


def _packed_kwargs(
    name: str, w: torch.Tensor, w_scale: torch.Tensor | None, packed: PackedWeight, k: int, a_dtype: torch.dtype,
    block_k: int,
) -> dict[str, Any]:  # fmt: skip
    """``w [E, N, K/2] uint8`` with ``w_scale [E, N, K/group]`` (:func:`.dequant.check_packed`)."""
    check_packed(name, w, w_scale, packed, k)
    if a_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: packed weights take bf16/fp16 activations, got {str(a_dtype).removeprefix('torch.')}")
    assert w_scale is not None  # checked above
    strides = dict(zip(("stride_wse", "stride_wsn", "stride_wsk"), w_scale.stride(), strict=True))
    return {**_UNSCALED, "w_scale_ptr": w_scale, **strides, "scale_bk": packed.group, "w_zero_ptr": packed.zero,
            "PACKED": packed_constant(packed.packing), "HAS_ZERO": packed.zero is not None, "PACK": 2,
            "GROUPS": groups_per_tile(packed.group, block_k)}  # fmt: skip


def _weight_scale_kwargs(
    name: str, w: torch.Tensor, w_scale: torch.Tensor | None, scale_block: ScaleBlock, a_dtype: torch.dtype,
    config: FusedConfig, k: int, packed: PackedWeight | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The kernels' weight arguments for ``w [E, N, K]`` (``k`` = K): none in ``a_dtype``;
    float8_e4m3fn with ``w_scale [E, ceil(N/bn), ceil(K/bk)]`` float32, upcast in the loads (the
    activations stay in bf16: weight-only fp8, a K tile inside one scale block); or ``packed``."""
    if packed is not None:
        return _packed_kwargs(name, w, w_scale, packed, k, a_dtype, config.block_k)
    none = _UNSCALED
    if w.dtype != fp8.FP8_DTYPE:
        check_tensor(name, w, dtypes=(a_dtype,), ndim=3)
        if w_scale is not None:
            raise ValueError(f"{name}_scale: given, but {name} is {str(w.dtype).removeprefix('torch.')}, not fp8")
        return none
    check_tensor(name, w, dtypes=(fp8.FP8_DTYPE,), ndim=3)
    if a_dtype != torch.bfloat16:
        raise TypeError(f"{name}: fp8 weights take bfloat16 activations, got {str(a_dtype).removeprefix('torch.')}")
    (e, n, k), (bn, bk) = w.shape, scale_block
    shape = (e, cdiv(n, bn), cdiv(k, bk))
    check_tensor(f"{name}_scale", w_scale, dtypes=(torch.float32,), shape=shape, contiguous=False)
    if bk % config.block_k and bk < k:
        raise ValueError(
            f"config.block_k: each K tile must lie in one of the weight's {bk}-column scale blocks; "
            f"got {config.block_k}, which does not divide {bk}"
        )
    assert w_scale is not None  # checked above
    strides = dict(zip(("stride_wse", "stride_wsn", "stride_wsk"), w_scale.stride(), strict=True))
    return {**none, "w_scale_ptr": w_scale, **strides, "scale_bn": bn, "scale_bk": bk, "FP8": True}


def _launch_fused(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    layout: GatherLayout,
    topk_weights: torch.Tensor | None,
    config: FusedConfig,
    *,
    n_out: int,
    k_dim: int,
    grid_m: int,
    **kernel_args: Any,
) -> None:
    """Launch :func:`_fused_gemm_kernel` on ``(grid_m, column blocks)`` with the arguments both GEMMs share; the
    GEMM's own (weight format, bias, ``GATED``...) come in ``kernel_args``."""
    _fused_gemm_kernel[(grid_m, cdiv(n_out, config.block_n))](
        a, w, out, layout.row_slot, layout.block_expert, topk_weights, layout.slot_row,
        layout.top_k, layout.num_blocks, layout.slot_row.numel(), n_out, k_dim,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        **kernel_args,
        # the CPU interpreter: dots upcast, packed weights decoded without inline PTX
        INTERPRETED=interpreting(),
        # fp32 inputs would silently drop to tf32 on tensor cores; keep them exact.
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def _check_gemm1(
    x: torch.Tensor,
    w13: torch.Tensor,
    layout: GatherLayout,
    out: torch.Tensor,
    config: FusedConfig,
    activation: Activation,
    pack: int,
) -> int:
    """:func:`fused_gemm1`'s shape checks (``pack`` weight values per stored element); returns ``I``."""
    num_tokens, hidden = x.shape
    if not activation.gated:
        raise ValueError(f"activation: the fused GEMM1 computes gated activations, not {activation.kind}")
    if w13.shape[2] * pack != hidden or w13.shape[1] % 2:
        raise ValueError(f"w13: expected shape [E, 2I, {hidden}], got {list(w13.shape)}")
    inter = w13.shape[1] // 2
    _check_layout(layout, config, x.device)
    if layout.slot_row.shape[0] != num_tokens:
        raise ValueError(f"layout: expected {num_tokens} tokens (x's rows), got {layout.slot_row.shape[0]}")
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(layout.num_rows, inter))
    return inter


def _check_gemm2(
    act: torch.Tensor,
    w2: torch.Tensor,
    layout: GatherLayout,
    out: torch.Tensor,
    config: FusedConfig,
    pack: int,
) -> None:
    """:func:`fused_gemm2_weighted`'s shape checks (``pack`` weight values per stored element)."""
    inter = act.shape[1]
    if w2.shape[2] * pack != inter:
        raise ValueError(f"w2: expected shape [E, H, {inter}], got {list(w2.shape)}")
    _check_layout(layout, config, act.device)
    if act.shape[0] != layout.num_rows:
        raise ValueError(f"act: expected {layout.num_rows} rows (layout.num_rows), got {act.shape[0]}")
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(layout.slot_row.numel(), w2.shape[1]), unit_last_stride=True)


def _check_topk_weights(topk_weights: torch.Tensor | None, topk_ids: torch.Tensor) -> None:
    """``topk_weights``: ``None``, or float ``[T, K]`` like ``topk_ids`` (in GEMM2 the layout's ``slot_row``) and on
    its device."""
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=topk_ids.shape)
        check_same_device(topk_weights=topk_weights, topk_ids=topk_ids)


def fused_gemm1(
    x: torch.Tensor,
    w13: torch.Tensor,
    layout: GatherLayout,
    out: torch.Tensor,
    config: FusedConfig,
    activation: Activation = SILU,
    *,
    w13_scale: torch.Tensor | None = None,
    scale_block: ScaleBlock = BLOCK_SCALES,
    packed: PackedWeight | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[r] = act(x[t] @ gate[e].T, x[t] @ up[e].T)`` for every layout row ``r`` holding a slot of token ``t``
    routed to expert ``e``; A rows are read from ``x`` directly (no scatter).

    Padding rows of ``out`` are neither computed nor written; row blocks past the last segment exit at once. The grid is
    (row blocks, column blocks) with row blocks fastest, so the programs of a hot expert's consecutive blocks read the
    same weight tile close in time (L2).

    Args:
        x: ``[T, H]`` bf16/fp16/fp32 with unit stride along H.
        w13: ``[E, 2I, H]`` same dtype, contiguous; rows ``[0, I)`` gate, ``[I, 2I)`` up. Or float8_e4m3fn with
            ``w13_scale`` (``x`` bf16, not quantized: the weights are upcast in the GEMM's loads).
        layout: from :func:`gather_layout` on the ``topk_ids [T, K]`` of ``x``, built with ``config.block_m``.
        out: ``[R, I]`` (``R = layout.num_rows``), bf16/fp16/fp32, contiguous.
        config: tiling; ``block_m`` must equal ``layout.block_m``.
        activation: a gated one (:mod:`moe_kernels.mlp.activations`).
        w13_scale: fp8 only: ``[E, ceil(2I/bn), ceil(H/bk)]`` float32, any strides, ``(bn, bk) = scale_block`` (a block
            must not straddle gate and up rows). Packed: ``[E, 2I, H/group]``.
        packed: ``w13`` is ``[E, 2I, H/2] uint8``, 4-bit values dequantized in the loads.
        bias: ``[E, 2I]`` (gate then up) added to the fp32 products before the activation.

    Returns ``out``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, unit_last_stride=True)
    hidden = x.shape[1]
    scales = _weight_scale_kwargs("w13", w13, w13_scale, scale_block, x.dtype, config, hidden, packed)
    inter = _check_gemm1(x, w13, layout, out, config, activation, int(scales["PACK"]))
    biased = bias_args(bias, w13.shape[0], 2 * inter)
    check_same_device(x=x, w13=w13, w13_scale=w13_scale, w13_zero=scales["w_zero_ptr"], bias=bias, out=out)
    if layout.num_blocks == 0 or inter == 0:
        return out
    if scales["FP8"] and inter % scale_block[0] and scale_block[0] < 2 * inter:
        raise ValueError(f"scale_block: {scale_block[0]}-row scale blocks straddle the gate and up rows (I = {inter})")
    _launch_fused(x, w13, out, layout, None, config, n_out=inter, k_dim=hidden, grid_m=layout.num_blocks,
                  # Offsets of the up rows from the gate rows, precomputed so the products are 64-bit on host.
                  up_offset=inter * w13.stride(1), up_scale_offset=(inter // scales["scale_bn"]) * scales["stride_wsn"],
                  GATED=True, HAS_WEIGHTS=False, ZERO_EMPTY=False, **activation.kernel_constants(), **biased,
                  **scales)  # fmt: skip
    return out


def fused_gemm2_weighted(
    act: torch.Tensor,
    w2: torch.Tensor,
    layout: GatherLayout,
    topk_weights: torch.Tensor | None,
    out: torch.Tensor,
    config: FusedConfig,
    *,
    w2_scale: torch.Tensor | None = None,
    scale_block: ScaleBlock = BLOCK_SCALES,
    packed: PackedWeight | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[s] = topk_weights[s] * (act[r] @ w2[e].T + bias[e])`` for every layout row ``r`` holding slot ``s`` routed
    to expert ``e``: written slot-major, the router weight applied in fp32 before rounding to ``out.dtype``.

    With ``top_k > 1`` rows of slots without an expert are left untouched (sum the slots with ``weighted_gather(out,
    layout.slot_index, None, y)``). With ``top_k == 1`` slot ``s`` is token ``s``, ``out`` is the final ``[T, H]``
    output, and rows of tokens without an expert are written with zeros (extra programs past the row blocks), so no
    further pass is needed.

    Args:
        act: ``[R, I]`` bf16/fp16/fp32, contiguous, from :func:`fused_gemm1` (padding rows are never read).
        w2: ``[E, H, I]`` same dtype, contiguous; or float8_e4m3fn with ``w2_scale``, as :func:`fused_gemm1` takes
            ``w13``.
        layout: the layout GEMM1 used.
        topk_weights: ``[T, K]`` float32 (bf16/fp16 accepted), contiguous; ``None`` = weight 1.
        out: ``[T * K, H]`` bf16/fp16/fp32 with unit stride along H.
        config: tiling; ``block_m`` must equal ``layout.block_m``.
        w2_scale, scale_block, packed: as :func:`fused_gemm1` takes them for ``w13``.
        bias: optional ``[E, H]``, added in fp32 before the router weight.

    Returns ``out``.
    """
    check_tensor("act", act, dtypes=FLOAT_DTYPES, ndim=2)
    inter = act.shape[1]
    scales = _weight_scale_kwargs("w2", w2, w2_scale, scale_block, act.dtype, config, inter, packed)
    _check_gemm2(act, w2, layout, out, config, int(scales["PACK"]))
    hidden, (num_tokens, top_k) = w2.shape[1], layout.slot_row.shape
    n_slots = num_tokens * top_k
    biased = bias_args(bias, w2.shape[0], hidden)
    check_same_device(
        act=act, w2=w2, w2_scale=w2_scale, w2_zero=scales["w_zero_ptr"], topk_weights=topk_weights, bias=bias, out=out
    )
    _check_topk_weights(topk_weights, layout.slot_row)
    if n_slots == 0 or hidden == 0:
        return out
    zero_empty = top_k == 1
    grid_m = layout.num_blocks + (cdiv(n_slots, config.block_m) if zero_empty else 0)
    _launch_fused(act, w2, out, layout, topk_weights, config, n_out=hidden, k_dim=inter, grid_m=grid_m, up_offset=0,
                  up_scale_offset=0, GATED=False, HAS_WEIGHTS=topk_weights is not None, ZERO_EMPTY=zero_empty,
                  **SILU.kernel_constants(), **biased, **scales)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- whole path


def fused_workspace_shapes(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    block_m: int,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The large buffers :func:`fused_experts` takes from its caller, by name: ``shape, dtype``.

    ``activation [R, I]`` (``R = contiguous_rows_bound(T * K, E, block_m)``) and, when
    ``top_k > 1``, ``slot_rows [T * K, H]``. Their contents need no initialisation.
    """
    rows = contiguous_rows_bound(num_tokens * top_k, num_experts, block_m)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"activation": ((rows, inter), dtype)}
    if top_k > 1:
        shapes["slot_rows"] = ((num_tokens * top_k, hidden), dtype)
    return shapes


def _check_workspace(workspace: dict[str, torch.Tensor], specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    for name, (shape, dtype) in specs.items():
        if name not in workspace:
            raise ValueError(f"workspace: expected a buffer {name!r}, got keys {sorted(workspace)}")
        check_tensor(f"workspace[{name!r}]", workspace[name], dtypes=(dtype,), shape=shape)


def _check_fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    workspace: dict[str, torch.Tensor],
    gemm1: FusedConfig,
    gemm2: FusedConfig,
) -> None:
    """:func:`fused_experts`' argument checks beyond those of the GEMMs it calls (``topk_weights``:
    :func:`_check_topk_weights`)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False)
    num_tokens, hidden = x.shape
    check_tensor("w13", w13, dtypes=(x.dtype, fp8.FP8_DTYPE, torch.uint8), ndim=3)
    check_tensor("w2", w2, dtypes=(w13.dtype,), ndim=3)
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape[:2] != (num_experts, hidden):
        raise ValueError(f"w2: expected shape [{num_experts}, {hidden}, I], got {list(w2.shape)}")
    check_tensor("topk_ids", topk_ids, dtypes=INDEX_DTYPES, shape=(num_tokens, None))
    top_k = topk_ids.shape[1]
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(num_tokens, hidden), contiguous=False)
    if gemm1.block_m != gemm2.block_m:
        raise ValueError(f"gemm2.block_m: expected gemm1.block_m = {gemm1.block_m} (one layout), got {gemm2.block_m}")
    _check_workspace(
        workspace, fused_workspace_shapes(num_tokens, top_k, num_experts, hidden, inter, x.dtype, gemm1.block_m)
    )
    check_same_device(x=x, w13=w13, w2=w2, topk_ids=topk_ids, out=out)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor | None,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    *,
    workspace: dict[str, torch.Tensor],
    gemm1: FusedConfig,
    gemm2: FusedConfig,
    residual: torch.Tensor | None = None,
    activation: Activation = SILU,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    scale_blocks: tuple[ScaleBlock, ScaleBlock] = (BLOCK_SCALES, BLOCK_SCALES),
    packed: tuple[PackedWeight, PackedWeight] | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = [residual[t] +] sum_k topk_weights[t, k] * expert_mlp(topk_ids[t, k], x[t])`` on the fused path.

    Launches: the layout (one program up to ``ONE_LAUNCH_MAX_SLOTS`` slots), GEMM1+activation, GEMM2 with the router
    weights, and the top-k sum (fixed k order, fp32) -- three when ``top_k == 1``, where GEMM2 writes ``out`` directly.
    Slots without an expert (``-1`` or any id outside ``[0, E)``) contribute nothing; a token without any gets zeros. No
    host sync, no large allocation: capturable in a CUDA graph per batch size.

    Args:
        x: ``[T, H]`` bf16/fp16/fp32 with unit stride along H.
        w13: ``[E, 2I, H]`` same dtype, contiguous (gate rows, then up rows).
        w2: ``[E, H, I]`` same dtype, contiguous.
        topk_weights: ``[T, K]`` float32 (bf16/fp16 accepted), contiguous; ``None`` = weight 1.
        topk_ids: ``[T, K]`` int32/int64, contiguous, local expert ids.
        out: ``[T, H]`` bf16/fp16/fp32 with unit stride along H; every row is written.
        workspace: the buffers named by :func:`fused_workspace_shapes`, exactly those shapes and dtypes.
        gemm1, gemm2: tilings of the two GEMMs (see :func:`default_configs`); same ``block_m``.
        residual: optional ``[T, H]`` added in the top-k sum (``top_k == 1``: in a pass of its own).
        activation: the gated activation GEMM1 applies (:mod:`moe_kernels.mlp.activations`).
        w13_scale, w2_scale, scale_blocks: fp8 weights (``x`` bf16): their float32 scales and the ``(rows, cols)`` each
            covers, per projection (:func:`fused_gemm1`); with ``packed`` (w13's, w2's) the scales of 4-bit weights
            ``[E, N, K/2] uint8``.
        w13_bias, w2_bias: optional expert biases ``[E, 2I]``, ``[E, H]`` (gpt-oss), added in the GEMMs' epilogues: ``w2
            @ act(w13 @ x + b13) + b2``.

    Returns ``out``.
    """
    _check_fused_experts(x, w13, w2, topk_ids, out, workspace, gemm1, gemm2)
    _check_topk_weights(topk_weights, topk_ids)
    layout = gather_layout(topk_ids, w13.shape[0], gemm1.block_m)
    packed13, packed2 = packed if packed is not None else (None, None)
    act = fused_gemm1(x, w13, layout, workspace["activation"], gemm1, activation, w13_scale=w13_scale,
                      scale_block=scale_blocks[0], packed=packed13, bias=w13_bias)  # fmt: skip
    top_k = topk_ids.shape[1]  # 1: GEMM2's slot-major rows are the output rows, and no sum adds the residual
    slot_rows = out if top_k == 1 else workspace["slot_rows"]
    fused_gemm2_weighted(act, w2, layout, topk_weights, slot_rows, gemm2, w2_scale=w2_scale,
                         scale_block=scale_blocks[1], packed=packed2, bias=w2_bias)  # fmt: skip
    if top_k == 1:
        return out if residual is None else out.add_(residual)
    return weighted_gather(slot_rows, layout.slot_index, None, out, residual=residual)


# ----------------------------------------------------------------------------- configs
