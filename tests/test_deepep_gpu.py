"""Expert parallelism on GPUs: DeepEP (both modes) and torch all-to-all over NCCL, end to end
at a DeepSeek-V3-like shape, one process per visible GPU (EP = number of GPUs, any size >= 2).

One launch runs every scenario (process start-up, NCCL set-up and DeepEP's JIT compiles are
paid once); the tests read the per-scenario outcomes. The reference gathers every rank's
tokens, lets each rank add its own experts' contributions in fp32, and sums across ranks.

Run on a machine with DeepEP 2.5, DeepGEMM and NCCL >= 2.29.2, set up as docs/gpu-setup.md says::

    python3 -m pytest -q -m multigpu tests/test_deepep_gpu.py
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_kernels.tools.launcher import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

# DeepSeek-V3-like layer, modest T
E, K, H, I = 256, 8, 7168, 2048  # noqa: E741 (the usual MoE letters)
MAX_TOKENS = 256  # one JIT specialisation shared by every DeepEP scenario below but the large-T one
BIG_T = 4096  # the earlier probe's cudaErrorIllegalAddress shape


# --- inputs and reference --------------------------------------------------------------------


def local_weights(rank: int, world: int):
    """This rank's weights, ``w13 [E_local, 2I, H]`` and ``w2 [E_local, H, I]`` bf16 (scaled for
    O(1) outputs), in local order whatever the placement."""
    from moe_kernels import ExpertWeights

    g = torch.Generator(device="cuda").manual_seed(1000 + rank)
    e_local = E // world
    w13 = torch.randn(e_local, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) / H**0.5
    w2 = torch.randn(e_local, H, I, device="cuda", dtype=torch.bfloat16, generator=g) / I**0.5
    return ExpertWeights(w13, w2)


def routed_tokens(t: int, seed: int, holes: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [t, H]`` bf16, ``topk_ids [t, K]`` int64 (distinct, some -1), ``topk_weights [t, K]`` f32."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, H, device="cuda", generator=g).to(torch.bfloat16)
    scores = torch.rand(t, E, device="cuda", generator=g)
    weights, ids = scores.topk(K, dim=-1)
    if holes and t:
        ids[::7, 3] = -1
    return x, ids, weights.softmax(dim=-1).float().contiguous()


def distributed_reference(group, x, ids, weights, w, placement=None) -> torch.Tensor:
    """The whole layer for this rank's tokens in fp32: every rank adds its experts' share (the
    experts its placement gives it, contiguous by default) for every rank's tokens, then the
    partial outputs are summed across ranks."""
    world, rank = group.size(), group.rank()
    w13, w2 = w.w13, w.w2
    e_local = w13.shape[0]
    mine = list(placement.local_experts) if placement is not None else list(range(rank * e_local, (rank + 1) * e_local))
    sizes_t = torch.tensor([x.shape[0]], device="cuda")
    sizes = [torch.empty_like(sizes_t) for _ in range(world)]
    dist.all_gather(sizes, sizes_t, group=group)
    sizes = [int(s) for s in torch.cat(sizes).tolist()]
    pad = max(max(sizes), 1)

    def gather(t: torch.Tensor, fill: float) -> torch.Tensor:
        padded = torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device="cuda")
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    all_x, all_ids, all_w = gather(x, 0), gather(ids.long(), -1), gather(weights, 0)
    partial = torch.zeros(all_x.shape, dtype=torch.float32, device="cuda")
    for e in range(e_local):
        token, slot = torch.nonzero(all_ids == mine[e], as_tuple=True)
        if token.numel() == 0:
            continue
        h = all_x[token].float() @ w13[e].float().t()
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].float().t()
        partial.index_add_(0, token, y * all_w[token, slot].unsqueeze(1))
    dist.all_reduce(partial, group=group)
    start = sum(sizes[:rank])
    return partial[start : start + x.shape[0]]


def calc_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """DeepGEMM's accuracy metric, 1 - cosine-like similarity (0 = identical)."""
    a, b = a.double(), b.double()
    denom = (a * a + b * b).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (a * b).sum() / denom)


def verdict(out: torch.Tensor, ref: torch.Tensor, **extra) -> dict:
    diff = calc_diff(out, ref)
    finite = bool(torch.isfinite(out).all())
    ok = finite and diff < 1e-3
    return {"status": "ok" if ok else "wrong", "diff": diff, "finite": finite, **extra}


def layer_cfg(group, *, max_tokens: int = MAX_TOKENS, cuda_graphs: bool = False):
    from moe_kernels import LayerConfig, MoEConfig, ParallelConfig

    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
    par = ParallelConfig(
        ep_size=group.size(), ep_rank=group.rank(), max_tokens_per_rank=max_tokens, cuda_graphs=cuda_graphs
    )
    return LayerConfig(moe=moe, parallel=par)


# --- scenarios (run on every rank, in the same order) --------------------------------------------


def combine_sums_without_weights(group) -> dict:
    """Pin DeepEP 2.5's semantics: expanded dispatch, identity experts (rows NOT weighted),
    combine -> each token gets (number of its valid experts) x itself; passing topk_weights to
    combine changes nothing in x."""
    from moe_kernels.backends import deep_ep as deep_ep_backend
    from moe_kernels.experts.deepgemm import deep_gemm_alignment
    from moe_kernels.prepare_finalize import deepep_buffer as epb

    deep_ep, _ = deep_ep_backend.probe_deep_ep()
    buffer = epb.reserve(group, num_max_tokens_per_rank=MAX_TOKENS, hidden=H, top_k=K)
    x, ids, weights = routed_tokens(64 + 8 * group.rank(), seed=7 + group.rank())
    recv_x, _, recv_w, handle, _ = buffer.dispatch(
        x,
        topk_idx=ids.to(deep_ep.topk_idx_t),
        topk_weights=weights,
        num_experts=E,
        num_max_tokens_per_rank=MAX_TOKENS,
        expert_alignment=deep_gemm_alignment(),
        num_sms=epb.num_sms_for(buffer, E, K),
        do_cpu_sync=True,
        do_expand=True,
    )
    plain, _, _ = buffer.combine(recv_x, handle=handle)
    with_weights, reduced_w, _ = buffer.combine(recv_x, handle=handle, topk_weights=recv_w)
    count = (ids >= 0).sum(dim=1, keepdim=True).float()
    unweighted = count * x.float()
    weighted = (weights * (ids >= 0)).sum(dim=1, keepdim=True) * x.float()
    err_unweighted = calc_diff(plain, unweighted)
    err_weighted = calc_diff(plain, weighted)
    ok = err_unweighted < 1e-4 and err_weighted > 1e-2 and torch.equal(plain, with_weights)
    epb.release(group)
    return {
        "status": "ok" if ok else "wrong",
        "diff_vs_unweighted_sum": err_unweighted,
        "diff_vs_weighted_sum": err_weighted,
        "weights_change_x": not torch.equal(plain, with_weights),
        "reduced_weights_shape": list(reduced_w.shape) if reduced_w is not None else None,
    }


def run_composed(group, pf, experts, t: int, seed: int, cfg, placement=None) -> dict:
    from moe_kernels import compose

    w = local_weights(group.rank(), group.size())
    kernel = compose(pf, experts, cfg, group=group, placement=placement)
    x, ids, weights = routed_tokens(t, seed)
    out = kernel(x, w, weights, ids)
    ref = distributed_reference(group, x, ids, weights, w, placement)
    kernel.release()
    return verdict(out, ref, tokens=t, pair=kernel.name)


def high_throughput(group, empty_rank: bool = False) -> dict:
    from moe_kernels.experts.deepgemm import ExpandedDeepGemmExperts
    from moe_kernels.prepare_finalize.deepep import DeepEPHighThroughputPrepareAndFinalize

    rank = group.rank()
    t = 0 if empty_rank and rank == 1 else 96 + 17 * rank
    pf = DeepEPHighThroughputPrepareAndFinalize()
    return run_composed(group, pf, ExpandedDeepGemmExperts(), t, 11 + rank, layer_cfg(group))


def placement_honoured(group) -> dict:
    """Experts placed in reverse order across the ranks (rank r holds the highest ids, in
    descending local order): DeepEP routes by contiguous ownership, so the ids are translated
    first; the output must match the reference for that placement."""
    from moe_kernels import ExpertPlacement
    from moe_kernels.experts.deepgemm import ExpandedDeepGemmExperts
    from moe_kernels.prepare_finalize.deepep import DeepEPHighThroughputPrepareAndFinalize

    world, rank = group.size(), group.rank()
    per = E // world
    rank_experts = [list(range(E - 1 - r * per, E - 1 - (r + 1) * per, -1)) for r in range(world)]
    placement = ExpertPlacement.from_rank_experts(rank_experts, rank)
    pf = DeepEPHighThroughputPrepareAndFinalize()
    return run_composed(group, pf, ExpandedDeepGemmExperts(), 64 + 3 * rank, 51 + rank, layer_cfg(group), placement)


def placements_that_differ_are_refused(group) -> dict:
    """Ranks built with different placements: the same error on every rank when the kernel is
    built, instead of tokens sent to ranks that do not hold their experts."""
    from moe_kernels import ExpertPlacement, compose
    from moe_kernels.experts.deepgemm import ExpandedDeepGemmExperts
    from moe_kernels.prepare_finalize.deepep import DeepEPLowLatencyPrepareAndFinalize

    world, rank = group.size(), group.rank()
    contiguous = ExpertPlacement.contiguous(E, world, rank)
    owners = list(range(world)) * (E // world)  # interleaved on rank 0 only
    placement = ExpertPlacement.from_owners(owners, rank) if rank == 0 else contiguous
    try:
        compose(
            DeepEPLowLatencyPrepareAndFinalize(),
            ExpandedDeepGemmExperts(),
            layer_cfg(group),
            group=group,
            placement=placement,
        )
    except ValueError as e:
        ok = "expert placement (fingerprint)" in str(e)
        return {"status": "ok" if ok else "wrong", "message": str(e)[:200]}
    return {"status": "wrong", "message": "a kernel was built although the ranks' placements differ"}


def low_latency_with_graph(group) -> dict:
    """Eager call (builds the buffer, compiles, sizes workspaces), then capture prepare ->
    experts -> finalize in a CUDA graph and replay it on new inputs written in place: a host
    sync anywhere in the chain would make the capture fail."""
    from moe_kernels import compose
    from moe_kernels.experts.deepgemm import ExpandedDeepGemmExperts
    from moe_kernels.prepare_finalize.deepep import DeepEPLowLatencyPrepareAndFinalize

    rank = group.rank()
    t = 32 + 5 * rank
    w = local_weights(rank, group.size())
    pf = DeepEPLowLatencyPrepareAndFinalize()
    kernel = compose(pf, ExpandedDeepGemmExperts(), layer_cfg(group, cuda_graphs=True), group=group)
    x, ids, weights = routed_tokens(t, 21 + rank)
    eager = kernel(x, w, weights, ids)
    result = {"eager": verdict(eager, distributed_reference(group, x, ids, weights, w))}

    static_x, static_ids, static_w = x.clone(), ids.clone(), weights.clone()
    torch.cuda.synchronize()
    dist.barrier(group=group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernel(static_x, w, static_w, static_ids, check_values=False)
    for replay in range(2):
        x, ids, weights = routed_tokens(t, 100 + 10 * replay + rank)
        static_x.copy_(x)
        static_ids.copy_(ids)
        static_w.copy_(weights)
        graph.replay()
        ref = distributed_reference(group, x, ids, weights, w)
        result[f"replay{replay}"] = verdict(static_out.clone(), ref)
    kernel.release()
    ok = all(v["status"] == "ok" for v in result.values())
    return {"status": "ok" if ok else "wrong", **result}


def torch_a2a_hybrid(group) -> dict:
    from moe_kernels.experts.hybrid import HybridDeepGemmExperts
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    rank = group.rank()
    pf = TorchAllToAllPrepareAndFinalize()
    return run_composed(group, pf, HybridDeepGemmExperts(), 80 + 9 * rank, 31 + rank, layer_cfg(group))


def raw_large_t(group, do_cpu_sync: bool) -> dict:
    """The probe that ended in cudaErrorIllegalAddress, done by the rules: T = 4096 on every
    rank, the same num_max_tokens_per_rank everywhere, the buffer sized by the hint for it,
    SMs explicit. Rows are weighted by hand before combine; then 20 timed round trips."""
    from moe_kernels.backends import deep_ep as deep_ep_backend
    from moe_kernels.experts.deepgemm import deep_gemm_alignment
    from moe_kernels.prepare_finalize import deepep_buffer as epb

    deep_ep, _ = deep_ep_backend.probe_deep_ep()
    buffer = epb.reserve(group, num_max_tokens_per_rank=BIG_T, hidden=H, top_k=K)
    x, ids, weights = routed_tokens(BIG_T, seed=41 + group.rank(), holes=False)
    idx = ids.to(deep_ep.topk_idx_t)
    sms = epb.num_sms_for(buffer, E, K)

    def round_trip() -> torch.Tensor:
        recv_x, _, recv_w, handle, _ = buffer.dispatch(
            x,
            topk_idx=idx,
            topk_weights=weights,
            num_experts=E,
            num_max_tokens_per_rank=BIG_T,
            expert_alignment=deep_gemm_alignment(),
            num_sms=sms,
            do_cpu_sync=do_cpu_sync,
            do_expand=True,
        )
        combined, _, _ = buffer.combine((recv_x.float() * recv_w.unsqueeze(1)).to(torch.bfloat16), handle=handle)
        return combined

    first = time.perf_counter()
    out = round_trip()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - first
    expected = weights.sum(dim=1, keepdim=True) * x.float()
    diff = calc_diff(out, expected)
    dist.barrier(group=group)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        round_trip()
    torch.cuda.synchronize()
    per_trip_ms = (time.perf_counter() - start) / 20 * 1e3
    epb.release(group)
    return {
        "status": "ok" if diff < 1e-4 else "wrong",
        "diff": diff,
        "first_call_s": first_s,
        "round_trip_ms": per_trip_ms,
        "num_sms": sms,
    }


def gpu_scenarios(group) -> dict:
    results: dict[str, dict] = {}

    def record(name, fn, *args):
        try:
            results[name] = fn(group, *args)
        except Exception as exc:  # one failure must not hide the other scenarios
            results[name] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        torch.cuda.synchronize()
        dist.barrier(group=group)

    from moe_kernels.backends import deep_ep as deep_ep_backend

    available = deep_ep_backend.deep_ep_check()
    if available.ok:
        record("combine_sums_without_weights", combine_sums_without_weights)
        record("high_throughput", high_throughput)
        record("high_throughput_empty_rank", high_throughput, True)
        record("low_latency_cuda_graph", low_latency_with_graph)
        record("placement_honoured", placement_honoured)
        record("placements_that_differ_are_refused", placements_that_differ_are_refused)
        record("raw_large_t_high_throughput", raw_large_t, True)
        record("raw_large_t_low_latency", raw_large_t, False)
    else:
        for name in DEEPEP_SCENARIOS:
            results[name] = {"status": "skip", "message": available.reason}
    record("torch_a2a_hybrid", torch_a2a_hybrid)
    return results


DEEPEP_SCENARIOS = [
    "combine_sums_without_weights",
    "high_throughput",
    "high_throughput_empty_rank",
    "low_latency_cuda_graph",
    "placement_honoured",
    "placements_that_differ_are_refused",
    "raw_large_t_high_throughput",
    "raw_large_t_low_latency",
]


# --- the tests -------------------------------------------------------------------------------


@functools.cache
def launch() -> list[dict]:
    return run_ranks(gpu_scenarios, torch.cuda.device_count(), "nccl", timeout_s=540, collective_timeout_s=300)


@pytest.mark.parametrize("scenario", [*DEEPEP_SCENARIOS, "torch_a2a_hybrid"])
def test_expert_parallel_end_to_end(scenario: str):
    per_rank = [r[scenario] for r in launch()]
    for o in per_rank:
        if o["status"] == "skip":
            pytest.skip(o["message"])
    print(f"{scenario}: {per_rank}")
    for rank, o in enumerate(per_rank):
        assert o["status"] == "ok", f"rank {rank}: {o}"
