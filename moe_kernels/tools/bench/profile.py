"""``moe-kernels bench profile``: where the GPU time of one call goes, kernel by kernel, for what
``select()`` picks and for vLLM's fused MoE (``--peer``), on the shapes of ``bench experts``.

For each shape and token count, each path runs eagerly under ``torch.profiler`` (after a warm-up
that JIT-compiles everything) and the table lists its kernels in launch order: launches per
call, GPU time per call, share of the call. Below it: the sum of kernel times, the GPU span of
one call (first kernel start to last kernel end: launch gaps included) and the time of the same
call replayed from a CUDA graph with L2 flushed (what ``bench experts`` reports). The graph time
over the kernel sum is what launches cost even inside a graph; the eager span, without one.

``--ncu``: skip the profiler and run each path once inside the NVTX range ``moe_profile``,
preceded by one ``torch.cuda._sleep`` kernel as a separator, for Nsight Compute:

    ncu --nvtx --nvtx-include "moe_profile/" --section SpeedOfLight --clock-control none --csv \\
        moe-kernels bench profile --ncu ...

The separators split ncu's kernel list into calls, in the order printed on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.selection.problems import SHAPES, make_problem, make_weights
from moe_kernels.selection.timing import Timer
from moe_kernels.tools.args import positive_ints, shape_names
from moe_kernels.tools.bench.experts import load_peer
from moe_kernels.tools.bench.tables import format_table
from moe_kernels.tools.harness import require_cuda
from moe_kernels.tools.progress import Progress

#: the separator kernel's length in GPU cycles: long enough to see, short beside any call
SEPARATOR_CYCLES = 1000


@dataclass(frozen=True)
class KernelRecord:
    """One kernel execution from the profiler: name and GPU start/end in microseconds."""

    name: str
    start_us: float
    end_us: float


@dataclass
class KernelRow:
    """One kernel name of a call: how often it was launched and its GPU time (summed)."""

    name: str
    launches: int = 0
    total_us: float = 0.0


@dataclass
class CallProfile:
    """The kernels of ``calls`` calls of one path, averaged per call."""

    kernels: list[KernelRow] = field(default_factory=list)
    kernel_sum_us: float = 0.0
    span_us: float = 0.0


def summarize(records_per_call: list[list[KernelRecord]]) -> CallProfile:
    """Average per call: each kernel name once, in order of first launch, with its launches and
    time; the sum of kernel times; the GPU span from the first start to the last end."""
    calls = len(records_per_call)
    if calls == 0:
        return CallProfile()
    rows: dict[str, KernelRow] = {}
    span = 0.0
    for records in records_per_call:
        for r in records:
            row = rows.setdefault(r.name, KernelRow(r.name))
            row.launches += 1
            row.total_us += r.end_us - r.start_us
        if records:
            span += max(r.end_us for r in records) - min(r.start_us for r in records)
    out = CallProfile(span_us=span / calls)
    for row in rows.values():
        out.kernels.append(KernelRow(row.name, round(row.launches / calls), row.total_us / calls))
    out.kernel_sum_us = sum(k.total_us for k in out.kernels)
    return out


def split_calls(records: Iterable[KernelRecord], calls: int, marker: str) -> list[list[KernelRecord]]:
    """Split a profiler's kernel list, sorted by start, into the ``calls`` calls that each begin
    with a ``marker`` kernel (the separator itself left out)."""
    groups: list[list[KernelRecord]] = []
    for r in sorted(records, key=lambda r: r.start_us):
        if marker in r.name:
            groups.append([])
        elif groups:
            groups[-1].append(r)
    if len(groups) != calls:
        raise RuntimeError(f"expected {calls} calls in the profile, found {len(groups)} separators")
    return groups


def profile_call(fn: Callable[[], object], calls: int) -> CallProfile:
    """Run ``fn`` ``calls`` times under the profiler, each after a separator kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.cuda._sleep(SEPARATOR_CYCLES)
            fn()
        torch.cuda.synchronize()
    records = [
        KernelRecord(e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return summarize(split_calls(records, calls, "spin_kernel"))


def short(name: str, width: int) -> str:
    """A kernel name cut to ``width``: template arguments and parameter lists dropped first."""
    base = name.split("(")[0].split("<")[0] if len(name) > width else name
    return base if len(base) <= width else base[: width - 3] + "..."


def table(profile: CallProfile, graph_us: float | None, width: int) -> str:
    rows: list[list[object]] = [
        [short(k.name, width), k.launches, k.total_us, f"{100 * k.total_us / max(profile.kernel_sum_us, 1e-9):.0f}%"]
        for k in profile.kernels
    ]
    text = format_table(["kernel", "launches", "us", "share"], rows)
    graph = f", CUDA-graph replay {graph_us:.1f} us" if graph_us is not None else ""
    return f"{text}\nkernels {profile.kernel_sum_us:.1f} us, eager GPU span {profile.span_us:.1f} us{graph}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", type=shape_names, default=["qwen3-30b-a3b"], help=f"comma-separated, from {', '.join(SHAPES)}"
    )
    parser.add_argument("--tokens", type=positive_ints, default=[1, 1024], help="comma-separated token counts")
    parser.add_argument("--peer", help="folder holding vllm_fused_moe_peer.py (unless vllm is installed)")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per path, averaged (default: 5)")
    parser.add_argument("--ncu", action="store_true", help="one call per path in NVTX range moe_profile, for ncu")
    parser.add_argument("--width", type=int, default=48, help="kernel name column width")


def profile_point(
    name: str, tokens: int, w: ExpertWeights, peer: Callable[..., torch.Tensor] | None, args: argparse.Namespace
) -> None:
    """Profile (or, with ``--ncu``, mark for ncu) ``select()``'s kernel and the peer at one point."""
    from moe_kernels.core.compose import WorkspaceCache
    from moe_kernels.selection.select import select

    shape = SHAPES[name]
    device = torch.device("cuda", torch.cuda.current_device())
    kernel = select(shape.layer(tokens), device=device, workspace_cache=WorkspaceCache()).kernel
    chosen = kernel.kernel_for(tokens) if hasattr(kernel, "kernel_for") else kernel
    x, tw, ids = make_problem(shape, tokens, seed=tokens)
    paths: dict[str, Callable[[], object]] = {
        f"select ({chosen.name})": lambda: kernel(x, w, tw, ids, check_values=False)
    }
    if peer is not None:
        paths["peer"] = lambda: peer(x, w.w13, w.w2, tw, ids)
    timer = Timer(30, 0.2)
    for path, fn in paths.items():
        title = f"## {name} T={tokens}: {path}"
        if args.ncu:
            fn()
            torch.cuda.synchronize()
            print(f"ncu call: {title}", file=sys.stderr, flush=True)
            with torch.cuda.nvtx.range("moe_profile"):
                torch.cuda._sleep(SEPARATOR_CYCLES)
                fn()
                torch.cuda.synchronize()
            continue
        prof = profile_call(fn, args.calls)
        print(f"{title}\n\n{table(prof, timer.graphed(fn, title), args.width)}\n", flush=True)
    kernel.release()


def run(args: argparse.Namespace) -> int:
    require_cuda("bench profile", "it profiles CUDA kernels")
    peer, peer_info = load_peer(Path(args.peer) if args.peer else None)
    print(f"# Kernel profile on {torch.cuda.get_device_name()}; peer: {peer_info}\n")
    with Progress(len(args.shapes) * len(args.tokens), "bench profile") as progress:
        for name in args.shapes:
            w = make_weights(SHAPES[name])
            for tokens in args.tokens:
                profile_point(name, tokens, w, peer, args)
                progress.advance()
            del w
            torch.cuda.empty_cache()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_kernels.tools.bench.profile", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
