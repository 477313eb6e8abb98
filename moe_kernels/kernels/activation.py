"""The activation between the expert GEMMs (:mod:`moe_kernels.mlp.activations`), optionally
quantized to fp8 for GEMM2 on the way out, with optional skipping of unused rows.

:func:`apply_activation` is the device function every kernel that applies an activation calls
(this row-wise kernel and the fused GEMM epilogues); its ``KIND`` is
:attr:`moe_kernels.mlp.activations.Activation.code`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import fp8
from moe_kernels.mlp.activations import SILU, Activation

from ._common import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, interpreting, pick_row_block
from .quant import check_group, check_scale_out, quantize_groups, row_tiles, scale_row_offset, scale_strides


@triton.jit
def _softcap(x, CAP: tl.constexpr):
    # CAP * tanh(x / CAP), with tanh(y) = 2 sigmoid(2y) - 1 (no tanh in every Triton build)
    return CAP * (2.0 * tl.sigmoid(2.0 * x / CAP) - 1.0)


@triton.jit
def apply_activation(gate, up, ACT: tl.constexpr):
    """``act(gate, up)`` in fp32 (``up`` unused by non-gated kinds); ``ACT`` is the tuple
    :meth:`moe_kernels.mlp.activations.Activation.kernel_constants` gives (0 = parameter unset); the
    torch definitions there are the reference. Branches on constants cost nothing at run time."""
    # (named one by one: unpacking a constexpr tuple at once loses constexpr-ness in triton 3.9)
    ACT_KIND: tl.constexpr = ACT[0]
    ACT_ALPHA: tl.constexpr = ACT[1]
    ACT_LIMIT: tl.constexpr = ACT[2]
    ACT_CLAMP_OUTPUT: tl.constexpr = ACT[3]
    ACT_UP_OFFSET: tl.constexpr = ACT[4]
    ACT_GATE_CAP: tl.constexpr = ACT[5]
    ACT_UP_CAP: tl.constexpr = ACT[6]
    if ACT_LIMIT > 0 and not ACT_CLAMP_OUTPUT:
        gate = tl.minimum(gate, ACT_LIMIT)
        up = tl.minimum(tl.maximum(up, -ACT_LIMIT), ACT_LIMIT)
    if ACT_KIND == 0:  # silu (alpha: gpt-oss's sigmoid slope; gate cap: Inkling-2)
        if ACT_GATE_CAP > 0:
            g = _softcap(gate, ACT_GATE_CAP) * tl.sigmoid(gate)
        else:
            g = gate * tl.sigmoid(ACT_ALPHA * gate)
    elif ACT_KIND == 1:  # gelu, tanh approximation: 0.5 x (1 + tanh(u)) == x sigmoid(2u)
        g = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    elif ACT_KIND == 2:  # gelu, erf
        g = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    elif ACT_KIND == 3:  # relu^2, not gated
        g = tl.maximum(gate, 0.0)
        g = g * g
    else:
        tl.static_assert(False, "unknown activation kind")
        g = gate
    if ACT_KIND == 3:
        return g
    if ACT_LIMIT > 0 and ACT_CLAMP_OUTPUT:
        g = tl.minimum(g, ACT_LIMIT)
        up = tl.minimum(tl.maximum(up, -ACT_LIMIT), ACT_LIMIT)
    if ACT_UP_CAP > 0:
        up = _softcap(up, ACT_UP_CAP)
    return g * (up + ACT_UP_OFFSET)


@triton.jit
def _activate_kernel(
    x_ptr,
    out_ptr,
    s_ptr,
    row_info_ptr,
    rows_per_group,
    n_cols,
    n_groups,
    stride_se,
    stride_sm,
    stride_sk,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    SKIP_BY_LAYOUT: tl.constexpr,
    SKIP_BY_COUNTS: tl.constexpr,
    QUANT: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    GROUP: tl.constexpr,
    G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Skipped rows leave at once: in the masked layout most rows are capacity nobody routed to
    # (3/4 of them for DeepSeek-V3 at T=4096), and computing them masked cost 4x this kernel's time.
    if SKIP_BY_LAYOUT:
        if tl.load(row_info_ptr + row) < 0:
            return
    if SKIP_BY_COUNTS:
        if row % rows_per_group >= tl.load(row_info_ptr + row // rows_per_group):
            return
    groups = tl.program_id(1).to(tl.int64) * G + tl.arange(0, G)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    live = cols < n_cols
    x_row = x_ptr + row * (2 * n_cols if GATED else n_cols)
    gate = tl.load(x_row + cols, mask=live, other=0).to(tl.float32)
    up = gate
    if GATED:
        up = tl.load(x_row + n_cols + cols, mask=live, other=0).to(tl.float32)
    result = apply_activation(gate, up, ACT)
    if QUANT:
        q, scale = quantize_groups(result, EXACT_CAST)
        tl.store(out_ptr + row * n_cols + cols, q.to(out_ptr.dtype.element_ty), mask=live)
        s_row = s_ptr + scale_row_offset(row, rows_per_group, stride_se, stride_sm)
        tl.store(s_row + groups * stride_sk, scale, mask=groups < n_groups)
    else:
        tl.store(out_ptr + row * n_cols + cols, result.to(out_ptr.dtype.element_ty), mask=live)


def _check_activate_args(
    x: torch.Tensor,
    out: torch.Tensor,
    activation: Activation,
    scale_out: torch.Tensor | None,
    group: int,
    grouped_layout: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> int:
    """Check :func:`activate`'s arguments (see there); return ``I``, the output's width."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    gated = activation.gated
    if x.dim() not in (2, 3) or (gated and x.shape[-1] % 2):
        want = "[R, 2I] or [E, M, 2I]" if gated else "[R, I] or [E, M, I]"
        raise ValueError(f"x: expected shape {want}, got {list(x.shape)}")
    inter = x.shape[-1] // 2 if gated else x.shape[-1]
    quant = scale_out is not None
    check_tensor("out", out, dtypes=(fp8.FP8_DTYPE,) if quant else FLOAT_DTYPES, shape=(*x.shape[:-1], inter))
    if quant:
        check_group(group)
        check_scale_out(scale_out, x.shape[:-1], cdiv(inter, group))
    if grouped_layout is not None and counts is not None:
        raise ValueError("pass at most one of grouped_layout and counts")
    if grouped_layout is not None:
        if x.dim() != 2:
            raise ValueError(f"x: grouped_layout needs a 2-D x [R, 2I], got {list(x.shape)}")
        check_tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), shape=(x.shape[0],))
    if counts is not None:
        if x.dim() != 3:
            raise ValueError(f"x: counts needs a 3-D x [E, M, 2I], got {list(x.shape)}")
        check_tensor("counts", counts, dtypes=(torch.int32,), shape=(x.shape[0],))
    check_same_device(x=x, out=out, scale_out=scale_out, grouped_layout=grouped_layout, counts=counts)
    return inter


def activate(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    activation: Activation = SILU,
    scale_out: torch.Tensor | None = None,
    group: int = fp8.SCALE_BLOCK,
    grouped_layout: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = act(x)`` (gated kinds: ``act(x[..., :I], x[..., I:])``), computed in fp32 and stored in ``out.dtype``
    -- or quantized to fp8 (one scale per row and ``group`` columns into ``scale_out``) when ``scale_out`` is given,
    so GEMM2's input never exists in bf16. Returns ``out``.

    Args:
        x: ``[R, 2I]`` or, for the masked layout, ``[E, M, 2I]`` (``I`` columns for a non-gated activation);
            bf16/fp16/fp32, contiguous. Gated: the first half is the gate, the second the up projection.
        out: same leading shape as ``x``, last dim ``I``; bf16/fp16/fp32 (float8_e4m3fn with ``scale_out``),
            contiguous.
        activation: which function (:mod:`moe_kernels.mlp.activations`).
        scale_out: ``[..., ceil(I / group)]`` float32, any strides (:mod:`moe_kernels.mlp.act_quant`).
        group: columns per scale, a power of two.
        grouped_layout: optional ``[R] int32`` (contiguous layout, 2-D ``x``): rows whose entry is ``-1`` are skipped.
        counts: optional ``[E] int32`` (masked layout, 3-D ``x``): rows ``m >= counts[e]`` of group ``e`` are
            skipped. Skipped rows of ``out`` (and ``scale_out``) are left untouched; their ``x`` rows are never read.
    """
    inter = _check_activate_args(x, out, activation, scale_out, group, grouped_layout, counts)
    quant = scale_out is not None
    num_rows = x.numel() // max(x.shape[-1], 1)
    if num_rows == 0 or inter == 0:
        return out
    rows_per_group, stride_se, stride_sm, stride_sk = scale_strides(scale_out)
    if counts is not None:  # one row count serves the counts lookup and the scale addressing
        rows_per_group = x.shape[1]
    block, num_warps = pick_row_block(num_rows, inter)
    tile, per_program, grid_cols = row_tiles(num_rows, inter, block, group if quant else None)
    _activate_kernel[(num_rows, grid_cols)](
        x,
        out,
        scale_out,
        grouped_layout if grouped_layout is not None else counts,
        rows_per_group,
        inter,
        cdiv(inter, group),
        stride_se,
        stride_sm,
        stride_sk,
        **activation.kernel_constants(),
        GATED=activation.gated,
        SKIP_BY_LAYOUT=grouped_layout is not None,
        SKIP_BY_COUNTS=counts is not None,
        QUANT=quant,
        EXACT_CAST=quant and interpreting(),
        GROUP=tile,
        G=per_program,
        num_warps=num_warps,
    )
    return out
