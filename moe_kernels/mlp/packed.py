"""4-bit weights packed two to a byte: the plain-torch numbers of the int4 group-quantized and
mxfp4 formats (:mod:`moe_kernels.mlp.formats`), for setup, the reference path and tests.

Packing (both formats, and what the Triton GEMMs' dequantizing loads read): a row of K values
is ``K / 2`` uint8 bytes; byte ``j`` holds element ``2j`` in its low nibble and ``2j + 1`` in
its high nibble (gpt-oss's ``*_blocks`` order; GPTQ/AWQ int32 words are repacked to it at load).

* int4: nibble ``u`` in ``[0, 15]`` stands for ``(u - zero) * scale`` with one float32 scale
  (and, asymmetric, one uint8 zero point) per row and ``group`` columns; symmetric means
  ``zero = 8`` (signed int4 in offset binary, as GPTQ's symmetric checkpoints store it).
* mxfp4 (OCP microscaling): nibble = e2m1 (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1,
  1.5, 2, 3, 4, 6), one e8m0 scale byte ``s`` per row and 32 columns meaning ``2^(s - 127)``.
"""

from __future__ import annotations

import torch

#: the symmetric int4 zero point: nibbles are signed values + 8
INT4_SYMMETRIC_ZERO = 8
INT4_MAX = 15
#: columns sharing one mxfp4 scale (OCP MX spec, gpt-oss)
MXFP4_GROUP = 32
#: e8m0 exponent bias
E8M0_BIAS = 127
#: the 16 e2m1 values by nibble (bit 3 the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """``u [..., K]`` integers in ``[0, 15]`` -> ``[..., K/2] uint8``, element ``2j`` low."""
    if u.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: K must be even, got {u.shape[-1]}")
    u = u.to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K/2] uint8`` -> ``[..., K] uint8`` nibbles, the inverse of :func:`pack_nibbles`."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    *lead, k = w.shape
    if k % group:
        raise ValueError(f"K = {k} is not a multiple of the group size {group}")
    return w.float().reshape(*lead, k // group, group)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """``w [..., N, K]`` -> ``weight [..., N, K/2] uint8``, ``scale [..., N, K/group] float32``
    and (asymmetric) ``zero [..., N, K/group] uint8``: round to nearest on the group's grid
    (symmetric: ``scale = amax / 7``; asymmetric: ``(max - min) / 15``, ``zero = round(-min / scale)``)."""
    g = _groups(w, group)
    if symmetric:
        scale = (g.abs().amax(dim=-1) / 7).clamp_min(1e-10)
        zero = torch.full_like(scale, INT4_SYMMETRIC_ZERO)
    else:
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / INT4_MAX).clamp_min(1e-10)
        zero = (-lo / scale).round().clamp(0, INT4_MAX)
    u = (g / scale[..., None]).round() + zero[..., None]
    out = {"weight": pack_nibbles(u.clamp(0, INT4_MAX).flatten(-2)), "scale": scale}
    if not symmetric:
        out["zero"] = zero.to(torch.uint8)
    return out


def dequantize_int4(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """The float32 ``[..., N, K]`` that packed ``weight``, ``scale`` and ``zero`` (None:
    symmetric) stand for."""
    u = unpack_nibbles(weight).float()
    z = INT4_SYMMETRIC_ZERO if zero is None else zero.float().repeat_interleave(group, dim=-1)
    return (u - z) * scale.float().repeat_interleave(group, dim=-1)


def quantize_mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w [..., N, K]`` -> ``weight [..., N, K/2] uint8`` (e2m1 nibbles) and ``scale [..., N,
    K/32] uint8`` (e8m0): the smallest power of two putting the group's amax within 6, each
    value then rounded to the nearest e2m1 value (ties to the smaller magnitude)."""
    g = _groups(w, MXFP4_GROUP)
    amax = g.abs().amax(dim=-1).clamp_min(2.0**-126)
    exponent = torch.ceil(torch.log2(amax / E2M1_MAX)).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = g / torch.exp2(exponent)[..., None]
    # the nearest magnitude by the midpoints between neighbours (a tie goes to the smaller)
    values = torch.tensor(E2M1_VALUES[:8], device=w.device)
    nearest = torch.bucketize(scaled.abs(), (values[1:] + values[:-1]) / 2)
    u = nearest + 8 * (scaled < 0)
    return {"weight": pack_nibbles(u.flatten(-2)), "scale": (exponent + E8M0_BIAS).to(torch.uint8)}


def dequantize_mxfp4(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 ``[..., N, K]`` that e2m1 ``weight`` and e8m0 ``scale`` stand for."""
    lut = torch.tensor(E2M1_VALUES, device=weight.device)
    values = lut[unpack_nibbles(weight).long()]
    return values * torch.exp2(scale.float() - E8M0_BIAS).repeat_interleave(MXFP4_GROUP, dim=-1)
