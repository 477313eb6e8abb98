"""The combination tester: every registered pair that the composer accepts runs against a
plain-loop reference; every pair it refuses is refused for stated, correct reasons."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import ExpertWeights, IncompatibleKernelsError, LayerConfig, MoEConfig, ParallelConfig, compose
from moe_kernels.core.compose import layer_context
from moe_kernels.selection.select import candidates

E, K, H, I = 4, 2, 32, 16  # noqa: E741 (I is the MoE intermediate size)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loop_reference(x, w13, w2, topk_weights, topk_ids):
    """out[t] = sum_k w[t,k] * w2[e] @ (silu(gate_e @ x[t]) * (up_e @ x[t])), one token at a time."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            h = w13[e].float() @ x[t].float()
            y = w2[e].float() @ (F.silu(h[:inter]) * h[inter:])
            out[t] += float(topk_weights[t, k]) * y
    return out


def make_inputs(t: int, dtype: torch.dtype, routing: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.empty(0, K)
    ids = ids.to(torch.int32)
    if routing == "skewed" and t:
        ids[:, 0] = 0  # expert 0 is hot: every token uses it
        ids[:, 1] = torch.where(ids[:, 1] == 0, torch.ones_like(ids[:, 1]), ids[:, 1])
    if routing == "with_minus_one" and t:
        ids[::2, 1] = -1
    weights = torch.rand(t, K, generator=g)
    return x, w13, w2, weights, ids


def layer(dtype: torch.dtype, **parallel) -> LayerConfig:
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=dtype)
    # sized for the largest batch below: the masked layout's capacity follows it
    parallel = {"max_tokens_per_rank": MAX_TOKENS, **parallel}
    return LayerConfig(moe=moe, parallel=ParallelConfig(**parallel))


MAX_TOKENS = 32


def all_pairs(cfg):
    return candidates(layer_context(cfg, device=DEVICE))


def valid_pairs(cfg):
    return [c for c in all_pairs(cfg) if c.valid]


def test_every_layout_has_a_runnable_pair_on_cpu():
    layouts = {c.prepare_finalize.output_layout for c in valid_pairs(layer(torch.float32))}
    assert {layout.value for layout in layouts} >= {"standard", "masked"}
    for cand in valid_pairs(layer(torch.float32)):
        assert cand.prepare_finalize.output_layout is cand.experts.input_layout, cand.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0, 1, 5, 17])
@pytest.mark.parametrize("routing", ["random", "skewed", "with_minus_one"])
def test_accepted_pairs_match_the_reference(dtype, t, routing):
    cfg = layer(dtype)
    x, w13, w2, weights, ids = make_inputs(t, dtype, routing, seed=t)
    expected = loop_reference(x, w13, w2, weights, ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    pairs = valid_pairs(cfg)
    assert pairs
    for cand in pairs:
        kernel = compose(cand.prepare_finalize, cand.experts, cfg, device=DEVICE)
        weights_ = ExpertWeights(w13.to(DEVICE), w2.to(DEVICE))
        out = kernel(x.to(DEVICE), weights_, weights.to(DEVICE), ids.to(DEVICE))
        assert out.shape == (t, H) and out.dtype == dtype, cand.name
        torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol, msg=cand.name)


def test_refused_pairs_name_every_failure():
    for cfg in (layer(torch.float32), layer(torch.float32, cuda_graphs=True, max_tokens_per_rank=64)):
        for cand in all_pairs(cfg):
            layouts_differ = cand.prepare_finalize.output_layout is not cand.experts.input_layout
            failed = {c.name for c in cand.failures}
            assert ("layout" in failed) == layouts_differ, cand.name
            if cand.valid:
                continue
            with pytest.raises(IncompatibleKernelsError) as info:
                compose(cand.prepare_finalize, cand.experts, cfg, device=DEVICE)
            assert [c.name for c in info.value.failures] == [c.name for c in cand.failures]
            for check in cand.failures:
                assert check.reason and check.reason in str(info.value)


def test_cuda_graph_mode_refuses_parts_that_sync():
    cfg = layer(torch.float32, cuda_graphs=True, max_tokens_per_rank=64)
    for cand in all_pairs(cfg):
        syncs = not (cand.prepare_finalize.supports_cuda_graphs and cand.experts.supports_cuda_graphs)
        if syncs:
            assert not cand.valid, cand.name
        else:
            assert not any(c.name.endswith("cuda_graphs") for c in cand.failures), cand.name
