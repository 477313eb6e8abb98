"""On one GPU: the experts on a tensor-parallel shard of Mixtral-8x7B against the unsharded layer,
the cost of choosing replicas (EPLB), and that a layer call, replicas or not, never waits on the
GPU (issue 22: no host sync on the call path). Benchmarks that also check results: they print a table
(run with ``-s``) and do not fail on a missed time target.

A TP = 4 rank runs exactly the experts of a layer with ``intermediate_size / 4``
(``cfg.mlp`` is the same; checked below), so the shard is timed as that layer on one GPU; the
all-reduce over the TP group is not part of it (multi-GPU). The four shards' outputs, summed,
must equal the unsharded layer's. Targets (issue 22): at T >= 1024 the shard takes at most 0.3x
the unsharded time (0.25 is perfect); at T <= 64 it is never slower; the replica choice adds
under 2 us at T <= 64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moe_kernels import LayerConfig, ParallelConfig, load_config, select
from moe_kernels.core.placement import ExpertPlacement, choose_slots
from moe_kernels.kernels.routing import fused_route
from moe_kernels.mlp.shard import IntermediateShard
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.router import Routing
from moe_kernels.selection.timing import Timer, host_us

TP = 4
TOKENS = (1, 64, 1024, 4096)
#: replica choices captured back to back in one graph: a single tiny kernel's replay time is the
#: graph launch's own latency, not what the choice adds to a call
CHOICES_PER_GRAPH = 100


def _timer() -> Timer:
    return Timer(max_runs=100, target_s=0.2)


def _mixtral(tp_size: int = 1, tp_rank: int = 0, inter_divisor: int = 1) -> LayerConfig:
    base = load_config("configs/mixtral-8x7b.yaml")
    moe = base.moe.model_copy(update={"intermediate_size": base.moe.intermediate_size // inter_divisor})
    par = ParallelConfig(tp_size=tp_size, tp_rank=tp_rank, max_tokens_per_rank=max(TOKENS))
    return LayerConfig.model_validate({**base.model_dump(), "moe": moe.model_dump(), "parallel": par.model_dump()})


def _routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(t, e, generator=g, device="cuda").argsort(dim=1)[:, :k].to(torch.int32)
    weights = torch.rand(t, k, generator=g, device="cuda").softmax(dim=1)
    return weights, ids


def _shards(w13: torch.Tensor, w2: torch.Tensor, inter: int) -> list[ExpertWeights]:
    """Rank r's weights: its gate rows and its up rows (not a slice of the stacked w13), its
    down columns."""
    out = []
    for r in range(TP):
        cut = IntermediateShard(inter, TP, r)
        gate, up = w13[:, cut.start : cut.stop], w13[:, inter + cut.start : inter + cut.stop]
        down = w2[:, :, cut.start : cut.stop]
        out.append(ExpertWeights(torch.cat([gate, up], dim=1).contiguous(), down.contiguous()))
    return out


def _compare_at(t: int, full_kernel, shard_kernel, full: ExpertWeights, shards: list[ExpertWeights]) -> str:
    """One row of the table: the shards' sum checked against the unsharded output, then timed."""
    e, k, h = full.num_experts, full_kernel.cfg.moe.top_k, full.hidden
    x = torch.randn(t, h, generator=torch.Generator(device="cuda").manual_seed(t), device="cuda").to(torch.bfloat16)
    weights, ids = _routing(t, e, k, seed=t)
    want = full_kernel(x, full, weights, ids).float()
    summed = sum(shard_kernel(x, w, weights, ids).float() for w in shards)
    err = (summed - want).abs().max().item() / want.abs().max().item()
    assert err < 3e-2, f"T={t}: the shards' sum is off the unsharded output by {err:.3g} (relative)"
    # replayed from CUDA graphs: the kernels' time, as in serving (an eager call's is the host's)
    timer = _timer()
    t_full = timer.graphed(lambda: full_kernel(x, full, weights, ids, check_values=False), "unsharded")
    t_shard = timer.graphed(lambda: shard_kernel(x, shards[0], weights, ids, check_values=False), "shard")
    assert not timer.failures, timer.failures
    ratio, limit = t_shard / t_full, (0.3 if t >= 1024 else 1.0)
    verdict = "met" if ratio <= limit else "MISSED"
    return f"{t:>6} {t_full:>13.1f} {t_shard:>9.1f} {ratio:>6.2f}  <= {limit:.2f} {verdict}"


@pytest.mark.gpu
def test_tp4_shard_of_mixtral_against_the_unsharded_experts() -> None:
    whole, quarter = _mixtral(), _mixtral(inter_divisor=TP)
    assert _mixtral(TP, 1).mlp == quarter.mlp  # what a TP rank runs is the quarter-width layer
    e, h, i = whole.moe.num_experts, whole.moe.hidden_size, whole.moe.intermediate_size
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device="cuda") * h**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g, device="cuda") * i**-0.5).to(torch.bfloat16)
    full_kernel = select(whole, device="cuda").kernel
    shard_kernel = select(quarter, device="cuda").kernel
    print(f"\nMixtral-8x7B experts, TP={TP} shard (I={i // TP}) vs unsharded (I={i}), bf16")
    print(f"  unsharded: {full_kernel.name}\n  shard: {shard_kernel.name}")
    print(f"{'T':>6} {'unsharded us':>13} {'shard us':>9} {'ratio':>6}  target")
    shards = _shards(w13, w2, i)
    for t in TOKENS:
        print(_compare_at(t, full_kernel, shard_kernel, ExpertWeights(w13, w2), shards))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_replica_choice_cost(tokens: int) -> None:
    """DeepSeek-V3-like: 256 logical experts, 32 redundant, 8 ranks (36 physical per rank), top-8.
    A layer chooses the replicas and counts them in its routing kernel's launch: that launch with
    the replica table against the same routing without it is what the choice adds to a call
    (target < 2 us), timed inside a CUDA graph, the slots checked against a plain-torch lookup.
    The choice as a launch of its own (what a kernel called without the layer's router runs) is
    timed beside it."""
    placement = ExpertPlacement.redundant(256, 32, ep_size=8)
    table = placement.slot_map("cuda")
    load = torch.zeros(placement.num_physical_experts, dtype=torch.int32, device="cuda")
    logits = torch.randn(tokens, 256, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
    routing = Routing().fused(256, correction_bias=False)
    assert routing is not None
    _, ids = fused_route(logits, 8, routing)
    _, slots = fused_route(logits, 8, routing, slot_table=table, load=load)
    rows = torch.arange(tokens, device="cuda").unsqueeze(1) % table.shape[1]
    assert torch.equal(slots, table.long()[ids.long(), rows].to(slots.dtype))

    def many(call: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(CHOICES_PER_GRAPH):
                call()

        return run

    timer = _timer()
    routed = timer.graphed(many(lambda: fused_route(logits, 8, routing)), "routing") / CHOICES_PER_GRAPH
    fused = timer.graphed(
        many(lambda: fused_route(logits, 8, routing, slot_table=table, load=load)), "routing + replicas"
    ) / CHOICES_PER_GRAPH  # fmt: skip
    alone = timer.graphed(many(lambda: choose_slots(ids, table, load)), "replicas alone") / CHOICES_PER_GRAPH
    assert not timer.failures, timer.failures
    host = host_us(lambda: fused_route(logits, 8, routing, slot_table=table, load=load)) - host_us(
        lambda: fused_route(logits, 8, routing)
    )
    print(
        f"\nreplica choice + load count, T={tokens}: adds {fused - routed:.2f} us to the routing launch inside "
        f"a CUDA graph (target < 2; routing {routed:.2f} us), {host:.1f} us of host time; as a launch of its "
        f"own {alone:.2f} us"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("redundant", [0, 4])
@pytest.mark.parametrize("tokens", [1, 64, 1024])
def test_no_host_sync_on_the_call_path(redundant: int, tokens: int) -> None:
    """A layer call (router, shared expert, the selected kernel; with replicas: their choice and
    load count) never waits on the GPU: issued behind a long GPU sleep, the calls must all be
    queued before the sleep ends (``host_us`` raises otherwise). Prints the host time per call."""
    from moe_kernels import FusedMoE

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = _small_cfg()
    placement = ExpertPlacement.redundant(cfg.moe.num_experts, redundant) if redundant else None
    layer = FusedMoE(cfg.model_copy(update={"parallel": ParallelConfig(max_tokens_per_rank=max(TOKENS))}),
                     placement=placement, device="cuda")  # fmt: skip
    layer.load_weights(**_checkpoint())
    x = torch.randn(tokens, cfg.moe.hidden_size, device="cuda", dtype=torch.bfloat16)
    host = host_us(lambda: layer(x))
    print(f"\n{layer.kernel.name}, {redundant} redundant experts, T={tokens}: host {host:.1f} us a call")


# --- 2 GPUs over NCCL: the layer as the docs build it ------------------------------------------


def _small_cfg(**parallel: object) -> LayerConfig:
    from moe_kernels import MoEConfig

    moe = MoEConfig(
        num_experts=8, top_k=2, hidden_size=256, intermediate_size=512, dtype=torch.bfloat16,
        num_shared_experts=1, shared_intermediate_size=256,
    )  # fmt: skip
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=256, **parallel))


def _checkpoint() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    e, h, i, s = 8, 256, 512, 256

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    return dict(
        gate_proj={x: rand(i, h) for x in range(e)},
        up_proj={x: rand(i, h) for x in range(e)},
        down_proj={x: rand(h, i) for x in range(e)},
        router_weight=rand(e, h),
        shared_gate_proj=rand(s, h),
        shared_up_proj=rand(s, h),
        shared_down_proj=rand(h, s),
    )


def _nccl_rank(group) -> dict:
    """TP = 2 (kernel selected), then EP = 2 with 2 redundant experts before and after a
    rebalance, each against the one-process layer on this GPU."""
    import torch.distributed as dist

    from moe_kernels import FusedMoE

    rank, device = group.rank(), torch.device("cuda", group.rank())
    ckpt = _checkpoint()
    # the same tokens on both ranks (TP ranks must hold the same tokens), most routed to expert 0
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) + 2 * ckpt["router_weight"][0]  # type: ignore[index]
    x = x.to(device, torch.bfloat16)
    whole = FusedMoE(_small_cfg(), device=device)
    whole.load_weights(**ckpt)
    ref = whole(x).float()
    errors = {}
    tp = FusedMoE(_small_cfg(tp_size=2, tp_rank=rank), device=device, tp_group=group)
    tp.load_weights(**ckpt)
    errors["tp2"] = ((tp(x).float() - ref).abs().max() / ref.abs().max()).item()
    placement = ExpertPlacement.redundant(8, 2, 2, rank)
    ep = FusedMoE(_small_cfg(ep_size=2, ep_rank=rank), placement=placement, device=device, group=group)
    ep.load_weights(**ckpt)
    errors["eplb_before"] = ((ep(x).float() - ref).abs().max() / ref.abs().max()).item()
    load = ep.expert_load.clone()  # type: ignore[union-attr]
    dist.all_reduce(load, group=group)
    ep.apply_placement(ep.placement.rebalance(load))
    errors["eplb_after"] = ((ep(x).float() - ref).abs().max() / ref.abs().max()).item()
    return errors


@pytest.mark.multigpu
def test_tp2_and_eplb_over_nccl_equal_the_one_process_layer() -> None:
    from moe_kernels.tools.launcher import run_ranks

    for rank, errors in enumerate(run_ranks(_nccl_rank, 2, "nccl", timeout_s=600)):
        assert all(err < 3e-2 for err in errors.values()), f"rank {rank}: {errors}"
