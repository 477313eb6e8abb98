"""Dequantizing weight loads: 4-bit values packed two to a byte, expanded to a GEMM's B tile in
registers, so the weights stay packed in memory and are read once (decode is bound by that read).

Layout (:mod:`moe_kernels.mlp.packed`): ``weight [E, N, K/2] uint8``, byte ``j`` of a row holds
column ``2j`` in its low nibble and ``2j + 1`` in its high nibble; scales (and int4 zero points)
``[E, N, K/group]``. A B tile ``[BLOCK_K, BLOCK_N]`` is loaded as its ``[BLOCK_K / 2, BLOCK_N]``
bytes, contiguous along K as a dense tile is (one byte a weight per load would forgo vector loads
and run 4x slower than bf16, measured on an H100), and decoded in registers. A nibble ``u``
stands for

* ``INT4``: ``(u - zero) * scale``, ``zero`` 8 when symmetric (no zero tensor);
* ``MXFP4``: e2m1 ``u`` (sign, 2 exponent bits, 1 mantissa bit) times ``2^(scale - 127)``.

The decoding (inline PTX on a GPU) gives exact bf16 codes (``u - 8``, ``u``, the e2m1 value).
Decode tiles (at most :data:`_PRODUCT_SCALE_ROWS` A rows) multiply A's even and odd columns by
the low and high nibbles' codes, and where one scale group spans the K tile the group's scale and
zero point go on the tile's product; wider tiles scale each weight and interleave the nibbles back
into K order. :func:`dequantize_packed` writes the bf16 weights out in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import packed as packed_numbers

from ._common import cdiv, check_same_device, check_tensor, interpreting, next_power_of_2

#: ``PACKED`` constexpr values of the GEMM kernels
NOT_PACKED = 0
INT4 = 1
MXFP4 = 2

_INT4_ZERO = tl.constexpr(float(packed_numbers.INT4_SYMMETRIC_ZERO))
#: float32 bits of 2^-127 (e8m0's smallest scale, subnormal)
_MIN_E8M0_BITS = tl.constexpr(0x00400000)
#: what :func:`_e2m1_times_2_pow_minus_14`'s values are short of
_TWO_POW_14 = tl.constexpr(16384.0)
#: the most A rows whose tile product takes a K tile's scales (where one group spans the tile): up
#: to 32 rows the product is an mma.sync tile and a multiply per output is cheaper than one per
#: weight; from 64 rows it is a wgmma, which a fresh product per K tile would make wait for each
#: other, and per-weight scaling costs less than the rows it serves
_PRODUCT_SCALE_ROWS = tl.constexpr(32)
# e8m0 and float32 share the exponent bias, so a scale's bits are a float32 exponent field
assert packed_numbers.E8M0_BIAS == 127

# The decoders below take four packed bytes (one 32-bit register, ``pack=4``) and give their
# eight values as bf16 pairs: low nibbles in $0 (bytes 0, 1) and $1 (bytes 2, 3), high nibbles
# in $2 and $3. ``prmt`` first spreads bytes 0, 1 (2, 3) into the two 16-bit halves of t0 (t1),
# so that one 32-bit operation decodes two weights. About 1.5 (int4) and 2.75 (mxfp4) instructions
# a weight, where the same decoding in Triton operations took 8 and 14 (SASS of the fused GEMM's
# loop, tests/sm90_compile.py --loops): decode is bound by these, not by the packed read.
_SPREAD = """
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
"""
#: int4: a nibble n OR-ed into the mantissa of bf16 128.0 (0x4300) is 128 + n, exact; one fma
#: subtracts 128 + the code offset (bf16 bits 0xC300 | offset: -128 - offset for offsets < 16)
_INT4_ASM = (
    "{ .reg .b32 t0, t1, h0, h1, one, off;"
    + _SPREAD
    + """
    shr.u32 h0, t0, 4;
    shr.u32 h1, t1, 4;
    mov.b32 one, 0x3F803F80;
    mov.b32 off, OFFSET;
    lop3.b32 t0, t0, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 h0, h0, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 h1, h1, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 $0, t0, one, off;
    fma.rn.bf16x2 $1, t1, one, off;
    fma.rn.bf16x2 $2, h0, one, off;
    fma.rn.bf16x2 $3, h1, one, off;
}"""
)
#: mxfp4: e2m1's exponent and mantissa bits placed as bf16's low exponent bits and top mantissa
#: bit (shifted up by 6 from the low nibble, 2 from the high one), its sign as bf16's (by 12 or
#: 8; ``lop3`` 0xF8 is ``m | (s & mask)``), make e2m1 x 2^-126 (0.5 the subnormal 2^-127, as in
#: e2m1); one multiply by 2^126 (0x7E80; an fma with -0.0, which runs on SM80 too) gives the
#: value, exact
_MXFP4_ASM = (
    "{ .reg .b32 t0, t1, m, s, big, nz;"
    + _SPREAD
    + """
    mov.b32 big, 0x7E807E80;
    mov.b32 nz, 0x80008000;
"""
    + "".join(
        f"""
    and.b32 m, {src}, {bits};
    shl.b32 m, m, {value_shift};
    shl.b32 s, {src}, {sign_shift};
    lop3.b32 m, m, s, 0x80008000, 0xF8;
    fma.rn.bf16x2 {dst}, m, big, nz;"""
        for src, dst, bits, value_shift, sign_shift in (
            ("t0", "$0", "0x00070007", 6, 12),
            ("t1", "$1", "0x00070007", 6, 12),
            ("t0", "$2", "0x00700070", 2, 8),
            ("t1", "$3", "0x00700070", 2, 8),
        )
    )
    + "\n}"
)
_INT4_SYMMETRIC_PTX = tl.constexpr(_INT4_ASM.replace("OFFSET", "0xC308C308"))  # -136: 128 + the zero 8
_INT4_PTX = tl.constexpr(_INT4_ASM.replace("OFFSET", "0xC300C300"))  # -128
_MXFP4_PTX = tl.constexpr(_MXFP4_ASM)


@triton.jit
def load_weight_tile(
    w_ptrs, mask, k0, k_dim, col_ok, scale_ptr, zero_ptr, row_offs, stride_sk, group, a_dtype: tl.constexpr,
    PACKED: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPS: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The B tile ``[BLOCK_K, BLOCK_N]`` at ``w_ptrs`` as ``(w, w_odd, scale, zero)`` for
    :func:`tile_dot`.

    Dense and fp8 weights: ``w`` as stored (``w_odd`` the same), scale 1, zero 0. Packed 4-bit
    weights: ``w_ptrs [BLOCK_K / 2, BLOCK_N]`` point at the bytes of each column's row that hold
    the columns ``k`` from ``k0``, ``row_offs [BLOCK_N]`` are the offsets of the rows' first scale
    (and zero point) from ``scale_ptr`` (``zero_ptr``) and ``GROUPS`` the scale groups in a K tile;
    ``w`` and ``w_odd`` ``[BLOCK_K / 2, BLOCK_N]`` hold the tile's even and odd rows (the bytes'
    low and high nibbles). Where one group spans the tile (``GROUPS == 1``) and the A tile has at
    most :data:`_PRODUCT_SCALE_ROWS` rows, they hold the codes (:func:`_codes`) and ``scale``
    (int4 with zero points also ``zero``) ``[1, BLOCK_N]`` float32 wait for the tile's product:
    one multiply per output instead of one per weight. Otherwise they hold the weights' values
    (float32; mxfp4 on a GPU bf16, exact), scale 1 and zero 0."""
    scale = 1.0
    zero = 0.0
    if PACKED == 0:
        # float `other`: the interpreter cannot cast the int 0 to fp8
        w = tl.load(w_ptrs, mask=mask, other=0.0)
        w_odd = w
    else:
        # whole bytes, contiguous along K (vector loads)
        raw = tl.load(w_ptrs, mask=mask, other=0)
        w, w_odd = _codes(raw, PACKED, HAS_ZERO, (not INTERPRETED) and a_dtype == tl.bfloat16)
        # per-group values become floats per group, before they meet the weights (a constexpr
        # argument each: a value chosen by a conditional expression is not one); both rows of a
        # byte lie in one group (groups are even)
        if PACKED == 2:
            scale = _per_group(scale_ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, True, GROUPS, BLOCK_K // 2)
        else:
            scale = _per_group(scale_ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, False, GROUPS, BLOCK_K // 2)
            if HAS_ZERO:
                zero = _per_group(zero_ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, False, GROUPS,
                                  BLOCK_K // 2)  # fmt: skip
        if PACKED == 2 and (not INTERPRETED) and (GROUPS > 1 or BLOCK_M > _PRODUCT_SCALE_ROWS):
            # a power of two: exact in bf16 (subnormals included), one bf16x2 multiply a pair of
            # weights (the interpreter multiplies bf16 bits as numbers, triton 3.9: float32 there)
            scale = scale.to(tl.bfloat16)
            w = w * scale
            w_odd = w_odd * scale
            scale = 1.0
        elif GROUPS > 1 or BLOCK_M > _PRODUCT_SCALE_ROWS:
            w = (w.to(tl.float32) - zero) * scale
            w_odd = (w_odd.to(tl.float32) - zero) * scale
            scale = 1.0
            zero = 0.0
    return w, w_odd, scale, zero


@triton.jit
def tile_dot(acc, a, w, w_odd, scale, zero, PACKED: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPS: tl.constexpr,
             INTERPRETED: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``acc`` plus ``a [BLOCK_M, BLOCK_K]`` times the weights :func:`load_weight_tile` gave as
    ``(w, w_odd, scale, zero)`` (not fp8's block scales), in ``a``'s dtype. Codes waiting for
    their group's values get them on the tile's product, ``(a @ codes - rowsum(a) x zero) *
    scale``, as two products: A's even columns with ``w``, its odd ones with ``w_odd``."""
    w = w.to(a.dtype)
    w_odd = w_odd.to(a.dtype)
    if INTERPRETED:  # the interpreter's low-precision tl.dot is wrong (triton 3.9); upcasting is exact
        a = a.to(tl.float32)
        w = w.to(tl.float32)
        w_odd = w_odd.to(tl.float32)
    # (constexpr conditions written out: a jit helper's result is a compile-time constant on some
    # Triton versions only)
    if PACKED != 0 and a.shape[0] <= _PRODUCT_SCALE_ROWS:
        # A's columns split (8x fewer values than the weights' at decode), two products
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], a.shape[1] // 2, 2)))
        if GROUPS == 1:
            part = tl.dot(a_even, w, input_precision=INPUT_PRECISION)
            part = tl.dot(a_odd, w_odd, part, input_precision=INPUT_PRECISION)
            if HAS_ZERO:
                part -= tl.sum(a.to(tl.float32), axis=1)[:, None] * zero
            acc += part * scale
        else:
            acc = tl.dot(a_even, w, acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(a_odd, w_odd, acc, input_precision=INPUT_PRECISION)
    elif PACKED != 0:
        # a wgmma tile: splitting A would cost a pass through shared memory; the rows interleave
        acc = tl.dot(a, _interleave(w, w_odd), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _interleave(even, odd):
    """A tile's even and odd rows ``[BLOCK_K / 2, N]`` -> the tile ``[BLOCK_K, N]`` in K order."""
    return tl.reshape(tl.permute(tl.join(even, odd), (0, 2, 1)), (2 * even.shape[0], even.shape[1]))


@triton.jit
def _codes(raw, PACKED: tl.constexpr, HAS_ZERO: tl.constexpr, PTX: tl.constexpr):
    """Packed bytes ``[BLOCK_K / 2, BLOCK_N]`` -> the codes of their low and high nibbles (the
    tile's even and odd rows), bf16, exact: int4 ``n - 8`` (symmetric) or ``n`` (with zero
    points), mxfp4 the e2m1 value. ``PTX``: decoded by inline PTX (a GPU, bf16 activations); else
    by Triton operations (the interpreter runs those)."""
    if PTX:
        if PACKED == 2:
            low, high = tl.inline_asm_elementwise(
                _MXFP4_PTX, "=r,=r,=r,=r,r", [raw], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
        elif HAS_ZERO:
            low, high = tl.inline_asm_elementwise(
                _INT4_PTX, "=r,=r,=r,=r,r", [raw], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
        else:
            low, high = tl.inline_asm_elementwise(
                _INT4_SYMMETRIC_PTX, "=r,=r,=r,=r,r", [raw], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
    else:
        low = _portable_codes(raw & 0xF, PACKED, HAS_ZERO)
        high = _portable_codes(raw >> 4, PACKED, HAS_ZERO)
    return low, high


@triton.jit
def _portable_codes(nibble, PACKED: tl.constexpr, HAS_ZERO: tl.constexpr):
    """:func:`_codes` of nibbles in Triton operations."""
    if PACKED == 2:
        codes = (_e2m1_times_2_pow_minus_14(nibble).to(tl.float32) * _TWO_POW_14).to(tl.bfloat16)
    elif HAS_ZERO:
        codes = nibble.to(tl.float32).to(tl.bfloat16)
    else:
        codes = (nibble.to(tl.float32) - _INT4_ZERO).to(tl.bfloat16)
    return codes


@triton.jit
def _e2m1_times_2_pow_minus_14(nibble):
    """e2m1 nibbles (sign, 2 exponent bits, 1 mantissa bit) -> their values times 2^-14, float16:
    the three value bits placed as float16's low exponent bits and top mantissa bit. Both formats
    have subnormals where the exponent field is 0, so 0.5 becomes float16's subnormal 2^-15 and
    the others normals with exponent e - 15 = (e - 1) - 14. Integer operations only: no select."""
    bits = ((nibble & 7).to(tl.uint16) << 9) | ((nibble & 8).to(tl.uint16) << 12)
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def _e8m0_to_float(s):
    """e8m0 scales (a biased exponent) -> 2^(s - 127) in float32, as bits: the exponent field is s
    (s == 0 is the subnormal 2^-127)."""
    s = s.to(tl.uint32)
    return tl.where(s == 0, _MIN_E8M0_BITS, s << 23).to(tl.float32, bitcast=True)


@triton.jit
def _per_group(
    ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, E8M0: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The per-group values (scales, zero points) of the K tile from ``k0`` as float32: ``[1,
    BLOCK_N]`` when one group spans the tile, else ``GROUPS`` loads per column broadcast to
    ``[BLOCK_K, BLOCK_N]`` -- one load per group, not per element. ``E8M0``: the values are e8m0
    scales."""
    if GROUPS == 1:
        v = tl.load(ptr + row_offs[None, :] + (k0 // group) * stride_sk, mask=col_ok[None, :], other=0)
    else:
        g = k0 // group + tl.arange(0, GROUPS)
        g_ok = (g * group < k_dim)[:, None] & col_ok[None, :]
        v = tl.load(ptr + row_offs[None, :] + g.to(tl.int64)[:, None] * stride_sk, mask=g_ok, other=0)
    if E8M0:
        v = _e8m0_to_float(v)
    else:
        v = v.to(tl.float32)
    if GROUPS > 1:
        v = tl.reshape(tl.broadcast_to(v[:, None, :], (GROUPS, BLOCK_K // GROUPS, v.shape[1])), (BLOCK_K, v.shape[1]))
    return v


@triton.jit
def _dequantize_kernel(
    w_ptr, scale_ptr, zero_ptr, out_ptr, n_rows, k_dim, stride_se, stride_sn, stride_sk, group,
    PACKED: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPS: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_N, BLOCK_K]`` tile of expert ``program_id(2)``'s weight, dequantized through
    :func:`load_weight_tile` (as a wide GEMM tile: the values, scaled) and stored in bf16."""
    expert = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    k0 = tl.program_id(1) * BLOCK_K
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    bytes_per_row = k_dim // 2
    w_ptrs = w_ptr + (expert * n_rows + rows[None, :]) * bytes_per_row + byte_cols[:, None]
    mask = (byte_cols < bytes_per_row)[:, None] & row_ok[None, :]
    scale_offs = expert * stride_se + rows.to(tl.int64) * stride_sn
    w, w_odd, _, _ = load_weight_tile(w_ptrs, mask, k0, k_dim, row_ok, scale_ptr, zero_ptr, scale_offs, stride_sk,
                                      group, tl.bfloat16, PACKED, HAS_ZERO, GROUPS, INTERPRETED,
                                      2 * _PRODUCT_SCALE_ROWS, BLOCK_K)  # fmt: skip
    values = _interleave(w.to(tl.bfloat16), w_odd.to(tl.bfloat16))
    cols = k0 + tl.arange(0, BLOCK_K)
    out_ptrs = out_ptr + (expert * n_rows + rows[None, :]) * k_dim + cols[:, None]
    tl.store(out_ptrs, values, mask=(cols < k_dim)[:, None] & row_ok[None, :])


def dequantize_packed(w: torch.Tensor, w_scale: torch.Tensor, packed: PackedWeight, out: torch.Tensor) -> None:
    """``w [E, N, K/2] uint8`` with ``w_scale`` (and ``packed.zero``) -> ``out [E, N, K]`` bf16, the
    weights they stand for rounded to bf16, in one pass (the packed bytes read once, ``out``
    written once): what a bf16 GEMM takes where rows enough amortize the pass."""
    k = w.shape[2] * 2
    check_packed("w", w, w_scale, packed, k)
    check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(w.shape[0], w.shape[1], k))
    check_same_device(w=w, w_scale=w_scale, zero=packed.zero, out=out)
    if out.numel() == 0:
        return
    block_n, block_k = 64, min(128, max(16, next_power_of_2(k)))
    grid = (cdiv(w.shape[1], block_n), cdiv(k, block_k), w.shape[0])
    _dequantize_kernel[grid](
        w, w_scale, packed.zero, out, w.shape[1], k, *w_scale.stride(), packed.group,
        PACKED=packed_constant(packed.packing), HAS_ZERO=packed.zero is not None,
        GROUPS=groups_per_tile(packed.group, block_k), INTERPRETED=interpreting(), BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def groups_per_tile(group: int, block_k: int) -> int:
    """The ``GROUPS`` constexpr: scale groups in a K tile (1 when a group spans it); both are
    powers of two, so one divides the other."""
    if group % block_k and block_k % group:
        raise ValueError(f"block_k: {block_k} and the group size {group} must divide one another")
    return max(1, block_k // group)


#: the kernels' ``packing`` argument -> their ``PACKED`` constexpr
PACKINGS = {None: NOT_PACKED, "int4": INT4, "mxfp4": MXFP4}


def packed_constant(packing: str | None) -> int:
    if packing not in PACKINGS:
        raise ValueError(f"packing: expected one of {list(PACKINGS)}, got {packing!r}")
    return PACKINGS[packing]


@dataclass(frozen=True)
class PackedWeight:
    """How a packed B operand (two 4-bit values a byte, :mod:`.dequant`) is dequantized:
    ``packing`` ``"int4"`` or ``"mxfp4"``, one scale per row and ``group`` columns, and int4
    zero points ``[E, N, K/group] uint8`` (None: symmetric, zero 8)."""

    packing: str
    group: int
    zero: torch.Tensor | None = None


def check_packed(name: str, w: torch.Tensor, w_scale: object, packed: PackedWeight, k: int) -> None:
    """``w [E, N, K/2] uint8`` with ``w_scale [E, N, K/group]`` (int4: float32, mxfp4: uint8) and
    int4 zero points of the scales' shape, contiguous; ``ValueError``/``TypeError`` naming the tensor."""
    packed_constant(packed.packing)
    int4 = packed.packing == "int4"
    e, n = w.shape[0], w.shape[1]
    check_tensor(name, w, dtypes=(torch.uint8,), shape=(e, n, k // 2))
    if k % packed.group or packed.group % 2:
        raise ValueError(f"{name}: K = {k} is not a multiple of the (even) group size {packed.group}")
    shape = (e, n, k // packed.group)
    check_tensor(f"{name}_scale", w_scale, dtypes=(torch.float32 if int4 else torch.uint8,), shape=shape)
    if packed.zero is not None:
        if not int4:
            raise ValueError(f"{name}_zero: {packed.packing} has no zero points")
        check_tensor(f"{name}_zero", packed.zero, dtypes=(torch.uint8,), shape=shape)
