"""``moe-kernels bench ep``: expert-parallel dispatch and combine latency across the visible GPUs.

One process per GPU (:func:`moe_kernels.tools.launcher.run_ranks`, NCCL). For each token count T
per rank it times, on one uniform random routing (top-k distinct experts among all E):

* ``ours-ht`` / ``ours-ll``: :class:`DeepEPHighThroughputPrepareAndFinalize` /
  :class:`DeepEPLowLatencyPrepareAndFinalize` ``prepare`` (dispatch) and ``finalize`` (combine);
* ``raw-ht`` / ``raw-ll``: the same ``EPBuffer.dispatch`` / ``combine`` calls made directly
  (same buffer, SMs, alignment and ``num_max_tokens_per_rank``): what our wrapper costs;
* ``torch-a2a``: :class:`TorchAllToAllPrepareAndFinalize` (NCCL ``all_to_all_single``).

The experts are left out: combine sends the dispatched rows back as they are. Each measurement
starts all ranks together (barrier + device sync), times one call with CUDA events, and keeps the
median over runs; the table shows the slowest rank's median. GB/s counts the activation bytes
that cross between GPUs (one row per token and destination rank other than its own, ``H x 2``
bytes) per rank. ``first ms`` is the wall time of the very first call of a path at that T:
DeepEP JIT-compiles its kernels for every new (``num_max_tokens_per_rank``, hidden, experts,
top-k, alignment, SMs, mode) and the first call of a process also builds the buffer -- the cost
that a short probe loop without warm-up mistakes for per-call latency.

``num_max_tokens_per_rank``: the high-throughput paths use one value for all T (``--ht-max-tokens``,
default the largest T: a prefill server sizes once); the low-latency paths use
``max(T, --ll-min-capacity)`` (decode servers size for their batch; its outputs are sized for
that worst case every call).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_kernels.tools.args import positive_ints
from moe_kernels.tools.bench.tables import format_table
from moe_kernels.tools.harness import CliError, require_cuda

DEFAULT_TOKENS = [1, 16, 128, 512, 4096]
PATHS = ("ours-ht", "raw-ht", "ours-ll", "raw-ll", "torch-a2a")
DEEPEP_PATHS = ("ours-ht", "raw-ht", "ours-ll", "raw-ll")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens",
        type=positive_ints,
        default=DEFAULT_TOKENS,
        help="comma-separated tokens per rank (default: %(default)s)",
    )
    parser.add_argument("--hidden", type=int, default=7168, help="H (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (default: %(default)s)")
    parser.add_argument("--num-experts", type=int, default=256, help="experts in the layer (default: %(default)s)")
    parser.add_argument("--world-size", type=int, default=None, help="ranks = GPUs to use (default: all visible)")
    parser.add_argument(
        "--paths", type=_path_list, default=list(PATHS), help=f"comma-separated, from {', '.join(PATHS)} (default: all)"
    )
    parser.add_argument("--num-sms", type=int, default=None, help="SMs for DeepEP (default: its estimate, 24 if none)")
    parser.add_argument("--ht-max-tokens", type=int, default=None, help="high-throughput capacity (default: max T)")
    parser.add_argument("--ll-min-capacity", type=int, default=128, help="smallest low-latency capacity (default: 128)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per measurement (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=590.0, help="seconds before the ranks are killed")
    parser.add_argument("--out", type=Path, help="directory for ep.md and ep.json")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark on ``args.world_size`` GPUs; print the table (stdout), progress (stderr)."""
    require_cuda("bench ep", "it runs one rank per GPU", gpus=max(2, args.world_size or 0))
    gpus = torch.cuda.device_count()
    world = args.world_size or gpus
    if world < 2:
        raise CliError(f"bench ep: --world-size {world}: expert parallelism needs two or more ranks")
    if world > gpus:
        print(f"bench ep: --world-size {world} but only {gpus} GPUs are visible", file=sys.stderr)
        return 2
    if args.num_experts % world:
        print(f"bench ep: --num-experts {args.num_experts} must be divisible by {world} ranks", file=sys.stderr)
        return 2
    params = {
        "tokens": sorted(args.tokens),
        "hidden": args.hidden,
        "top_k": args.top_k,
        "num_experts": args.num_experts,
        "paths": list(args.paths),
        "num_sms": args.num_sms,
        "ht_max_tokens": args.ht_max_tokens or max(args.tokens),
        "ll_min_capacity": args.ll_min_capacity,
        "warmup": args.warmup,
        "runs": args.runs,
    }
    from moe_kernels.tools.launcher import run_ranks

    print(f"bench ep: {world} ranks, H={args.hidden}, top-{args.top_k}, {args.num_experts} experts", file=sys.stderr)
    results = run_ranks(_bench_rank, world, "nccl", args=(params,), timeout_s=args.timeout)
    report = results[0]
    headers = ["path", "T/rank", "dispatch us", "combine us", "dispatch GB/s", "combine GB/s", "first ms", "note"]
    columns = ("path", "tokens", "dispatch_us", "combine_us", "dispatch_gbs", "combine_gbs", "first_ms", "note")
    rows = [["-" if r[c] is None else r[c] for c in columns] for r in report["rows"]]
    table = format_table(headers, rows)
    title = (
        f"EP dispatch/combine, {world} x {torch.cuda.get_device_name(0)}, H={args.hidden}, "
        f"top-{args.top_k}, {args.num_experts} experts; {report['env']}"
    )
    print(f"{title}\n\n{table}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ep.md").write_text(f"{title}\n\n{table}\n")
        (args.out / "ep.json").write_text(json.dumps({"params": params, "world": world, **report}, indent=2))
    return 0


# --- on each rank -----------------------------------------------------------------------------


def _bench_rank(group: dist.ProcessGroup, p: dict[str, Any]) -> dict[str, Any]:
    from moe_kernels.backends import deep_ep as deep_ep_backend

    rank, world = group.rank(), group.size()
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if rank == 0:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    deep_ep_ok = deep_ep_backend.deep_ep_check()
    nccl = deep_ep_backend.nccl_check()
    env = f"{deep_ep_ok.reason}; {nccl.reason}"
    progress(env)
    rows = []
    for t in p["tokens"]:
        x, ids, weights = _routing(t, p, seed=1234 + rank)
        sent = _sent_rows(ids, rank, world, p["num_experts"] // world)
        for path in p["paths"]:
            if path in DEEPEP_PATHS and not deep_ep_ok.ok:
                row = _empty_row(path, t, "DeepEP unavailable")
            elif path.endswith("-ht") and t > p["ht_max_tokens"]:
                row = _empty_row(path, t, f"T > --ht-max-tokens {p['ht_max_tokens']}")
            else:
                try:
                    dispatch, combine = _path_calls(path, group, p, x, ids, weights)
                    row = _measure(path, t, dispatch, combine, group, p, sent, x.shape[1] * x.element_size())
                except Exception as exc:  # report the failure in the table, keep the other paths
                    note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                    row = _empty_row(path, t, note)
                    torch.cuda.synchronize()
            rows.append(row)
            progress(
                f"{path:>9} T={t:<5} dispatch {_fmt_us(row['dispatch_us'])} us, combine "
                f"{_fmt_us(row['combine_us'])} us, first call {_fmt_us(row['first_ms'])} ms {row['note']}"
            )
            dist.barrier(group=group)
    return {"rows": rows, "env": env}


def _routing(t: int, p: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, p["hidden"], device="cuda", generator=g).to(torch.bfloat16)
    weights, ids = torch.rand(t, p["num_experts"], device="cuda", generator=g).topk(p["top_k"], dim=-1)
    return x, ids, weights.float().contiguous()


def _sent_rows(ids: torch.Tensor, rank: int, world: int, num_local_experts: int) -> int:
    """(token, destination rank) pairs with a destination other than this rank."""
    owner = ids // num_local_experts
    goes_to = (owner.unsqueeze(-1) == torch.arange(world, device=ids.device)).any(dim=1)
    goes_to[:, rank] = False
    return int(goes_to.sum())


def _path_calls(
    path: str, group: dist.ProcessGroup, p: dict[str, Any], x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """``dispatch()`` -> state, ``combine(state)``, for one path at this T."""
    from moe_kernels.backends import deep_gemm

    ht = path.endswith("-ht")
    capacity = p["ht_max_tokens"] if ht else max(x.shape[0], p["ll_min_capacity"])
    alignment = deep_gemm.alignment() or 1  # what the DeepGEMM experts would ask for
    point = _Point(group, p, capacity, alignment, x, ids, w)
    if path == "torch-a2a" or path.startswith("ours"):
        return _ours_calls(path, point)
    return _raw_calls(point, ht=ht)


@dataclasses.dataclass(frozen=True)
class _Point:
    """One path's inputs at one T: the group, the run's parameters, the buffers' capacity in
    tokens per rank, the experts' row alignment, and ``x [T, H]``, ``ids``/``w [T, K]``."""

    group: dist.ProcessGroup
    p: dict[str, Any]
    capacity: int
    alignment: int
    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor


def _ours_calls(path: str, point: _Point) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """Our prepare/finalize parts (DeepEP or torch all-to-all), bound as a layer binds them."""
    from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig
    from moe_kernels.core.compose import layer_context
    from moe_kernels.core.contract import Layout, PrepareAndFinalize, TokenFormat
    from moe_kernels.prepare_finalize.deepep import (
        DeepEPHighThroughputPrepareAndFinalize,
        DeepEPLowLatencyPrepareAndFinalize,
    )
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    group, p, x, ids, w = point.group, point.p, point.x, point.ids, point.w
    moe = MoEConfig(num_experts=p["num_experts"], top_k=p["top_k"], hidden_size=p["hidden"], intermediate_size=8)
    parallel = ParallelConfig(ep_size=group.size(), ep_rank=group.rank(), max_tokens_per_rank=point.capacity)
    ctx = layer_context(LayerConfig(moe=moe, parallel=parallel), group=group)
    pf: PrepareAndFinalize
    if path == "torch-a2a":
        pf, fmt = TorchAllToAllPrepareAndFinalize(), TokenFormat(Layout.STANDARD)
    else:
        mode = DeepEPHighThroughputPrepareAndFinalize if path.endswith("-ht") else DeepEPLowLatencyPrepareAndFinalize
        pf, fmt = mode(num_sms=p["num_sms"]), TokenFormat(Layout.EXPANDED, point.alignment)
    pf.bind(ctx, fmt)
    out = torch.empty_like(x)

    def dispatch() -> Any:
        return pf.prepare(x, ids, w, {})

    def combine(prepared: Any) -> None:
        pf.finalize(out, prepared.tokens.x, prepared)  # the dispatched rows stand in for the experts'

    return dispatch, combine


def _raw_calls(point: _Point, *, ht: bool) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """The same ``EPBuffer.dispatch``/``combine`` calls made directly: what our wrapper costs."""
    from moe_kernels.backends import deep_ep as deep_ep_backend
    from moe_kernels.prepare_finalize import deepep_buffer as epb

    deep_ep, _ = deep_ep_backend.probe_deep_ep()
    assert deep_ep is not None  # the raw paths run only where the DeepEP parts' checks passed
    x, ids, w, capacity, alignment = point.x, point.ids, point.w, point.capacity, point.alignment
    e, group, p = point.p["num_experts"], point.group, point.p
    buffer = epb.reserve(group, num_max_tokens_per_rank=capacity, hidden=x.shape[1], top_k=ids.shape[1])
    sms = p["num_sms"] or epb.num_sms_for(buffer, e, ids.shape[1])
    idx = ids.to(deep_ep.topk_idx_t)

    def raw_dispatch() -> Any:
        recv_x, _, _, handle, _ = buffer.dispatch(
            x,
            topk_idx=idx,
            topk_weights=w,
            num_experts=e,
            num_max_tokens_per_rank=capacity,
            expert_alignment=alignment,
            num_sms=sms,
            do_cpu_sync=ht,
            do_expand=True,
        )
        return recv_x, handle

    def raw_combine(state: Any) -> None:
        recv_x, handle = state
        buffer.combine(recv_x, handle=handle)

    return raw_dispatch, raw_combine


def _measure(
    path: str,
    t: int,
    dispatch: Callable[[], Any],
    combine: Callable[[Any], None],
    group: dist.ProcessGroup,
    p: dict[str, Any],
    sent_rows: int,
    row_bytes: int,
) -> dict[str, Any]:
    dist.barrier(group=group)
    torch.cuda.synchronize()
    cold = time.perf_counter()
    combine(dispatch())
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - cold) * 1e3
    for _ in range(p["warmup"]):
        combine(dispatch())
    state = dispatch()
    d_us = _median_us(dispatch, p["runs"], group)
    c_us = _median_us(lambda: combine(state), p["runs"], group)
    # the slowest rank sets the pace; bytes per rank averaged over ranks
    stats = torch.tensor([d_us, c_us, first_ms, float(sent_rows)], device="cuda", dtype=torch.float64)
    peak = stats.clone()
    dist.all_reduce(peak[:3], op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(stats[3:], group=group)
    d_us, c_us, first_ms = peak[:3].tolist()
    mean_bytes = stats[3].item() / group.size() * row_bytes
    return {
        "path": path,
        "tokens": t,
        "dispatch_us": d_us,
        "combine_us": c_us,
        "dispatch_gbs": mean_bytes / (d_us * 1e-6) / 1e9,
        "combine_gbs": mean_bytes / (c_us * 1e-6) / 1e9,
        "first_ms": first_ms,
        "note": "",
    }


def _median_us(fn: Callable[[], Any], runs: int, group: dist.ProcessGroup) -> float:
    times = []
    for _ in range(runs):
        dist.barrier(group=group)  # every rank enters together: no waiting on a late peer inside the kernel
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _empty_row(path: str, t: int, note: str) -> dict[str, Any]:
    return {
        "path": path,
        "tokens": t,
        "dispatch_us": None,
        "combine_us": None,
        "dispatch_gbs": None,
        "combine_gbs": None,
        "first_ms": None,
        "note": note,
    }


def _fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _path_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in PATHS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    return values
