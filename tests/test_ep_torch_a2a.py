"""Expert parallelism over torch all_to_all on CPUs (gloo), 2 and 4 processes.

Each world size is one launch (process start-up dominates on small CI machines): every rank
runs every scenario through ``compose(TorchAllToAllPrepareAndFinalize(), experts, cfg,
placement=..., group=group)`` with the weights of the experts its placement gives it (in local
order), and compares its output with a single-process plain-loop reference of the whole layer
over all experts. Layers the ranks disagree on are refused when the kernel is built (bind), on
every rank with the same message. The tests below read the per-scenario outcomes.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels.tools.launcher import run_ranks

E, K, H, I = 8, 3, 32, 16  # noqa: E741 (the usual MoE letters)
MAX_TOKENS = 64

SCENARIOS = [
    "random_fp32",
    "random_bf16",
    "empty_rank",
    "skewed_one_expert",
    "skewed_hot_expert",
    "minus_one",
    "placement_reversed_interleaved",
    "placement_shuffled",
    "triton_fp32",
    "triton_bf16",
    "mismatch_hidden_size",
    "mismatch_top_k",
    "mismatch_num_experts",
    "mismatch_dtype",
    "mismatch_placement",
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


def _placement(kind: str, world: int, rank: int):
    """Which experts each rank holds, in local order."""
    from moe_kernels.core.placement import ExpertPlacement

    if kind == "contiguous":
        return ExpertPlacement.contiguous(E, world, rank)
    if kind == "reversed_interleaved":  # rank r: experts E-1-r, E-1-r-W, ... (descending, strided)
        return ExpertPlacement.from_rank_experts([list(range(E - 1 - r, -1, -world)) for r in range(world)], rank)
    if kind == "shuffled":  # a fixed random permutation cut into equal parts
        order = torch.randperm(E, generator=torch.Generator().manual_seed(7)).tolist()
        per = E // world
        return ExpertPlacement.from_rank_experts([order[r * per : (r + 1) * per] for r in range(world)], rank)
    raise ValueError(kind)


def _run_layer(group, routing: str, dtype: torch.dtype, experts_name: str, placement: str = "contiguous") -> dict:
    from moe_kernels import ExpertWeights, TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    w13, w2, per_rank = make_layer(world, routing, dtype)
    x, ids, weights = per_rank[rank]
    placed = _placement(placement, world, rank)
    mine = list(placed.local_experts)  # this rank's experts, in local order
    if experts_name == "reference":
        experts = TorchReferenceExperts()
    else:
        from moe_kernels.experts.triton import TritonExperts

        experts = TritonExperts()
    cfg = _layer_cfg(world, rank, dtype)
    pf = TorchAllToAllPrepareAndFinalize()
    kernel = compose(pf, experts, cfg, placement=placed, group=group, device="cpu")
    out = kernel(x, ExpertWeights(w13[mine].contiguous(), w2[mine].contiguous()), weights, ids)
    ref = loop_reference(x, w13, w2, weights, ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    close = torch.allclose(out.float(), ref, atol=tol, rtol=tol)
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    return {
        "status": "ok" if close else "wrong",
        "max_abs_err": err,
        "tokens": x.shape[0],
        "shape": list(out.shape),
        "dtype": str(out.dtype),
        "local_experts": mine,
        "contiguous": placed.is_contiguous,
    }


def _raised_at_compose(build) -> dict:
    """Build a kernel; a ValueError (not a refusal by the checks) is the expected outcome."""
    from moe_kernels import IncompatibleKernelsError

    try:
        build()
    except IncompatibleKernelsError as exc:
        return {"status": "refused by the checks", "message": str(exc)}
    except ValueError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def _run_mismatch(group, field: str) -> dict:
    from moe_kernels import TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    odd = rank == world - 1  # the last rank disagrees
    hidden = H + 8 if odd and field == "hidden_size" else H
    top_k = K - 1 if odd and field == "top_k" else K
    num_experts = 2 * E if odd and field == "num_experts" else E
    dtype = torch.bfloat16 if odd and field == "dtype" else torch.float32
    cfg = _layer_cfg(world, rank, dtype, hidden=hidden, top_k=top_k, num_experts=num_experts)
    return _raised_at_compose(
        lambda: compose(TorchAllToAllPrepareAndFinalize(), TorchReferenceExperts(), cfg, group=group, device="cpu")
    )


def _run_placement_mismatch(group) -> dict:
    from moe_kernels import TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    # the last rank builds another (valid) table than the others
    placed = _placement("reversed_interleaved" if rank == world - 1 else "contiguous", world, rank)
    cfg = _layer_cfg(world, rank, torch.float32)
    return _raised_at_compose(
        lambda: compose(
            TorchAllToAllPrepareAndFinalize(), TorchReferenceExperts(), cfg, placement=placed, group=group, device="cpu"
        )
    )


def _run_refusals(group) -> dict:
    from moe_kernels import IncompatibleKernelsError, TorchReferenceExperts, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    cfg = _layer_cfg(world, (rank + 1) % world, torch.float32)  # ep_rank disagrees with the group
    try:
        compose(TorchAllToAllPrepareAndFinalize(), TorchReferenceExperts(), cfg, group=group, device="cpu")
    except IncompatibleKernelsError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def _run_select(group) -> dict:
    from moe_kernels import ExpertWeights, TorchReferenceExperts, select
    from moe_kernels.prepare_finalize.deepep import (
        DeepEPHighThroughputPrepareAndFinalize,
        DeepEPLowLatencyPrepareAndFinalize,
    )
    from moe_kernels.prepare_finalize.local import LocalMaskedPrepareAndFinalize, LocalPrepareAndFinalize
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    cfg = _layer_cfg(world, rank, torch.float32)
    pfs = [
        lambda cfg: LocalPrepareAndFinalize(),
        lambda cfg: LocalMaskedPrepareAndFinalize(),
        lambda cfg: DeepEPHighThroughputPrepareAndFinalize(),
        lambda cfg: DeepEPLowLatencyPrepareAndFinalize(),
        lambda cfg: TorchAllToAllPrepareAndFinalize(),
    ]
    selection = select(
        cfg,
        group=group,
        device="cpu",
        prepare_finalize_factories=pfs,
        experts_factories=[lambda cfg: TorchReferenceExperts()],
    )
    # the chosen kernel runs the layer (its bind is the ranks' agreement)
    w13, w2, per_rank = make_layer(world, "random", torch.float32)
    x, ids, weights = per_rank[rank]
    e_local = E // world
    mine = slice(rank * e_local, (rank + 1) * e_local)
    out = selection.kernel(x, ExpertWeights(w13[mine].contiguous(), w2[mine].contiguous()), weights, ids)
    close = torch.allclose(out, loop_reference(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)
    return {
        "status": "ok",
        "plan": [choice.candidate.name for choice in selection.plan],
        "kernel": selection.kernel.name,
        "kernel_matches_reference": close,
        "valid": [c.name for c in selection.candidates if c.valid],
        "refused": {c.name: [f"{f.name}: {f.reason}" for f in c.failures] for c in selection.candidates if not c.valid},
        "explain": selection.explain(),
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
    for placement in ("reversed_interleaved", "shuffled"):
        record(f"placement_{placement}", _run_layer, group, "random", torch.float32, "reference", placement)
    skip = _triton_available()
    for dtype, name in ((torch.float32, "triton_fp32"), (torch.bfloat16, "triton_bf16")):
        if skip:
            results[name] = {"status": "skip", "message": skip}
        else:
            # a non-contiguous placement under the Triton experts too: their local ids come from it
            record(name, _run_layer, group, "minus_one", dtype, "triton", "reversed_interleaved")
    for field in ("hidden_size", "top_k", "num_experts", "dtype"):
        record(f"mismatch_{field}", _run_mismatch, group, field)
    record("mismatch_placement", _run_placement_mismatch, group)
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
    "placement_reversed_interleaved",
    "placement_shuffled",
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
def test_non_contiguous_placements_are_honoured(world: int):
    """Each rank held exactly its placed experts (in the table's local order), and the outputs
    matched the reference above: the a2a routed every token by the placement."""
    for kind in ("reversed_interleaved", "shuffled"):
        per_rank = outcomes(world, f"placement_{kind}")
        held = [o["local_experts"] for o in per_rank]
        assert sorted(e for experts in held for e in experts) == list(range(E)), held
        assert not any(o["contiguous"] for o in per_rank), held
        if kind == "reversed_interleaved":
            assert held == [list(range(E - 1 - r, -1, -world)) for r in range(world)], held


def _assert_same_error_on_every_rank(per_rank: list[dict], field: str, odd_rank: int, world: int) -> None:
    messages = set()
    for rank, o in enumerate(per_rank):
        assert o["status"] == "raised", f"rank {rank}: {o}"
        msg = o["message"]
        messages.add(msg)
        assert f"{field}:" in msg and "the ranks disagree on the layer" in msg, msg
        others = ",".join(str(r) for r in range(world) if r != odd_rank)
        agreeing = f"on rank {others}" if world == 2 else f"on ranks {others}"
        assert agreeing in msg and f"on rank {odd_rank}" in msg, msg
    assert len(messages) == 1, messages


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("field", ["hidden_size", "top_k", "num_experts", "dtype"])
def test_mismatched_config_raises_at_compose_on_every_rank(world: int, field: str):
    _assert_same_error_on_every_rank(outcomes(world, f"mismatch_{field}"), field, world - 1, world)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_with_different_placements_raise_at_compose(world: int):
    per_rank = outcomes(world, "mismatch_placement")
    _assert_same_error_on_every_rank(per_rank, "expert placement (fingerprint)", world - 1, world)
    for o in per_rank:  # the placement is all that differs: one problem listed
        assert " | " not in o["message"], o["message"]


@pytest.mark.parametrize("world", [2, 4])
def test_group_that_disagrees_with_config_is_refused(world: int):
    for o in outcomes(world, "group_disagrees_with_config"):
        assert o["status"] == "raised" and "the config says" in o["message"], o


@pytest.mark.parametrize("world", [2])
def test_select_prefers_torch_a2a_on_cpu(world: int):
    pair = "TorchAllToAllPrepareAndFinalize + TorchReferenceExperts"
    for o in outcomes(world, "select_prefers_a2a_on_cpu"):
        assert o["status"] == "ok", o
        assert o["valid"] == [pair], o
        assert o["plan"] == [pair] and o["kernel"] == pair, o  # with EP: one pair, no token ranges
        assert o["kernel_matches_reference"], o
        for local in ("LocalPrepareAndFinalize", "LocalMaskedPrepareAndFinalize"):
            reasons = o["refused"][f"{local} + TorchReferenceExperts"]
            assert any("needs an EP dispatcher" in r for r in reasons), reasons
        for mode in ("HighThroughput", "LowLatency"):
            reasons = o["refused"][f"DeepEP{mode}PrepareAndFinalize + TorchReferenceExperts"]
            assert any("DeepEP needs a CUDA GPU" in r for r in reasons), reasons
        assert f"CHOSEN T>=1: {pair}" in o["explain"], o["explain"]


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
    from moe_kernels.tools.launcher import RankFailure, RanksFailedError

    with pytest.raises(RanksFailedError, match="rank 1: KeyError: 'rank one is broken'"):
        run_ranks(_fails_on_rank_one, 2, timeout_s=120)
    results = run_ranks(_fails_on_rank_one, 2, timeout_s=120, return_exceptions=True)
    assert results[0] == 0 and isinstance(results[1], RankFailure) and results[1].type_name == "KeyError"


def test_run_ranks_kills_a_hung_rank_at_the_deadline():
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_ranks(_hangs_on_rank_one, 2, timeout_s=20)
