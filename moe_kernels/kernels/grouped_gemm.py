"""Grouped GEMM over experts, ``out = a @ b[e].T`` per row group -- bf16/fp16/fp32, or fp8 with
block scales -- optionally fused with the activation.

One Triton kernel serves both token layouts produced by :mod:`.permute` and both number formats:

* contiguous: rows of ``a [R, K]`` are expert segments; ``grouped_layout [R]`` names each row's
  expert (``-1`` = padding). The expert is looked up once per BLOCK_M row tile, so every segment
  must start on a multiple of BLOCK_M (``alignment % block_m == 0``).
* masked: ``a [E, M, K]`` holds ``counts[e]`` valid rows per expert.
* fp8 (``a_scale``/``b_scale`` given): ``a`` float8_e4m3fn with one float32 scale per row and 128
  columns, ``b [E, N, K]`` float8_e4m3fn with one per ``b_scale_block = (bn, bk)`` block: 128 x 128
  (DeepSeek-V3), ``(1, K)`` (one per output channel) or ``(N, K)`` (one per tensor); per K tile
  the fp8 tile product is accumulated in fp32 times ``a_scale[row, kb] * b_scale[e, n // bn, k // bk]``.

With ``activation`` the weight ``b [E, 2I, K]`` stacks gate rows over up rows; each program
accumulates the gate and the up tile of the same output columns and writes ``act(gate, up)``
into ``out [..., I]``, so the ``[R, 2I]`` intermediate never goes to memory (not with fp8, whose
GEMM2 input must be quantized first: there the activation is its own kernel).

Rows that are skipped (padding / past ``counts``) are neither computed nor written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import fp8
from moe_kernels.mlp.activations import SILU, Activation

from ._common import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, interpreting
from .activation import apply_activation
from .bias import bias_args, bias_row
from .dequant import PackedWeight, check_packed, groups_per_tile, load_weight_tile, packed_constant, tile_dot

if TYPE_CHECKING:  # (typing.Unpack is Python 3.11+; annotations are never evaluated)
    from typing_extensions import Unpack

_SCALE_BLOCK = tl.constexpr(fp8.SCALE_BLOCK)

#: Tiles per format. bf16 (H100): 64-row tiles keep padding low at decode sizes, 128x64 weight
#: tiles with 3 stages fit in shared memory even when the fused path streams gate and up tiles.
#: fp8: BLOCK_K is one scale block; 64 + 128 rows of 128 fp8 bytes per stage leave room for 3.
BLOCK_M = 64
BLOCK_N = 128
BLOCK_K = {False: 64, True: fp8.SCALE_BLOCK}
NUM_STAGES = 3


@triton.jit
def weight_scale(scale_ptrs, kb, stride_k, col_ok, PER_COLUMN: tl.constexpr):
    """The weight scales of a K tile in scale column ``kb``: ``[1, BLOCK_N]`` from per-column
    pointers (``PER_COLUMN``), or one scalar when the whole N tile shares a scale row."""
    if PER_COLUMN:
        scale = tl.load(scale_ptrs + kb * stride_k, mask=col_ok, other=0.0)[None, :]
    else:
        scale = tl.load(scale_ptrs + kb * stride_k)
    return scale


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    group_ptr,
    a_scale_ptr,
    b_scale_ptr,
    num_rows,
    rows_per_group,
    n_out,
    k_dim,
    stride_be,
    stride_bn,
    up_offset,
    stride_ase,
    stride_asm,
    stride_ask,
    stride_bse,
    stride_bsn,
    stride_bsk,
    scale_bn,
    scale_bk,
    b_zero_ptr,
    bias_ptr,
    stride_bias_e,
    MASKED: tl.constexpr,
    FP8: tl.constexpr,
    SCALE_PER_COLUMN: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    PACK: tl.constexpr,
    GROUPS: tl.constexpr,
    FUSED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if MASKED:
        tiles_per_group = tl.cdiv(rows_per_group, BLOCK_M)
        expert = pid_m // tiles_per_group
        tile_start = (pid_m % tiles_per_group) * BLOCK_M
        valid_rows = tl.minimum(tl.load(group_ptr + expert), rows_per_group)
        if tile_start >= valid_rows:
            return
        local = tile_start + tl.arange(0, BLOCK_M)
        row_ok = local < valid_rows
        rows = expert.to(tl.int64) * rows_per_group + local
        scale_rows = expert.to(tl.int64) * stride_ase + local.to(tl.int64) * stride_asm
    else:
        tile_start = pid_m * BLOCK_M
        expert = tl.load(group_ptr + tile_start)
        if expert < 0:
            return
        rows = tile_start.to(tl.int64) + tl.arange(0, BLOCK_M)
        # Padding rows at the segment tail share the tile; they must stay unwritten.
        row_expert = tl.load(group_ptr + rows, mask=rows < num_rows, other=-1)
        row_ok = row_expert == expert
        scale_rows = rows * stride_asm

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * k_dim + offs_k[None, :]
    # B is [N, K] row-major; reading it as a [BLOCK_K, BLOCK_N] tile gives A @ B^T directly (and
    # keeps it K-major, as fp8 wgmma wants).
    # (packed: the BLOCK_K / 2 bytes of a column's K tile, read contiguously and unpacked in
    # registers; its scales at b_scale_offs + k // scale_bk * stride_bsk)
    offs_kb = tl.arange(0, BLOCK_K // PACK)
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn + offs_kb[:, None]
    b_scale_offs = expert.to(tl.int64) * stride_bse + cols.to(tl.int64) * stride_bsn
    if FP8:
        # Without SCALE_PER_COLUMN the whole N tile lies in one scale row (BLOCK_N divides bn).
        b_scale_base = b_scale_ptr + expert.to(tl.int64) * stride_bse
        if SCALE_PER_COLUMN:
            b_scale_ptrs = b_scale_base + (cols // scale_bn) * stride_bsn
        else:
            b_scale_ptrs = b_scale_base + (pid_n * BLOCK_N // scale_bn) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = offs_k < k_dim - k0
        b_mask = (offs_kb < (k_dim - k0) // PACK)[:, None] & col_ok[None, :]
        # fp8 loads take a float `other` (the interpreter cannot cast the int 0 to fp8). Zeroed
        # padding rows and K tails contribute nothing even if the memory behind them holds NaNs.
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b, b_odd, b_scale, b_zero = load_weight_tile(b_ptrs, b_mask, k0, k_dim, col_ok, b_scale_ptr, b_zero_ptr,
                                                     b_scale_offs, stride_bsk, scale_bk, a_ptr.dtype.element_ty,
                                                     PACKED, HAS_ZERO, GROUPS, INTERPRETED, BLOCK_M,
                                                     BLOCK_K)  # fmt: skip
        if FP8:
            # BLOCK_K divides the activation group and the weight's scale block, so the K tile
            # lies in one of each. A fresh partial per K tile: Hopper's fp8 tensor-core
            # accumulation is not full fp32, so it is promoted into the fp32 accumulator at least
            # once per scale block (as DeepGEMM).
            b = b.to(a_ptr.dtype.element_ty)
            a_dot = a
            if INTERPRETED:  # the interpreter's low-precision tl.dot is wrong (triton 3.9); upcasting is exact
                a_dot = a.to(tl.float32)
                b = b.to(tl.float32)
            a_scale = tl.load(a_scale_ptr + scale_rows + (k0 // _SCALE_BLOCK) * stride_ask, mask=row_ok, other=0.0)
            b_scale = weight_scale(b_scale_ptrs, k0 // scale_bk, stride_bsk, col_ok, SCALE_PER_COLUMN)
            acc += tl.dot(a_dot, b, input_precision=INPUT_PRECISION) * (a_scale[:, None] * b_scale)
        else:
            acc = tile_dot(acc, a, b, b_odd, b_scale, b_zero, PACKED, HAS_ZERO, GROUPS, INTERPRETED, INPUT_PRECISION)
        if FUSED:
            up_scale_offs = b_scale_offs + n_out * stride_bsn
            b_up, b_up_odd, up_scale, up_zero = load_weight_tile(
                b_ptrs + up_offset, b_mask, k0, k_dim, col_ok, b_scale_ptr, b_zero_ptr, up_scale_offs, stride_bsk,
                scale_bk, a_ptr.dtype.element_ty, PACKED, HAS_ZERO, GROUPS, INTERPRETED, BLOCK_M, BLOCK_K,
            )  # fmt: skip
            acc_up = tile_dot(acc_up, a, b_up, b_up_odd, up_scale, up_zero, PACKED, HAS_ZERO, GROUPS, INTERPRETED,
                              INPUT_PRECISION)  # fmt: skip
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K // PACK

    if HAS_BIAS:
        # the bias has the weight's N columns: fused, gate columns then up columns (n_out further)
        acc += bias_row(bias_ptr, expert, cols, col_ok, stride_bias_e)[None, :]
        if FUSED:
            acc_up += bias_row(bias_ptr + n_out, expert, cols, col_ok, stride_bias_e)[None, :]
    if FUSED:
        acc = apply_activation(acc, acc_up, ACT)
    out_ptrs = out_ptr + rows[:, None] * n_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check_operands(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    activation: Activation | None,
    b_scale_block: tuple[int, int] = (fp8.SCALE_BLOCK, fp8.SCALE_BLOCK),
    packed: PackedWeight | None = None,
) -> int:
    """Validate ``b [E, N, K]`` (and the scales) against ``a``; return the output width."""
    quantized = a_scale is not None
    if packed is not None:
        check_tensor("a", a, dtypes=(torch.bfloat16, torch.float16), ndim=a.dim())
        check_packed("b", b, b_scale, packed, a.shape[-1])
        if quantized:
            raise ValueError("a_scale: packed weights take unquantized activations")
    elif quantized != (b_scale is not None):
        raise ValueError("a_scale and b_scale: give both (fp8 operands) or neither")
    elif quantized:
        check_tensor("a", a, dtypes=(fp8.FP8_DTYPE,), ndim=a.dim())
        check_tensor("b", b, dtypes=(fp8.FP8_DTYPE,), ndim=3)
        scale_shape = (*a.shape[:-1], cdiv(a.shape[-1], fp8.SCALE_BLOCK))
        check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=scale_shape, contiguous=False)
        e, n, k = b.shape
        b_scale_shape = (e, cdiv(n, b_scale_block[0]), cdiv(k, b_scale_block[1]))
        check_tensor("b_scale", b_scale, dtypes=(torch.float32,), shape=b_scale_shape, contiguous=False)
        if activation is not None:
            raise ValueError("activation: fp8 operands take the activation as a kernel of its own (GEMM2 input)")
    else:
        check_tensor("a", a, dtypes=FLOAT_DTYPES, ndim=a.dim())
        check_tensor("b", b, dtypes=(a.dtype,), ndim=3)
    if packed is None and b.shape[2] != a.shape[-1]:
        raise ValueError(f"b: expected K = {a.shape[-1]} (a's last dim), got shape {list(b.shape)}")
    if activation is not None and activation.gated:
        if b.shape[1] % 2:
            raise ValueError(f"b: a gated activation needs an even N = 2I, got shape {list(b.shape)}")
        return b.shape[1] // 2
    return b.shape[1]


def _scale_args(
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    b_scale_block: tuple[int, int],
    *,
    masked: bool,
    k_dim: int,
    block_n: int,
    block_k: int,
    packed: PackedWeight | None = None,
) -> dict[str, Any]:
    """The kernel's scale arguments: strides, the weight's scale block and whether an N tile
    needs a scale per column; checks that a K tile lies in one activation group and one weight
    scale block. ``packed``: the 4-bit weight's group scales and zero points."""
    none = {"a_scale_strides": (0, 0, 0), "b_scale_strides": (0, 0, 0), "scale_bn": 1, "scale_bk": 1,
            "SCALE_PER_COLUMN": False, "b_zero_ptr": None, "PACKED": 0, "HAS_ZERO": False, "PACK": 1,
            "GROUPS": 1}  # fmt: skip
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n: expected a power of two >= 16, got {block_n}")
    if packed is not None and b_scale is not None:
        return {**none, "b_scale_strides": b_scale.stride(), "scale_bk": packed.group, "b_zero_ptr": packed.zero,
                "PACKED": packed_constant(packed.packing), "HAS_ZERO": packed.zero is not None, "PACK": 2,
                "GROUPS": groups_per_tile(packed.group, block_k)}  # fmt: skip
    if a_scale is None or b_scale is None:
        return none
    bn, bk = b_scale_block
    if block_k < 16 or fp8.SCALE_BLOCK % block_k or (bk % block_k and bk < k_dim):
        raise ValueError(
            f"block_k: expected a divisor of {fp8.SCALE_BLOCK} (the activation group) and of the weight's scale "
            f"block {bk} (or a block spanning K = {k_dim}), >= 16; got {block_k}"
        )
    return {
        **none,
        "a_scale_strides": a_scale.stride() if masked else (0, a_scale.stride(0), a_scale.stride(1)),
        "b_scale_strides": b_scale.stride(),
        "scale_bn": bn,
        "scale_bk": bk,
        "SCALE_PER_COLUMN": bn % block_n != 0,
    }


class GroupedGemmOptions(TypedDict, total=False):
    """The keyword options :func:`grouped_gemm_contiguous` and :func:`grouped_gemm_masked` share (documented at the
    former); their defaults are :func:`_grouped_gemm`'s."""

    a_scale: torch.Tensor | None
    b_scale: torch.Tensor | None
    b_scale_block: tuple[int, int]
    packed: PackedWeight | None
    activation: Activation | None
    bias: torch.Tensor | None
    block_m: int
    block_n: int
    block_k: int | None
    num_warps: int | None
    num_stages: int


def _check_layout(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, n_out: int, masked: bool
) -> None:
    """The layout's checks: contiguous ``a [R, K]``, ``rows = grouped_layout [R] int32``, ``out [R, n_out]``; masked
    ``a [E, M, K]``, ``rows = counts [E] int32``, ``out [E, M, n_out]``."""
    if a.dim() != (3 if masked else 2):
        want = "a 3-D tensor [E, M, K]" if masked else "a 2-D tensor [R, K]"
        raise ValueError(f"a: expected {want}, got shape {list(a.shape)}")
    if masked and b.shape[0] != a.shape[0]:
        raise ValueError(f"b: expected E = {a.shape[0]} (a's first dim), got shape {list(b.shape)}")
    check_tensor("counts" if masked else "grouped_layout", rows, dtypes=(torch.int32,), shape=(a.shape[0],))
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(*a.shape[:-1], n_out))


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    *,
    masked: bool,
    alignment: int | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    b_scale_block: tuple[int, int] = (fp8.SCALE_BLOCK, fp8.SCALE_BLOCK),
    packed: PackedWeight | None = None,
    activation: Activation | None = None,
    bias: torch.Tensor | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Both grouped GEMMs: ``rows`` is the contiguous layout's ``grouped_layout`` or, ``masked``, the ``counts``."""
    n_out = _check_operands(a, a_scale, b, b_scale, activation, b_scale_block, packed)
    _check_layout(a, b, rows, out, n_out, masked)
    rows_name = "counts" if masked else "grouped_layout"
    check_same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias, **{rows_name: rows}, out=out)
    if alignment is not None and alignment % block_m:
        raise ValueError(f"alignment: expected a multiple of block_m = {block_m}, got {alignment}")
    block_k = BLOCK_K[a_scale is not None] if block_k is None else block_k
    k_dim = a.shape[-1]
    scales = _scale_args(
        a_scale, b_scale, b_scale_block, masked=masked, k_dim=k_dim, block_n=block_n, block_k=block_k, packed=packed
    )
    # masked: E groups of M rows, each tiled on its own; contiguous: one group of R rows
    rows_per_group = a.shape[-2]
    num_row_tiles = (a.shape[0] if masked else 1) * cdiv(rows_per_group, block_m)
    if num_row_tiles == 0 or n_out == 0:
        return out
    fused = activation is not None and activation.gated
    _grouped_gemm_kernel[(num_row_tiles, cdiv(n_out, block_n))](
        a, b, out, rows, a_scale, b_scale, a.numel() // max(k_dim, 1), rows_per_group, n_out, k_dim,
        b.stride(0), b.stride(1),
        # Offset of the up rows from the gate rows, precomputed so the product is 64-bit on host.
        n_out * b.stride(1),
        *scales.pop("a_scale_strides"), *scales.pop("b_scale_strides"), **scales,
        **bias_args(bias, b.shape[0], b.shape[1]),
        MASKED=masked, FP8=a_scale is not None, FUSED=fused,
        **(activation if fused and activation is not None else SILU).kernel_constants(),
        # the CPU interpreter: dots upcast, packed weights decoded without inline PTX
        INTERPRETED=interpreting(),
        # fp32 inputs would silently drop to tf32 on tensor cores; keep them exact.
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 or interpreting() else None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # Two fp32 accumulators per program need twice the registers: spread them over 8 warps.
        num_warps=(8 if fused else 4) if num_warps is None else num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def grouped_gemm_contiguous(
    a: torch.Tensor,
    b: torch.Tensor,
    grouped_layout: torch.Tensor,
    out: torch.Tensor,
    *,
    alignment: int | None = None,
    **options: Unpack[GroupedGemmOptions],
) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: ``out[r] = a[r] @ b[grouped_layout[r]].T``.

    Caller contract: every expert segment starts on a multiple of ``block_m`` (build the layout with an alignment that
    is a multiple of ``block_m``, by default :data:`BLOCK_M`), so that each row tile holds rows of one expert. Tiles
    whose first row is ``-1`` are skipped; ``-1`` rows inside a tile are neither read nor written.

    Args:
        a: ``[R, K]`` bf16/fp16/fp32, or float8_e4m3fn with ``a_scale``, contiguous.
        b: ``[E, N, K]`` ``a``'s dtype, contiguous (``nn.Linear`` weight layout per expert).
        grouped_layout: ``[R] int32``, expert of each row, ``-1`` = skip.
        out: ``[R, N]`` (``[R, N/2]`` with a gated ``activation``), bf16/fp16/fp32, contiguous.
        alignment: the layout's alignment, if known; checked to be a multiple of ``block_m``.
        a_scale: fp8: ``[R, ceil(K/128)]`` float32 per-token-group scales, any strides.
        b_scale: fp8: ``[E, ceil(N/bn), ceil(K/bk)]`` float32 scales, any strides.
        b_scale_block: ``(bn, bk)``, the weight rows and columns one scale covers
            (:meth:`moe_kernels.mlp.formats.Fp8Scaled.scale_block`); default 128 x 128.
        packed: ``b`` is ``[E, N, K/2] uint8``, two 4-bit values a byte, with ``b_scale [E, N, K/group]`` (and zero
            points), dequantized in the loads (:mod:`.dequant`); ``a`` bf16/fp16 without ``a_scale``.
        activation: fuse it: ``b``'s N = 2I rows are gate then up; write ``act(a @ gate.T, a @ up.T)`` (bf16/fp16/fp32
            only).
        bias: ``[E, N]`` per-expert bias added to the fp32 product before the activation (gpt-oss), unit stride along N.
        block_m, block_n, block_k, num_warps, num_stages: Triton tiling (fp8: ``block_k`` divides 128 and ``bk`` so a K
            tile lies in one scale block); defaults :data:`BLOCK_M`, :data:`BLOCK_N`, 64 (128 for fp8), 4 (8 when
            fused), :data:`NUM_STAGES`.

    Returns ``out``.
    """
    return _grouped_gemm(a, b, grouped_layout, out, masked=False, alignment=alignment, **options)


def grouped_gemm_masked(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, out: torch.Tensor, **options: Unpack[GroupedGemmOptions]
) -> torch.Tensor:
    """Masked-layout grouped GEMM: ``out[e, m] = a[e, m] @ b[e].T`` for ``m < counts[e]``.

    Rows ``m >= counts[e]`` are neither computed nor written (counts above M act as M).

    Args:
        a: ``[E, M, K]`` bf16/fp16/fp32, or float8_e4m3fn with ``a_scale [E, M, ceil(K/128)]`` (any strides),
            contiguous.
        b: ``[E, N, K]`` ``a``'s dtype, contiguous (fp8: with ``b_scale``).
        counts: ``[E] int32`` valid rows per expert (``MaskedLayout.counts``).
        out: ``[E, M, N]`` (``[E, M, N/2]`` with a gated ``activation``), bf16/fp16/fp32, contiguous.
        options: keyword only, as :func:`grouped_gemm_contiguous` takes them (:class:`GroupedGemmOptions`).

    Returns ``out``.
    """
    return _grouped_gemm(a, b, counts, out, masked=True, alignment=None, **options)
