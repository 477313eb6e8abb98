"""SiLU-and-multiply activation of the gated expert MLP, with optional skipping of unused rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_same_device, check_tensor, pick_row_block


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    row_info_ptr,
    rows_per_group,
    n_cols,
    SKIP_BY_LAYOUT: tl.constexpr,
    SKIP_BY_COUNTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # A skipped row gets zero live columns: the per-row condition is a scalar, and folding it into
    # the column bound avoids a scalar-bool & vector mask (which trips the triton 3.9 interpreter).
    n_live = n_cols
    if SKIP_BY_LAYOUT:
        n_live = tl.where(tl.load(row_info_ptr + row) >= 0, n_cols, 0)
    if SKIP_BY_COUNTS:
        n_live = tl.where(row % rows_per_group < tl.load(row_info_ptr + row // rows_per_group), n_cols, 0)
    live = cols < n_live
    x_row = x_ptr + row * (2 * n_cols)
    gate = tl.load(x_row + cols, mask=live, other=0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=live, other=0).to(tl.float32)
    result = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * n_cols + cols, result.to(out_ptr.dtype.element_ty), mask=live)


def silu_and_mul(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    grouped_layout: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = silu(x[..., :I]) * x[..., I:]``, computed in fp32 and stored in ``out.dtype``.

    Args:
        x: ``[R, 2I]`` or, for the masked layout, ``[E, M, 2I]``; bf16/fp16/fp32, contiguous.
            The first half of the last dim is the gate (SiLU applies to it), the second the up
            projection.
        out: same shape as ``x`` with last dim ``I``; bf16/fp16/fp32, contiguous.
        grouped_layout: optional ``[R] int32`` (contiguous layout, 2-D ``x``): rows whose entry is
            ``-1`` are skipped.
        counts: optional ``[E] int32`` (masked layout, 3-D ``x``): rows ``m >= counts[e]`` of group
            ``e`` are skipped.

    Skipped rows of ``out`` are left untouched and their ``x`` rows are never read.

    Returns:
        ``out``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() not in (2, 3) or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape [R, 2I] or [E, M, 2I], got {list(x.shape)}")
    inter = x.shape[-1] // 2
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(*x.shape[:-1], inter))
    if grouped_layout is not None and counts is not None:
        raise ValueError("pass at most one of grouped_layout and counts")
    rows_per_group = 1
    if grouped_layout is not None:
        if x.dim() != 2:
            raise ValueError(f"x: grouped_layout needs a 2-D x [R, 2I], got {list(x.shape)}")
        check_tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), shape=(x.shape[0],))
    if counts is not None:
        if x.dim() != 3:
            raise ValueError(f"x: counts needs a 3-D x [E, M, 2I], got {list(x.shape)}")
        check_tensor("counts", counts, dtypes=(torch.int32,), shape=(x.shape[0],))
        rows_per_group = x.shape[1]
    check_same_device(x=x, out=out, grouped_layout=grouped_layout, counts=counts)
    num_rows = x.numel() // max(x.shape[-1], 1)
    if num_rows == 0 or inter == 0:
        return out
    block, num_warps = pick_row_block(num_rows, inter)
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x,
        out,
        grouped_layout if grouped_layout is not None else counts,
        rows_per_group,
        inter,
        SKIP_BY_LAYOUT=grouped_layout is not None,
        SKIP_BY_COUNTS=counts is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out
