"""Expert parallelism over torch all_to_all on CPUs (gloo), 2 and 4 processes.

Each world size is one launch (process start-up dominates on small CI machines): every rank
runs every scenario through ``compose(TorchAllToAllPrepareAndFinalize, experts)`` with its
own slice of the experts, and compares its output with a single-process plain-loop reference
of the whole layer over all experts. The tests below read the per-scenario outcomes.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels.distributed import run_ranks

E, K, H, I = 8, 3, 32, 16  # noqa: E741 (the usual MoE letters)
MAX_TOKENS = 64

SCENARIOS = [
    "random_fp32",
    "random_bf16",
    "empty_rank",
    "skewed_one_expert",
    "skewed_hot_expert",
    "minus_one",
    "expert_map",
    "triton_fp32",
    "triton_bf16",
    "mismatch_hidden_size",
    "mismatch_top_k",
    "mismatch_num_experts",
    "mismatch_dtype",
    "bad_expert_map",
    "group_disagrees_with_config",
    "select_prefers_a2a_on_cpu",
]


# --- the single-process reference ------------------------------------------------------------


def loop_reference(x, w13, w2, topk_weights, topk_ids):
    """out[t] = sum_k w[t,k] * w2[e] @ (silu(gate_e @ x[t]) * (up_e @ x[t])) over all E experts."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            h = w13[e].float() @ x[t].float()
            out[t] += float(topk_weights[t, k]) * (w2[e].float() @ (F.silu(h[:inter]) * h[inter:]))
    return out


def make_layer(world: int, routing: str, dtype: torch.dtype, seed: int = 0, hidden: int = H, top_k: int = K):
    """The same global layer on every rank: per-rank tokens and all experts' weights."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(E, hidden, I, generator=g) / I**0.5).to(dtype)
    per_rank = []
    for r in range(world):
        t = 0 if routing == "empty_rank" and r == 1 else 5 + 3 * r
        x = torch.randn(t, hidden, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(t)]) if t else torch.empty(0, top_k)
        ids = ids.to(torch.int64)
        if routing == "skewed_one_expert" and t:  # every token to the last expert only
            ids[:, 0] = E - 1
            ids[:, 1:] = -1
        if routing == "skewed_hot_expert" and t:  # every token uses expert 0 (rank 0), plus others
            ids = torch.stack(
                [torch.cat([torch.zeros(1), torch.randperm(E - 1, generator=g)[: top_k - 1] + 1]) for _ in range(t)]
            )
            ids = ids.to(torch.int64)
        if routing == "minus_one" and t:
            ids[::2, 1] = -1
            ids[0, :] = -1  # a token routed nowhere: its output is zero
        weights = torch.rand(t, top_k, generator=g)
        per_rank.append((x, ids.to(torch.int32 if r % 2 else torch.int64), weights))
    return w13, w2, per_rank


# --- the rank function -----------------------------------------------------------------------


def _layer_cfg(world: int, rank: int, dtype: torch.dtype, hidden: int = H, top_k: int = K, num_experts: int = E):
    from moe_kernels import LayerConfig, MoEConfig, ParallelConfig

    moe = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=I, dtype=dtype)
    return LayerConfig(moe=moe, parallel=ParallelConfig(ep_size=world, ep_rank=rank, max_tokens_per_rank=MAX_TOKENS))


def _run_layer(group, routing: str, dtype: torch.dtype, experts_name: str, with_map: bool = False) -> dict:
    from moe_kernels import TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    w13, w2, per_rank = make_layer(world, routing, dtype)
    x, ids, weights = per_rank[rank]
    e_local = E // world
    lo = rank * e_local
    if experts_name == "reference":
        experts = TorchReferenceExperts()
    else:
        from moe_kernels.experts.triton import TritonExperts

        experts = TritonExperts()
    cfg = _layer_cfg(world, rank, dtype)
    kernel = compose(TorchAllToAllPrepareAndFinalize(group, MAX_TOKENS), experts, cfg, device="cpu")
    expert_map = None
    if with_map:
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[lo : lo + e_local] = torch.arange(e_local, dtype=torch.int32)
    out = kernel(
        x, w13[lo : lo + e_local].contiguous(), w2[lo : lo + e_local].contiguous(), weights, ids, expert_map=expert_map
    )
    ref = loop_reference(x, w13, w2, weights, ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    close = torch.allclose(out.float(), ref, atol=tol, rtol=tol)
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    return {"status": "ok" if close else "wrong", "max_abs_err": err, "tokens": x.shape[0], "shape": list(out.shape)}


def _run_mismatch(group, field: str) -> dict:
    from moe_kernels import TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    odd = rank == world - 1  # the last rank disagrees
    hidden = H + 8 if odd and field == "hidden_size" else H
    top_k = K - 1 if odd and field == "top_k" else K
    num_experts = 2 * E if odd and field == "num_experts" else E
    dtype = torch.bfloat16 if odd and field == "dtype" else torch.float32
    g = torch.Generator().manual_seed(rank)
    e_local = num_experts // world
    cfg = _layer_cfg(world, rank, dtype, hidden=hidden, top_k=top_k, num_experts=num_experts)
    kernel = compose(TorchAllToAllPrepareAndFinalize(group, MAX_TOKENS), TorchReferenceExperts(), cfg, device="cpu")
    x = torch.randn(4, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(4)])
    w13 = torch.randn(e_local, 2 * I, hidden).to(dtype)
    w2 = torch.randn(e_local, hidden, I).to(dtype)
    try:
        kernel(x, w13, w2, torch.rand(4, top_k), ids)
    except ValueError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def _run_bad_map(group) -> dict:
    from moe_kernels import TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    e_local = E // world
    cfg = _layer_cfg(world, rank, torch.float32)
    kernel = compose(TorchAllToAllPrepareAndFinalize(group, MAX_TOKENS), TorchReferenceExperts(), cfg, device="cpu")
    reversed_map = torch.full((E,), -1, dtype=torch.int32)  # this rank's experts, numbered backwards
    reversed_map[rank * e_local : (rank + 1) * e_local] = torch.arange(e_local - 1, -1, -1, dtype=torch.int32)
    if e_local == 1:  # a single local expert cannot be reversed: point at another rank's instead
        reversed_map = torch.roll(reversed_map, 1)
    x = torch.randn(3, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(3)])
    try:
        kernel(
            x,
            torch.randn(e_local, 2 * I, H),
            torch.randn(e_local, H, I),
            torch.rand(3, K),
            ids,
            expert_map=reversed_map,
        )
    except ValueError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def _run_refusals(group) -> dict:
    from moe_kernels import IncompatibleKernelsError, TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    cfg = _layer_cfg(world, (rank + 1) % world, torch.float32)  # ep_rank disagrees with the group
    try:
        compose(TorchAllToAllPrepareAndFinalize(group, MAX_TOKENS), TorchReferenceExperts(), cfg, device="cpu")
    except IncompatibleKernelsError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def _run_select(group) -> dict:
    from moe_kernels import TorchReferenceExperts
    from moe_kernels.prepare_finalize.deepep import (
        DeepEPHighThroughputPrepareAndFinalize,
        DeepEPLowLatencyPrepareAndFinalize,
    )
    from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize
    from moe_kernels.select import candidates

    world, rank = group.size(), group.rank()
    cfg = _layer_cfg(world, rank, torch.float32)
    pfs = [
        lambda cfg, group: LocalPrepareAndFinalize(),
        lambda cfg, group: DeepEPHighThroughputPrepareAndFinalize(group, cfg.parallel.max_tokens_per_rank),
        lambda cfg, group: DeepEPLowLatencyPrepareAndFinalize(group, cfg.parallel.max_tokens_per_rank),
        lambda cfg, group: TorchAllToAllPrepareAndFinalize(group, cfg.parallel.max_tokens_per_rank),
    ]
    found = candidates(cfg, torch.device("cpu"), group, pfs, [lambda cfg: TorchReferenceExperts()])
    return {
        "status": "ok",
        "valid": [c.name for c in found if c.valid],
        "refused": {c.name: [f.reason for f in c.failures] for c in found if not c.valid},
    }


def _triton_available() -> str | None:
    if torch.cuda.is_available():
        # these ranks run on the CPU (gloo); with a GPU present Triton is not interpreting
        return "Triton runs on the CPU only under TRITON_INTERPRET=1, which a GPU machine does not set"
    try:
        from moe_kernels.experts.triton import TritonExperts  # noqa: F401
    except Exception as exc:  # the lead's Triton experts may be absent or broken: skip, not fail
        return f"moe_kernels.experts.triton.TritonExperts does not import: {type(exc).__name__}: {exc}"
    return None


def rank_scenarios(group) -> dict:
    """Every scenario on this rank; each outcome a small dict. Scenarios run in the same order
    on every rank, so their collectives pair up."""
    results: dict[str, dict] = {}

    def record(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception as exc:  # one scenario failing must not hide the others
            results[name] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}

    record("random_fp32", _run_layer, group, "random", torch.float32, "reference")
    record("random_bf16", _run_layer, group, "random", torch.bfloat16, "reference")
    record("empty_rank", _run_layer, group, "empty_rank", torch.float32, "reference")
    record("skewed_one_expert", _run_layer, group, "skewed_one_expert", torch.float32, "reference")
    record("skewed_hot_expert", _run_layer, group, "skewed_hot_expert", torch.float32, "reference")
    record("minus_one", _run_layer, group, "minus_one", torch.float32, "reference")
    record("expert_map", _run_layer, group, "random", torch.float32, "reference", True)
    skip = _triton_available()
    for dtype, name in ((torch.float32, "triton_fp32"), (torch.bfloat16, "triton_bf16")):
        if skip:
            results[name] = {"status": "skip", "message": skip}
        else:
            record(name, _run_layer, group, "minus_one", dtype, "triton")
    for field in ("hidden_size", "top_k", "num_experts", "dtype"):
        record(f"mismatch_{field}", _run_mismatch, group, field)
    record("bad_expert_map", _run_bad_map, group)
    record("group_disagrees_with_config", _run_refusals, group)
    record("select_prefers_a2a_on_cpu", _run_select, group)
    return results


# --- the tests -------------------------------------------------------------------------------


@functools.cache
def launch(world: int) -> list[dict]:
    return run_ranks(rank_scenarios, world, "gloo", timeout_s=240, collective_timeout_s=60)


def outcomes(world: int, scenario: str) -> list[dict]:
    per_rank = [r[scenario] for r in launch(world)]
    skips = [o["message"] for o in per_rank if o["status"] == "skip"]
    if skips:
        pytest.skip(skips[0])
    return per_rank


LAYER_SCENARIOS = [
    "random_fp32",
    "random_bf16",
    "empty_rank",
    "skewed_one_expert",
    "skewed_hot_expert",
    "minus_one",
    "expert_map",
    "triton_fp32",
    "triton_bf16",
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", LAYER_SCENARIOS)
def test_matches_single_process_reference(world: int, scenario: str):
    for rank, o in enumerate(outcomes(world, scenario)):
        assert o["status"] == "ok", f"rank {rank}: {o}"


@pytest.mark.parametrize("world", [2, 4])
def test_empty_rank_gets_empty_output(world: int):
    per_rank = outcomes(world, "empty_rank")
    assert per_rank[1]["tokens"] == 0 and per_rank[1]["shape"] == [0, H]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("field", ["hidden_size", "top_k", "num_experts", "dtype"])
def test_mismatched_config_raises_on_every_rank(world: int, field: str):
    for rank, o in enumerate(outcomes(world, f"mismatch_{field}")):
        assert o["status"] == "raised", f"rank {rank}: {o}"
        msg = o["message"]
        assert f"{field}:" in msg, msg
        others = ",".join(map(str, range(world - 1)))
        agreeing = f"on rank {others}" if world == 2 else f"on ranks {others}"
        assert agreeing in msg and f"on rank {world - 1}" in msg, msg


@pytest.mark.parametrize("world", [2, 4])
def test_non_contiguous_expert_map_is_refused(world: int):
    for o in outcomes(world, "bad_expert_map"):
        assert o["status"] == "raised" and "contiguous expert ownership" in o["message"], o


@pytest.mark.parametrize("world", [2, 4])
def test_group_that_disagrees_with_config_is_refused(world: int):
    for o in outcomes(world, "group_disagrees_with_config"):
        assert o["status"] == "raised" and "the config says" in o["message"], o


@pytest.mark.parametrize("world", [2])
def test_select_prefers_torch_a2a_on_cpu(world: int):
    for o in outcomes(world, "select_prefers_a2a_on_cpu"):
        assert o["valid"] == ["TorchAllToAllPrepareAndFinalize + TorchReferenceExperts"], o
        local = o["refused"]["LocalPrepareAndFinalize + TorchReferenceExperts"]
        assert any("needs an EP dispatcher" in r for r in local), local
        for mode in ("HighThroughput", "LowLatency"):
            reasons = o["refused"][f"DeepEP{mode}PrepareAndFinalize + TorchReferenceExperts"]
            assert any("DeepEP needs a CUDA GPU" in r for r in reasons), reasons


# --- the launcher --------------------------------------------------------------------------


def _fails_on_rank_one(group) -> int:
    if group.rank() == 1:
        raise KeyError("rank one is broken")
    return group.rank() * 10


def _hangs_on_rank_one(group) -> int:
    import time

    if group.rank() == 1:
        time.sleep(600)
    return group.rank()


def test_run_ranks_reports_which_rank_raised():
    from moe_kernels.distributed import RankFailure, RanksFailedError

    with pytest.raises(RanksFailedError, match="rank 1: KeyError: 'rank one is broken'"):
        run_ranks(_fails_on_rank_one, 2, timeout_s=120)
    results = run_ranks(_fails_on_rank_one, 2, timeout_s=120, return_exceptions=True)
    assert results[0] == 0 and isinstance(results[1], RankFailure) and results[1].type_name == "KeyError"


def test_run_ranks_kills_a_hung_rank_at_the_deadline():
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_ranks(_hangs_on_rank_one, 2, timeout_s=20)
