"""Shared experts (added in the routed path's final write) and the asynchronous
prepare/finalize API with the two-batch-overlap driver, each against a plain loop: on the CPU the
local path in one process and torch all-to-all over gloo with 2 and 4 processes; on one GPU the
shared experts on their side stream, captured in a CUDA graph."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import (
    ExpertWeights,
    FusedMoE,
    LayerConfig,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    compose,
)
from moe_kernels.tools.launcher import run_ranks

E, K, H, I, S = 8, 2, 32, 16, 24  # noqa: E741 (S: the shared expert's width)


def layer_cfg(gate: bool = True, tbo: bool = False, **parallel: object) -> LayerConfig:
    moe = MoEConfig(
        num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.float32,
        num_shared_experts=1, shared_intermediate_size=S, shared_expert_gate=gate,
    )  # fmt: skip
    par = ParallelConfig(**{"max_tokens_per_rank": 64, "two_batch_overlap": tbo, **parallel})
    return LayerConfig(moe=moe, parallel=par)


def checkpoint(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        gate_proj={e: torch.randn(I, H, generator=g) * H**-0.5 for e in range(E)},
        up_proj={e: torch.randn(I, H, generator=g) * H**-0.5 for e in range(E)},
        down_proj={e: torch.randn(H, I, generator=g) * I**-0.5 for e in range(E)},
        router_weight=torch.randn(E, H, generator=g) * 0.5,
        shared_gate_proj=torch.randn(S, H, generator=g) * H**-0.5,
        shared_up_proj=torch.randn(S, H, generator=g) * H**-0.5,
        shared_down_proj=torch.randn(H, S, generator=g) * S**-0.5,
        shared_expert_gate=torch.randn(1, H, generator=g) * H**-0.5,
    )


def loop_layer(x: torch.Tensor, ckpt: dict, gate: bool) -> torch.Tensor:
    """Per token: softmax top-k routing, the routed experts weighted and summed, plus the shared
    MLP (scaled by its sigmoid gate when present) -- written out one token at a time."""
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        scores = (ckpt["router_weight"] @ x[t]).softmax(-1)
        weights, ids = scores.topk(K)
        weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), ids.tolist(), strict=True):
            h = F.silu(ckpt["gate_proj"][e] @ x[t]) * (ckpt["up_proj"][e] @ x[t])
            out[t] += w * (ckpt["down_proj"][e] @ h)
        shared = ckpt["shared_down_proj"] @ (F.silu(ckpt["shared_gate_proj"] @ x[t]) * (ckpt["shared_up_proj"] @ x[t]))
        if gate:
            shared = shared * torch.sigmoid(ckpt["shared_expert_gate"][0] @ x[t])
        out[t] += shared
    return out


def load(layer: FusedMoE, ckpt: dict, gate: bool) -> FusedMoE:
    layer.load_weights(**{k: v for k, v in ckpt.items() if gate or k != "shared_expert_gate"})
    return layer


@pytest.mark.parametrize("gate", [True, False], ids=["qwen-gated", "deepseek-plain"])
@pytest.mark.parametrize("tbo", [False, True], ids=["serial", "two-batch"])
def test_shared_experts_are_added_once(gate: bool, tbo: bool) -> None:
    cfg = layer_cfg(gate, tbo)
    ckpt = checkpoint()
    layer = load(FusedMoE(cfg, device="cpu"), ckpt, gate)
    assert layer.shared_w13.shape == (2 * S, H) and (layer.shared_gate is not None) == gate
    for t in (0, 1, 9):
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(layer(x), loop_layer(x, ckpt, gate), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [True, False], ids=["qwen-gated", "deepseek-plain"])
def test_side_stream_shared_experts_replay_from_a_cuda_graph(gate: bool) -> None:
    """On a GPU the shared experts run on a side stream beside the routed path: the capture must
    see the fork joined, and replays on new inputs must match the plain loop. float32, so that
    the layer's router picks the loop's experts (bf16 logits could swap near-ties)."""
    ckpt = checkpoint()
    layer = load(FusedMoE(layer_cfg(gate, cuda_graphs=True), device="cuda"), ckpt, gate)
    assert layer._side_stream is not None, "the shared experts should overlap on a CUDA device"
    static = torch.zeros(16, H, device="cuda")
    layer(static)  # JIT compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(static)
    for seed in (1, 2):
        x = torch.randn(16, H, generator=torch.Generator().manual_seed(seed))
        static.copy_(x)
        graph.replay()
        # Triton's fp32 dots run in tf32
        torch.testing.assert_close(out.cpu(), loop_layer(x, ckpt, gate), rtol=5e-3, atol=5e-3)


def test_missing_shared_weights_are_named() -> None:
    ckpt = checkpoint()
    layer = FusedMoE(layer_cfg(), device="cpu")
    layer.load_weights(**{k: v for k, v in ckpt.items() if not k.startswith("shared")})
    with pytest.raises(
        RuntimeError, match="weights not loaded: shared_gate_proj; shared_up_proj; shared_down_proj; shared_expert_gate"
    ):
        layer(torch.randn(2, H))
    plain = FusedMoE(layer_cfg(gate=False), device="cpu")
    with pytest.raises(ValueError, match="shared_expert_gate: this layer's config has no shared expert gate"):
        plain.load_weights(shared_expert_gate=ckpt["shared_expert_gate"])
    with pytest.raises(ValueError, match=r"shared_down_proj must have shape \[32, 24\]"):
        plain.load_weights(shared_down_proj=torch.zeros(S, H))


def test_a_residual_is_added_by_every_layout_in_its_final_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's residual argument, through the local standard path (experts' gather) and
    the local masked path (finalize's gather), equals the plain sum."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moe_kernels import LocalMaskedPrepareAndFinalize, MaskedTritonExperts, TritonExperts

    cfg = LayerConfig(moe=MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=torch.float32))
    g = torch.Generator().manual_seed(3)
    w = ExpertWeights(torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2)
    x, residual = torch.randn(7, H, generator=g), torch.randn(7, H, generator=g)
    ids = torch.rand(7, E, generator=g).argsort(dim=1)[:, :K].to(torch.int32)
    tw = torch.rand(7, K, generator=g)
    plain = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")(x, w, tw, ids)
    for pf, ex in (
        (LocalPrepareAndFinalize(), TorchReferenceExperts()),
        (LocalPrepareAndFinalize(), TritonExperts()),
        (LocalMaskedPrepareAndFinalize(), MaskedTritonExperts()),
    ):
        out = compose(pf, ex, cfg, device="cpu")(x, w, tw, ids, residual=residual)
        torch.testing.assert_close(out, plain + residual, rtol=1e-4, atol=1e-4, msg=ex.name)
    with pytest.raises(ValueError, match=r"residual must match x \(\[7, 32\]"):
        compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")(
            x, w, tw, ids, residual=residual[:3]
        )


# --- expert parallelism over gloo -------------------------------------------------------------


def _rank(group) -> dict:
    """Both modes in one launch (process start-up dominates on small CI machines)."""
    from moe_kernels import TorchAllToAllPrepareAndFinalize

    world, rank = group.size(), group.rank()
    ckpt = checkpoint()
    results = {}
    for tbo in (False, True):
        cfg = layer_cfg(True, tbo, ep_size=world, ep_rank=rank)
        kernel = compose(TorchAllToAllPrepareAndFinalize(), TorchReferenceExperts(), cfg, group=group, device="cpu")
        layer = load(FusedMoE(cfg, device="cpu", group=group, kernel=kernel), ckpt, True)
        # rank 1 passes no tokens: it must still join every collective of both micro-batches
        t = 0 if rank == 1 else 5 + 2 * rank
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(100 + rank))
        out = layer(x)
        err = (out - loop_layer(x, ckpt, True)).abs().max().item() if t else 0.0
        results[tbo] = {"err": err, "shape": list(out.shape)}
    return results


@functools.cache
def launch(world: int) -> list[dict]:
    return run_ranks(_rank, world, timeout_s=240)


@pytest.mark.parametrize("tbo", [False, True], ids=["serial", "two-batch"])
@pytest.mark.parametrize("world", [2, 4])
def test_ep_layer_with_shared_experts_and_two_batch_overlap(world: int, tbo: bool) -> None:
    for rank, result in enumerate(launch(world)):
        assert result[tbo]["err"] < 1e-4, (rank, result)
        assert result[tbo]["shape"][1] == H
