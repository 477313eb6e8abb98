"""torch.compile through the registered ops: one graph, no break, no recompile over token counts,
the same output as eager and as the per-token loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from test_layer import E, checkpoint, layer_cfg, loop_layer
from torch._dynamo.decorators import mark_unbacked

from moe_kernels import (
    ExpertWeights,
    FusedMoE,
    LocalPrepareAndFinalize,
    ParallelConfig,
    TorchReferenceExperts,
    WorkspaceCache,
    compose,
)
from moe_kernels.experts.fused_triton import FusedTritonExperts
from moe_kernels.model.ops import call_kernel, register_kernel

TOKENS = (7, 1, 64, 300)
PARALLEL = ParallelConfig(max_tokens_per_rank=512)


def loaded_layer(experts: object, device: str = "cpu", **moe: object) -> FusedMoE:
    cfg = layer_cfg(torch.float32, PARALLEL, **moe)
    kernel = compose(LocalPrepareAndFinalize(), experts, cfg, device=device, workspace_cache=WorkspaceCache())
    layer = FusedMoE(cfg, device=device, kernel=kernel)
    layer.load_weights(**checkpoint())
    return layer


def compile_counted(module: torch.nn.Module) -> tuple[torch.nn.Module, torch._dynamo.testing.CompileCounterWithBackend]:
    """``module`` compiled fullgraph and dynamic, with a counter of the graphs Dynamo builds."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(module, backend=counter, fullgraph=True, dynamic=True), counter


def tokens(t: int, device: str = "cpu", seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[T, H]`` activations, the token dimension marked as unbacked: a backed symbol would be
    specialized at T = 1 (PyTorch's 0/1 specialization) and so recompile there."""
    gen = torch.Generator().manual_seed(seed + t)
    x = torch.randn(t, layer_cfg().moe.hidden_size, generator=gen).to(device=device, dtype=dtype)
    mark_unbacked(x, 0)
    return x


@pytest.mark.parametrize("experts", [TorchReferenceExperts, FusedTritonExperts], ids=["reference", "triton"])
def test_compiled_layer_one_graph_no_recompile(experts: type) -> None:
    layer = loaded_layer(experts())
    compiled, counter = compile_counted(layer)
    for t in TOKENS:
        x = tokens(t)
        out = compiled(x)
        assert torch.equal(out, layer(x)), f"T={t}: compiled != eager"
        want = loop_layer(x, checkpoint(), layer.cfg.moe)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations over T in {TOKENS}"


def test_explain_reports_no_graph_break() -> None:
    layer = loaded_layer(TorchReferenceExperts())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(tokens(7))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    targets = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.moe_kernels.fused_moe_layer in targets


def test_a_copied_layer_compiles_to_its_own_weights() -> None:
    layer = loaded_layer(TorchReferenceExperts())
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.w2.mul_(2.0)
    torch._dynamo.reset()
    x = tokens(5)
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    twin_out = torch.compile(twin, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(twin_out, 2.0 * out)


def test_layer_op_meets_the_custom_op_contract() -> None:
    """torch.library's own checks: the fake matches the real output, no undeclared mutation."""
    layer = loaded_layer(TorchReferenceExperts())
    torch.library.opcheck(torch.ops.moe_kernels.fused_moe_layer.default, (tokens(5), layer._op_key))


class RoutedInGraph(torch.nn.Module):
    """A caller that routes in its own compiled code and calls a kernel through its op."""

    def __init__(self, layer: FusedMoE) -> None:
        super().__init__()
        self.layer = layer
        self.key = register_kernel(layer.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x, self.layer.router.weight)
        topk_weights, topk_ids = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        weights = ExpertWeights(self.layer.w13, self.layer.w2)
        return call_kernel(self.key, x, weights, topk_weights, topk_ids)


def test_kernel_op_compiles_beside_a_compiled_router() -> None:
    module = RoutedInGraph(loaded_layer(TorchReferenceExperts()))
    compiled, counter = compile_counted(module)
    for t in TOKENS:
        x = tokens(t)
        torch.testing.assert_close(compiled(x), loop_layer(x, checkpoint(), module.layer.cfg.moe))
    assert counter.frame_count == 1
    torch.library.opcheck(
        torch.ops.moe_kernels.moe_kernel.default,
        (tokens(3), torch.full((3, 2), 0.5), torch.tensor([[0, 1], [2, 3], [E - 1, 0]]))
        + (module.layer.w13, module.layer.w2, None, None, None, module.key, False),
    )


def test_unknown_key_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="layer 'nope' is not registered"):
        torch.ops.moe_kernels.fused_moe_layer(torch.zeros(1, 16), "nope")


@pytest.mark.gpu
def test_compiled_layer_in_a_cuda_graph_replays_eager() -> None:
    """The fast path on a GPU: compiled (inductor), captured in a CUDA graph at each T, replayed
    with new inputs == the eager layer."""
    cfg = layer_cfg(torch.bfloat16, ParallelConfig(max_tokens_per_rank=512, cuda_graphs=True))
    layer = FusedMoE(cfg, device="cuda")
    layer.load_weights(**checkpoint())
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for t in TOKENS:
        static_x = tokens(t, "cuda", dtype=torch.bfloat16)
        for _ in range(2):  # compile and warm up outside the capture
            compiled(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = compiled(static_x)
        fresh = tokens(t, "cuda", seed=7, dtype=torch.bfloat16)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, layer(fresh))
