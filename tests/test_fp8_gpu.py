"""GPU tests of the fp8 block-scaled experts on real EP-local shapes.

Every STANDARD and MASKED experts class of the registry that computes fp8 weights runs composed behind the local
prepare/finalize of its layout, and the EXPANDED one on a hand-built copy of DeepEP's fp8
dispatch output; each is compared with a plain-torch loop on the dequantized weights and the
unquantized bf16 activations. The difference is then the activations' quantization error: rounding to e4m3
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
    ExpandedDeepGemmExperts,
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
)
from moe_kernels.backends import deep_gemm
from moe_kernels.core.compose import check_pair, layer_context
from moe_kernels.core.contract import ExpandedTokens
from moe_kernels.kernels import quantize_rows
from moe_kernels.mlp.act_quant import ActQuant, scale_view
from moe_kernels.mlp.formats import Fp8Block
from moe_kernels.mlp.fp8 import quantize_blocks
from moe_kernels.selection import registry

pytestmark = pytest.mark.gpu

SHAPES = {"deepseek_v3_ep8": (32, 8, 7168, 2048), "qwen3_30b_a3b": (128, 8, 2048, 768)}
CASES = [(0, "uniform"), (1, "uniform"), (7, "skewed"), (128, "uniform"), (4096, "skewed")]
FP8_EXPERTS = {
    part.name: make
    for make in registry.EXPERTS
    if Fp8Block in (part := make(None)).weight_formats
    and part.name != "TorchReferenceExperts"
    and part.input_layout is not Layout.EXPANDED  # no local prepare/finalize hands those out
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
    (q13, s13), (q2, s2) = quantize_blocks(w13), quantize_blocks(w2)
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


@pytest.mark.parametrize("name", ["MaskedDeepGemmExperts", "HybridDeepGemmExperts", "DeepGemmExperts"])
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


# --- the expanded layout of DeepEP's fp8 dispatch ---------------------------------------------


def expanded_dispatch(
    x: torch.Tensor, ids: torch.Tensor, topk_w: torch.Tensor, num_experts: int, alignment: int
) -> tuple[ExpandedTokens, torch.Tensor, torch.Tensor]:
    """What DeepEP's expanded fp8 dispatch hands the experts, built by hand: one row per (token,
    slot) with an id >= 0, grouped by expert, expert e's rows starting at ``align(end[e-1], A)``,
    and ``A`` more rows past the last segment (a low-latency capacity tail). The rows are the
    tokens quantized per 128 columns, the scales ``[R, H/128]`` float32 token-major with column
    stride ``align(R, 4)`` (``use_tma_aligned_col_major_sf=True``). Every row outside a segment
    holds fp8 NaN (0x7F), a NaN scale and a NaN router weight. Also returns each row's token
    and expert (-1 outside the segments)."""
    device, (t, h) = x.device, x.shape
    tok, slot = torch.nonzero(ids >= 0, as_tuple=True)
    expert = ids[tok, slot].long()
    order = torch.argsort(expert, stable=True)
    tok, slot, expert = tok[order], slot[order], expert[order]
    counts = torch.bincount(expert, minlength=num_experts).tolist()
    starts, ends, end = [], [], 0
    for c in counts:
        starts.append(-(-end // alignment) * alignment)
        end = starts[-1] + c
        ends.append(end)
    rows = -(-end // alignment) * alignment + alignment
    first = torch.tensor([sum(counts[:e]) for e in range(num_experts)], device=device)
    row_of = torch.tensor(starts, device=device)[expert] + torch.arange(len(tok), device=device) - first[expert]

    q_tok = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=device)
    s_tok = torch.empty(t, -(-h // 128), dtype=torch.float32, device=device)
    quantize_rows(x, q_tok, s_tok)
    q = torch.full((rows, h), 0x7F, dtype=torch.uint8, device=device)
    q[row_of] = q_tok.view(torch.uint8)[tok]
    storage, _ = ActQuant().scale_storage(-(-rows // 4) * 4, h)
    scale = scale_view(torch.empty(storage, device=device))[:rows].fill_(float("nan"))
    scale[row_of] = s_tok[tok]
    row_weights = torch.full((rows,), float("nan"), device=device)
    row_weights[row_of] = topk_w[tok, slot]
    row_token = torch.full((rows,), -1, dtype=torch.int64, device=device)
    row_token[row_of] = tok
    row_expert = torch.full((rows,), -1, dtype=torch.int64, device=device)
    row_expert[row_of] = expert
    ends_t = torch.tensor(ends, dtype=torch.int32, device=device)
    tokens = ExpandedTokens(
        q.view(torch.float8_e4m3fn), ends_t, row_weights, alignment, max(1, len(tok) // num_experts), x_scale=scale
    )
    return tokens, row_token, row_expert


@pytest.mark.parametrize("t", [0, 1, 7, 128])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_expanded_experts_weight_valid_rows_and_zero_the_rest(shape, t):
    """Skewed routing (a hot expert in every token, a third of the slots -1) dispatched by hand
    into the psum layout with NaN in every padding row, its scale and its weight. Every row
    outside a segment must come out as zeros; the valid rows, and each token's rows summed (what
    DeepEP's combine does), must match the loop on the dequantized weights within the fp8
    tolerance of this module (T=0: a layout of padding rows only)."""
    e, _, h, i = SHAPES[shape]
    cfg = layer(shape)
    ctx = layer_context(cfg, device="cuda")
    experts = ExpandedDeepGemmExperts()
    failed = [c for c in experts.checks(ctx) if not c.ok]
    if failed:
        pytest.skip("; ".join(f"{c.name}: {c.reason}" for c in failed))
    w = weights(shape)
    x, topk_w, ids = routing(shape, t, "skewed", seed=100 + t)
    tokens, row_token, row_expert = expanded_dispatch(x, ids, topk_w, e, deep_gemm.alignment())
    experts.bind(ctx)
    workspace = WorkspaceCache().get(experts.workspace_specs(ctx, tokens.num_rows), x.device)
    for buf in workspace.values():
        buf.view(torch.uint8).fill_(0xFF)  # NaN in bf16, float8_e4m3fn and float32 alike
    out = torch.full(tokens.x.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    experts.apply(tokens, w, out, workspace)
    torch.cuda.synchronize()

    valid = row_token >= 0
    assert (out[~valid] == 0).all(), "rows outside the segments must be zeros"
    ref = torch.zeros(out.shape, dtype=torch.float32, device="cuda")
    for ex in range(e):
        rows = torch.nonzero(row_expert == ex).squeeze(1)
        if rows.numel():
            w13, w2 = w.dequantized(ex)
            hh = x[row_token[rows]].float() @ w13.T
            ref[rows] = ((F.silu(hh[:, :i]) * hh[:, i:]) @ w2.T) * tokens.row_weights[rows, None]
    assert_quantization_close(out[valid], ref[valid], f"{shape} fp8 expanded T={t} rows")
    combined = torch.zeros(t, h, device="cuda").index_add_(0, row_token[valid], out[valid].float())
    assert_quantization_close(combined, reference(x, w, topk_w, ids), f"{shape} fp8 expanded T={t} combined")
