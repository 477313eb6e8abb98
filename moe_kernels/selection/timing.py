"""Timing on the GPU for the tuner and the benchmarks: CUDA-graph replays, L2 flushed, median."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    runs: int


def _flush_l2(scratch: torch.Tensor) -> None:
    scratch.zero_()


def time_cuda(fn: Callable[[], object], *, warmup: int = 10, runs: int = 50, flush_l2: bool = True) -> Timing:
    """Median time of ``fn()`` over ``runs`` calls, each bracketed by its own CUDA events.

    L2 is flushed before each run (a write of 256 MiB) so weights are read from HBM, as in
    a model where other layers evict them.
    """
    scratch = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        if scratch is not None:
            _flush_l2(scratch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    q = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), q[0], q[-1], runs)


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup=3, runs=20, flush_l2=False)
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense GEMM throughput (the practical tensor-core peak) in TFLOP/s."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    t = time_cuda(lambda: a @ b, warmup=3, runs=10, flush_l2=False)
    return 2 * n**3 / (t.median_us * 1e-6) / 1e12


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
