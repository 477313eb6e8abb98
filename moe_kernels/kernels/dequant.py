"""Dequantizing weight loads: 4-bit values packed two to a byte, expanded to a GEMM's B tile in
registers, so the weights stay packed in memory and are read once (decode is bound by that read).

Layout (:mod:`moe_kernels.mlp.packed`): ``weight [E, N, K/2] uint8``, byte ``j`` of a row holds
column ``2j`` in its low nibble and ``2j + 1`` in its high nibble; scales (and int4 zero points)
``[E, N, K/group]``. A B tile ``[BLOCK_K, BLOCK_N]`` is loaded as its ``[BLOCK_K / 2, BLOCK_N]``
bytes, contiguous along K as a dense tile is (one byte a weight per load would forgo vector loads
and run 4x slower than bf16, measured on an H100), split into nibbles, interleaved back into K
order in registers, and each mapped to its value:

* ``INT4``: ``(u - zero) * scale``, ``zero`` 8 when symmetric (no zero tensor);
* ``MXFP4``: e2m1 ``u`` (sign, 2 exponent bits, 1 mantissa bit) times ``2^(scale - 127)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_kernels.mlp import packed as packed_numbers

from ._common import check_tensor

#: ``PACKED`` constexpr values of the GEMM kernels
NOT_PACKED = 0
INT4 = 1
MXFP4 = 2

_INT4_ZERO = tl.constexpr(float(packed_numbers.INT4_SYMMETRIC_ZERO))
#: how :func:`_per_group` hands its values over: as loaded, e8m0 scales as floats, integers as
#: floats plus 2^23
_RAW = tl.constexpr(0)
_E8M0_SCALE = tl.constexpr(1)
_INT_PLUS_2_23 = tl.constexpr(2)
#: 2^23 and its float32 bits, whose mantissa an integer below 2^23 can be OR-ed into
_TWO_POW_23 = tl.constexpr(8388608.0)
_TWO_POW_23_BITS = tl.constexpr(0x4B000000)
#: float32 bits of 2^-127 (e8m0's smallest scale, subnormal)
_MIN_E8M0_BITS = tl.constexpr(0x00400000)
#: what :func:`_e2m1_times_2_pow_minus_14`'s values are short of
_TWO_POW_14 = tl.constexpr(16384.0)
# e8m0 and float32 share the exponent bias, so a scale's bits are a float32 exponent field
assert packed_numbers.E8M0_BIAS == 127


@triton.jit
def load_weight_tile(
    w_ptrs, mask, k0, k_dim, col_ok, scale_ptr, zero_ptr, row_offs, stride_sk, group,
    PACKED: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The B tile ``[BLOCK_K, BLOCK_N]`` at ``w_ptrs`` as ``(w, scale)``.

    Dense and fp8 weights: ``w`` as stored, scale 1. Packed 4-bit weights: ``w_ptrs [BLOCK_K / 2,
    BLOCK_N]`` point at the bytes of each column's row that hold the columns ``k`` from ``k0``,
    ``row_offs [BLOCK_N]`` are the offsets of the rows' first scale (and zero point) from
    ``scale_ptr`` (``zero_ptr``) and ``GROUPS`` the scale groups in a K tile; ``w`` holds the
    weights' float32 values and scale 1, except for mxfp4 with one group across the K tile
    (``GROUPS == 1``): then ``w`` holds bf16 e2m1 values times 2^-14 and ``scale [1, BLOCK_N]``
    float32 their columns' scales, for the tile's product (:func:`tile_dot`: one multiply per
    output instead of one per weight)."""
    # one return (the compiler wants every return of one type, dead constexpr branches included)
    scale = 1.0
    if PACKED == 0:
        # float `other`: the interpreter cannot cast the int 0 to fp8
        w = tl.load(w_ptrs, mask=mask, other=0.0)
    else:
        # whole bytes, contiguous along K (vector loads), then their two nibbles interleaved into
        # K order: row 2j of the tile is byte j's low nibble, row 2j + 1 its high one
        raw = tl.load(w_ptrs, mask=mask, other=0)
        nibble = tl.reshape(tl.permute(tl.join(raw & 0xF, raw >> 4), (0, 2, 1)), (BLOCK_K, raw.shape[1]))
        # per-group values become floats per group, before they meet the weights (a constexpr
        # argument each: a value chosen by a conditional expression is not one)
        if PACKED == 2:
            scale = _per_group(scale_ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, _E8M0_SCALE, GROUPS, BLOCK_K)
            # e2m1 times 2^-14, exact in bf16 too; the 2^14 comes back before the scale (which
            # may be as large as 2^127), on the dot's result where the scale waits for it
            w = _e2m1_times_2_pow_minus_14(nibble)
            if GROUPS == 1:
                w = w.to(tl.bfloat16)
            else:
                w = w.to(tl.float32) * _TWO_POW_14
        else:
            scale = _per_group(scale_ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, _RAW, GROUPS, BLOCK_K)
            if HAS_ZERO:
                zero = _per_group(zero_ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, _INT_PLUS_2_23, GROUPS,
                                  BLOCK_K)  # fmt: skip
            else:
                zero = _INT4_ZERO + _TWO_POW_23
            # 2^23 + n, exact, by OR-ing n into 2^23's bits: no int-to-float conversion a weight.
            # (128 + n as bf16 bits, the zero point subtracted after the dot as offset times the
            # A rows' sums, measured slower on an H100: 49 against 39 us at Qwen3-30B-A3B's T = 1.)
            w = (nibble.to(tl.uint32) | _TWO_POW_23_BITS).to(tl.float32, bitcast=True) - zero
        if PACKED == 1 or GROUPS > 1:
            w = w * scale
            scale = 1.0
    return w, scale


@triton.jit
def tile_dot(acc, a, w, scale, PACKED: tl.constexpr, GROUPS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc`` plus ``a [BLOCK_M, BLOCK_K]`` times the weights :func:`load_weight_tile` gave as ``(w,
    scale)`` (not fp8's block scales): where the scale waits for the product, mxfp4 codes' missing
    2^14 first (no overflow before the scale), then the scales."""
    # (constexpr conditions written out: a jit helper's result is a compile-time constant on some
    # Triton versions only)
    if PACKED == 2 and GROUPS == 1:
        acc += tl.dot(a, w, input_precision=INPUT_PRECISION) * _TWO_POW_14 * scale
    else:
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


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
    ptr, row_offs, k0, k_dim, group, stride_sk, col_ok, AS_FLOAT: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The per-group values (scales, zero points) of the K tile from ``k0``: ``[1, BLOCK_N]`` when
    one group spans the tile, else ``GROUPS`` loads per column broadcast to ``[BLOCK_K,
    BLOCK_N]`` -- one load per group, not per element. ``AS_FLOAT`` (:data:`_RAW`,
    :data:`_E8M0_SCALE`, :data:`_INT_PLUS_2_23`) turns them into floats before the broadcast."""
    if GROUPS == 1:
        v = _as_float(tl.load(ptr + row_offs[None, :] + (k0 // group) * stride_sk, mask=col_ok[None, :], other=0),
                      AS_FLOAT)  # fmt: skip
    else:
        g = k0 // group + tl.arange(0, GROUPS)
        g_ok = (g * group < k_dim)[:, None] & col_ok[None, :]
        v = tl.load(ptr + row_offs[None, :] + g.to(tl.int64)[:, None] * stride_sk, mask=g_ok, other=0)
        v = _as_float(v, AS_FLOAT)
        v = tl.reshape(tl.broadcast_to(v[:, None, :], (GROUPS, BLOCK_K // GROUPS, v.shape[1])), (BLOCK_K, v.shape[1]))
    return v


@triton.jit
def _as_float(v, AS_FLOAT: tl.constexpr):
    if AS_FLOAT == 1:  # _E8M0_SCALE
        v = _e8m0_to_float(v)
    elif AS_FLOAT == 2:  # _INT_PLUS_2_23: int4 zero points, offset like the weights they meet
        v = v.to(tl.float32) + _TWO_POW_23
    return v


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
