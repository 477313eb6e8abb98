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
from test_quant_kernels import contiguous_routing

from moe_kernels import (
    DequantizedGroupedMMExperts,
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
from moe_kernels.core.compose import layer_context
from moe_kernels.kernels import FusedConfig, PackedWeight, dequantize_packed, grouped_gemm_contiguous
from moe_kernels.mlp.formats import Fp8Block, Fp8Channel, Fp8Tensor
from moe_kernels.mlp.weights import ExpertWeights, quantize_weights

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
    with pytest.raises(ValueError, match="group_size must be a power of two >= 16; got 100"):
        QuantConfig(scheme="int4_w4a16", group_size=100)
    with pytest.raises(ValueError, match="multiples of its group 128; got hidden_size=192"):
        moe = MoEConfig(num_experts=E, top_k=K, hidden_size=192, intermediate_size=I, dtype=torch.bfloat16)
        LayerConfig(moe=moe, quant=QuantConfig(scheme="int4_w4a16"))
    with pytest.raises(ValueError, match="symmetric: not a parameter of scheme mxfp4"):
        QuantConfig(scheme="mxfp4", symmetric=False)
    with pytest.raises(ValueError, match=r"uint8 \(packed 4-bit\): give format="):
        ExpertWeights(torch.zeros(1, 2, 2, dtype=torch.uint8), torch.zeros(1, 2, 1, dtype=torch.uint8))


@pytest.mark.parametrize("experts", [TritonExperts, FusedTritonExperts, MaskedTritonExperts])
@pytest.mark.parametrize("scheme", [*SCHEMES, "fp8_w8a8_block"])
@pytest.mark.parametrize("t", [1, 7])
def test_fp8_experts_match_the_loop(scheme: str, experts: type, t: int) -> None:
    cfg = cfg_for(scheme)
    weights, w13, w2 = packed(scheme)
    prepare = LocalMaskedPrepareAndFinalize() if experts is MaskedTritonExperts else LocalPrepareAndFinalize()
    kernel = compose(prepare, experts(), cfg, device="cpu")
    x, tw, ids = routed(t)
    out = kernel(x, weights, tw, ids)
    ref = loop_reference(x, w13, w2, tw, ids)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    if experts is FusedTritonExperts:
        # weight-only fp8: the activations stay bf16, so only bf16 roundings (2^-8 relative, the
        # intermediate's and the output's) separate it from the loop on the dequantized weights
        assert err <= 2**-6, err
    else:
        assert err <= 0.1, err
        assert err > 1e-4, "as close as an unquantized computation: were the activations quantized at all?"


def test_fused_fp8_kernels_refuse_bad_scales_and_tiles() -> None:
    from moe_kernels.kernels import FusedConfig, fused_experts, fused_workspace_shapes
    from moe_kernels.kernels.fused_moe import BLOCK_SCALES

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
    block, _, _ = packed("fp8_w8a8_block")
    with pytest.raises(ValueError, match="config.block_k: .* got 256, which does not divide 128"):
        wide_k = FusedConfig(16, 32, 256, 4, 2)
        wide = {**call, "gemm1": wide_k, "gemm2": wide_k, "scale_blocks": (BLOCK_SCALES, BLOCK_SCALES)}
        fused_experts(x, block.w13, block.w2, tw, ids, out, w13_scale=block.w13_scale, w2_scale=block.w2_scale,
                      **wide)  # fmt: skip
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
                            w13_zero=t13.get("zero"), w2_zero=t2.get("zero"))  # fmt: skip
    prepare = LocalMaskedPrepareAndFinalize() if experts is MaskedTritonExperts else LocalPrepareAndFinalize()
    kernel = compose(prepare, experts(), cfg, device="cpu")
    x, tw, ids = routed(t)
    out = kernel(x, weights, tw, ids)
    ref = loop_reference(x, real13, real2, tw, ids)
    # the kernels round each dequantized weight and the activation to bf16 (8 mantissa bits)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 3e-2, err


@pytest.mark.parametrize("block_k", [32, 64])
def test_mxfp4_with_one_or_two_scale_groups_per_k_tile(block_k: int) -> None:
    # 32-column groups: a 32-deep K tile takes one scale, applied to the tile's product; a 64-deep
    # one takes two, applied to each weight -- both kernels, both ways
    quant, pack = PACKED["mxfp4"]
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=quant)
    w13, w2 = float_weights()
    (t13, real13), (t2, real2) = pack(w13), pack(w2)
    weights = ExpertWeights(t13["weight"], t2["weight"], t13["scale"], t2["scale"], cfg.mlp.weights)
    x, tw, ids = routed(7)
    ref = loop_reference(x, real13, real2, tw, ids)
    tile = FusedConfig(block_m=16, block_n=32, block_k=block_k, num_warps=4, num_stages=2)
    fused = compose(LocalPrepareAndFinalize(), FusedTritonExperts(tiles={1: (tile, tile)}), cfg, device="cpu")
    out = fused(x, weights, tw, ids)
    # the kernels round each dequantized weight and the activation to bf16 (8 mantissa bits)
    assert (out.float() - ref).abs().max() <= 3e-2 * ref.abs().max()

    # the grouped GEMM alone: each routed row times its expert's w13, rows grouped by expert in
    # segments padded to the 16-row block
    dst_row, layout = contiguous_routing(ids, E, alignment=16)
    rows = torch.zeros(layout.numel(), H, dtype=torch.bfloat16)
    rows[dst_row.flatten()] = x.repeat_interleave(K, dim=0)
    gemm1 = torch.empty(layout.numel(), 2 * I, dtype=torch.bfloat16)
    grouped_gemm_contiguous(rows, t13["weight"], layout, gemm1, b_scale=t13["scale"],
                            packed=PackedWeight("mxfp4", 32), block_m=16, block_n=32, block_k=block_k,
                            alignment=16)  # fmt: skip
    live = layout >= 0
    expected = torch.einsum("rh,rnh->rn", rows[live].float(), real13[layout[live].long()])
    assert (gemm1[live].float() - expected).abs().max() <= 3e-2 * expected.abs().max()


@pytest.mark.parametrize("name", list(PACKED))
def test_dequantize_packed_gives_the_bf16_weights(name: str) -> None:
    # the pass DequantizedGroupedMMExperts makes before its bf16 GEMMs: every weight as the
    # packer's real value rounded to bf16; K = 192 leaves a partial 128-column tile (where the
    # group allows it)
    quant, pack = PACKED[name]
    group = 32 if name == "mxfp4" else quant.group_size
    k = 192 if group < 128 else 384
    w = torch.randn(3, 40, k, generator=torch.Generator().manual_seed(4)) * 0.1
    tensors, real = pack(w)
    packing = "mxfp4" if name == "mxfp4" else "int4"
    out = torch.full((3, 40, k), float("nan"), dtype=torch.bfloat16)
    dequantize_packed(tensors["weight"], tensors["scale"], PackedWeight(packing, group, tensors.get("zero")), out)
    # within one bf16 step of the real value (8 significant bits: 2^-7 relative; the interpreter
    # rounds float32 to bf16 by truncation), exact where the value is a bf16 number (mxfp4)
    torch.testing.assert_close(out.float(), real, rtol=2**-7, atol=0)
    assert name != "mxfp4" or torch.equal(out.float(), real)
    with pytest.raises(ValueError, match=rf"out: expected shape \[3, 40, {k}\]"):
        dequantize_packed(tensors["weight"], tensors["scale"], PackedWeight(packing, group, tensors.get("zero")),
                          out[:, :, :128])  # fmt: skip


def test_dequantized_grouped_mm_takes_4_bit_weights_only() -> None:
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    packed_cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=PACKED["mxfp4"][0])
    experts, ctx = DequantizedGroupedMMExperts(), layer_context(packed_cfg, device="cpu")
    assert experts.check_mlp(ctx).ok, experts.check_mlp(ctx).reason
    dense = layer_context(LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32)), device="cpu")
    refused = experts.check_mlp(dense)
    assert not refused.ok and "computes with int4_group, mxfp4 weights, not" in refused.reason
    spec = experts.workspace_specs(ctx, 32)
    assert spec["w13"].shape == (E, 2 * I, H) and spec["w2"].shape == (E, H, I)


# ----------------------------------------------------------------------------- published checkpoints


def int32_words(nibbles: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` values in [0, 16) -> one int32 word each, value ``i`` at bits ``4i..4i+3``."""
    word = sum(nibbles[..., i].long() << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def rows_of(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group, group)


def int4_codes(w: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and group: fp16 scale, zero point, codes ``u [N, K]``; real = (u - z) * s."""
    tensors, _ = int4_groups(w, group, symmetric)
    s = tensors["scale"].half().float()
    z = tensors["zero"].long() if not symmetric else torch.full_like(s, 8).long()
    u = ((rows_of(w, group) / s[..., None]).round() + z[..., None]).clamp(0, 15).reshape(w.shape).long()
    return u, s, z


def gptq_tensors(w: torch.Tensor, group: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """GPTQ: qweight [K/8, N] packed along K, qzeros [K/g, N/8] along N holding zero - 1."""
    u, s, z = int4_codes(w, group, symmetric)
    n, k = w.shape
    return {
        "qweight": int32_words(u.t().reshape(k // 8, 8, n).transpose(1, 2)),
        "qzeros": int32_words((z.t() - 1).reshape(k // group, n // 8, 8)),
        "scales": s.t().half().contiguous(),
        "g_idx": (torch.arange(k) // group).to(torch.int32),
    }


def awq_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """AWQ: qweight [K, N/8], qzeros [K/g, N/8], nibble i holding column order[i] of 8."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    u, s, z = int4_codes(w, group, symmetric=False)
    n, k = w.shape
    return {
        "qweight": int32_words(u.t().reshape(k, n // 8, 8)[..., order]),
        "qzeros": int32_words(z.t().reshape(k // group, n // 8, 8)[..., order]),
        "scales": s.t().half().contiguous(),
    }


def pack_quantized_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized, symmetric: weight_packed [N, K/8] (signed + 8)."""
    u, s, _ = int4_codes(w, group, symmetric=True)
    n, k = w.shape
    return {
        "weight_packed": int32_words(u.reshape(n, k // 8, 8)),
        "weight_scale": s.half(),
        "weight_shape": torch.tensor([n, k]),
    }


def real_int4(w: torch.Tensor, group: int, symmetric: bool) -> torch.Tensor:
    u, s, z = int4_codes(w, group, symmetric)
    return ((rows_of(u.float(), group) - z[..., None]) * s[..., None]).reshape(w.shape)


def fp8_tensors(w: torch.Tensor, per_channel: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    q, s = fp8_per_rows(w[None], per_channel)
    scale = s[0] if per_channel else s[0].reshape(())  # ModelOpt: a 0-d per-tensor scale
    return {"weight": q[0], "weight_scale": scale, "input_scale": torch.ones(1)}, (q.float() * s)[0]


PROJECTIONS = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I)}


def per_expert_checkpoint(kind: str, w13: torch.Tensor, w2: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``model.layers.0.mlp.experts.{e}.{proj}.<part>`` tensors and the real weights they hold."""
    group = 64
    make = {
        "gptq": lambda w: (gptq_tensors(w, group, True), real_int4(w, group, True)),
        "awq": lambda w: (awq_tensors(w, group), real_int4(w, group, False)),
        "pack-quantized": lambda w: (pack_quantized_tensors(w, group), real_int4(w, group, True)),
        "fp8-channel": lambda w: fp8_tensors(w, True),
        "fp8-tensor": lambda w: fp8_tensors(w, False),
    }[kind]
    tensors, real13, real2 = {}, torch.empty_like(w13), torch.empty_like(w2)
    for e in range(E):
        for proj, rows in (*PROJECTIONS.items(), ("down_proj", None)):
            w = w2[e] if rows is None else w13[e, rows]
            parts, real = make(w)
            tensors |= {f"model.layers.0.mlp.experts.{e}.{proj}.{p}": t.contiguous() for p, t in parts.items()}
            if rows is None:
                real2[e] = real
            else:
                real13[e, rows] = real
    return tensors, real13, real2


PUBLISHED = {
    "gptq": ("gptq", QuantConfig(scheme="int4_w4a16", group_size=64)),
    "awq": ("awq", QuantConfig(scheme="int4_w4a16", group_size=64, symmetric=False)),
    "pack-quantized": ("pack-quantized", QuantConfig(scheme="int4_w4a16", group_size=64)),
    "fp8-channel": ("fp8", QuantConfig(scheme="fp8_w8a8_channel")),
    "fp8-tensor": ("fp8", QuantConfig(scheme="fp8_w8a8_tensor")),
}


def saved_and_loaded(tensors: dict[str, torch.Tensor], tmp_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    save_file(tensors, tmp_path / "model.safetensors")
    return load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_checkpoints_load_and_match_the_loop(name: str, tmp_path) -> None:
    from moe_kernels.model.naming import NAMINGS
    from moe_kernels.model.published import published_expert_weights

    kind, quant = PUBLISHED[name]
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=quant)
    w13, w2 = float_weights()
    tensors, real13, real2 = per_expert_checkpoint(name, w13, w2)
    loaded = saved_and_loaded(tensors, tmp_path)
    weights = published_expert_weights(loaded, "model.layers.0.", NAMINGS["mlp-experts"], kind, cfg.mlp, range(E))
    # the repacked weights stand for exactly what the packer meant (fp8 per tensor: gate and up
    # requantized to one scale, within half an e4m3 step of it)
    for got, want in ((weights.dequantized(e), (real13[e], real2[e])) for e in range(E)):
        for g, w in zip(got, want, strict=True):
            step = 0.0 if name != "fp8-tensor" else w.abs().max().item() / 8
            torch.testing.assert_close(g, w, atol=step, rtol=0)
    kernel = compose(LocalPrepareAndFinalize(), FusedTritonExperts(), cfg, device="cpu")
    x, tw, ids = routed(5)
    ref = loop_reference(x, real13, real2, tw, ids)
    err = (kernel(x, weights, tw, ids).float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= cfg.mlp.tolerance, err


def test_gpt_oss_mxfp4_checkpoint_loads(tmp_path) -> None:
    from moe_kernels.model.naming import NAMINGS
    from moe_kernels.model.published import published_expert_weights

    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=QuantConfig(scheme="mxfp4"))
    w13, w2 = float_weights()
    # gpt-oss stores gate_up rows alternating gate, up
    interleaved = torch.stack((w13[:, :I], w13[:, I:]), dim=2).reshape(E, 2 * I, H)
    tensors = {}
    for key, w in (("gate_up_proj", interleaved), ("down_proj", w2)):
        parts, _ = mxfp4_groups(w)
        n, k = w.shape[1:]
        tensors[f"model.layers.0.mlp.experts.{key}_blocks"] = parts["weight"].reshape(E, n, k // 32, 16)
        tensors[f"model.layers.0.mlp.experts.{key}_scales"] = parts["scale"]
    _, real13 = mxfp4_groups(w13)
    _, real2 = mxfp4_groups(w2)
    loaded = saved_and_loaded(tensors, tmp_path)
    weights = published_expert_weights(loaded, "model.layers.0.", NAMINGS["gpt-oss"], "mxfp4", cfg.mlp, [2, 0])
    assert torch.equal(weights.dequantized(0)[0], real13[2]) and torch.equal(weights.dequantized(1)[1], real2[0])


def test_published_checkpoints_bad_input_is_refused() -> None:
    from moe_kernels.model.naming import NAMINGS
    from moe_kernels.model.published import published_expert_weights

    w13, w2 = float_weights()
    naming, root = NAMINGS["mlp-experts"], "model.layers.0."

    def load(name: str, quant: QuantConfig, edit) -> None:
        moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
        cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=quant)
        tensors, _, _ = per_expert_checkpoint(name, w13, w2)
        edit(tensors)
        published_expert_weights(tensors, root, naming, PUBLISHED[name][0], cfg.mlp, range(E))

    key = "model.layers.0.mlp.experts.1.up_proj."
    gptq = PUBLISHED["gptq"][1]
    with pytest.raises(ValueError, match="act-order"):
        load("gptq", gptq, lambda t: t.__setitem__(key + "g_idx", t[key + "g_idx"].flip(0)))
    with pytest.raises(ValueError, match="zero points other than 8 on a symmetric scheme"):
        load("gptq", gptq, lambda t: t.__setitem__(key + "qzeros", t[key + "qzeros"] + 1))
    with pytest.raises(ValueError, match=r"qweight: expected shape \[16, 256\], got \[8, 256\]"):
        load("gptq", gptq, lambda t: t.__setitem__(key + "qweight", t[key + "qweight"][:8]))
    with pytest.raises(ValueError, match=r"weight_shape: expected \[256, 128\]"):
        load("pack-quantized", PUBLISHED["pack-quantized"][1],
             lambda t: t.__setitem__(key + "weight_shape", torch.tensor([256, 64])))  # fmt: skip
    with pytest.raises(ValueError, match="weight_scale: scales must be finite and positive"):
        load("fp8-channel", PUBLISHED["fp8-channel"][1],
             lambda t: t[key + "weight_scale"].__setitem__(3, float("nan")))  # fmt: skip
    with pytest.raises(ValueError, match="layer model.layers.0: awq checkpoint: missing mlp.experts.1.up_proj.scales"):
        load("awq", PUBLISHED["awq"][1], lambda t: t.pop(root + "mlp.experts.1.up_proj.scales"))


def test_fused_moe_layer_runs_a_repacked_awq_checkpoint() -> None:
    from moe_kernels import FusedMoE
    from moe_kernels.model.naming import NAMINGS
    from moe_kernels.model.published import published_expert_weights

    kind, quant = PUBLISHED["awq"]
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=32), quant=quant)
    layer = FusedMoE(cfg, device="cpu", kernel=compose(LocalPrepareAndFinalize(), FusedTritonExperts(), cfg))
    w13, w2 = float_weights()
    tensors, real13, real2 = per_expert_checkpoint("awq", w13, w2)
    t13, s13 = tensors["model.layers.0.mlp.experts.0.gate_proj.qweight"], torch.ones(I, H // 64)
    with pytest.raises(ValueError, match="loads whole experts with load_expert_weights"):
        layer.load_weights(gate_proj={0: t13}, gate_proj_scale={0: s13})
    # float weights are quantized on load, as quantize_weights does
    layer.load_weights(gate_proj=w13[:, :I], up_proj=w13[:, I:], down_proj=w2)
    direct = quantize_weights(w13, w2, cfg.mlp.weights)
    for part in ("w13", "w13_scale", "w13_zero", "w2", "w2_scale", "w2_zero"):
        assert torch.equal(getattr(layer, part), getattr(direct, part)), part
    layer.load_expert_weights(
        published_expert_weights(tensors, "model.layers.0.", NAMINGS["mlp-experts"], kind, cfg.mlp, range(E))
    )
    layer.load_weights(router_weight=torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
    x = routed(6)[0]
    out = layer(x)
    tw, ids = layer.router(x)
    ref = loop_reference(x, real13, real2, tw, ids)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= cfg.mlp.tolerance, err


@pytest.mark.parametrize(
    ("quantization_config", "expected"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False},
         QuantConfig(scheme="int4_w4a16", group_size=64)),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
         QuantConfig(scheme="int4_w4a16", symmetric=False)),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}}},
         QuantConfig(scheme="int4_w4a16")),
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
         QuantConfig(scheme="fp8_w8a8_channel")),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, QuantConfig(scheme="fp8_w8a8_tensor")),
        ({"quant_method": "mxfp4"}, QuantConfig(scheme="mxfp4")),
    ],
)  # fmt: skip
def test_quantization_configs_name_their_scheme(quantization_config: dict, expected: QuantConfig) -> None:
    from moe_kernels.model.published import quant_from_hf

    assert quant_from_hf(quantization_config) == expected


def test_act_order_and_other_bit_widths_are_refused() -> None:
    from moe_kernels.model.published import quant_from_hf

    with pytest.raises(ValueError, match="desc_act"):
        quant_from_hf({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(ValueError, match="8-bit weights"):
        quant_from_hf({"quant_method": "gptq", "bits": 8, "group_size": 128})
