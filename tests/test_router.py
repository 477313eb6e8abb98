"""route() and Router against a plain per-token loop written for clarity, not speed, and the
router variants against the router modules of transformers itself."""

from __future__ import annotations

import importlib
import math
import re
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.kernels.routing import fused_route
from moe_kernels.model.layer import FusedMoE
from moe_kernels.model.router import Router, Routing, route


def loop_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per token, in float64: scores, (biased) choice values, allowed groups, best top_k."""
    bias = [0.0] * logits.shape[1] if correction_bias is None else correction_bias.double().tolist()
    all_ids, all_weights = [], []
    for row in logits.double().tolist():
        num_experts = len(row)
        if scoring == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = [scores[e] + bias[e] for e in range(num_experts)]

        allowed = list(range(num_experts))
        if num_expert_group is not None:
            size = num_experts // num_expert_group
            group_score = []
            for g in range(num_expert_group):
                members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                # DeepSeek-V3 (with a bias): sum of the two best; otherwise the best one
                group_score.append(sum(members[:2]) if correction_bias is not None else members[0])
            best_groups = sorted(range(num_expert_group), key=lambda g: -group_score[g])[:topk_group]
            allowed = [e for g in best_groups for e in range(g * size, (g + 1) * size)]

        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in chosen]
        if renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        all_ids.append(chosen)
        all_weights.append([w * routed_scaling_factor for w in weights])
    return all_ids, all_weights


def fused(logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor | None = None, **options):
    """:func:`route`'s options run by the one-launch kernel (the Triton interpreter on the CPU)."""
    routing = Routing(**options).fused(logits.shape[1], correction_bias=correction_bias is not None)
    assert routing is not None, f"the kernel implements {options}"
    return fused_route(logits, top_k, routing, correction_bias)


IMPLEMENTATIONS = {"torch": route, "fused": fused}


def assert_matches_loop(logits: torch.Tensor, top_k: int, impl: str = "torch", **kwargs) -> None:
    weights, ids = IMPLEMENTATIONS[impl](logits, top_k, **kwargs)
    want_ids, want_weights = loop_route(logits, top_k, **kwargs)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (logits.shape[0], top_k)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(weights, torch.tensor(want_weights, dtype=torch.float32), rtol=1e-5, atol=1e-6)


CASES = {
    "softmax": dict(top_k=4),
    "softmax-no-renormalize": dict(top_k=4, renormalize=False),
    "sigmoid": dict(top_k=4, scoring="sigmoid"),
    "sigmoid-scaled": dict(top_k=3, scoring="sigmoid", routed_scaling_factor=2.5),
    "grouped-max": dict(top_k=4, num_expert_group=4, topk_group=2),
    "grouped-bias-deepseek": dict(
        top_k=4, scoring="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5, bias=True
    ),
    "bias-no-groups": dict(top_k=2, scoring="sigmoid", bias=True),
    "top1": dict(top_k=1),
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_route_matches_loop(case: str, dtype: torch.dtype, impl: str) -> None:
    kwargs = dict(CASES[case], impl=impl)
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    num_experts = 16
    if kwargs.pop("bias", False):
        kwargs["correction_bias"] = torch.randn(num_experts, generator=gen) * 0.1
    if dtype == torch.float32:
        logits = torch.randn(33, num_experts, generator=gen) * 2
    else:
        # bf16/fp16 round random logits into exact ties, which either order may break:
        # use distinct multiples of 1/4 (exact in both) instead
        logits = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(33)]) * 0.25 - 2
    logits = logits.to(dtype)
    assert_matches_loop(logits, **kwargs)


def test_group_score_is_top2_sum_with_bias_and_max_without() -> None:
    # 4 groups of 2 (sigmoid scores): g0 = (0.953, 0.007) has the best expert but a low
    # top-2 sum; g1 = (0.731, 0.711) and g2 = (0.622, 0.622) have the best sums.
    logits = torch.tensor([[3.0, -5.0, 1.0, 0.9, 0.5, 0.5, -1.0, -1.0]])
    common = dict(scoring="sigmoid", num_expert_group=4, topk_group=2)
    _, ids_sum = route(logits, 2, correction_bias=torch.zeros(8), **common)
    _, ids_max = route(logits, 2, **common)
    assert ids_sum.tolist() == [[2, 3]]  # groups 1 and 2 kept; expert 0 excluded
    assert ids_max.tolist() == [[0, 2]]  # groups 0 and 1 kept


def test_bias_steers_choice_but_not_weights() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    weights, ids = route(logits, 2, correction_bias=bias)
    assert ids.tolist() == [[3, 0]]
    scores = logits.softmax(-1)[0]
    want = torch.stack([scores[3], scores[0]]) / (scores[3] + scores[0])
    torch.testing.assert_close(weights[0], want)


def test_renormalize_and_scaling() -> None:
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    weights, _ = route(logits, 3, routed_scaling_factor=2.5)
    torch.testing.assert_close(weights.sum(-1), torch.full((10,), 2.5))
    raw, _ = route(logits, 3, renormalize=False)
    assert (raw.sum(-1) < 1).all()  # a strict subset of a softmax sums to less than 1


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 6),
    groups=st.sampled_from([None, 1, 2, 4]),
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    biased=st.booleans(),
    impl=st.sampled_from(list(IMPLEMENTATIONS)),
    data=st.data(),
)
def test_ids_distinct_and_in_range_even_with_ties(
    t: int, groups: int | None, scoring: str, biased: bool, impl: str, data: st.DataObject
) -> None:
    num_experts = 8
    topk_group = None if groups is None else data.draw(st.integers(1, groups))
    max_k = num_experts if groups is None else topk_group * (num_experts // groups)
    top_k = data.draw(st.integers(1, max_k))
    # few distinct values: many exact ties
    values = data.draw(st.lists(st.integers(-2, 2), min_size=t * num_experts, max_size=t * num_experts))
    logits = torch.tensor(values, dtype=torch.float32).view(t, num_experts)
    bias = torch.tensor(data.draw(st.lists(st.integers(-1, 1), min_size=8, max_size=8)), dtype=torch.float32)
    weights, ids = IMPLEMENTATIONS[impl](
        logits,
        top_k,
        scoring=scoring,
        num_expert_group=groups,
        topk_group=topk_group,
        correction_bias=bias if biased else None,
    )
    assert ids.shape == (t, top_k)
    for row in ids.tolist():
        assert len(set(row)) == top_k
        assert all(0 <= e < num_experts for e in row)
    torch.testing.assert_close(weights.sum(-1), torch.ones(t))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_empty_batch(impl: str) -> None:
    route_with = IMPLEMENTATIONS[impl]
    weights, ids = route_with(torch.empty(0, 8), 2, num_expert_group=2, topk_group=1, correction_bias=torch.zeros(8))
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "kwargs"),
    [
        (37, 60, dict(top_k=6)),  # E not a power of two; tokens over several programs
        (20, 256, dict(top_k=8, scoring="sigmoid", num_expert_group=8, topk_group=4, routed_scaling_factor=2.5,
                       bias=True)),  # DeepSeek-V3's routing at its width
        (5, 384, dict(top_k=8, scoring="sigmoid", routed_scaling_factor=2.827, bias=True)),  # Kimi-K2's
        (9, 24, dict(top_k=4, num_expert_group=3, topk_group=2)),  # a group count that is not a power of two
    ],
)  # fmt: skip
def test_fused_routing_matches_loop_at_model_widths(num_tokens: int, num_experts: int, kwargs: dict) -> None:
    gen = torch.Generator().manual_seed(num_experts)
    if kwargs.pop("bias", False):
        kwargs["correction_bias"] = torch.randn(num_experts, generator=gen) * 0.1
    assert_matches_loop(torch.randn(num_tokens, num_experts, generator=gen) * 2, impl="fused", **kwargs)


def test_fused_routing_reads_logits_of_any_strides() -> None:
    logits = torch.randn(16, 9, generator=torch.Generator().manual_seed(6)).t()  # [9, 16], column-major
    want = route(logits, 3)
    got = fused(logits, 3)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


def test_fused_routing_chooses_on_logits_as_route_does() -> None:
    logits = torch.randn(11, 32, generator=torch.Generator().manual_seed(5))
    bias = torch.linspace(-0.5, 0.5, 32)
    for scoring in ("softmax", "sigmoid"):
        want = route(logits, 4, scoring=scoring, choose_on="logits", correction_bias=bias)
        got = fused(logits, 4, scoring=scoring, choose_on="logits", correction_bias=bias)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


def test_fused_routing_chooses_each_tokens_replica_and_counts_it() -> None:
    """With a replica table the kernel gives each chosen expert's replica number ``t % count`` for
    token ``t`` (the table repeats each row's replicas to the width 6) and counts the slots, as a
    plain loop over the tokens does; the weights are those of the routing without a table."""
    replicas = {0: [0, 8], 3: [3, 9, 10]}  # experts 0 and 3 replicated; 11 physical experts
    rows = [replicas.get(e, [e]) for e in range(8)]
    table = torch.tensor([[r[j % len(r)] for j in range(6)] for r in rows], dtype=torch.int32)
    logits = torch.randn(37, 8, generator=torch.Generator().manual_seed(9))
    logits[:, 0] += 3.0  # most tokens pick the replicated experts
    logits[:, 3] += 3.0
    load = torch.zeros(11, dtype=torch.int32)
    weights, slots = fused_route(logits, 2, Routing().fused(8, correction_bias=False), slot_table=table, load=load)
    want_weights, ids = fused(logits, 2)
    assert torch.equal(weights, want_weights)
    want = torch.tensor([[rows[e][t % len(rows[e])] for e in ids[t].tolist()] for t in range(37)], dtype=torch.int32)
    assert torch.equal(slots, want)
    assert torch.equal(load, torch.bincount(want.flatten(), minlength=11).to(torch.int32))
    assert {8, 9, 10} <= set(want.flatten().tolist())  # the replicas were chosen, not only the first


@pytest.mark.parametrize(
    "options",
    [
        dict(sparsemixer_eps=0.01),
        dict(logit_scale=2.0),
        dict(logit_softcap=30.0),
        dict(scoring="sigmoid", per_expert_score="sqrtsoftplus"),
        dict(renormalize_p=2.0),
        dict(num_expert_group=4, topk_group=2, group_fill="zero"),
    ],
)
def test_fused_routing_leaves_what_it_does_not_implement_to_route(options: dict) -> None:
    assert Routing(**options).fused(16, correction_bias=False) is None


@pytest.mark.parametrize(
    ("logits", "kwargs", "error", "match"),
    [
        (torch.zeros(8), dict(top_k=2), ValueError, "router_logits must be \\[T, E\\]"),
        (torch.zeros(4, 8, dtype=torch.int32), dict(top_k=2), TypeError, "router_logits must be a floating"),
        (torch.zeros(4, 8), dict(top_k=0), ValueError, "top_k"),
        (torch.zeros(4, 8), dict(top_k=9), ValueError, "top_k"),
        (torch.zeros(4, 8), dict(top_k=2, scoring="relu"), ValueError, "scoring"),
        (torch.zeros(4, 8), dict(top_k=2, routed_scaling_factor=0.0), ValueError, "routed_scaling_factor"),
        (torch.zeros(4, 8), dict(top_k=2, num_expert_group=3, topk_group=1), ValueError, "num_expert_group"),
        (torch.zeros(4, 8), dict(top_k=2, topk_group=1), ValueError, "together"),
        (torch.zeros(4, 8), dict(top_k=2, num_expert_group=2, topk_group=3), ValueError, "topk_group"),
        (torch.zeros(4, 8), dict(top_k=5, num_expert_group=4, topk_group=2), ValueError, "top_k \\(5\\) exceeds"),
        (torch.zeros(4, 8), dict(top_k=2, correction_bias=torch.zeros(7)), ValueError, "correction_bias"),
        (torch.zeros(4, 8), dict(top_k=2, correction_bias=torch.zeros(8, dtype=torch.int64)), TypeError, "bias"),
    ],
)
def test_bad_arguments(logits: torch.Tensor, kwargs: dict, error: type[Exception], match: str) -> None:
    top_k = kwargs.pop("top_k")
    with pytest.raises(error, match=match):
        route(logits, top_k, **kwargs)


def test_router_module_matches_loop_on_its_own_logits() -> None:
    moe = MoEConfig(
        num_experts=16,
        top_k=4,
        hidden_size=32,
        intermediate_size=8,
        dtype=torch.bfloat16,
        scoring="sigmoid",
        num_expert_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        correction_bias=True,
    )
    router = Router(moe, device="cpu")
    assert router.weight.shape == (16, 32) and router.weight.dtype == torch.bfloat16
    assert not router.weight.requires_grad
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.1)
    x = torch.randn(9, 32, generator=gen).to(torch.bfloat16)
    weights, ids = router(x)
    logits = x @ router.weight.t()  # the gate GEMM in the model dtype, as the router runs it
    want_ids, want_weights = loop_route(
        logits,
        4,
        scoring="sigmoid",
        num_expert_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        correction_bias=router.e_score_correction_bias,
    )
    assert ids.tolist() == want_ids
    torch.testing.assert_close(weights, torch.tensor(want_weights, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert "correction_bias" in repr(router) and "groups=2/4" in repr(router)


def test_router_without_bias_has_no_bias_parameter() -> None:
    router = Router(MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8), device="cpu")
    assert set(router.state_dict()) == {"weight"}


# ---- variants against the routers of transformers itself --------------------------------------
# Families refused today for their expert MLP still have their router checked here, module
# against module, so each router variant has an independent reference.

E, H_R, K = 8, 32, 2


def _hf_config(family: str, cls: str, **fields: object) -> object:
    config = getattr(importlib.import_module(f"transformers.models.{family}.configuration_{family}"), cls)
    return config(hidden_size=H_R, num_experts_per_tok=K, **fields)


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return module.eval()


def _ours(moe: MoEConfig, **tensors: torch.Tensor) -> Router:
    router = Router(moe, device="cpu")
    router.load_tensors(**tensors)
    return router


def _same_routing(ours: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Same expert set per token and the same weight for each expert."""
    w, i = ours
    order, ref_order = i.long().argsort(dim=1), ids.long().argsort(dim=1)
    assert torch.equal(i.long().gather(1, order), ids.long().gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), weights.float().gather(1, ref_order), rtol=1e-5, atol=1e-6)


X = torch.randn(24, H_R, generator=torch.Generator().manual_seed(7))
MOE = dict(num_experts=E, top_k=K, hidden_size=H_R, intermediate_size=8, dtype=torch.float32)


def test_router_linear_bias_and_top_k_on_logits_match_gpt_oss() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    hf = _randomized(GptOssTopKRouter(_hf_config("gpt_oss", "GptOssConfig", num_local_experts=E)), 1)
    _, weights, ids = hf(X)
    ours = _ours(MoEConfig(**MOE, router_bias=True, choose_on="logits"), weight=hf.weight, bias=hf.bias)
    _same_routing(ours(X), ids, weights)


def test_sqrtsoftplus_scores_and_hash_routing_match_deepseek_v4() -> None:
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HashRouter, DeepseekV4TopKRouter

    config = _hf_config("deepseek_v4", "DeepseekV4Config", n_routed_experts=E, vocab_size=50, routed_scaling_factor=1.5)
    moe = dict(**MOE, scoring="sigmoid", per_expert_score="sqrtsoftplus", routed_scaling_factor=1.5)
    hf = _randomized(DeepseekV4TopKRouter(config), 2)
    _, weights, ids = hf(X)
    bias = hf.e_score_correction_bias
    _same_routing(
        _ours(MoEConfig(**moe, correction_bias=True), weight=hf.weight, e_score_correction_bias=bias)(X), ids, weights
    )

    hashed = _randomized(DeepseekV4HashRouter(config), 3)
    with torch.no_grad():
        hashed.tid2eid.copy_(
            torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:K] for t in range(50)])
        )
    input_ids = torch.randint(0, 50, (X.shape[0],), generator=torch.Generator().manual_seed(4))
    _, weights, ids = hashed(X, input_ids)
    ours = _ours(MoEConfig(**moe, hash_routing=True), weight=hashed.weight, tid2eid=hashed.tid2eid)
    _same_routing(ours(X, input_ids), ids, weights)
    with pytest.raises(ValueError, match="input_ids: this layer routes by token id"):
        ours(X)


def test_router_input_norm_and_expert_scale_match_gemma4() -> None:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    config = _hf_config(
        "gemma4", "Gemma4TextConfig", num_experts=E, top_k_experts=K, enable_moe_block=True, moe_intermediate_size=8
    )
    hf = _randomized(Gemma4TextRouter(config), 5)
    _, weights, ids = hf(X)
    moe = MoEConfig(**MOE, router_input_norm=True, router_norm_eps=config.rms_norm_eps, expert_weight_scale=True)
    ours = _ours(moe, weight=hf.proj.weight, input_scale=hf.scale, expert_scale=hf.per_expert_scale)
    _same_routing(ours(X), ids, weights)


def test_logit_scale_matches_muse_spark() -> None:
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTopkRouter

    config = _hf_config(
        "muse_spark",
        "MuseSparkTextConfig",
        num_local_experts=E,
        output_multiplier=0.3,
        routed_scaling_factor=2.0,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf = _randomized(MuseSparkTopkRouter(config), 6)
    _, weights, ids = hf(X)
    moe = MoEConfig(**MOE, scoring="sigmoid", correction_bias=True, logit_scale=0.3, routed_scaling_factor=2.0)
    _same_routing(_ours(moe, weight=hf.weight, e_score_correction_bias=hf.e_score_correction_bias)(X), ids, weights)


def test_sigmoid_of_top_k_matches_llama4() -> None:
    """Llama-4 takes the top-k logits and a sigmoid of each: our sigmoid scoring, not renormalized."""
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    hf = _randomized(Llama4Router(_hf_config("llama4", "Llama4TextConfig", num_local_experts=E)), 7)
    scores, _ = hf(X)
    weights, ids = scores.topk(K, dim=1)
    _same_routing(_ours(MoEConfig(**MOE, scoring="sigmoid", renormalize=False), weight=hf.weight)(X), ids, weights)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_p_norm_matches_dbrx(p: float) -> None:
    from transformers.models.dbrx.configuration_dbrx import DbrxFFNConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    ffn = DbrxFFNConfig(
        hidden_size=H_R, ffn_hidden_size=8, moe_num_experts=E, moe_top_k=K, moe_normalize_expert_weights=p
    )
    hf = DbrxFFN(types.SimpleNamespace(ffn_config=ffn))
    hf.router = _randomized(hf.router, 8)
    weights, ids = hf.route_tokens_to_experts(hf.router(X))
    ours = _ours(MoEConfig(**MOE, renormalize_p=p), weight=hf.router.layer.weight)
    _same_routing(ours(X), ids, weights)


def test_sparsemixer_matches_phimoe() -> None:
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    config = _hf_config("phimoe", "PhimoeConfig", num_local_experts=E, router_jitter_noise=0.05)
    hf = _randomized(PhimoeTopKRouter(config), 9)
    _, weights, ids = hf(X)
    moe = MoEConfig(**MOE, renormalize=False, sparsemixer_eps=0.05)
    _same_routing(_ours(moe, weight=hf.weight)(X), ids, weights)


def test_soft_capped_logits_match_laguna() -> None:
    from transformers.models.laguna.modeling_laguna import LagunaTopKRouter

    config = _hf_config("laguna", "LagunaConfig", num_experts=E, moe_router_logit_softcapping=1.5)
    hf = _randomized(LagunaTopKRouter(config), 10)
    _, weights, ids = hf(X)
    moe = MoEConfig(**MOE, scoring="sigmoid", correction_bias=True, logit_softcap=1.5)
    _same_routing(_ours(moe, weight=hf.weight, e_score_correction_bias=hf.e_score_correction_bias)(X), ids, weights)


def test_fp32_router_dtype_keeps_the_gate_in_fp32() -> None:
    moe = MoEConfig(**{**MOE, "dtype": torch.bfloat16}, router_dtype=torch.float32)
    router = Router(moe, device="cpu")
    assert router.weight.dtype == torch.float32 and "router_dtype=float32" in repr(router)
    w = torch.randn(E, H_R, generator=torch.Generator().manual_seed(11))
    router.load_tensors(weight=w)
    x = X.bfloat16()
    torch.testing.assert_close(router.logits(x), x.float() @ w.t(), rtol=1e-6, atol=1e-6)


def test_fp32_gate_keeps_a_low_precision_copy_only_when_exact() -> None:
    """The bf16 copy that feeds the GPU's bf16-in, fp32-out gate GEMM exists exactly when every fp32
    weight is a bf16 value, and follows each way of writing the weight."""
    moe = MoEConfig(**{**MOE, "dtype": torch.bfloat16}, router_dtype=torch.float32)
    router = Router(moe, device="cpu")
    exact = torch.randn(E, H_R, generator=torch.Generator().manual_seed(12)).bfloat16().float()
    router.load_tensors(weight=exact)
    assert router.gate_lowp is not None and router.gate_lowp.dtype == torch.bfloat16
    assert torch.equal(router.gate_lowp.float(), exact)
    inexact = exact.clone()
    inexact[3, 5] += exact[3, 5].abs() * 2**-12  # below bf16's resolution: fp32 only
    router.load_tensors(weight=inexact)
    assert router.gate_lowp is None
    router.load_state_dict({"weight": exact}, strict=False)
    assert router.gate_lowp is not None and torch.equal(router.gate_lowp.float(), exact)
    assert "gate_lowp" not in router.state_dict()
    layer = FusedMoE(LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=8)), device="cpu")
    layer.load_weights(router_weight=exact)
    assert layer.router.gate_lowp is not None and torch.equal(layer.router.gate_lowp.float(), exact)
    plain = Router(MoEConfig(**{**MOE, "dtype": torch.bfloat16}), device="cpu")
    plain.load_tensors(weight=exact.bfloat16())
    assert plain.gate_lowp is None  # a bf16 gate is already the fast GEMM


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(group_fill="zero"), "group_score and group_fill need grouped routing"),
        (dict(per_expert_score="sqrtsoftplus"), "per_expert_score sqrtsoftplus needs scoring sigmoid"),
        (dict(renormalize=False, renormalize_p=2.0), "renormalize_p (2.0) needs renormalize true"),
        (dict(choose_on="logits", renormalize=False), "choose_on logits with scoring softmax"),
        (dict(sparsemixer_eps=0.1), "sparsemixer routing takes scoring softmax, top_k 2, renormalize false"),
        (dict(hash_routing=True, correction_bias=True), "hash_routing takes experts from a table"),
    ],
)
def test_contradicting_router_fields_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        MoEConfig(**MOE, **changes)


def test_load_tensors_checks_names_and_shapes() -> None:
    router = Router(MoEConfig(**MOE), device="cpu")
    with pytest.raises(ValueError, match="bias: this router's config has no such parameter"):
        router.load_tensors(bias=torch.zeros(E))
    with pytest.raises(ValueError, match=r"weight must have shape \[8, 32\], got \[8, 31\]"):
        router.load_tensors(weight=torch.zeros(E, H_R - 1))
    with pytest.raises(ValueError, match="tid2eid: this router's config has moe.hash_routing false"):
        router.load_tensors(tid2eid=torch.zeros(4, K, dtype=torch.int64))


def test_routing_options_as_data_or_keywords() -> None:
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    opts = dict(scoring="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.0)
    assert_matches_loop(logits, 2, correction_bias=torch.zeros(8), **opts)
    by_data = route(logits, 2, Routing(**opts), correction_bias=torch.zeros(8))
    by_keywords = route(logits, 2, correction_bias=torch.zeros(8), **opts)
    assert all(torch.equal(a, b) for a, b in zip(by_data, by_keywords, strict=True))
    with pytest.raises(TypeError, match="unknown options \\['scorin'\\]"):
        route(logits, 2, scorin="sigmoid")
    with pytest.raises(TypeError, match="not both"):
        route(logits, 2, Routing(), scoring="sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("name", "num_experts", "kwargs"),
    [
        ("qwen3-30b-a3b", 128, dict(top_k=8)),
        ("deepseek-v3", 256, dict(top_k=8, scoring="sigmoid", num_expert_group=8, topk_group=4,
                                  routed_scaling_factor=2.5, bias=True)),
    ],
)  # fmt: skip
def test_fused_routing_on_the_gpu(name: str, num_experts: int, kwargs: dict) -> None:
    """On CUDA tensors: the kernel's choice equals route()'s and its weights agree; then both are
    timed inside a CUDA graph (100 calls a graph: one call alone would time the graph launch) and
    printed (run with -s)."""
    from moe_kernels.selection.timing import Timer

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    if kwargs.pop("bias", False):
        kwargs["correction_bias"] = torch.randn(num_experts, generator=gen, device="cuda") * 0.1
    top_k = kwargs.pop("top_k")
    timer, calls = Timer(max_runs=50, target_s=0.1), 100
    for tokens in (1, 64, 4096):
        # fp32 logits: bf16 ones tie exactly, and ties may go either way
        logits = torch.randn(tokens, num_experts, generator=gen, device="cuda") * 2
        want, got = route(logits, top_k, **kwargs), fused(logits, top_k, **kwargs)
        assert torch.equal(got[1], want[1]), f"{name} T={tokens}: the choices differ"
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        times = {
            impl: timer.graphed(lambda f=f, x=logits: [f(x, top_k, **kwargs) for _ in range(calls)], impl) / calls
            for impl, f in IMPLEMENTATIONS.items()
        }
        assert not timer.failures, timer.failures
        print(f"\n{name} routing T={tokens}: torch {times['torch']:.2f} us, fused {times['fused']:.2f} us a call")
