"""Expert biases (gpt-oss: ``w2 @ act(w13 @ x + b13) + b2``, weighted by the router) against a plain
torch loop written from gpt-oss's definition: every experts implementation that claims biases, the
Triton GEMM epilogues on their own, and the refusals of those that cannot add them.

Without a GPU the Triton kernels run in the interpreter (tiny shapes, 16-wide tiles).
"""

from __future__ import annotations

import pytest
import torch

from moe_kernels import (
    ExpertWeights,
    FusedTritonExperts,
    IncompatibleKernelsError,
    LayerConfig,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    TritonExperts,
    compose,
)
from moe_kernels.core.compose import layer_context
from moe_kernels.experts.deepgemm import DeepGemmExperts
from moe_kernels.experts.grouped_mm import GroupedMMExperts
from moe_kernels.kernels import contiguous_layout, grouped_gemm_contiguous
from moe_kernels.mlp.activations import Activation

E, K, H, INTER = 4, 2, 64, 32
GPT_OSS = Activation("silu", alpha=1.702, limit=7.0, up_offset=1.0)


def gpt_oss_expert(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
    """One expert as gpt-oss writes it (gate rows then up rows here: the loader de-interleaves)."""
    gate, up = (x @ w13.T + b13).chunk(2, dim=-1)
    gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    return ((up + 1) * (gate * torch.sigmoid(gate * 1.702))) @ w2.T + b2


def problem(t: int = 9, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * INTER, H, generator=gen) * 0.4
    w2 = torch.randn(E, H, INTER, generator=gen) * 0.2
    b13 = torch.randn(E, 2 * INTER, generator=gen) * 2.0  # large enough to move values across the clamps
    b2 = torch.randn(E, H, generator=gen)
    x = torch.randn(t, H, generator=gen)
    ids = torch.rand(t, E, generator=gen).argsort(dim=1)[:, :K].int()
    weights = torch.rand(t, K, generator=gen)
    return x, ExpertWeights(w13, w2, w13_bias=b13, w2_bias=b2), weights, ids


def plain_loop(x, w: ExpertWeights, weights, ids) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            out[t] += weights[t, k] * gpt_oss_expert(x[t], w.w13[e], w.w13_bias[e], w.w2[e], w.w2_bias[e])
    return out


def layer_cfg(expert_bias: bool = True) -> LayerConfig:
    moe = MoEConfig(
        num_experts=E, top_k=K, hidden_size=H, intermediate_size=INTER, dtype=torch.float32, activation=GPT_OSS,
        expert_bias=expert_bias,
    )  # fmt: skip
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=16))


@pytest.mark.parametrize("experts_cls", [TorchReferenceExperts, TritonExperts, FusedTritonExperts])
def test_experts_add_the_biases(experts_cls: type) -> None:
    kernel = compose(LocalPrepareAndFinalize(), experts_cls(), layer_cfg(), device="cpu")
    x, w, weights, ids = problem()
    out = kernel(x, w, weights, ids)
    ref = plain_loop(x, w, weights, ids)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the biases matter: without them the output is far off
    no_bias = plain_loop(x, ExpertWeights(w.w13, w.w2, w13_bias=w.w13_bias * 0, w2_bias=w.w2_bias * 0), weights, ids)
    assert (no_bias - ref).abs().max() > 0.1 * ref.abs().max()


def test_grouped_gemm_epilogue_adds_the_bias_unfused() -> None:
    """The unfused GEMM (fp8 GEMM1, GEMM2): ``out[r] = a[r] @ b[e].T + bias[e]``, padding rows unwritten."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 2], [2, 3], [1, 2]], dtype=torch.int32)
    layout = contiguous_layout(ids, E, 16)
    rows = layout.grouped_layout.shape[0]
    a = torch.randn(rows, H, generator=gen)
    b = torch.randn(E, 24, H, generator=gen)
    bias = torch.randn(E, 24, generator=gen)
    out = torch.full((rows, 24), 7.0)
    grouped_gemm_contiguous(a, b, layout.grouped_layout, out, bias=bias, alignment=16, block_m=16, block_n=16)
    for r, e in enumerate(layout.grouped_layout.tolist()):
        if e < 0:
            assert (out[r] == 7.0).all()
        else:
            torch.testing.assert_close(out[r], a[r] @ b[e].T + bias[e], rtol=1e-5, atol=1e-4)


def test_biases_are_refused_where_a_gemm_cannot_add_them() -> None:
    """DeepGEMM's GEMMs have no bias epilogue: its MLP check refuses, naming the feature, and the
    composer says so; torch._grouped_mm's path and the Triton paths accept."""
    moe = layer_cfg().moe.model_copy(update={"dtype": torch.bfloat16})
    ctx = layer_context(LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=16)), device="cpu")
    verdict = DeepGemmExperts().check_mlp(ctx)
    assert not verdict.ok and "expert biases" in verdict.reason
    for cls in (GroupedMMExperts, TritonExperts, FusedTritonExperts):
        assert cls().check_mlp(ctx).ok
    with pytest.raises(IncompatibleKernelsError, match="expert biases"):
        compose(LocalPrepareAndFinalize(), DeepGemmExperts(), ctx.cfg, device="cpu")


def test_weights_without_the_configs_biases_are_refused() -> None:
    kernel = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), layer_cfg(), device="cpu")
    x, w, weights, ids = problem()
    with pytest.raises(ValueError, match="w13_bias: missing"):
        kernel(x, ExpertWeights(w.w13, w.w2), weights, ids)
    plain = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), layer_cfg(False), device="cpu")
    with pytest.raises(ValueError, match="w13_bias: the layer has no expert biases"):
        plain(x, w, weights, ids)


def test_a_biased_layer_loads_its_experts_in_one_call() -> None:
    """``load_expert_weights`` with biases (what a repacked gpt-oss checkpoint hands over) loads the
    biases too: the layer runs and routes its tokens through gpt-oss's experts."""
    from moe_kernels import FusedMoE

    x, w, _, _ = problem()
    layer = FusedMoE(layer_cfg(), device="cpu")
    layer.load_expert_weights(w)
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(4))
    layer.load_weights(router_weight=router)
    weights, ids = layer.router(x)
    torch.testing.assert_close(layer(x), plain_loop(x, w, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("experts_cls", [GroupedMMExperts, TritonExperts, FusedTritonExperts])
def test_gpu_paths_add_the_biases(experts_cls: type) -> None:
    """bf16 on the GPU (torch._grouped_mm's gather-add, the Triton epilogues) within bf16's 3e-2."""
    moe = layer_cfg().moe.model_copy(update={"dtype": torch.bfloat16})
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=16))
    kernel = compose(LocalPrepareAndFinalize(), experts_cls(), cfg, device="cuda")
    x, w, weights, ids = problem()
    ref = plain_loop(x, w, weights, ids)
    gpu = ExpertWeights(
        *(t.cuda().bfloat16() for t in (w.w13, w.w2)),
        w13_bias=w.w13_bias.cuda().bfloat16(),
        w2_bias=w.w2_bias.cuda().bfloat16(),
    )
    out = kernel(x.cuda().bfloat16(), gpu, weights.cuda(), ids.cuda())
    assert (out.float().cpu() - ref).abs().max() <= 3e-2 * ref.abs().max()
