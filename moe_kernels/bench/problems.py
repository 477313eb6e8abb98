"""What every benchmark measures on: random problems and weights of a shape, the valid pairs of
the registry, and a timer that replays CUDA graphs within a time budget."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_kernels.bench.shapes import BenchShape
from moe_kernels.bench.timing import time_cuda
from moe_kernels.weights import ExpertWeights

#: where problems and weights are made (the tests run the measuring code on the CPU)
DEVICE = "cuda"


#: back-to-back calls before timing: a GPU left idle while the host composed or compiled runs
#: at lower clocks for a while (measured: the first 60 replays of an fp8 decode call 10 % slow)
WARMUP_S = 0.1


class Timer:
    """CUDA-graph replay medians with a per-measurement time budget (big points get fewer runs)."""

    def __init__(self, max_runs: int, target_s: float) -> None:
        self.max_runs, self.target_s = max_runs, target_s
        self.failures: list[str] = []

    def eager(self, fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        single = max(time.perf_counter() - start, 1e-6)
        runs = int(min(self.max_runs, max(5, self.target_s / single)))
        warmup = int(min(500, max(2, WARMUP_S / single)))
        return time_cuda(fn, warmup=warmup, runs=runs).median_us

    def graphed(self, fn: Callable[[], object], what: str) -> float:
        """GPU time of ``fn`` replayed from a CUDA graph (no host launch overhead, as in decode
        serving). ``fn`` must not sync; it runs once eagerly first (JIT compiles)."""
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # report and time eagerly rather than lose the whole run
            torch.cuda.synchronize()
            self.failures.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            print(f"bench: CUDA-graph capture failed, timing eagerly: {self.failures[-1]}", file=sys.stderr)
            return self.eager(fn)
        try:
            return self.eager(graph.replay)
        finally:
            del graph


def make_problem(shape: BenchShape, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, H]`` bf16, ``topk_weights [T, K]`` f32 (rows sum to 1), ``topk_ids [T, K]`` int32."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, shape.hidden, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(tokens, shape.num_experts, device=DEVICE, generator=gen).argsort(dim=1)[:, : shape.top_k]
    weights = torch.rand(tokens, shape.top_k, device=DEVICE, generator=gen)
    weights /= weights.sum(dim=1, keepdim=True)
    return x, weights, ids.to(torch.int32).contiguous()


def make_weights(shape: BenchShape, seed: int = 0, quant: str = "none") -> ExpertWeights:
    """Random bf16 expert weights (N(0, 1/fan_in)), or their fp8 block quantization."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    w13 = torch.randn(e, 2 * i, h, device=DEVICE, dtype=torch.bfloat16, generator=gen).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, device=DEVICE, dtype=torch.bfloat16, generator=gen).mul_(i**-0.5)
    if quant == "none":
        return ExpertWeights(w13, w2)
    from moe_kernels.kernels.quant import quantize_fp8_blocks

    (q13, s13), (q2, s2) = quantize_fp8_blocks(w13.float()), quantize_fp8_blocks(w2.float())
    return ExpertWeights(q13, q2, s13, s2)


def dequantized(w: ExpertWeights) -> ExpertWeights:
    """The bf16 weights an fp8 layer's weights stand for (what its bf16 twin runs on)."""
    from moe_kernels.kernels.quant import dequantize_fp8_blocks

    assert w.w13_scale is not None and w.w2_scale is not None
    return ExpertWeights(
        dequantize_fp8_blocks(w.w13, w.w13_scale).bfloat16(), dequantize_fp8_blocks(w.w2, w.w2_scale).bfloat16()
    )


def valid_pairs(cfg: Any) -> list[tuple[str, Callable[[], Any]]]:
    """``(name, build)`` for every registered pair the composer accepts for ``cfg`` here
    (the reference loop left out: it syncs per expert); ``build()`` composes a fresh kernel."""
    from moe_kernels import registry
    from moe_kernels.compose import WorkspaceCache, check_pair, compose, layer_context, pair_name

    ctx = layer_context(cfg)
    out = []
    for make_pf in registry.PREPARE_FINALIZE:
        for make_ex in registry.EXPERTS:
            pf, ex = make_pf(cfg), make_ex(cfg)
            if ex.name == "TorchReferenceExperts" or not all(c.ok for c in check_pair(pf, ex, ctx)):
                continue

            def build(make_pf=make_pf, make_ex=make_ex):  # noqa: ANN202 (a closure over the loop)
                return compose(make_pf(cfg), make_ex(cfg), cfg, workspace_cache=WorkspaceCache())

            out.append((pair_name(pf, ex), build))
    return out
