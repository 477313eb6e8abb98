"""Timing on the GPU: CUDA events after warm-up, the median of many runs."""

from __future__ import annotations

import statistics
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


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (readable in a terminal and in docs)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
