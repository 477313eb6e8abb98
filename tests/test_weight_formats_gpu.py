"""GPU tests of every weight format's Triton paths on real EP-local shapes (skipped without a GPU).

Each scheme's layer runs through the fused decode path (``FusedTritonExperts``), the grouped
path (``TritonExperts``) and, 4-bit formats, the bf16 copy on ``torch._grouped_mm``
(``DequantizedGroupedMMExperts``), composed behind the local prepare/finalize, and is compared with a
plain-torch loop on the dequantized weights in float32 (the format's own rounding excluded).
Tolerances (``max|out - ref| <= tol * max|ref|``): fp8 formats 0.1 -- the activations are
rounded to e4m3 (3 mantissa bits, ~3.6 % standard deviation per value) before two GEMMs and the
SiLU; 4-bit formats 3e-2 -- bf16 activations and each dequantized weight rounded to bf16
(8 mantissa bits), the bf16 layer's budget.

T = 300 is routed skewed (half the slots on two experts), the others uniformly.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import (
    DequantizedGroupedMMExperts,
    FusedTritonExperts,
    LayerConfig,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    QuantConfig,
    TritonExperts,
    WorkspaceCache,
    compose,
)
from moe_kernels.mlp.weights import ExpertWeights, quantize_weights

pytestmark = pytest.mark.gpu

SHAPES = {
    "deepseek_v3_ep8": (32, 8, 7168, 2048),
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "mixtral": (8, 2, 4096, 14336),
    "gpt_oss_20b": (32, 4, 2880, 2880),
}
SCHEMES = {
    "fp8_w8a8_block": QuantConfig(scheme="fp8_w8a8_block"),
    "fp8_w8a8_channel": QuantConfig(scheme="fp8_w8a8_channel"),
    "fp8_w8a8_tensor": QuantConfig(scheme="fp8_w8a8_tensor"),
    "int4_w4a16": QuantConfig(scheme="int4_w4a16", group_size=64),
    "int4_w4a16_zp": QuantConfig(scheme="int4_w4a16", group_size=64, symmetric=False),
    "mxfp4": QuantConfig(scheme="mxfp4"),
}
TOKENS = [0, 1, 7, 300, 2048]


def layer(shape: str, scheme: str) -> LayerConfig:
    e, k, h, i = SHAPES[shape]
    moe = MoEConfig(num_experts=e, top_k=k, hidden_size=h, intermediate_size=i, dtype=torch.bfloat16)
    try:
        return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=2048), quant=SCHEMES[scheme])
    except ValueError as err:  # e.g. gpt-oss's H = 2880 is not a multiple of 128-blocks
        pytest.skip(str(err).splitlines()[0])


@functools.lru_cache(maxsize=1)  # one layer's float32 copy at a time (GiBs on the big shapes)
def weights(shape: str, scheme: str) -> tuple[ExpertWeights, torch.Tensor, torch.Tensor]:
    """The layer's weights in its format and the float32 weights they stand for."""
    e, _, h, i = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device="cuda", generator=gen, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, i, device="cuda", generator=gen, dtype=torch.bfloat16) * i**-0.5
    stored = quantize_weights(w13, w2, layer(shape, scheme).mlp.weights)
    return stored, *(torch.stack([stored.dequantized(x)[j] for x in range(e)]) for j in (0, 1))


def routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_ids, topk_weights)``: distinct experts per token; at T = 300 half the tokens
    pick experts 0 and 1 first (skewed)."""
    gen = torch.Generator(device="cuda").manual_seed(t)
    scores = torch.rand(t, e, device="cuda", generator=gen)
    if t == 300:
        scores[:, :2] += (torch.rand(t, 1, device="cuda", generator=gen) < 0.5).float() * 2
    ids = scores.topk(k, dim=1).indices.to(torch.int32)
    return ids, torch.rand(t, k, device="cuda", generator=gen)


def loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per expert, in float32, on the dequantized weights."""
    out = torch.zeros(x.shape[0], w2.shape[1], device=x.device)
    inter = w2.shape[2]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x[tok].float() @ w13[e].t()
        out.index_add_(0, tok, (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t() * tw[tok, slot, None])
    return out


# pytest varies the top decorator fastest: one (shape, scheme) at a time keeps its weights cached
@pytest.mark.parametrize("experts", [FusedTritonExperts, TritonExperts, DequantizedGroupedMMExperts])
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_format_fast_paths_match_the_loop(shape: str, scheme: str, t: int, experts: type) -> None:
    cfg = layer(shape, scheme)
    if experts is DequantizedGroupedMMExperts and not scheme.startswith(("int4", "mxfp4")):
        pytest.skip("4-bit formats only")
    e, k, h, _ = SHAPES[shape]
    stored, w13, w2 = weights(shape, scheme)
    kernel = compose(LocalPrepareAndFinalize(), experts(), cfg, device="cuda", workspace_cache=WorkspaceCache())
    ids, tw = routing(t, e, k)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    out = kernel(x, stored, tw, ids)
    assert out.shape == (t, h)
    if t == 0:
        return
    ref = loop(x, w13, w2, tw, ids)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= cfg.mlp.tolerance, f"{shape} {scheme} T={t} {experts.__name__}: {err:.3g}"
