"""FP8 block-scaled layers on the CPU: configs, weight loading (pre-quantized or quantized on
load), the composer's scheme checks, the local masked prepare quantizing on its way, and the
Triton fp8 experts against the plain loop on the dequantized weights.

Tolerance: the reference runs on the dequantized weights (exactly what the kernel multiplies)
but on unquantized activations. Rounding an activation to e4m3 (3 mantissa bits) moves it by
at most 2^-4 of itself, about 3.6 % standard deviation for uniformly placed values; a dot
product of K such independent errors has a relative error of about that size too, and the
output passes two GEMMs and the SiLU. We accept max|out - ref| <= 0.1 max|ref| and check the
error is not tiny-by-accident (a kernel that skipped the quantization would be far closer).
"""

from __future__ import annotations

import pytest
import torch

from moe_kernels import (
    ExpertWeights,
    FusedMoE,
    FusedTritonExperts,
    GroupedMMExperts,
    IncompatibleKernelsError,
    LayerConfig,
    LocalMaskedPrepareAndFinalize,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    QuantConfig,
    TorchReferenceExperts,
    TritonExperts,
    compose,
)
from moe_kernels.core.compose import layer_context
from moe_kernels.core.contract import Layout, TokenFormat
from moe_kernels.mlp.act_quant import ActQuant
from moe_kernels.mlp.fp8 import dequantize_blocks, dequantize_groups, quantize_blocks

E, K, H, I = 4, 2, 128, 256  # noqa: E741
FP8 = QuantConfig(scheme="fp8_w8a8_block")


def fp8_cfg(**parallel: object) -> LayerConfig:
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    return LayerConfig(moe=moe, parallel=ParallelConfig(**{"max_tokens_per_rank": 32, **parallel}), quant=FP8)


def checkpoint(seed: int = 0) -> dict[str, dict[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "gate_proj": {e: torch.randn(I, H, generator=gen) * H**-0.5 for e in range(E)},
        "up_proj": {e: torch.randn(I, H, generator=gen) * H**-0.5 for e in range(E)},
        "down_proj": {e: torch.randn(H, I, generator=gen) * I**-0.5 for e in range(E)},
    }


def routed(t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=gen).bfloat16()
    ids = torch.rand(t, E, generator=gen).argsort(dim=1)[:, :K].to(torch.int32)
    if t > 2:
        ids[1, 1] = -1
    return x, torch.rand(t, K, generator=gen), ids


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()


def test_fp8_layer_loads_pre_quantized_or_quantizes() -> None:
    ckpt = checkpoint()
    quantized = FusedMoE(fp8_cfg(), device="cpu", kernel=reference(fp8_cfg()))
    quantized.load_weights(**ckpt)
    assert quantized.w13.dtype == quantized.w2.dtype == torch.float8_e4m3fn
    assert quantized.w13_scale.shape == (E, 2 * I // 128, H // 128) and quantized.w2_scale.shape == (E, 1, 2)

    pre = FusedMoE(fp8_cfg(), device="cpu", kernel=reference(fp8_cfg()))
    q = {name: {} for name in ckpt}
    s = {f"{name}_scale": {} for name in ckpt}
    for name, per_expert in ckpt.items():
        for e, w in per_expert.items():
            wq, ws = quantize_blocks(w[None])
            q[name][e], s[f"{name}_scale"][e] = wq[0], ws[0]
    pre.load_weights(**q, **s)
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        assert torch.equal(getattr(pre, name).float(), getattr(quantized, name).float()), name
    # gate rows first: the dequantized gate block of expert 2 is close to the source
    gate = dequantize_blocks(pre.w13[2:3, :I], pre.w13_scale[2:3, : I // 128])[0]
    torch.testing.assert_close(gate, ckpt["gate_proj"][2], atol=0.07 * ckpt["gate_proj"][2].abs().max(), rtol=0)


def test_fp8_load_errors() -> None:
    layer = FusedMoE(fp8_cfg(), device="cpu", kernel=reference(fp8_cfg()))
    ckpt = checkpoint()
    wq, ws = quantize_blocks(ckpt["down_proj"][0][None])
    with pytest.raises(ValueError, match=r"down_proj_scale: missing expert 0"):
        layer.load_weights(down_proj={0: wq[0]}, down_proj_scale={1: ws[0]})
    with pytest.raises(ValueError, match=r"down_proj_scale\[0\] must have shape \[1, 2\]"):
        layer.load_weights(down_proj={0: wq[0]}, down_proj_scale={0: ws[0].t().contiguous()})
    with pytest.raises(TypeError, match=r"down_proj\[0\] must have dtype float8_e4m3fn"):
        layer.load_weights(down_proj={0: ckpt["down_proj"][0]}, down_proj_scale={0: ws[0]})


def reference(cfg: LayerConfig):
    return compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")


def test_compose_refuses_a_part_that_does_not_compute_the_format() -> None:
    with pytest.raises(
        IncompatibleKernelsError, match="computes with dense weights, not fp8 e4m3, 128x128 block scales"
    ):
        compose(LocalPrepareAndFinalize(), GroupedMMExperts(), fp8_cfg(), device="cpu")
    # one class, both formats: the weights' format picks the GEMM
    bf16 = LayerConfig(moe=fp8_cfg().moe, parallel=fp8_cfg().parallel)
    for cfg in (bf16, fp8_cfg()):
        for part in (TritonExperts, FusedTritonExperts):
            assert compose(LocalPrepareAndFinalize(), part(), cfg, device="cpu").experts.name == part.__name__


@pytest.mark.parametrize("t", [0, 1, 7, 20])
def test_triton_fp8_experts_match_the_loop_on_dequantized_weights(t: int) -> None:
    cfg = fp8_cfg()
    layer = FusedMoE(cfg, device="cpu", kernel=compose(LocalPrepareAndFinalize(), TritonExperts(), cfg))
    layer.load_weights(**checkpoint())
    x, tw, ids = routed(t)
    out = layer.kernel(x, layer.weights, tw, ids)
    ref = reference(cfg)(x, layer.weights, tw, ids)  # dequantized weights, bf16 activations
    assert out.shape == (t, H) and out.dtype == torch.bfloat16
    if t == 0:
        return
    err = rel_err(out, ref)
    assert err <= 0.1, err
    assert err > 1e-4, "as close as an unquantized computation: were the activations quantized at all?"


def test_local_masked_prepare_quantizes_rows_into_the_fp8_layout() -> None:
    cfg = fp8_cfg()
    ctx = layer_context(cfg, device="cpu")
    pf = LocalMaskedPrepareAndFinalize()
    fmt = TokenFormat(Layout.MASKED, alignment=128, act_quant=ActQuant())
    assert pf.check_format(ctx, fmt).ok
    pf.bind(ctx, fmt)
    from moe_kernels.core.compose import WorkspaceCache

    workspace = WorkspaceCache().get(pf.workspace_specs(ctx, fmt), ctx.device)
    x, tw, ids = routed(9)
    tokens = pf.prepare(x, tw, ids, workspace).tokens
    assert tokens.x.dtype == torch.float8_e4m3fn and tokens.x.shape == (E, 128, H)
    assert tokens.x_scale.shape == (E, 128, 1) and tokens.x_scale.stride()[1] == 1  # token-major
    for e in range(E):
        rows = sorted(t for t in range(9) for k in range(K) if int(ids[t, k]) == e)
        assert int(tokens.counts[e]) == len(rows)
        got = dequantize_groups(tokens.x[e, : len(rows)], tokens.x_scale[e, : len(rows)])
        want = x[rows].float()
        # rows land in any order (atomic slots): compare as sets of rows, within the fp8 bound
        for row in want:
            assert ((got - row).abs().amax(dim=1) <= 2**-4 * row.abs().max() + 1e-6).any()


def test_reference_experts_dequantize_fp8_tokens() -> None:
    """Tokens that arrive quantized (fp8 dispatch) are dequantized by the reference."""
    from moe_kernels.core.contract import StandardTokens
    from moe_kernels.kernels import quantize_rows

    cfg = fp8_cfg()
    layer = FusedMoE(cfg, device="cpu", kernel=reference(cfg))
    layer.load_weights(**checkpoint())
    x, tw, ids = routed(5)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(5, 1)
    quantize_rows(x, q, s)
    experts = TorchReferenceExperts()
    experts.bind(layer_context(cfg, device="cpu"))
    from_fp8, from_bf16 = torch.empty_like(x), torch.empty_like(x)
    experts.apply(StandardTokens(q, ids, tw, s), layer.weights, from_fp8, {})
    experts.apply(StandardTokens(dequantize_groups(q, s).bfloat16(), ids, tw), layer.weights, from_bf16, {})
    torch.testing.assert_close(from_fp8.float(), from_bf16.float(), atol=2e-2, rtol=2e-2)
    assert isinstance(layer.weights, ExpertWeights) and layer.weights.is_quantized
