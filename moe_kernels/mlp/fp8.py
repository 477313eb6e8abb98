"""FP8 (e4m3) numbers: the constants every fp8 path shares and the plain-torch (de)quantizers.

Recipe (DeepSeek-V3, DeepGEMM SM90): a group of values shares one float32 scale
``max(amax, EPS) / 448`` (optionally rounded up to a power of two, the UE8M0 scales SM100
DeepGEMM needs) and stores ``q = clamp(x / scale, -448, 448)`` rounded to nearest even;
``dequantized = q * scale``. Weights use one scale per ``[128, 128]`` block, activations one per
token and 128 columns. The Triton kernels (:mod:`moe_kernels.kernels.quant`) compute exactly
these values on the hot path; the functions here are for setup (quantizing weights), the
reference path and tests.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
#: the largest finite e4m3fn value
FP8_MAX = 448.0
#: Width of a scale block along K (and N for weights): fixed by the DeepSeek-V3 checkpoints and by
#: DeepGEMM's SM90 kernels ("Only support per-128-channel FP8 scaling").
SCALE_BLOCK = 128
#: Floor on a group's amax, so an all-zero group gets a finite scale (and q = 0). The value of
#: DeepGEMM's and DeepEP's reference casts, so scales agree with theirs for every non-tiny group.
EPS = 1e-4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``s`` (s > 0): frexp gives ``s = m * 2^e`` with m in [0.5, 1)."""
    mantissa, exponent = torch.frexp(s)
    return torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent))


def quantize_blocks(
    w: torch.Tensor, block: tuple[int, int] = (SCALE_BLOCK, SCALE_BLOCK), *, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise fp8 quantization of weights ``w [..., N, K]`` (any float dtype).

    Returns ``(q [..., N, K] float8_e4m3fn, scale [..., ceil(N/bn), ceil(K/bk)] float32)`` with
    ``w ~= q * scale`` blockwise: the layout DeepSeek-V3 checkpoints store as ``weight_scale_inv``
    and DeepGEMM takes as B scales. ``ue8m0`` rounds scales up to powers of two.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"w: expected a floating-point tensor [..., N, K], got {_describe(w)}")
    block_n, block_k = block
    *lead, n_rows, n_cols = w.shape
    nb, kb = _cdiv(n_rows, block_n), _cdiv(n_cols, block_k)
    padded = torch.zeros(*lead, nb * block_n, kb * block_k, dtype=torch.float32, device=w.device)
    padded[..., :n_rows, :n_cols] = w
    tiles = padded.view(*lead, nb, block_n, kb, block_k)
    # In float64 then rounded: the correctly rounded fp32 quotient, as the kernels' div_rn gives
    # (CUDA torch turns division by a Python scalar into a reciprocal multiply).
    scale = (tiles.abs().amax(dim=(-3, -1)).clamp_min(EPS).double() / FP8_MAX).float()
    if ue8m0:
        scale = ceil_pow2(scale)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(padded.shape)[..., :n_rows, :n_cols].contiguous(), scale


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (SCALE_BLOCK, SCALE_BLOCK)
) -> torch.Tensor:
    """``q [..., N, K]`` fp8 times its block scales ``[..., ceil(N/bn), ceil(K/bk)]``, as float32."""
    block_n, block_k = block
    *lead, n_rows, n_cols = q.shape
    want = (*lead, _cdiv(n_rows, block_n), _cdiv(n_cols, block_k))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale: expected shape {list(want)} for q {list(q.shape)}, got {list(scale.shape)}")
    full = scale.float().repeat_interleave(block_n, dim=-2).repeat_interleave(block_k, dim=-1)
    return q.float() * full[..., :n_rows, :n_cols]


def quantize_groups(x: torch.Tensor, group: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-``group``-columns fp8 quantization of activations ``x [..., K]``:
    ``(q [..., K] float8_e4m3fn, scale [..., ceil(K/group)] float32)``, the values the Triton
    quantize kernels write."""
    *lead, k = x.shape
    groups = _cdiv(k, group)
    padded = torch.zeros(*lead, groups * group, dtype=torch.float32, device=x.device)
    padded[..., :k] = x
    tiles = padded.view(*lead, groups, group)
    scale = (tiles.abs().amax(dim=-1).clamp_min(EPS).double() / FP8_MAX).float()
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, groups * group)[..., :k].contiguous(), scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group: int = SCALE_BLOCK) -> torch.Tensor:
    """``q [..., K]`` fp8 times its per-group scales ``[..., ceil(K/group)]`` (any strides), as float32."""
    k = q.shape[-1]
    want = (*q.shape[:-1], _cdiv(k, group))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale: expected shape {list(want)} for q {list(q.shape)}, got {list(scale.shape)}")
    return q.float() * scale.float().repeat_interleave(group, dim=-1)[..., :k]


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    return type(t).__name__
