"""Timing on the GPU for the tuner and the benchmarks: CUDA-graph replays, L2 flushed, median.

The measuring is ``triton.testing.do_bench`` (CUDA events per call, L2 flushed, the median);
this module adds what it does not do: capturing the call in a CUDA graph first (decode serving
replays graphs, so host launch overhead must not count), a per-point time budget, the host's own
time per call (:func:`host_us`: what an eager caller pays before the GPU is the limit), and the
reference figures of the device (copy bandwidth, dense GEMM throughput).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median microseconds of one ``fn()`` on the GPU: ``triton.testing.do_bench``, which times
    each call between its own CUDA events after ``warmup_ms`` of untimed calls, and flushes L2
    before each (a 256 MiB write) so weights are read from HBM, as in a model where other layers
    evict them. The number of timed calls is what fits ``rep_ms`` (at least one)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


#: GPU clock assumed to size :func:`host_us`'s busy kernel (an H100/H200 boosts to 1.98 GHz); it
#: only needs to outlast the host loop, which the function checks
_SLEEP_CYCLES_PER_S = 2.0e9


def host_us(fn: Callable[[], object], calls: int = 20) -> float:
    """Mean host microseconds one ``fn()`` takes to enqueue its GPU work: ``calls``
    calls are issued behind a ``torch.cuda._sleep`` kernel long enough to keep the GPU busy, so
    the host never waits for it and the wall time is the host's alone (few calls: CUDA queues
    about a thousand launches, and a full queue would make the host wait). ``RuntimeError`` when the
    GPU finished the sleep first: then a call waited on the GPU (a host sync) or the host loop
    outlasted the sleep, and the number would not be host time."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    single_s = time.perf_counter() - start  # an upper bound: it may include a sync
    torch.cuda.synchronize()
    torch.cuda._sleep(int(max(0.02, 4 * calls * single_s) * _SLEEP_CYCLES_PER_S))
    busy = torch.cuda.Event()
    busy.record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    ran_dry = busy.query()
    torch.cuda.synchronize()
    if ran_dry:
        raise RuntimeError(
            f"host_us: the GPU went idle during {calls} calls ({elapsed * 1e3:.1f} ms): a call waits on the GPU "
            "(a host sync), so its host time cannot be told from its GPU time"
        )
    return elapsed / calls * 1e6


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_cuda(lambda: dst.copy_(src), warmup_ms=5, rep_ms=50)
    return 2 * nbytes / (us * 1e-6) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense GEMM throughput (the practical tensor-core peak) in TFLOP/s."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    us = time_cuda(lambda: a @ b, warmup_ms=5, rep_ms=50)
    return 2 * n**3 / (us * 1e-6) / 1e12


#: back-to-back calls before timing: a GPU left idle while the host composed or compiled runs
#: at lower clocks for a while (measured: the first 60 replays of an fp8 decode call 10 % slow)
WARMUP_S = 0.1


class Timer:
    """CUDA-graph replay medians with a per-measurement time budget (big points get fewer runs)."""

    def __init__(self, max_runs: int, target_s: float) -> None:
        self.max_runs, self.target_s = max_runs, target_s
        self.failures: list[str] = []

    def eager(self, fn: Callable[[], object]) -> float:
        """Median microseconds of ``fn()`` (:func:`time_cuda`), timed for ``target_s`` or
        ``max_runs`` calls, whichever is shorter (at least 5 calls)."""
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        single = max(time.perf_counter() - start, 1e-6)
        rep_s = max(5 * single, min(self.target_s, self.max_runs * single))
        return time_cuda(fn, warmup_ms=WARMUP_S * 1e3, rep_ms=rep_s * 1e3)

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
