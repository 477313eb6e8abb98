"""Un-permute: weighted sum of each token's expert output rows back into token order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, pick_row_block
from .permute import ContiguousLayout, MaskedLayout, resolve_dst_row


@triton.jit
def _weighted_gather_kernel(
    y_ptr,
    dst_ptr,
    weights_ptr,
    residual_ptr,
    out_ptr,
    top_k,
    n_cols,
    stride_ym,
    stride_rm,
    stride_om,
    HAS_WEIGHTS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_RESIDUAL:
        # added here rather than in a pass of its own over [T, H]
        acc += tl.load(residual_ptr + tok * stride_rm + cols, mask=cols < n_cols, other=0).to(tl.float32)
    # Fixed k order keeps the fp32 sum (and so the output) bit-identical run to run.
    for k in range(top_k):
        row = tl.load(dst_ptr + tok * top_k + k)
        # Scalar condition folded into the column bound (a scalar-bool & vector mask trips the
        # triton 3.9 interpreter).
        live = cols < tl.where(row >= 0, n_cols, 0)
        vals = tl.load(y_ptr + row * stride_ym + cols, mask=live, other=0)
        if HAS_WEIGHTS:
            # Zeroing the weight too keeps a garbage weight on an unused slot out of the sum.
            weight = tl.where(row >= 0, tl.load(weights_ptr + tok * top_k + k).to(tl.float32), 0.0)
            acc += weight * vals.to(tl.float32)
        else:
            acc += vals.to(tl.float32)
    tl.store(out_ptr + tok * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def weighted_gather(
    y: torch.Tensor,
    dst_row: torch.Tensor | ContiguousLayout | MaskedLayout,
    topk_weights: torch.Tensor | None,
    out: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = residual[t] + sum_k topk_weights[t, k] * y[dst_row[t, k]]`` over slots with
    ``dst_row >= 0`` (no residual term without ``residual``).

    Accumulates in fp32 in fixed ``k`` order (deterministic); a token without a valid slot gets zeros.

    Args:
        y: ``[R, H]`` or ``[E, capacity, H]`` (masked layout), bf16/fp16/fp32, contiguous. Only
            rows named by ``dst_row`` are read.
        dst_row: ``[T, K] int64`` contiguous (or a layout carrying one), ``-1`` = skip.
        topk_weights: ``[T, K]`` float32 (bf16/fp16 accepted), contiguous; ``None`` means weight 1.
        out: ``[T, H]`` bf16/fp16/fp32 with unit stride along H.
        residual: optional ``[T, H]`` bf16/fp16/fp32 with unit stride along H (e.g. the shared
            experts' output), added in fp32; may alias ``out``.

    Returns:
        ``out``.
    """
    dst_row = resolve_dst_row(dst_row)
    check_tensor("y", y, dtypes=FLOAT_DTYPES)
    if y.dim() < 2:
        raise ValueError(f"y: expected shape [R, H] or [E, capacity, H], got {list(y.shape)}")
    hidden = y.shape[-1]
    check_tensor("dst_row", dst_row, dtypes=(torch.int64,), ndim=2)
    num_tokens, top_k = dst_row.shape
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=(num_tokens, top_k))
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(num_tokens, hidden), unit_last_stride=True)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, shape=(num_tokens, hidden), unit_last_stride=True)
    check_same_device(y=y, dst_row=dst_row, topk_weights=topk_weights, out=out, residual=residual)
    if num_tokens == 0 or hidden == 0:
        return out
    y_rows = y.view(-1, hidden)
    block, num_warps = pick_row_block(num_tokens, hidden)
    _weighted_gather_kernel[(num_tokens, cdiv(hidden, block))](
        y_rows,
        dst_row,
        topk_weights,
        residual,
        out,
        top_k,
        hidden,
        y_rows.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        HAS_WEIGHTS=topk_weights is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out
