"""FP8 (e4m3) quantization for the MoE pipeline and a block-scaled fp8 grouped GEMM fallback.

Recipe (DeepSeek-V3 / DeepGEMM SM90): activations carry one fp32 scale per token and 128-wide
group of the hidden dim, weights one fp32 scale per 128x128 block; ``dequantized = q * scale``.
A group's scale is ``max(amax, EPS) / 448`` (optionally rounded up to a power of two, the UE8M0
scales SM100 DeepGEMM needs) and ``q = clamp(x / scale, -448, 448)`` rounded to nearest even.

Quantization is fused where the data already passes through a kernel:

* :func:`quantize_fp8_token_groups`: a plain cast, ``[M, K]`` or ``[E, M, K]``.
* :func:`scatter_rows_quant_fp8`: the permutation scatter (as ``permute.scatter_rows``), each
  token quantized once and written to its K destination rows.
* :func:`silu_and_mul_quant_fp8`: SiLU-and-mul (as ``activation.silu_and_mul``) in fp32, then
  quantized, so the GEMM2 input never exists in bf16.

All three write ``scale_out`` through its strides. DeepGEMM's SM90 fp8 grouped GEMMs want the
activation scales MN-major (token dim contiguous) with the column stride padded to 4 floats
(16-byte TMA alignment) and re-lay them out with an extra kernel launch otherwise; allocate
``scale_out`` with :func:`empty_group_scales` ``(..., mn_major=True)`` for that path and the
DeepGEMM call receives it untouched. The Triton GEMMs here read either layout.

:func:`grouped_gemm_fp8_contiguous` / :func:`grouped_gemm_fp8_masked` mirror
``grouped_gemm.py``'s two layouts for GPUs without DeepGEMM: per 128-wide K block the fp8 tile
product is accumulated in fp32 times ``a_scale[row, kb] * b_scale[e, nb, kb]``.

Launch wrappers never synchronise with the host (CUDA-graph capturable). The plain-torch helpers
at the end (weight quantization, dequantization) are for setup and tests, not the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_same_device, check_tensor, interpreting, pick_row_block

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Width of a scale block along K (and N for weights): fixed by the DeepSeek-V3 checkpoints and by
# DeepGEMM's SM90 kernels ("Only support per-128-channel FP8 scaling").
SCALE_BLOCK = 128
# Floor on a group's amax, so an all-zero group gets a finite scale (and q = 0). The value of
# DeepGEMM's and DeepEP's reference casts, so scales agree with theirs for every non-tiny group.
EPS = 1e-4
# DeepGEMM pads the MN extent of scale tensors to 16 bytes (TMA), i.e. to 4 floats.
_TMA_ALIGN_FLOATS = 4

_FP8_MAX = tl.constexpr(FP8_MAX)
_EPS = tl.constexpr(EPS)
_SCALE_BLOCK = tl.constexpr(SCALE_BLOCK)

# Defaults for the fp8 GEMM on H100: BLOCK_K is one scale block; 64-row tiles keep padding low at
# decode sizes; 64 + 128 rows of 128 fp8 bytes per stage leave room for 3 stages.
BLOCK_M = 64
BLOCK_N = 128
BLOCK_K = 128
NUM_STAGES = 3


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _ceil_pow2(s):
    """Smallest power of two >= ``s`` for positive normal fp32 ``s`` (exact, via the bits)."""
    bits = s.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (tl.minimum(exp, 254) << 23).to(tl.float32, bitcast=True)


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
def _quantize_groups(vals, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr):
    """``vals [G, GROUP]`` fp32 -> (values on the e4m3 grid as fp32 ``[G, GROUP]``, scales ``[G]``).

    IEEE divisions (div_rn, not Triton's approximate ``/``) make the result bit-identical to
    ``x / (amax / 448)`` computed by torch.
    """
    amax = tl.max(tl.abs(vals), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, _EPS), _FP8_MAX)
    if UE8M0:
        scale = _ceil_pow2(scale)
    q = tl.math.div_rn(vals, scale[:, None])
    # amax / (amax / 448) can land one ulp above 448, which e4m3fn cannot hold.
    q = tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)
    if EXACT_CAST:
        q = _round_to_e4m3(q)
    return q, scale


@triton.jit
def _scale_row_offset(row, rows_per_group, stride_se, stride_sm):
    """Offset of ``row``'s scales in a ``[R, S]`` or ``[E, M, S]`` tensor of arbitrary strides."""
    group = row // rows_per_group
    return group * stride_se + (row - group * rows_per_group) * stride_sm


# ----------------------------------------------------------------------------- quantization kernels


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    n_cols,
    n_groups,
    stride_xm,
    scale_rows_per_group,
    stride_se,
    stride_sm,
    stride_sk,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    UE8M0: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1).to(tl.int64) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    col_ok = cols < n_cols
    vals = tl.load(x_ptr + row * stride_xm + cols, mask=col_ok, other=0).to(tl.float32)
    q, scale = _quantize_groups(vals, UE8M0, EXACT_CAST)
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=col_ok)
    s_row = s_ptr + _scale_row_offset(row, scale_rows_per_group, stride_se, stride_sm)
    tl.store(s_row + groups * stride_sk, scale, mask=groups < n_groups)


@triton.jit
def _scatter_quant_kernel(
    x_ptr,
    dst_ptr,
    q_ptr,
    s_ptr,
    top_k,
    n_cols,
    n_groups,
    stride_xm,
    scale_rows_per_group,
    stride_se,
    stride_sm,
    stride_sk,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    UE8M0: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    # One program per (token, group block): the token is read and quantized once, written K times.
    tok = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1).to(tl.int64) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    vals = tl.load(x_ptr + tok * stride_xm + cols, mask=cols < n_cols, other=0).to(tl.float32)
    q, scale = _quantize_groups(vals, UE8M0, EXACT_CAST)
    q = q.to(q_ptr.dtype.element_ty)
    for k in range(top_k):
        row = tl.load(dst_ptr + tok * top_k + k)
        # Scalar condition folded into the bounds (a scalar-bool & vector mask trips the triton
        # 3.9 interpreter).
        tl.store(q_ptr + row * n_cols + cols, q, mask=cols < tl.where(row >= 0, n_cols, 0))
        s_row = s_ptr + _scale_row_offset(row, scale_rows_per_group, stride_se, stride_sm)
        tl.store(s_row + groups * stride_sk, scale, mask=groups < tl.where(row >= 0, n_groups, 0))


@triton.jit
def _silu_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    row_info_ptr,
    rows_per_group,
    n_cols,
    n_groups,
    stride_se,
    stride_sm,
    stride_sk,
    SKIP_BY_LAYOUT: tl.constexpr,
    SKIP_BY_COUNTS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    UE8M0: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if SKIP_BY_LAYOUT:
        if tl.load(row_info_ptr + row) < 0:
            return
    if SKIP_BY_COUNTS:
        if row % rows_per_group >= tl.load(row_info_ptr + row // rows_per_group):
            return
    groups = tl.program_id(1).to(tl.int64) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    col_ok = cols < n_cols
    x_row = x_ptr + row * (2 * n_cols)
    gate = tl.load(x_row + cols, mask=col_ok, other=0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=col_ok, other=0).to(tl.float32)
    q, scale = _quantize_groups(gate * tl.sigmoid(gate) * up, UE8M0, EXACT_CAST)
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=col_ok)
    s_row = s_ptr + _scale_row_offset(row, rows_per_group, stride_se, stride_sm)
    tl.store(s_row + groups * stride_sk, scale, mask=groups < n_groups)


# ----------------------------------------------------------------------------- quantization wrappers


def _check_group(group: int) -> None:
    if group < 1 or group & (group - 1):
        raise ValueError(f"group: expected a power of two, got {group}")


def _check_scale_out(scale_out: object, lead_shape: Sequence[int], n_groups: int) -> torch.Tensor:
    """``scale_out [*lead_shape, n_groups]`` float32, any strides (row-major or MN-major)."""
    shape = (*lead_shape, n_groups)
    return check_tensor("scale_out", scale_out, dtypes=(torch.float32,), shape=shape, contiguous=False)


def _scale_strides(scale_out: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows per leading group, group stride, row stride, column stride) of ``[R, S]``/``[E, M, S]``."""
    if scale_out.dim() == 3:
        return scale_out.shape[1], scale_out.stride(0), scale_out.stride(1), scale_out.stride(2)
    # A 2-D tensor is one group holding every row.
    return max(scale_out.shape[0], 1), 0, scale_out.stride(0), scale_out.stride(1)


def _row_launch(num_rows: int, n_cols: int, group: int) -> tuple[int, int, int]:
    """(groups per program, grid columns, warps): a few groups per program, as in pick_row_block."""
    block, _ = pick_row_block(num_rows, n_cols)
    groups_per_prog = max(1, block // group)
    n_groups = triton.cdiv(n_cols, group)
    num_warps = max(1, min(4, groups_per_prog * group // 256))
    return groups_per_prog, triton.cdiv(n_groups, groups_per_prog), num_warps


def empty_group_scales(
    shape: Sequence[int],
    *,
    group: int = SCALE_BLOCK,
    mn_major: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uninitialised fp32 scale tensor for fp8 data of ``shape`` (``[M, K]`` or ``[E, M, K]``).

    Returns ``[M, S]`` / ``[E, M, S]`` with ``S = ceil(K / group)``. With ``mn_major`` the token
    dim is contiguous and padded to ``align(M, 4)``: strides ``(1, align(M, 4))`` or
    ``(align(M, 4) * S, 1, align(M, 4))``. That is the layout DeepGEMM's SM90 fp8 GEMMs read
    directly (``get_mn_major_tma_aligned_tensor`` returns such a tensor as is); the default
    row-major layout costs DeepGEMM a transpose launch per call. DeepEP's
    ``use_tma_aligned_col_major_sf=True`` dispatch returns the same 2-D layout.
    """
    _check_group(group)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape: expected [M, K] or [E, M, K], got {list(shape)}")
    *lead, k = (int(d) for d in shape)
    n_groups = triton.cdiv(k, group)
    if not mn_major:
        return torch.empty(*lead, n_groups, dtype=torch.float32, device=device)
    rows = lead[-1]
    pitch = triton.cdiv(rows, _TMA_ALIGN_FLOATS) * _TMA_ALIGN_FLOATS
    if len(lead) == 1:
        return torch.empty_strided((rows, n_groups), (1, pitch), dtype=torch.float32, device=device)
    return torch.empty_strided(
        (lead[0], rows, n_groups), (pitch * n_groups, 1, pitch), dtype=torch.float32, device=device
    )


def quantize_fp8_token_groups(
    x: torch.Tensor,
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    *,
    group: int = SCALE_BLOCK,
    ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group fp8 cast: ``q_out = x / scale``, one scale per row and ``group`` columns.

    Args:
        x: ``[M, K]`` (unit stride along K) or ``[E, M, K]`` (contiguous), bf16/fp16/fp32.
        q_out: same shape as ``x``, float8_e4m3fn, contiguous.
        scale_out: ``[..., ceil(K / group)]`` float32, any strides (see :func:`empty_group_scales`).
        group: columns per scale, a power of two (128 for DeepGEMM and the GEMMs here).
        ue8m0: round every scale up to a power of two (SM100 DeepGEMM truncates scales to their
            exponent byte, so non-power-of-two scales would be silently wrong there).

    Returns:
        ``(q_out, scale_out)``.
    """
    _check_group(group)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, contiguous=False)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected shape [M, K] or [E, M, K], got {list(x.shape)}")
    # Rows are addressed as row * stride(-2): a 2-D x may be a row slice, a 3-D one must be dense.
    if x.dim() == 3:
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
    elif x.stride(1) != 1 and x.numel():
        raise ValueError(f"x: expected unit stride along K, got strides {x.stride()}")
    n_cols = x.shape[-1]
    n_groups = triton.cdiv(n_cols, group)
    check_tensor("q_out", q_out, dtypes=(FP8_DTYPE,), shape=tuple(x.shape))
    _check_scale_out(scale_out, x.shape[:-1], n_groups)
    check_same_device(x=x, q_out=q_out, scale_out=scale_out)
    num_rows = x.numel() // max(n_cols, 1)
    if num_rows == 0 or n_cols == 0:
        return q_out, scale_out
    groups_per_prog, grid_cols, num_warps = _row_launch(num_rows, n_cols, group)
    _quantize_kernel[(num_rows, grid_cols)](
        x,
        q_out,
        scale_out,
        n_cols,
        n_groups,
        x.stride(-2),
        *_scale_strides(scale_out),
        GROUP=group,
        GROUPS_PER_PROG=groups_per_prog,
        UE8M0=ue8m0,
        EXACT_CAST=interpreting(),
        num_warps=num_warps,
    )
    return q_out, scale_out


def scatter_rows_quant_fp8(
    x: torch.Tensor,
    dst_row: torch.Tensor,
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    *,
    group: int = SCALE_BLOCK,
    ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``permute.scatter_rows`` with the fp8 cast fused: quantize ``x[t]`` once, write it to
    ``q_out[dst_row[t, k]]`` and its scales to ``scale_out[dst_row[t, k]]`` for every ``k``.

    Args:
        x: ``[T, H]`` bf16/fp16/fp32, unit stride along H.
        dst_row: ``[T, K] int64`` contiguous (a layout's ``dst_row``), ``-1`` = skip. Rows must lie
            inside ``q_out``.
        q_out: ``[R, H]`` (contiguous layout) or ``[E, capacity, H]`` (masked layout),
            float8_e4m3fn, contiguous. Rows no slot maps to keep their contents.
        scale_out: ``[R, ceil(H / group)]`` or ``[E, capacity, ceil(H / group)]`` float32, any
            strides (see :func:`empty_group_scales`); untouched where ``q_out`` is.
        group, ue8m0: as in :func:`quantize_fp8_token_groups`.

    Returns:
        ``(q_out, scale_out)``.
    """
    _check_group(group)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False)
    if x.stride(1) != 1 and x.numel():
        raise ValueError(f"x: expected unit stride along the hidden dim, got strides {x.stride()}")
    num_tokens, hidden = x.shape
    check_tensor("dst_row", dst_row, dtypes=(torch.int64,), shape=(num_tokens, None))
    check_tensor("q_out", q_out, dtypes=(FP8_DTYPE,))
    if q_out.dim() not in (2, 3) or q_out.shape[-1] != hidden:
        raise ValueError(f"q_out: expected shape [R, {hidden}] or [E, capacity, {hidden}], got {list(q_out.shape)}")
    n_groups = triton.cdiv(hidden, group)
    _check_scale_out(scale_out, q_out.shape[:-1], n_groups)
    check_same_device(x=x, dst_row=dst_row, q_out=q_out, scale_out=scale_out)
    if num_tokens == 0 or hidden == 0:
        return q_out, scale_out
    groups_per_prog, grid_cols, num_warps = _row_launch(num_tokens, hidden, group)
    _scatter_quant_kernel[(num_tokens, grid_cols)](
        x,
        dst_row,
        q_out,
        scale_out,
        dst_row.shape[1],
        hidden,
        n_groups,
        x.stride(0),
        *_scale_strides(scale_out),
        GROUP=group,
        GROUPS_PER_PROG=groups_per_prog,
        UE8M0=ue8m0,
        EXACT_CAST=interpreting(),
        num_warps=num_warps,
    )
    return q_out, scale_out


def silu_and_mul_quant_fp8(
    gate_up: torch.Tensor,
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    *,
    group: int = SCALE_BLOCK,
    ue8m0: bool = False,
    grouped_layout: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` in fp32, quantized per ``group`` columns.

    Bit-identical to ``activation.silu_and_mul`` into an fp32 buffer followed by
    :func:`quantize_fp8_token_groups`, without the intermediate.

    Args:
        gate_up: ``[R, 2I]`` or ``[E, M, 2I]`` bf16/fp16/fp32, contiguous; gate first, then up.
        q_out: ``[..., I]`` float8_e4m3fn, contiguous.
        scale_out: ``[..., ceil(I / group)]`` float32, any strides (see :func:`empty_group_scales`).
        group, ue8m0: as in :func:`quantize_fp8_token_groups`.
        grouped_layout: optional ``[R] int32`` (2-D ``gate_up``): rows whose entry is ``-1`` are skipped.
        counts: optional ``[E] int32`` (3-D ``gate_up``): rows ``m >= counts[e]`` are skipped.

    Skipped rows of ``q_out`` and ``scale_out`` are left untouched and never read from ``gate_up``.

    Returns:
        ``(q_out, scale_out)``.
    """
    _check_group(group)
    check_tensor("gate_up", gate_up, dtypes=FLOAT_DTYPES)
    if gate_up.dim() not in (2, 3) or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up: expected shape [R, 2I] or [E, M, 2I], got {list(gate_up.shape)}")
    inter = gate_up.shape[-1] // 2
    n_groups = triton.cdiv(inter, group)
    check_tensor("q_out", q_out, dtypes=(FP8_DTYPE,), shape=(*gate_up.shape[:-1], inter))
    _check_scale_out(scale_out, gate_up.shape[:-1], n_groups)
    if grouped_layout is not None and counts is not None:
        raise ValueError("pass at most one of grouped_layout and counts")
    if grouped_layout is not None:
        if gate_up.dim() != 2:
            raise ValueError(f"gate_up: grouped_layout needs a 2-D gate_up [R, 2I], got {list(gate_up.shape)}")
        check_tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), shape=(gate_up.shape[0],))
    if counts is not None:
        if gate_up.dim() != 3:
            raise ValueError(f"gate_up: counts needs a 3-D gate_up [E, M, 2I], got {list(gate_up.shape)}")
        check_tensor("counts", counts, dtypes=(torch.int32,), shape=(gate_up.shape[0],))
    check_same_device(gate_up=gate_up, q_out=q_out, scale_out=scale_out, grouped_layout=grouped_layout, counts=counts)
    num_rows = gate_up.numel() // max(gate_up.shape[-1], 1)
    if num_rows == 0 or inter == 0:
        return q_out, scale_out
    scale_rows_per_group, stride_se, stride_sm, stride_sk = _scale_strides(scale_out)
    groups_per_prog, grid_cols, num_warps = _row_launch(num_rows, inter, group)
    _silu_quant_kernel[(num_rows, grid_cols)](
        gate_up,
        q_out,
        scale_out,
        grouped_layout if grouped_layout is not None else counts,
        # One row count serves the counts lookup and the scale addressing: M for 3-D tensors; for
        # 2-D ones (no counts) all rows form one group.
        scale_rows_per_group,
        inter,
        n_groups,
        stride_se,
        stride_sm,
        stride_sk,
        SKIP_BY_LAYOUT=grouped_layout is not None,
        SKIP_BY_COUNTS=counts is not None,
        GROUP=group,
        GROUPS_PER_PROG=groups_per_prog,
        UE8M0=ue8m0,
        EXACT_CAST=interpreting(),
        num_warps=num_warps,
    )
    return q_out, scale_out


# ----------------------------------------------------------------------------- fp8 grouped GEMM


@triton.jit
def _grouped_gemm_fp8_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    out_ptr,
    group_ptr,
    num_rows,
    rows_per_group,
    n_out,
    k_dim,
    stride_be,
    stride_bn,
    stride_ase,
    stride_asm,
    stride_ask,
    stride_bse,
    stride_bsn,
    stride_bsk,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
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
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    a_scale_ptrs = a_scale_ptr + scale_rows
    # BLOCK_N divides SCALE_BLOCK, so the whole N tile shares one weight-scale row.
    b_scale_row = b_scale_ptr + expert.to(tl.int64) * stride_bse + (pid_n * BLOCK_N // _SCALE_BLOCK) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = offs_k < k_dim - k0
        # fp8 loads take a float `other` (the interpreter cannot cast the int 0 to fp8). Zeroed
        # padding rows and K tails contribute nothing even if the memory behind them holds NaNs.
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # BLOCK_K divides SCALE_BLOCK, so the K tile lies in one scale block.
        kb = k0 // _SCALE_BLOCK
        a_scale = tl.load(a_scale_ptrs + kb * stride_ask, mask=row_ok, other=0.0)
        b_scale = tl.load(b_scale_row + kb * stride_bsk)
        if UPCAST:
            # The interpreter's low-precision tl.dot is wrong (triton 3.9); fp8 -> fp32 is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            partial = tl.dot(a, b, input_precision="ieee")
        else:
            partial = tl.dot(a, b)
        # A fresh partial per K tile: Hopper's fp8 tensor-core accumulation is not full fp32, so
        # it is promoted into the fp32 accumulator at least once per scale block (as DeepGEMM).
        acc += partial * (a_scale[:, None] * b_scale)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    out_ptrs = out_ptr + rows[:, None] * n_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check_fp8_weights(a: torch.Tensor, b: object, b_scale: object) -> int:
    """Validate ``b [E, N, K]`` fp8 and ``b_scale [E, ceil(N/128), ceil(K/128)]``; return N."""
    check_tensor("b", b, dtypes=(FP8_DTYPE,), ndim=3)
    if b.shape[2] != a.shape[-1]:
        raise ValueError(f"b: expected K = {a.shape[-1]} (a's last dim), got shape {list(b.shape)}")
    num_experts, n_out, k_dim = b.shape
    scale_shape = (num_experts, triton.cdiv(n_out, SCALE_BLOCK), triton.cdiv(k_dim, SCALE_BLOCK))
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), shape=scale_shape, contiguous=False)
    return n_out


def _check_tiles(block_n: int, block_k: int) -> None:
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 16 or SCALE_BLOCK % value:
            raise ValueError(f"{name}: expected a divisor of {SCALE_BLOCK} that is >= 16, got {value}")


def _launch_fp8(
    a: torch.Tensor,
    a_scale_strides: tuple[int, int, int],
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out: torch.Tensor,
    group: torch.Tensor,
    *,
    masked: bool,
    num_row_tiles: int,
    rows_per_group: int,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
) -> None:
    n_out, k_dim = b.shape[1], b.shape[2]
    if num_row_tiles == 0 or n_out == 0:
        return
    _grouped_gemm_fp8_kernel[(num_row_tiles, triton.cdiv(n_out, block_n))](
        a,
        a_scale,
        b,
        b_scale,
        out,
        group,
        a.numel() // max(k_dim, 1),
        rows_per_group,
        n_out,
        k_dim,
        b.stride(0),
        b.stride(1),
        *a_scale_strides,
        *b_scale.stride(),
        MASKED=masked,
        UPCAST=interpreting(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def grouped_gemm_fp8_contiguous(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    grouped_layout: torch.Tensor,
    out: torch.Tensor,
    *,
    alignment: int | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = 4,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Block-scaled fp8 contiguous-layout grouped GEMM: ``out[r] = deq(a)[r] @ deq(b[e]).T``
    with ``e = grouped_layout[r]`` (the same contract as ``grouped_gemm.grouped_gemm_contiguous``).

    Caller contract: every expert segment starts on a multiple of ``block_m``. Tiles whose first
    row is ``-1`` are skipped; ``-1`` rows inside a tile are neither read nor written.

    Args:
        a: ``[R, K]`` float8_e4m3fn, contiguous.
        a_scale: ``[R, ceil(K/128)]`` float32 per-token-group scales, any strides (row-major or
            the MN-major layout of :func:`empty_group_scales`).
        b: ``[E, N, K]`` float8_e4m3fn, contiguous.
        b_scale: ``[E, ceil(N/128), ceil(K/128)]`` float32 block scales, any strides.
        grouped_layout: ``[R] int32``, expert of each row, ``-1`` = skip.
        out: ``[R, N]`` bf16/fp16/fp32, contiguous.
        alignment: the layout's alignment, if known; checked to be a multiple of ``block_m``.
        block_m, block_n, block_k, num_warps, num_stages: Triton tiling; ``block_n`` and
            ``block_k`` must divide 128 so a tile lies in one scale block.

    Returns:
        ``out``.
    """
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=2)
    num_rows, k_dim = a.shape
    scale_shape = (num_rows, triton.cdiv(k_dim, SCALE_BLOCK))
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=scale_shape, contiguous=False)
    n_out = _check_fp8_weights(a, b, b_scale)
    check_tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), shape=(num_rows,))
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(num_rows, n_out))
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, grouped_layout=grouped_layout, out=out)
    _check_tiles(block_n, block_k)
    if alignment is not None and alignment % block_m:
        raise ValueError(f"alignment: expected a multiple of block_m = {block_m}, got {alignment}")
    _launch_fp8(
        a,
        (0, a_scale.stride(0), a_scale.stride(1)),
        a_scale,
        b,
        b_scale,
        out,
        grouped_layout,
        masked=False,
        num_row_tiles=triton.cdiv(num_rows, block_m),
        rows_per_group=num_rows,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def grouped_gemm_fp8_masked(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    counts: torch.Tensor,
    out: torch.Tensor,
    *,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = 4,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Block-scaled fp8 masked-layout grouped GEMM: ``out[e, m] = deq(a)[e, m] @ deq(b[e]).T``
    for ``m < counts[e]``; other rows are neither computed nor written (counts above M act as M).

    Args:
        a: ``[E, M, K]`` float8_e4m3fn, contiguous.
        a_scale: ``[E, M, ceil(K/128)]`` float32, any strides (row-major or MN-major).
        b: ``[E, N, K]`` float8_e4m3fn, contiguous.
        b_scale: ``[E, ceil(N/128), ceil(K/128)]`` float32, any strides.
        counts: ``[E] int32`` valid rows per expert.
        out: ``[E, M, N]`` bf16/fp16/fp32, contiguous.
        block_m, block_n, block_k, num_warps, num_stages: as in :func:`grouped_gemm_fp8_contiguous`.

    Returns:
        ``out``.
    """
    check_tensor("a", a, dtypes=(FP8_DTYPE,), ndim=3)
    num_experts, rows_per_group, k_dim = a.shape
    scale_shape = (num_experts, rows_per_group, triton.cdiv(k_dim, SCALE_BLOCK))
    check_tensor("a_scale", a_scale, dtypes=(torch.float32,), shape=scale_shape, contiguous=False)
    n_out = _check_fp8_weights(a, b, b_scale)
    if b.shape[0] != num_experts:
        raise ValueError(f"b: expected E = {num_experts} (a's first dim), got shape {list(b.shape)}")
    check_tensor("counts", counts, dtypes=(torch.int32,), shape=(num_experts,))
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(num_experts, rows_per_group, n_out))
    check_same_device(a=a, a_scale=a_scale, b=b, b_scale=b_scale, counts=counts, out=out)
    _check_tiles(block_n, block_k)
    _launch_fp8(
        a,
        a_scale.stride(),
        a_scale,
        b,
        b_scale,
        out,
        counts,
        masked=True,
        num_row_tiles=num_experts * triton.cdiv(rows_per_group, block_m),
        rows_per_group=rows_per_group,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# ----------------------------------------------------------------------------- plain-torch helpers


def _ceil_pow2_torch(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (s > 0): frexp gives s = m * 2^e with m in [0.5, 1)."""
    mantissa, exponent = torch.frexp(s)
    return torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent))


def quantize_fp8_blocks(
    w: torch.Tensor,
    block: tuple[int, int] = (SCALE_BLOCK, SCALE_BLOCK),
    *,
    ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise fp8 quantization of weights (setup time, plain torch).

    Args:
        w: ``[..., N, K]`` (e.g. ``[E, N, K]``) bf16/fp16/fp32.
        block: ``(rows, cols)`` of one scale block.
        ue8m0: round scales up to powers of two.

    Returns:
        ``(q, scale)``: ``q [..., N, K]`` float8_e4m3fn and ``scale [..., ceil(N/bn), ceil(K/bk)]``
        float32 with ``w ~= q * scale`` blockwise: the layout DeepSeek-V3 checkpoints store as
        ``weight_scale_inv`` and DeepGEMM takes as B scales.
    """
    check_tensor("w", w, dtypes=FLOAT_DTYPES, contiguous=False)
    if w.dim() < 2:
        raise ValueError(f"w: expected shape [..., N, K], got {list(w.shape)}")
    block_n, block_k = block
    *lead, n_rows, n_cols = w.shape
    nb, kb = triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_k)
    padded = torch.zeros(*lead, nb * block_n, kb * block_k, dtype=torch.float32, device=w.device)
    padded[..., :n_rows, :n_cols] = w
    tiles = padded.view(*lead, nb, block_n, kb, block_k)
    # In float64 then rounded: the correctly rounded fp32 quotient, as the kernels' div_rn gives
    # (CUDA torch turns division by a Python scalar into a reciprocal multiply).
    scale = (tiles.abs().amax(dim=(-3, -1)).clamp_min(EPS).double() / FP8_MAX).float()
    if ue8m0:
        scale = _ceil_pow2_torch(scale)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(padded.shape)[..., :n_rows, :n_cols].contiguous(), scale


def dequantize_fp8_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (SCALE_BLOCK, SCALE_BLOCK)
) -> torch.Tensor:
    """``q [..., N, K]`` fp8 times its block scales ``[..., ceil(N/bn), ceil(K/bk)]``, as float32."""
    check_tensor("q", q, dtypes=(FP8_DTYPE,), contiguous=False)
    block_n, block_k = block
    *lead, n_rows, n_cols = q.shape
    want = (*lead, triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_k))
    check_tensor("scale", scale, dtypes=(torch.float32,), shape=want, contiguous=False)
    full = scale.repeat_interleave(block_n, dim=-2).repeat_interleave(block_k, dim=-1)
    return q.float() * full[..., :n_rows, :n_cols]


def dequantize_fp8_token_groups(q: torch.Tensor, scale: torch.Tensor, group: int = SCALE_BLOCK) -> torch.Tensor:
    """``q [..., K]`` fp8 times its per-group scales ``[..., ceil(K/group)]`` (any strides), as float32."""
    check_tensor("q", q, dtypes=(FP8_DTYPE,), contiguous=False)
    n_cols = q.shape[-1]
    want = (*q.shape[:-1], triton.cdiv(n_cols, group))
    check_tensor("scale", scale, dtypes=(torch.float32,), shape=want, contiguous=False)
    return q.float() * scale.repeat_interleave(group, dim=-1)[..., :n_cols]
