"""Weight formats beyond bf16 and 128x128-block fp8 on the CPU: fp8 with one scale per output
channel or per tensor, through every Triton path (grouped GEMM, fused decode) and the plain loop.

Every comparison is against a plain torch loop written here on the dequantized weights
(``w_fp8 * scale``, expanded by hand from the format's description) and unquantized
activations. Tolerance: rounding an activation to e4m3 (3 mantissa bits) moves it by at most
2^-4 of itself, ~3.6 % standard deviation; a K-term dot product of such independent errors has
a relative error of that size, and the output passes two GEMMs and the SiLU. We accept
max|out - ref| <= 0.1 max|ref| and check the error is not tiny (the activations were quantized).
"""

from __future__ import annotations

import pytest
import torch

from moe_kernels import (
    FusedTritonExperts,
    LayerConfig,
    LocalMaskedPrepareAndFinalize,
    LocalPrepareAndFinalize,
    MaskedTritonExperts,
    MoEConfig,
    ParallelConfig,
    QuantConfig,
    TorchReferenceExperts,
    TritonExperts,
    compose,
)
from moe_kernels.mlp.formats import Fp8Block, Fp8Channel, Fp8Tensor
from moe_kernels.mlp.weights import ExpertWeights

E, K, H, I = 4, 2, 128, 256  # noqa: E741
FP8_MAX = 448.0


def cfg_for(scheme: str) -> LayerConfig:
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=QuantConfig(scheme=scheme))


def float_weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * H**-0.5
    w2 = torch.randn(E, H, I, generator=gen) * I**-0.5
    # rows of very different magnitudes: a per-channel scale must follow each row
    w13 *= torch.linspace(0.1, 4.0, 2 * I)[None, :, None]
    return w13, w2


def fp8_per_rows(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The published recipe: scale = amax / 448 over each row (channel) or the whole [N, K]
    tensor, q = round(w / scale) to e4m3; returns (q [E, N, K], scale [E, N or 1, 1])."""
    amax = w.abs().amax(dim=-1, keepdim=True) if per_channel else w.abs().amax(dim=(-2, -1), keepdim=True)
    scale = amax / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.float()


def routed(t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=gen).bfloat16()
    ids = torch.rand(t, E, generator=gen).argsort(dim=1)[:, :K].to(torch.int32)
    if t > 2:
        ids[1, 1] = -1
    return x, torch.rand(t, K, generator=gen), ids


def loop_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """sum_k w[t, k] * w2[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), one slot at a time."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            h = w13[e] @ x[t].float()
            out[t] += topk_weights[t, k] * (w2[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


def fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's recipe: one scale amax / 448 per block x block tile; returns (q, scale
    [E, N/block, K/block]) and the per-element scales expanded for the reference."""
    e, n, k = w.shape
    tiles = w.view(e, n // block, block, k // block, block)
    scale = tiles.abs().amax(dim=(2, 4)) / FP8_MAX
    q = (tiles / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(e, n, k)
    return q, scale.float()


def expand_blocks(scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    return scale.repeat_interleave(block, 1).repeat_interleave(block, 2)


def packed(scheme: str) -> tuple[ExpertWeights, torch.Tensor, torch.Tensor]:
    """The weights stored as ``scheme`` says, and the float weights they stand for."""
    w13, w2 = float_weights()
    if scheme == "fp8_w8a8_block":
        (q13, s13), (q2, s2) = fp8_blocks(w13), fp8_blocks(w2)
        weights = ExpertWeights(q13, q2, s13, s2, format=Fp8Block())
        return weights, q13.float() * expand_blocks(s13), q2.float() * expand_blocks(s2)
    fmt, per_channel = SCHEMES[scheme]
    (q13, s13), (q2, s2) = fp8_per_rows(w13, per_channel), fp8_per_rows(w2, per_channel)
    return ExpertWeights(q13, q2, s13, s2, format=fmt), q13.float() * s13, q2.float() * s2


SCHEMES = {"fp8_w8a8_channel": (Fp8Channel(), True), "fp8_w8a8_tensor": (Fp8Tensor(), False)}


def test_schemes_build_their_formats() -> None:
    assert cfg_for("fp8_w8a8_channel").mlp.weights == Fp8Channel()
    assert cfg_for("fp8_w8a8_tensor").mlp.weights == Fp8Tensor()
    assert Fp8Channel().stored(6, 5)["scale"] == ((6, 1), torch.float32)
    assert Fp8Tensor().stored(6, 5)["scale"] == ((1, 1), torch.float32)
    assert Fp8Block().stored(300, 130)["scale"] == ((3, 2), torch.float32)
    with pytest.raises(ValueError, match="act_group must be 128"):
        QuantConfig(scheme="fp8_w8a8_channel", act_group=64)


@pytest.mark.parametrize("experts", [TritonExperts, FusedTritonExperts])
@pytest.mark.parametrize("scheme", [*SCHEMES, "fp8_w8a8_block"])
@pytest.mark.parametrize("t", [1, 7])
def test_fp8_experts_match_the_loop(scheme: str, experts: type, t: int) -> None:
    cfg = cfg_for(scheme)
    weights, w13, w2 = packed(scheme)
    kernel = compose(LocalPrepareAndFinalize(), experts(), cfg, device="cpu")
    x, tw, ids = routed(t)
    out = kernel(x, weights, tw, ids)
    ref = loop_reference(x, w13, w2, tw, ids)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 0.1, err
    assert err > 1e-4, "as close as an unquantized computation: were the activations quantized at all?"


def test_fused_fp8_kernels_refuse_bad_scales_and_tiles() -> None:
    from moe_kernels.kernels import FusedConfig, fused_experts, fused_workspace_shapes

    weights, _, _ = packed("fp8_w8a8_channel")
    x, tw, ids = routed(3)
    shapes = fused_workspace_shapes(3, K, E, H, I, torch.bfloat16, 16)
    workspace = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    tiles = FusedConfig(16, 32, 128, 4, 2)
    blocks = ((1, H), (1, I))
    call = {"workspace": workspace, "gemm1": tiles, "gemm2": tiles, "scale_blocks": blocks}
    out = torch.empty(3, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"w13_scale: expected shape \[4, 512, 1\], got \[4, 1, 1\]"):
        fused_experts(
            x,
            weights.w13,
            weights.w2,
            tw,
            ids,
            out,
            w13_scale=weights.w13_scale[:, :1],
            w2_scale=weights.w2_scale,
            **call,
        )
    with pytest.raises(ValueError, match="config.block_k: .* expected 128, got 64"):
        small_k = FusedConfig(16, 32, 64, 4, 2)
        fused_experts(x, weights.w13, weights.w2, tw, ids, out, w13_scale=weights.w13_scale, w2_scale=weights.w2_scale,
                      **{**call, "gemm1": small_k, "gemm2": small_k})  # fmt: skip
    fp32 = {name: t.float() for name, t in workspace.items()}
    with pytest.raises(TypeError, match="fp8 weights take bfloat16 activations, got float32"):
        fused_experts(x.float(), weights.w13, weights.w2, tw, ids, out.float(), w13_scale=weights.w13_scale,
                      w2_scale=weights.w2_scale, **{**call, "workspace": fp32})  # fmt: skip


# ----------------------------------------------------------------------------- 4-bit formats


def pack_low_first(u: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values a byte, the even column in the low nibble (gpt-oss's ``*_blocks`` order)."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def int4_groups(w: torch.Tensor, group: int, symmetric: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ's recipe per row and group: symmetric q = round(w / s) + 8 with s = amax / 7;
    asymmetric s = (max - min) / 15, z = round(-min / s), q = clamp(round(w / s) + z, 0, 15).
    Returns the packed tensors and the float weight they stand for."""
    *lead, k = w.shape
    g = w.reshape(*lead, k // group, group)
    if symmetric:
        s = g.abs().amax(-1) / 7
        z = torch.full_like(s, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        s = (hi - lo) / 15
        z = (-lo / s).round()
    q = ((g / s[..., None]).round() + z[..., None]).clamp(0, 15)
    real = ((q - z[..., None]) * s[..., None]).reshape(w.shape)
    tensors = {"weight": pack_low_first(q.reshape(w.shape).to(torch.uint8)), "scale": s.float()}
    if not symmetric:
        tensors["zero"] = z.to(torch.uint8)
    return tensors, real


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_groups(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """OCP MX: per 32 columns the exponent e = ceil(log2(amax / 6)) (stored e + 127), each value
    the nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6} times 2^e (sign in bit 3)."""
    *lead, k = w.shape
    g = w.reshape(*lead, k // 32, 32)
    e = torch.ceil(torch.log2(g.abs().amax(-1) / 6))
    scaled = g / torch.exp2(e)[..., None]
    idx = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)
    real = (torch.where(scaled < 0, -E2M1[idx], E2M1[idx]) * torch.exp2(e)[..., None]).reshape(w.shape)
    nibble = (idx + 8 * (scaled < 0)).reshape(w.shape).to(torch.uint8)
    return {"weight": pack_low_first(nibble), "scale": (e + 127).to(torch.uint8)}, real


PACKED = {
    "int4_sym": (QuantConfig(scheme="int4_w4a16", group_size=64), lambda w: int4_groups(w, 64, True)),
    "int4_zero": (QuantConfig(scheme="int4_w4a16", symmetric=False), lambda w: int4_groups(w, 128, False)),
    "mxfp4": (QuantConfig(scheme="mxfp4"), mxfp4_groups),
}


@pytest.mark.parametrize("experts", [FusedTritonExperts, TritonExperts, MaskedTritonExperts, TorchReferenceExperts])
@pytest.mark.parametrize("name", list(PACKED))
@pytest.mark.parametrize("t", [1, 7])
def test_packed_experts_match_the_loop(name: str, experts: type, t: int) -> None:
    quant, pack = PACKED[name]
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=quant)
    w13, w2 = float_weights()
    (t13, real13), (t2, real2) = pack(w13), pack(w2)
    weights = ExpertWeights(t13["weight"], t2["weight"], t13["scale"], t2["scale"], cfg.mlp.weights,
                            t13.get("zero"), t2.get("zero"))  # fmt: skip
    prepare = LocalMaskedPrepareAndFinalize() if experts is MaskedTritonExperts else LocalPrepareAndFinalize()
    kernel = compose(prepare, experts(), cfg, device="cpu")
    x, tw, ids = routed(t)
    out = kernel(x, weights, tw, ids)
    ref = loop_reference(x, real13, real2, tw, ids)
    # the kernels round each dequantized weight and the activation to bf16 (8 mantissa bits)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 3e-2, err
