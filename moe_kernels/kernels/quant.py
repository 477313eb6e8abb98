"""FP8 (e4m3) quantization inside the Triton kernels: the device functions every fused
quantizing kernel shares.

Recipe (:mod:`moe_kernels.mlp.fp8`): one float32 scale ``max(amax, EPS) / 448`` per row and
group of columns, ``q = clamp(x / scale, -448, 448)`` rounded to nearest even. Quantization is
fused where the data already passes through a kernel -- the permutation scatter
(:func:`moe_kernels.kernels.permute.scatter_rows`), the activation between the GEMMs
(:func:`moe_kernels.kernels.activation.activate`) -- so a quantized copy is never a pass of its
own; :func:`quantize_groups` is the one body they share. Scales are written through their
strides: DeepGEMM's SM90 fp8 GEMMs want them MN-major (:mod:`moe_kernels.mlp.act_quant`), the
Triton GEMMs read any layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import fp8

from ._common import cdiv, check_tensor

_FP8_MAX = tl.constexpr(fp8.FP8_MAX)
_EPS = tl.constexpr(fp8.EPS)


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 ``|y| <= 448`` to the nearest e4m3 value (ties to even), staying in fp32.

    The CPU interpreter's fp32 -> fp8 cast rounds half away from zero, mishandles mantissa
    carries and flushes subnormals (triton 3.9); after this rounding the cast only has to copy
    bits, which it does exactly. GPUs convert correctly (cvt.rn.satfinite) and skip it.
    """
    bits = y.to(tl.int32, bitcast=True)
    # e4m3 keeps 3 mantissa bits, so the spacing is 2^(exponent - 3); below the smallest normal
    # 2^-6 (biased fp32 exponent 121) the subnormal spacing 2^-9 applies.
    ulp_exp = tl.maximum((bits >> 23) & 0xFF, 121) - 3
    ulp = (ulp_exp << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((254 - ulp_exp) << 23).to(tl.float32, bitcast=True)
    # Adding and subtracting 1.5 * 2^23 rounds a value below 2^22 to an integer, ties to even.
    rounded = ((tl.abs(y) * inv_ulp + 12582912.0) - 12582912.0) * ulp
    # OR-ing the sign back keeps -0.0 and tiny negatives as -0, like the hardware cast.
    return (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def scale_row_offset(row, rows_per_group, stride_se, stride_sm):
    """Offset of ``row``'s scales in a ``[R, S]`` or ``[E, M, S]`` tensor of arbitrary strides."""
    group = row // rows_per_group
    return group * stride_se + (row - group * rows_per_group) * stride_sm


@triton.jit
def quantize_groups(vals, EXACT_CAST: tl.constexpr):
    """``vals [G, GROUP]`` fp32 -> (values on the e4m3 grid as fp32 ``[G, GROUP]``, scales ``[G]``).

    IEEE divisions (div_rn, not Triton's approximate ``/``) make the result bit-identical to
    ``x / (amax / 448)`` computed by torch (:func:`moe_kernels.mlp.fp8.quantize_groups`).
    """
    amax = tl.max(tl.abs(vals), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, _EPS), _FP8_MAX)
    q = tl.math.div_rn(vals, scale[:, None])
    # amax / (amax / 448) can land one ulp above 448, which e4m3fn cannot hold.
    q = tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)
    if EXACT_CAST:
        q = _round_to_e4m3(q)
    return q, scale


def check_group(group: int) -> None:
    if group < 1 or group & (group - 1):
        raise ValueError(f"group: expected a power of two, got {group}")


def check_scale_out(scale_out: object, lead_shape: Sequence[int], n_groups: int) -> torch.Tensor:
    """``scale_out [*lead_shape, n_groups]`` float32, any strides (row-major or MN-major)."""
    shape = (*lead_shape, n_groups)
    return check_tensor("scale_out", scale_out, dtypes=(torch.float32,), shape=shape, contiguous=False)


def scale_strides(scale_out: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(rows per leading group, group stride, row stride, column stride) of ``[R, S]``/``[E, M, S]``
    (zeros without scales)."""
    if scale_out is None:
        return 1, 0, 0, 0
    if scale_out.dim() == 3:
        return scale_out.shape[1], scale_out.stride(0), scale_out.stride(1), scale_out.stride(2)
    # A 2-D tensor is one group holding every row.
    return max(scale_out.shape[0], 1), 0, scale_out.stride(0), scale_out.stride(1)


def row_tiles(num_rows: int, n_cols: int, block: int, group: int | None) -> tuple[int, int, int]:
    """``(GROUP, G, grid columns)``: a program covers ``G`` column groups of ``GROUP`` (one
    scale each when quantizing: ``GROUP = group``; otherwise one group of ``block`` columns)."""
    if group is None:
        return block, 1, cdiv(n_cols, block)
    per_program = max(1, block // group)
    return group, per_program, cdiv(cdiv(n_cols, group), per_program)
