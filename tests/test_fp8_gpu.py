"""GPU tests of the fp8 block-scaled experts on real EP-local shapes.

Every fp8 experts class of the registry runs composed behind the local prepare/finalize of its
layout and is compared with a plain-torch loop on the dequantized weights and the unquantized
bf16 activations. The difference is then the activations' quantization error: rounding to e4m3
(3 mantissa bits) moves a value by at most 2^-4 of itself, ~3.6 % standard deviation, and a dot
product of many such independent errors keeps about that relative size; two GEMMs and the SiLU
follow. We accept DeepGEMM's similarity metric ``1 - 2 sum(xy) / sum(x^2 + y^2)`` below 2e-3
(an error of ~4.5 % rms gives ~1e-3) and ``max|out - ref| <= 0.1 max|ref|``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import (
    ExpertWeights,
    LayerConfig,
    Layout,
    LocalMaskedPrepareAndFinalize,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    QuantConfig,
    WorkspaceCache,
    compose,
    registry,
)
from moe_kernels.compose import check_pair, layer_context
from moe_kernels.kernels.quant import quantize_fp8_blocks

pytestmark = pytest.mark.gpu

SHAPES = {"deepseek_v3_ep8": (32, 8, 7168, 2048), "qwen3_30b_a3b": (128, 8, 2048, 768)}
CASES = [(0, "uniform"), (1, "uniform"), (7, "skewed"), (128, "uniform"), (4096, "skewed")]
FP8_EXPERTS = {
    part.name: make
    for make in registry.EXPERTS
    if "fp8_w8a8_block" in (part := make(None)).quant_schemes and part.name != "TorchReferenceExperts"
}


def layer(shape: str, **parallel: object) -> LayerConfig:
    e, k, h, i = SHAPES[shape]
    moe = MoEConfig(num_experts=e, top_k=k, hidden_size=h, intermediate_size=i, dtype=torch.bfloat16)
    par = ParallelConfig(**{"max_tokens_per_rank": 4096, **parallel})
    return LayerConfig(moe=moe, parallel=par, quant=QuantConfig(scheme="fp8_w8a8_block"))


def kernel_for(name: str, cfg: LayerConfig):
    experts = FP8_EXPERTS[name](cfg)
    pf = LocalMaskedPrepareAndFinalize() if experts.input_layout is Layout.MASKED else LocalPrepareAndFinalize()
    failed = [c for c in check_pair(pf, experts, layer_context(cfg, device="cuda")) if not c.ok]
    if failed:
        pytest.skip("; ".join(f"{c.name}: {c.reason}" for c in failed))
    return compose(pf, experts, cfg, device="cuda", workspace_cache=WorkspaceCache())


@functools.cache
def weights(shape: str) -> ExpertWeights:
    e, _, h, i = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5
    w2 = torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5
    (q13, s13), (q2, s2) = quantize_fp8_blocks(w13), quantize_fp8_blocks(w2)
    return ExpertWeights(q13, q2, s13, s2)


def routing(shape: str, t: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e, k, h, _ = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(t, e, device="cuda", generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    if kind == "skewed" and t:
        hot = ids == 3
        ids[hot] = ids[:, :1].expand_as(ids)[hot]
        ids[:, 0] = 3
        ids[::3, 1:4] = -1
    return x, torch.rand(t, k, device="cuda", generator=gen), ids


def reference(x: torch.Tensor, w: ExpertWeights, topk_w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The plain loop on the dequantized weights and the bf16 activations, fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w.num_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        w13, w2 = w.dequantized(e)
        h = x[tok].float() @ w13.T
        y = (F.silu(h[:, : w.inter]) * h[:, w.inter :]) @ w2.T
        out.index_add_(0, tok, y * topk_w[tok, slot, None])
    return out


def assert_quantization_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape, what
    if out.numel() == 0:
        return
    out = out.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    o, r = out.double(), ref.double()
    diff = 1 - 2 * (o * r).sum() / (o * o + r * r).sum().clamp_min(1e-30)
    assert diff.item() < 2e-3, f"{what}: similarity metric {diff.item():.2e}"
    rel = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert rel <= 0.1, f"{what}: max error {rel:.3f} of max |ref|"


@pytest.mark.parametrize(("t", "route"), CASES)
@pytest.mark.parametrize("name", list(FP8_EXPERTS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_experts_match_the_dequantized_loop(shape, name, t, route):
    kernel = kernel_for(name, layer(shape))
    x, w, ids = routing(shape, t, route, seed=t)
    out = kernel(x, weights(shape), w, ids)
    assert_quantization_close(out, reference(x, weights(shape), w, ids), f"{shape} {name} T={t} {route}")


@pytest.mark.parametrize("name", ["Fp8MaskedDeepGemmExperts", "Fp8HybridDeepGemmExperts", "Fp8DeepGemmExperts"])
def test_fp8_paths_replay_in_a_cuda_graph(name):
    shape = "deepseek_v3_ep8"
    kernel = kernel_for(name, layer(shape, cuda_graphs=True, max_tokens_per_rank=256))
    w = weights(shape)
    x, tw, ids = routing(shape, 64, "skewed", seed=1)
    kernel(x, w, tw, ids)  # JIT compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(x, w, tw, ids, check_values=False)
    x2, tw2, ids2 = routing(shape, 64, "uniform", seed=2)
    x.copy_(x2)
    tw.copy_(tw2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert_quantization_close(out, reference(x2, w, tw2, ids2), f"{name} graph replay")
