"""GPU tests of the DeepGEMM and torch._grouped_mm experts on real EP-local layer shapes.

Every STANDARD/BATCHED experts class runs composed behind LocalPrepareAndFinalize and is
compared with a plain-torch per-expert loop written here (fp32 from the bf16 inputs), with
DeepGEMM's own accuracy metric ``1 - 2 sum(x y) / sum(x^2 + y^2)`` and vLLM's bf16 tolerance
(atol = rtol = 3e-2). The expanded (DeepEP) layout is built by hand. The first call of each
weight shape JIT-compiles DeepGEMM kernels, so the shapes are few.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels.compose import WorkspaceCache, compose
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.contract import ExpandedTokens
from moe_kernels.experts.deepgemm import (
    BatchedDeepGemmExperts,
    DeepGemmExperts,
    ExpandedDeepGemmExperts,
    contiguous_alignment,
    deep_gemm_status,
)
from moe_kernels.experts.grouped_mm import GroupedMMExperts
from moe_kernels.experts.hybrid import HybridDeepGemmExperts
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize

pytestmark = pytest.mark.gpu

#: EP-local shapes: (local experts, top-k, H, I)
SHAPES = {
    "deepseek_v3_ep8": (32, 8, 7168, 2048),  # 256 experts / EP 8
    "qwen3_30b_a3b": (128, 8, 2048, 768),
}
#: (tokens, routing): skewed = one hot expert + a third of the slots -1 (experts on other ranks)
CASES = [(0, "uniform"), (1, "uniform"), (7, "skewed"), (128, "uniform"), (128, "skewed"), (4096, "skewed")]
HUGE = 10**9

STANDARD = {
    "deepgemm_contiguous": DeepGemmExperts,
    "hybrid_contiguous": lambda: HybridDeepGemmExperts(threshold=0),
    "hybrid_masked": lambda: HybridDeepGemmExperts(threshold=HUGE, masked_memory_budget=2**40),
    "hybrid_default": HybridDeepGemmExperts,
    "grouped_mm": GroupedMMExperts,
}


def needs(kind: str) -> None:
    if kind != "grouped_mm":
        ok, why = deep_gemm_status()
        if not ok:
            pytest.skip(why)
    major = torch.cuda.get_device_capability()[0]
    if major not in (9, 10):
        pytest.skip(f"SM{major}x: these experts need SM90/SM100")


def layer(shape: str, **parallel: object) -> LayerConfig:
    e, k, h, i = SHAPES[shape]
    moe = MoEConfig(num_experts=e, top_k=k, hidden_size=h, intermediate_size=i, dtype=torch.bfloat16)
    return LayerConfig(moe=moe, parallel=ParallelConfig(**parallel))


@functools.cache
def weights(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    e, _, h, i = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(i**-0.5)
    return w13, w2


def routing(shape: str, t: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] bf16, topk_weights [T, K] f32, topk_ids [T, K] int32 (distinct per token)."""
    e, k, h, _ = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(t, e, device="cuda", generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    if kind == "skewed" and t:
        hot = ids == 3
        ids[hot] = ids[:, :1].expand_as(ids)[hot]  # keep ids distinct when moving 3 into slot 0
        ids[:, 0] = 3
        ids[::3, 1:4] = -1
    w = torch.rand(t, k, device="cuda", generator=gen)
    return x, w, ids


def reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per expert: gather its tokens, fp32 MLP (SiLU on the first half of w13's rows), add weighted."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w13[e].float().T
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].float().T
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out


@functools.cache
def case(shape: str, t: int, kind: str) -> tuple[torch.Tensor, ...]:
    w13, w2 = weights(shape)
    x, w, ids = routing(shape, t, kind, seed=t)
    return x, w, ids, reference(x, w13, w2, w, ids)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape, what
    if out.numel() == 0:
        return
    out = out.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    o, r = out.double(), ref.double()
    diff = 1 - 2 * (o * r).sum() / (o * o + r * r).sum().clamp_min(1e-30)
    assert diff.item() < 1e-4, f"{what}: DeepGEMM metric {diff.item():.2e}"
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(("t", "route"), CASES)
@pytest.mark.parametrize("kind", list(STANDARD))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_standard_experts_match_the_loop(shape, kind, t, route):
    needs(kind)
    cfg = layer(shape)
    w13, w2 = weights(shape)
    x, w, ids, ref = case(shape, t, route)
    kernel = compose(LocalPrepareAndFinalize(), STANDARD[kind](), cfg, device="cuda")
    assert_matches(kernel(x, w13, w2, w, ids), ref, f"{shape} {kind} T={t} {route}")


@pytest.mark.parametrize(("t", "route"), CASES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_experts_match_the_loop(shape, t, route):
    """M = T: unaligned for T = 1, 7 (staged through aligned scratch), aligned for 128, 4096."""
    needs("batched")
    cfg = layer(shape)
    w13, w2 = weights(shape)
    x, w, ids, ref = case(shape, t, route)
    kernel = compose(LocalPrepareAndFinalize(batched=True), BatchedDeepGemmExperts(), cfg, device="cuda")
    assert_matches(kernel(x, w13, w2, w, ids), ref, f"{shape} batched T={t} {route}")


def expanded_layout(counts: list[int], alignment: int, extra: int, hidden: int, seed: int):
    """Hand-made DeepEP expanded output: expert e's rows start at align(end[e-1]); every row
    outside a segment holds NaN (garbage must never reach the output)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    starts, ends, end = [], [], 0
    for c in counts:
        start = -(-end // alignment) * alignment
        starts.append(start)
        end = start + c
        ends.append(end)
    rows = -(-end // alignment) * alignment + extra
    x = torch.full((rows, hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
    row_expert = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    for e, (s, c) in enumerate(zip(starts, counts, strict=True)):
        x[s : s + c] = torch.randn(c, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        row_expert[s : s + c] = e
    row_weights = torch.rand(rows, device="cuda", generator=gen)
    return x, torch.tensor(ends, dtype=torch.int32, device="cuda"), row_weights, row_expert


@pytest.mark.parametrize("profile", ["skewed", "sparse", "empty"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_expanded_experts_weight_valid_rows_and_zero_the_rest(shape, profile):
    needs("expanded")
    e, _, h, i = SHAPES[shape]
    w13, w2 = weights(shape)
    gen = torch.Generator().manual_seed(e)
    if profile == "skewed":  # one hot expert, the rest random, some empty
        counts = torch.randint(0, 40, (e,), generator=gen)
        counts[::5] = 0
        counts[e // 2] = 1500
    elif profile == "sparse":  # decode-like: a few rows on a few experts
        counts = torch.zeros(e, dtype=torch.int64)
        counts[torch.randperm(e, generator=gen)[:5]] = torch.tensor([1, 2, 3, 1, 7])
    else:
        counts = torch.zeros(e, dtype=torch.int64)
    counts = counts.tolist()
    alignment = contiguous_alignment()
    x, ends, row_weights, row_expert = expanded_layout(counts, alignment, alignment, h, seed=len(counts))
    expected_m = max(1, sum(counts) // e)
    tokens = ExpandedTokens(x, ends, row_weights, alignment, expected_m)
    experts = ExpandedDeepGemmExperts()
    failed = [c for c in experts.checks(layer(shape), torch.device("cuda")) if not c.ok]
    assert not failed, failed
    workspace = WorkspaceCache().get(experts.workspace_shapes(tokens, w13, w2), x.device)
    for buf in workspace.values():
        buf.fill_(float("nan"))
    out = torch.full_like(x, float("nan"))
    experts.apply(tokens, w13, w2, out, workspace)

    valid = row_expert >= 0
    assert (out[~valid] == 0).all(), "rows outside the segments must be zeros"
    ref = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
    for ex in range(e):
        rows = torch.nonzero(row_expert == ex).squeeze(1)
        if rows.numel():
            hh = x[rows].float() @ w13[ex].float().T
            ref[rows] = ((F.silu(hh[:, :i]) * hh[:, i:]) @ w2[ex].float().T) * row_weights[rows, None]
    assert_matches(out[valid], ref[valid], f"{shape} expanded {profile}")


def capture_and_replay(kernel, shape: str, t: int) -> None:
    """Warm up, capture one call in a CUDA graph, then feed new inputs in place and replay."""
    w13, w2 = weights(shape)
    x, w, ids = routing(shape, t, "skewed", seed=1)
    kernel(x, w13, w2, w, ids)  # JIT-compiles and grows the workspaces outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(x, w13, w2, w, ids, check_values=False)
    x2, w_2, ids2 = routing(shape, t, "uniform", seed=2)
    x.copy_(x2)
    w.copy_(w_2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, reference(x2, w13, w2, w_2, ids2), f"{shape} graph replay")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_path_replays_in_a_cuda_graph(shape):
    needs("batched")
    cfg = layer(shape, cuda_graphs=True, max_tokens_per_rank=256)
    pf = LocalPrepareAndFinalize(batched=True, capacity=256)
    kernel = compose(pf, BatchedDeepGemmExperts(), cfg, device="cuda", workspace_cache=WorkspaceCache())
    capture_and_replay(kernel, shape, t=200)


@pytest.mark.parametrize("kind", ["deepgemm_contiguous", "hybrid_default", "grouped_mm"])
def test_standard_paths_replay_in_a_cuda_graph(kind):
    needs(kind)
    shape = "qwen3_30b_a3b"
    cfg = layer(shape, cuda_graphs=True)
    kernel = compose(LocalPrepareAndFinalize(), STANDARD[kind](), cfg, device="cuda", workspace_cache=WorkspaceCache())
    capture_and_replay(kernel, shape, t=64)
