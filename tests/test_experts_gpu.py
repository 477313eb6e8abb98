"""GPU tests of every experts class on real EP-local layer shapes, and of CUDA-graph safety.

Every STANDARD and MASKED experts class of the registry (plus the hybrid forced to each path)
runs composed behind the local prepare/finalize of its layout and is compared with a
plain-torch per-expert loop written here (fp32 from the bf16 inputs), with DeepGEMM's own
accuracy metric ``1 - 2 sum(x y) / sum(x^2 + y^2)`` and vLLM's bf16 tolerance
(atol = rtol = 3e-2). The expanded (DeepEP) layout is built by hand. The first call of each
weight shape JIT-compiles kernels, so the shapes are few.

The capture tests replay graphs after eager calls of other sizes and after unrelated
allocations, and check that the replay is right and wrote nothing outside its own memory.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import (
    ExpandedDeepGemmExperts,
    ExpertWeights,
    HybridDeepGemmExperts,
    LayerConfig,
    Layout,
    LocalMaskedPrepareAndFinalize,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    WorkspaceCache,
    WorkspaceError,
    compose,
)
from moe_kernels.backends import deep_gemm
from moe_kernels.core.compose import layer_context
from moe_kernels.core.contract import ExpandedTokens
from moe_kernels.mlp.formats import Dense
from moe_kernels.selection import registry

pytestmark = pytest.mark.gpu

#: EP-local shapes: (local experts, top-k, H, I)
SHAPES = {
    "deepseek_v3_ep8": (32, 8, 7168, 2048),  # 256 experts / EP 8
    "qwen3_30b_a3b": (128, 8, 2048, 768),
}
#: (tokens, routing): skewed = one hot expert spanning many row tiles + a third of the slots -1
CASES = [(0, "uniform"), (1, "uniform"), (7, "skewed"), (128, "skewed"), (4096, "skewed")]
MAX_TOKENS = 4096
HUGE = 10**9


def experts_by_name() -> dict[str, object]:
    """Every registered STANDARD/MASKED experts factory that computes unquantized weights, by class
    name (fp8 weights are test_fp8_gpu.py's), plus the hybrid pinned to each of its paths."""
    made = {}
    for make in registry.EXPERTS:
        part = make(None)
        layouts = (Layout.STANDARD, Layout.MASKED)
        if part.input_layout in layouts and Dense in part.weight_formats and part.name != "TorchReferenceExperts":
            made[part.name] = make
    made["Hybrid(contiguous)"] = lambda cfg: HybridDeepGemmExperts(threshold=0)
    made["Hybrid(masked)"] = lambda cfg: HybridDeepGemmExperts(threshold=HUGE, masked_memory_budget=2**40)
    return made


EXPERTS = experts_by_name()


def layer(shape: str, **parallel: object) -> LayerConfig:
    e, k, h, i = SHAPES[shape]
    moe = MoEConfig(num_experts=e, top_k=k, hidden_size=h, intermediate_size=i, dtype=torch.bfloat16)
    return LayerConfig(moe=moe, parallel=ParallelConfig(**{"max_tokens_per_rank": MAX_TOKENS, **parallel}))


def kernel_for(name: str, cfg: LayerConfig, cache: WorkspaceCache | None = None):
    """The named experts composed behind the local prepare/finalize of their layout; skips with
    the composer's reasons when this GPU cannot run them (e.g. no deep_gemm)."""
    experts = EXPERTS[name](cfg)
    pf = LocalMaskedPrepareAndFinalize() if experts.input_layout is Layout.MASKED else LocalPrepareAndFinalize()
    from moe_kernels.core.compose import check_pair

    failed = [c for c in check_pair(pf, experts, layer_context(cfg, device="cuda")) if not c.ok]
    if failed:
        pytest.skip("; ".join(f"{c.name}: {c.reason}" for c in failed))
    return compose(pf, experts, cfg, device="cuda", workspace_cache=cache or WorkspaceCache())


@functools.cache
def weights(shape: str) -> ExpertWeights:
    e, _, h, i = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(i**-0.5)
    return ExpertWeights(w13, w2)


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


def reference(x: torch.Tensor, w: ExpertWeights, topk_w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per expert: gather its tokens, fp32 MLP (SiLU on the first half of w13's rows), add weighted."""
    inter = w.inter
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w.num_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w.w13[e].float().T
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w.w2[e].float().T
        out.index_add_(0, tok, y * topk_w[tok, slot, None])
    return out


@functools.cache
def case(shape: str, t: int, kind: str) -> tuple[torch.Tensor, ...]:
    x, w, ids = routing(shape, t, kind, seed=t)
    return x, w, ids, reference(x, weights(shape), w, ids)


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
@pytest.mark.parametrize("name", list(EXPERTS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_experts_match_the_loop(shape, name, t, route):
    kernel = kernel_for(name, layer(shape))
    x, w, ids, ref = case(shape, t, route)
    assert_matches(kernel(x, weights(shape), w, ids), ref, f"{shape} {name} T={t} {route}")


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
    e, _, h, i = SHAPES[shape]
    cfg = layer(shape)
    ctx = layer_context(cfg, device="cuda")
    experts = ExpandedDeepGemmExperts()
    failed = [c for c in experts.checks(ctx) if not c.ok]
    if failed:
        pytest.skip("; ".join(c.reason for c in failed))
    w = weights(shape)
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
    alignment = deep_gemm.alignment()
    x, ends, row_weights, row_expert = expanded_layout(counts, alignment, alignment, h, seed=len(counts))
    tokens = ExpandedTokens(x, ends, row_weights, alignment, max(1, sum(counts) // e))
    experts.bind(ctx)
    workspace = WorkspaceCache().get(experts.workspace_specs(ctx, x.shape[0]), x.device)
    for buf in workspace.values():
        buf.fill_(float("nan"))
    out = torch.full_like(x, float("nan"))
    experts.apply(tokens, w, out, workspace)

    valid = row_expert >= 0
    assert (out[~valid] == 0).all(), "rows outside the segments must be zeros"
    ref = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
    for ex in range(e):
        rows = torch.nonzero(row_expert == ex).squeeze(1)
        if rows.numel():
            hh = x[rows].float() @ w.w13[ex].float().T
            ref[rows] = ((F.silu(hh[:, :i]) * hh[:, i:]) @ w.w2[ex].float().T) * row_weights[rows, None]
    assert_matches(out[valid], ref[valid], f"{shape} expanded {profile}")


# --- CUDA graphs ------------------------------------------------------------------------------------


GRAPH_SHAPE = "qwen3_30b_a3b"


@pytest.mark.parametrize("name", list(EXPERTS))
def test_replay_survives_larger_eager_calls_and_unrelated_allocations(name):
    """The sequence that used to corrupt memory: capture at T=64, an eager call at T=6000 on
    the same stream, then 200 unrelated 16 MiB tensors. Workspaces are reserved for the
    largest call when the kernel is built, so nothing grows, the replay stays right, and the
    unrelated tensors (a stand-in for an engine's KV cache) keep their contents."""
    cfg = layer(GRAPH_SHAPE, cuda_graphs=True, max_tokens_per_rank=8192)
    kernel = kernel_for(name, cfg)
    w = weights(GRAPH_SHAPE)
    x, tw, ids = routing(GRAPH_SHAPE, 64, "skewed", seed=1)
    kernel(x, w, tw, ids)  # JIT compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(x, w, tw, ids, check_values=False)
    big = routing(GRAPH_SHAPE, 6000, "uniform", seed=3)
    assert_matches(kernel(*big[:1], w, *big[1:]), reference(big[0], w, big[1], big[2]), f"{name} eager T=6000")
    others = [torch.full((4 * 2**20,), float(j), device="cuda") for j in range(200)]  # 200 x 16 MiB
    x2, tw2, ids2 = routing(GRAPH_SHAPE, 64, "uniform", seed=2)
    x.copy_(x2)
    tw.copy_(tw2)
    ids.copy_(ids2)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, reference(x2, w, tw2, ids2), f"{name} graph replay")
    touched = [j for j, t in enumerate(others) if not bool((t == float(j)).all())]
    assert not touched, f"{name}: the replay overwrote unrelated tensors {touched}"


def test_a_kernel_built_after_a_capture_cannot_grow_its_workspaces():
    """Growing a buffer a captured graph uses would hand its memory back: building a bigger
    kernel on the same cache after the capture raises instead."""
    cache = WorkspaceCache()
    small = kernel_for("TritonExperts", layer(GRAPH_SHAPE, cuda_graphs=True, max_tokens_per_rank=64), cache)
    w = weights(GRAPH_SHAPE)
    x, tw, ids = routing(GRAPH_SHAPE, 64, "uniform", seed=4)
    small(x, w, tw, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        small(x, w, tw, ids, check_values=False)
    with pytest.raises(WorkspaceError, match="used by a captured CUDA graph and cannot grow"):
        kernel_for("TritonExperts", layer(GRAPH_SHAPE, cuda_graphs=True, max_tokens_per_rank=8192), cache)
