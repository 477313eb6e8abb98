"""Redundant experts (EPLB): placements with replicas, the per-token replica choice, the load
counters, the rebalance and moving to a new placement -- one process for the tables and the local
path, two gloo ranks (one launch) for torch all-to-all, each against the layer without replicas."""

from __future__ import annotations

import functools

import pytest
import torch
from test_tensor_parallel import checkpoint as tp_checkpoint

from moe_kernels import FusedMoE, LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.core import eplb
from moe_kernels.core.placement import ExpertPlacement, map_expert_ids
from moe_kernels.tools.launcher import run_ranks

E, K, H, I = 8, 2, 32, 16  # noqa: E741 (the usual MoE letters)


def layer_cfg(ep_size: int = 1, ep_rank: int = 0) -> LayerConfig:
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.float32)
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=64, ep_size=ep_size, ep_rank=ep_rank))


def checkpoint() -> dict[str, object]:
    return tp_checkpoint(inter=I, hidden=H, experts=E)


def skewed_tokens(t: int, seed: int, ckpt: dict) -> torch.Tensor:
    """Tokens most of which the router sends to expert 0 (they lean on its router row)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, H, generator=g) + 3.0 * ckpt["router_weight"][0]  # type: ignore[index]


def one_process_output(ckpt: dict, x: torch.Tensor) -> torch.Tensor:
    layer = FusedMoE(layer_cfg(), device="cpu")
    layer.load_weights(**ckpt)
    return layer(x)


# --- one process -----------------------------------------------------------------------------


def test_placement_with_replicas() -> None:
    p = ExpertPlacement.from_rank_experts([[0, 1, 2, 0], [3, 4, 5, 1]], ep_rank=1, num_redundant_experts=2)
    assert (p.num_experts, p.num_physical_experts, p.num_local_experts) == (6, 8, 4)
    assert p.replicas[0] == (0, 3) and p.replicas[1] == (1, 7) and p.replicas[4] == (5,)
    with pytest.raises(ValueError, match=r"logical experts without a replica: \[5\]"):
        ExpertPlacement.from_rank_experts([[0, 1, 2, 0], [3, 4, 1, 1]], ep_rank=0, num_redundant_experts=2)
    with pytest.raises(ValueError, match=r"out of range: \[6\]"):
        ExpertPlacement.from_rank_experts([[0, 1, 2, 6], [3, 4, 5, 1]], ep_rank=0, num_redundant_experts=2)
    with pytest.raises(ValueError, match="must be divisible by ep_size"):
        ExpertPlacement.redundant(8, 1, ep_size=2)


def test_replica_is_the_token_index_modulo_the_replica_count() -> None:
    p = ExpertPlacement.from_rank_experts([[0, 1, 0], [2, 0, 1]], ep_rank=0, num_redundant_experts=3)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [-1, 0], [2, 1]])
    slots = map_expert_ids(ids, p.slot_map("cpu"))
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            want = -1 if e < 0 else p.replicas[e][t % len(p.replicas[e])]
            assert int(slots[t, k]) == want, (t, k)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_one_launch_choice_equals_the_torch_lookup(dtype: torch.dtype) -> None:
    """The Triton kernel a GPU runs (here under the interpreter) picks the same slots and counts
    the same load as the plain-torch path."""
    from moe_kernels.kernels.replicas import replica_slots

    p = ExpertPlacement.from_rank_experts([[0, 1, 0], [2, 0, 1]], ep_rank=0, num_redundant_experts=3)
    ids = torch.randint(-1, 3, (37, 2), generator=torch.Generator().manual_seed(0)).to(dtype)
    for table in (p.slot_map("cpu"), ExpertPlacement.contiguous(3).slot_map("cpu")):
        want = map_expert_ids(ids, table)
        load = torch.zeros(6, dtype=torch.int32)
        got = replica_slots(ids, table, load)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(load, torch.bincount(want[want >= 0].long(), minlength=6).int())


def test_bad_load_vectors_are_refused() -> None:
    p = ExpertPlacement.redundant(E, 2, ep_size=2)
    with pytest.raises(ValueError, match=r"load must have shape \[10\] \(one count per physical expert\), got \[8\]"):
        p.rebalance(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="load must have dtype int32 or int64"):
        p.rebalance(torch.zeros(10))
    with pytest.raises(TypeError, match="load: expected a torch.Tensor"):
        p.rebalance([0] * 10)  # type: ignore[arg-type]


def test_rebalance_evens_out_a_skewed_load() -> None:
    """Zipf-like load over 64 experts on 8 ranks with 8 redundant experts: the heaviest rank's
    load over the mean drops from about 2.6 (contiguous, no replicas) to about 1.0."""
    g = torch.Generator().manual_seed(0)
    logical = (1e4 / torch.arange(1, 65).float() ** 1.2)[torch.randperm(64, generator=g)].round().long()
    start = ExpertPlacement.redundant(64, 8, ep_size=8)
    physical = torch.zeros(72, dtype=torch.int64)
    for e, slots in enumerate(start.replicas):  # the measured counts: each replica its share
        for i, s in enumerate(slots):
            physical[s] = logical[e] // len(slots) + (i < logical[e] % len(slots))
    before = eplb.imbalance(ExpertPlacement.contiguous(64, 8).rank_experts, logical.tolist())
    new = start.rebalance(physical)
    after = eplb.imbalance(new.rank_experts, logical.tolist())
    assert before > 2.0 and after < 1.05, (before, after)
    assert all(len(set(r)) == len(r) for r in new.rank_experts)  # no two copies of an expert on one rank


def test_hierarchical_rebalance_keeps_groups_on_nodes() -> None:
    """64 experts in 8 groups, 2 nodes of 4 ranks, 8 redundant: every group's experts (and their
    replicas) sit on one node, and the load stays near even."""
    g = torch.Generator().manual_seed(1)
    logical = (1e4 / torch.arange(1, 65).float() ** 1.2)[torch.randperm(64, generator=g)].round().long()
    start = ExpertPlacement.redundant(64, 8, ep_size=8)
    physical = torch.tensor([int(logical[e]) // len(start.replicas[e]) for r in start.rank_experts for e in r])
    new = start.rebalance(physical, num_nodes=2, num_groups=8)
    node_of_group: dict[int, set[int]] = {}
    for rank, experts in enumerate(new.rank_experts):
        for e in experts:
            node_of_group.setdefault(e // 8, set()).add(rank // 4)
    assert all(len(nodes) == 1 for nodes in node_of_group.values()), node_of_group
    assert eplb.imbalance(new.rank_experts, logical.tolist()) < 1.3
    with pytest.raises(ValueError, match=r"num_nodes \(3\) to divide num_groups"):
        start.rebalance(physical, num_nodes=3, num_groups=8)


def test_local_layer_with_replicas_equals_the_layer_without_and_counts_load() -> None:
    ckpt = checkpoint()
    x = skewed_tokens(12, 1, ckpt)
    ref = one_process_output(ckpt, x)
    layer = FusedMoE(layer_cfg(), placement=ExpertPlacement.redundant(E, 2), device="cpu")
    layer.load_weights(**ckpt)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    load = layer.expert_load
    assert load is not None and load.dtype == torch.int32 and load.shape == (E + 2,)
    assert int(load.sum()) == 12 * K and int(load[0]) > 0 and int(load[E]) > 0  # both replicas of expert 0
    new = layer.placement.rebalance(load)
    layer.apply_placement(new)
    load.zero_()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert int(load.sum()) == 12 * K


# --- two ranks over gloo ---------------------------------------------------------------------


def _ep_layer(group, placement, experts: str) -> FusedMoE:
    from moe_kernels import TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    cfg = layer_cfg(group.size(), group.rank())
    if experts == "reference":
        ex = TorchReferenceExperts()
    else:
        from moe_kernels.experts.triton import TritonExperts

        ex = TritonExperts()
    kernel = compose(TorchAllToAllPrepareAndFinalize(), ex, cfg, placement=placement, group=group, device="cpu")
    return FusedMoE(cfg, placement=placement, group=group, kernel=kernel, device="cpu")


def _eplb_run(group, experts: str) -> dict:
    import torch.distributed as dist

    rank = group.rank()
    ckpt = checkpoint()
    x = skewed_tokens(9 + 4 * rank, 2 + rank, ckpt)
    ref = one_process_output(ckpt, x)
    layer = _ep_layer(group, ExpertPlacement.redundant(E, 2, group.size(), rank), experts)
    layer.load_weights(**ckpt)
    before = (layer(x) - ref).abs().max().item()
    load = layer.expert_load.clone()  # type: ignore[union-attr]
    dist.all_reduce(load, group=group)
    new = layer.placement.rebalance(load)
    layer.apply_placement(new)
    after = (layer(x) - ref).abs().max().item()
    return {
        "status": "ok" if max(before, after) < 1e-4 else "wrong",
        "errors": (before, after),
        "moved": new.rank_experts != ExpertPlacement.redundant(E, 2, group.size(), rank).rank_experts,
        "load_total": int(load.sum()),
        "hot_replicas": len(new.replicas[0]),
    }


def _eplb_disagree(group) -> dict:
    layer = _ep_layer(group, ExpertPlacement.redundant(E, 2, group.size(), group.rank()), "reference")
    layer.load_weights(**checkpoint())
    rows = [list(r) for r in layer.placement.rank_experts]
    if group.rank() == 1:  # this rank would move to another table
        rows[0][0], rows[1][0] = rows[1][0], rows[0][0]
    try:
        layer.apply_placement(ExpertPlacement.from_rank_experts(rows, group.rank(), 2))
    except ValueError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def rank_scenarios(group) -> dict:
    results: dict[str, dict] = {}
    for name, fn, args in (
        ("reference", _eplb_run, ("reference",)),
        ("triton", _eplb_run, ("triton",)),
        ("disagree", _eplb_disagree, ()),
    ):
        try:
            results[name] = fn(group, *args)
        except Exception as exc:  # one scenario failing must not hide the others
            results[name] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
    return results


@functools.cache
def launch() -> list[dict]:
    return run_ranks(rank_scenarios, 2, "gloo", timeout_s=240, collective_timeout_s=60)


@pytest.mark.parametrize("experts", ["reference", "triton"])
def test_two_ranks_with_replicas_equal_the_layer_before_and_after_a_rebalance(experts: str) -> None:
    if experts == "triton" and torch.cuda.is_available():
        pytest.skip("the ranks run Triton on the CPU, which needs the interpreter (not set on GPU machines)")
    outcomes = [r[experts] for r in launch()]
    for rank, outcome in enumerate(outcomes):
        assert outcome["status"] == "ok", f"rank {rank}: {outcome}"
    assert outcomes[0]["moved"], "the rebalance should move experts (the load is skewed)"
    assert outcomes[0]["hot_replicas"] >= 2
    assert outcomes[0]["load_total"] == sum(9 + 4 * r for r in range(2)) * K


def test_ranks_that_disagree_on_a_new_placement_fail_alike() -> None:
    outcomes = [r["disagree"] for r in launch()]
    assert all(o["status"] == "raised" for o in outcomes), outcomes
    assert len({o["message"] for o in outcomes}) == 1 and "new placement (fingerprint)" in outcomes[0]["message"]
