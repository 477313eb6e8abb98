"""``moe-kernels bench experts``: what ``select()`` picks and every valid local pair of the registry,
beside vLLM's fused MoE (``--peer``), the GEMMs alone and the hardware limits, on EP-local shapes.

For each shape (:mod:`moe_kernels.selection.problems`) and token count T, on one uniform routing
(every token picks top-k distinct local experts), in one process on one GPU:

* ``select``: the kernel :func:`moe_kernels.selection.select.select` builds for the layer (sized for the
  largest T; it switches pairs by T where the tuning table says so);
* every valid pair of the registry (``--pairs all``), each composed for calls of T tokens;
* ``peer``: vLLM's Triton ``fused_experts`` on the same inputs -- real ``vllm`` when it
  imports, else the module ``vllm_fused_moe_peer`` from the ``--peer`` folder;
* ``GEMMs``: DeepGEMM's contiguous/masked grouped GEMMs and ``torch._grouped_mm`` alone on the
  same routing, inputs already permuted (the floor the glue adds to);
* ``torch-ops``: a straightforward torch MoE (sort, index_select, ``_grouped_mm``, index_add);
* the limits: touched experts' weight bytes / measured copy bandwidth (``HBM bound``) and the
  GEMM FLOPs / measured dense bf16 GEMM rate (``TC bound``).

``--quant fp8`` (``fp8_w8a8_block``) or any other scheme (``fp8_w8a8_channel``,
``fp8_w8a8_tensor``, ``int4_w4a16``, ``mxfp4``): the layer of each shape in that format (random
weights quantized by the format's ``quantize``), beside ``bf16``: what ``select()`` picks for the
unquantized layer of the same shape on the dequantized weights and the same routing, and the
peer in the same format where it has one (:data:`PEER_QUANT`; the GEMMs-alone columns are
bf16-only). The HBM bound then counts the stored bytes: packed weights, scales, zero points.

Times are GPU time of one call replayed from a CUDA graph (median of CUDA-event runs, L2 flushed
before each). Ratios above 1 mean we are faster (``peer / select``) or slower (``select / bound``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_kernels.mlp.formats import Int4Group
from moe_kernels.mlp.schemes import SCHEMES
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.selection.problems import SHAPES, BenchShape, dequantized, make_problem, make_weights, valid_pairs
from moe_kernels.selection.timing import Timer, copy_bandwidth_gbs, matmul_tflops
from moe_kernels.selection.tuner import tune_shape
from moe_kernels.tools.args import positive_ints, shape_names
from moe_kernels.tools.bench.tables import format_table
from moe_kernels.tools.harness import require_cuda
from moe_kernels.tools.progress import Progress

DEFAULT_TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


# --- the baselines ------------------------------------------------------------------------


def torch_ops_moe(
    x: torch.Tensor, w: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The straightforward torch MoE the kernels must beat (a BASELINE, not a library path):
    argsort the slots by expert, ``index_select`` the rows, ``torch._grouped_mm`` twice with a
    torch SiLU-and-mul between, scale by the router weights and ``index_add_`` back (fp32).
    No host sync (group ends by ``searchsorted``), so it too can be timed from a CUDA graph."""
    t, k = topk_ids.shape
    e, inter = w.num_experts, w.inter
    flat = topk_ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, e)  # -1 slots sort last, past every group
    order = torch.argsort(key, stable=True)
    token = order // k
    bounds = torch.arange(1, e + 1, device=key.device)
    offs = torch.searchsorted(key[order], bounds).to(torch.int32)
    rows = x.index_select(0, token)
    h = torch._grouped_mm(rows, w.w13.transpose(-2, -1), offs=offs)
    act = F.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(act, w.w2.transpose(-2, -1), offs=offs)
    weight = torch.where(key[order] < e, topk_weights.reshape(-1)[order], 0.0)
    # rows past the last group are uninitialised: where(), not a multiply, keeps NaN out
    y = torch.where((key[order] < e)[:, None], y.float() * weight[:, None], 0.0)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y).to(x.dtype)


def load_peer(folder: Path | None) -> tuple[Callable[..., torch.Tensor] | None, str]:
    """vLLM's ``fused_experts``: from an installed ``vllm`` if any, else ``vllm_fused_moe_peer``
    in ``folder``; ``(None, why)`` when neither imports."""
    try:
        module = importlib.import_module("vllm.model_executor.layers.fused_moe")
        return module.fused_experts, f"vllm {importlib.import_module('vllm').__version__}"
    except Exception:  # not installed (the usual case on the benchmark machines): try the folder
        pass
    if folder is None:
        return None, "no vllm installed and no --peer folder given"
    sys.path.insert(0, str(folder.resolve()))
    try:
        module = importlib.import_module("vllm_fused_moe_peer")
    except Exception as e:  # a missing or broken folder is reported, not fatal
        return None, f"cannot import vllm_fused_moe_peer from {folder}: {type(e).__name__}: {e}"
    return module.fused_experts, f"vLLM's fused_experts from {folder} (vllm_fused_moe_peer)"


#: our schemes the peer also runs (its ``quant=`` names are the same)
PEER_QUANT = ("fp8_w8a8_block", "fp8_w8a8_channel", "fp8_w8a8_tensor", "int4_w4a16")


def peer_call(
    peer: Callable[..., torch.Tensor], quant: str, w: ExpertWeights
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``(x, topk_weights, topk_ids) -> out`` of the peer on our weights, converted once to its
    layout (per-tensor scales ``[E]``; int4 zero points two per byte along N), or ``None`` where
    the peer has no such format."""
    if quant == "none":
        return lambda x, tw, ids: peer(x, w.w13, w.w2, tw, ids)
    if quant not in PEER_QUANT:
        return None
    kwargs: dict[str, Any] = {"quant": quant, "w13_scale": w.w13_scale, "w2_scale": w.w2_scale}
    if quant == "fp8_w8a8_tensor":
        assert w.w13_scale is not None and w.w2_scale is not None  # an fp8 layer has its scales
        kwargs |= {"w13_scale": w.w13_scale.reshape(-1), "w2_scale": w.w2_scale.reshape(-1)}
    if quant == "int4_w4a16":
        fmt = w.weight_format
        assert isinstance(fmt, Int4Group)  # the format of int4_w4a16
        kwargs["group_size"] = fmt.group_size
        if w.w13_zero is not None and w.w2_zero is not None:
            kwargs["w13_zp"], kwargs["w2_zp"] = (z[:, 0::2] | (z[:, 1::2] << 4) for z in (w.w13_zero, w.w2_zero))
    return lambda x, tw, ids: peer(x, w.w13, w.w2, tw, ids, **kwargs)


# --- measuring ----------------------------------------------------------------------------


def useful_flops(shape: BenchShape, tokens: int) -> float:
    """2 * T * K * (H * 2I + I * H): the GEMM work of the routed slots (no padding)."""
    return 6.0 * tokens * shape.top_k * shape.hidden * shape.inter


@dataclass
class Point:
    """Everything measured for one (shape, T); times in microseconds."""

    tokens: int
    us: dict[str, float] = field(default_factory=dict)
    max_rel_err: dict[str, float] = field(default_factory=dict)
    select_pair: str = ""
    active_experts: int = 0
    hbm_bound_us: float = 0.0
    tc_bound_us: float = 0.0


@dataclass
class ShapeResult:
    name: str
    shape: BenchShape
    decided_by: str = ""
    points: list[Point] = field(default_factory=list)


def bench_point(
    shape: BenchShape,
    tokens: int,
    w: ExpertWeights,
    selection: Any,
    peer: Callable[..., torch.Tensor] | None,
    timer: Timer,
    args: argparse.Namespace,
    limits: tuple[float, float],
    tuned: dict[str, dict[int, float]],
    bf16: tuple[ExpertWeights, Any] | None = None,
) -> Point:
    """One token count. ``bf16``: for an fp8 layer, the dequantized weights and the bf16 layer's
    selection, timed on the same routing as ``bf16``."""
    point = Point(tokens)
    x, tw, ids = make_problem(shape, tokens, seed=tokens)
    plain = bf16[0] if bf16 is not None else w
    ref = torch_ops_moe(x, plain, tw, ids).float()
    scale = max(ref.abs().max().item(), 1e-6)

    def record(name: str, fn: Callable[[], torch.Tensor]) -> None:
        point.max_rel_err[name] = (fn().float() - ref).abs().max().item() / scale
        point.us[name] = timer.graphed(fn, f"{shape.label} T={tokens} {name}")

    kernel = selection.kernel
    chosen = kernel.kernel_for(tokens) if hasattr(kernel, "kernel_for") else kernel
    point.select_pair = chosen.name
    record("select", lambda: kernel(x, w, tw, ids, check_values=False))
    if bf16 is not None:
        bf16_kernel = bf16[1].kernel
        record("bf16", lambda: bf16_kernel(x, plain, tw, ids, check_values=False))
    call = peer_call(peer, args.quant, w) if peer is not None else None
    if call is not None:
        record("peer", lambda: call(x, tw, ids))
    record("torch-ops", lambda: torch_ops_moe(x, plain, tw, ids))
    if args.pairs == "all":
        for name, build in valid_pairs(shape.layer(tokens, args.quant)):
            pair = build()
            record(name, functools.partial(pair, x, w, tw, ids, check_values=False))
            del pair
    else:  # measured by the tuner a moment ago, in this process
        point.us.update({name: times[tokens] for name, times in tuned.items() if tokens in times})
    if bf16 is None:
        gemm_alone(point, x, ids, w, timer)

    copy_gbs, peak_tflops = limits
    point.active_experts = int(torch.unique(ids).numel())
    per_expert = w.nbytes() / w.num_experts  # weights and (fp8) their scales
    point.hbm_bound_us = point.active_experts * per_expert / (copy_gbs * 1e9) * 1e6
    point.tc_bound_us = useful_flops(shape, tokens) / (peak_tflops * 1e12) * 1e6
    return point


def gemm_alone(point: Point, x: torch.Tensor, ids: torch.Tensor, w: ExpertWeights, timer: Timer) -> None:
    """The two grouped GEMMs alone on already permuted rows: DeepGEMM contiguous and masked
    (when it imports) and ``torch._grouped_mm``; the fastest lands in ``point.us["gemms"]``."""
    from moe_kernels.backends import deep_gemm as dg
    from moe_kernels.kernels import contiguous_layout, masked_layout, scatter_rows

    inter, (t, k), e = w.inter, ids.shape, w.num_experts
    times = []
    if dg.status()[0]:
        deep_gemm = dg.module()
        lay = contiguous_layout(ids, e, dg.alignment() or 1)
        rows = x.new_empty(lay.num_rows_bound, x.shape[1])
        scatter_rows(x, lay.dst_row, rows)
        gate_up, act, y = (
            x.new_empty(rows.shape[0], 2 * inter),
            x.new_empty(rows.shape[0], inter),
            torch.empty_like(rows),
        )

        def contiguous() -> None:
            deep_gemm.m_grouped_bf16_gemm_nt_contiguous(rows, w.w13, gate_up, lay.grouped_layout)
            deep_gemm.m_grouped_bf16_gemm_nt_contiguous(act, w.w2, y, lay.grouped_layout)

        times.append(timer.graphed(contiguous, "DeepGEMM contiguous GEMMs"))
        cap = -(-t // dg.masked_rows_multiple()) * dg.masked_rows_multiple()
        masked = masked_layout(ids, e, cap)
        xb = x.new_empty(e, cap, x.shape[1])
        scatter_rows(x, masked.dst_row, xb)
        gu, ac, yb = x.new_empty(e, cap, 2 * inter), x.new_empty(e, cap, inter), torch.empty_like(xb)
        expected_m = -(-t * k // e)

        def masked_gemms() -> None:
            deep_gemm.m_grouped_bf16_gemm_nt_masked(xb, w.w13, gu, masked.counts, expected_m)
            deep_gemm.m_grouped_bf16_gemm_nt_masked(ac, w.w2, yb, masked.counts, expected_m)

        times.append(timer.graphed(masked_gemms, "DeepGEMM masked GEMMs"))
    if hasattr(torch, "_grouped_mm"):
        lay = contiguous_layout(ids, e, 1)
        rows = x.new_empty(lay.num_rows_bound, x.shape[1])
        scatter_rows(x, lay.dst_row, rows)
        act = x.new_empty(rows.shape[0], inter)
        w13t, w2t = w.w13.transpose(-2, -1), w.w2.transpose(-2, -1)

        def grouped() -> None:
            torch._grouped_mm(rows, w13t, offs=lay.segment_ends)
            torch._grouped_mm(act, w2t, offs=lay.segment_ends)

        times.append(timer.graphed(grouped, "torch._grouped_mm GEMMs"))
    if times:
        point.us["gemms"] = min(times)


# --- reporting ----------------------------------------------------------------------------


def _ratio(num: float | None, den: float | None) -> float | str:
    return num / den if num and den else "-"


def best_pair(point: Point) -> tuple[str, float] | None:
    """Our fastest composed pair at this point (``select`` itself included)."""
    ours = {n: us for n, us in point.us.items() if " + " in n or n == "select"}
    return min(ours.items(), key=lambda kv: kv[1]) if ours else None


def summary_table(result: ShapeResult) -> str:
    peer = "bf16" if any("bf16" in p.us for p in result.points) else "peer"
    headers = [
        "T", "select us", "select picks", f"{peer} us", f"{peer}/select", "best us", "select/best",
        "GEMMs us", "select/GEMMs", "HBM bound us", "select/HBM", "TFLOP/s", "select/TC bound", "torch-ops/select",
        "max rel err",
    ]  # fmt: skip
    rows = []
    for p in result.points:
        sel = p.us.get("select")
        best = best_pair(p)
        rows.append(
            [
                p.tokens,
                sel or "-",
                p.select_pair.replace("PrepareAndFinalize", "PF").replace("Experts", ""),
                p.us.get(peer, "-"),
                _ratio(p.us.get(peer), sel),
                best[1] if best else "-",
                _ratio(sel, best[1] if best else None),
                p.us.get("gemms", "-"),
                _ratio(sel, p.us.get("gemms")),
                p.hbm_bound_us,
                _ratio(sel, p.hbm_bound_us),
                useful_flops(result.shape, p.tokens) / sel / 1e6 if sel else "-",
                _ratio(sel, p.tc_bound_us),
                _ratio(p.us.get("torch-ops"), sel),
                f"{max(p.max_rel_err.values(), default=0.0):.1e}",
            ]
        )
    if peer == "bf16" and any("peer" in p.us for p in result.points):
        # a quantized layer: the peer in the same format too
        headers += ["peer us", "peer/select"]
        for row, p in zip(rows, result.points, strict=True):
            row += [p.us.get("peer", "-"), _ratio(p.us.get("peer"), p.us.get("select"))]
    return format_table(headers, rows)


def pairs_table(result: ShapeResult) -> str:
    names = sorted({n for p in result.points for n in p.us if " + " in n})
    if not names:
        return ""
    headers = ["pair", *(f"T={p.tokens}" for p in result.points)]
    rows = [[n, *(p.us.get(n, "-") for p in result.points)] for n in names]
    return format_table(headers, rows)


def report(results: list[ShapeResult], header: list[str]) -> str:
    parts = ["# Experts benchmark", "", *header, ""]
    for r in results:
        shape = r.shape
        parts += [
            f"## {r.name}: {shape.label}, E={shape.num_experts} K={shape.top_k} H={shape.hidden} I={shape.inter}",
            "",
        ]
        parts += [f"select() decided by: {r.decided_by}", "", summary_table(r), ""]
        table = pairs_table(r)
        if table:
            parts += ["Every valid pair (us):", "", table, ""]
    return "\n".join(parts)


def panels(results: list[ShapeResult]) -> list[Any]:
    """One plot panel per shape: every measured series, divided into the peer's times (the bf16
    twin's in an fp8 run, where that is the comparison the tables make)."""
    from moe_kernels.tools.bench.plot import Panel

    out = []
    for r in results:
        panel = Panel(f"{r.name}: E={r.shape.num_experts} K={r.shape.top_k} H={r.shape.hidden} I={r.shape.inter}")
        for p in r.points:
            for name, us in p.us.items():
                label = name.replace("PrepareAndFinalize", "PF").replace("Experts", "")
                panel.series.setdefault(label, []).append((p.tokens, us))
        panel.reference = "bf16" if "bf16" in panel.series else "peer"
        out.append(panel)
    return out


# --- CLI ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", type=shape_names, default=list(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}"
    )
    parser.add_argument(
        "--tokens",
        type=positive_ints,
        default=DEFAULT_TOKENS,
        help="comma-separated token counts (default: %(default)s)",
    )
    parser.add_argument("--peer", type=Path, help="folder holding vllm_fused_moe_peer.py (unless vllm is installed)")
    parser.add_argument(
        "--pairs", choices=("all", "none"), default="all", help="also time every valid pair (default: all)"
    )
    parser.add_argument(
        "--tune-out",
        type=Path,
        help="tune each shape first (moe-kernels tune: tiles, then every pair) and write the table here; with "
        "--pairs none the pairs' times come from that run. The 'untuned' shape is never tuned",
    )
    parser.add_argument("--tile-candidates", type=int, default=6, help="with --tune-out: tilings timed per GEMM")
    parser.add_argument(
        "--quant",
        choices=("fp8", *SCHEMES),
        default="none",
        help="a quantization scheme (fp8: fp8_w8a8_block): the layers in that format beside bf16 and the peer",
    )
    parser.add_argument("--out", type=Path, help="directory for experts.md, experts.json and experts.png")
    parser.add_argument("--runs", type=int, default=30, help="most timed runs per measurement (default: %(default)s)")
    parser.add_argument("--target-ms", type=float, default=200.0, help="time budget of one measurement")
    parser.add_argument("--time-budget-s", type=float, help="stop starting new points after this many seconds")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the tables (stdout) and progress (stderr)."""
    require_cuda("bench experts", "it times with CUDA events")
    device = torch.device("cuda", torch.cuda.current_device())
    peer, peer_info = load_peer(args.peer)
    limits = (copy_bandwidth_gbs(), matmul_tflops())
    header = _header(torch.cuda.get_device_name(device), peer_info, limits)
    timer = Timer(args.runs, args.target_ms / 1e3)
    args.quant = "fp8_w8a8_block" if args.quant == "fp8" else args.quant
    results: list[ShapeResult] = []
    start = time.perf_counter()
    with Progress(len(args.shapes) * len(args.tokens), "bench experts") as progress:
        progress.say(header[0].removeprefix("- "))
        for name in args.shapes:
            result = ShapeResult(name, SHAPES[name])
            results.append(result)
            save = lambda: _write(args, results, header)
            _bench_shape(result, args, device, peer, timer, limits, progress, save, deadline=start)
    if timer.failures:
        header.append("- CUDA-graph capture failed for (timed eagerly instead): " + "; ".join(timer.failures))
    print(report(results, header))
    _write(args, results, header)
    return 0


def _header(gpu: str, peer_info: str, limits: tuple[float, float]) -> list[str]:
    return [
        f"- GPU: {gpu}, torch {torch.__version__}, date {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- peer: {peer_info}",
        f"- measured limits: copy {limits[0]:.0f} GB/s (read + write), dense bf16 GEMM {limits[1]:.0f} TFLOP/s",
        "- routing: every token picks top-k distinct local experts uniformly at random",
        "- times: GPU time of one call replayed from a CUDA graph, median of CUDA-event runs, L2 flushed before each",
        "- peer/select > 1: we are faster; select/best: what select() costs over our fastest pair at that T;",
        "  HBM bound = touched experts' weight bytes / copy bandwidth; TC bound = GEMM FLOPs / dense GEMM rate",
    ]


def _bench_shape(
    result: ShapeResult,
    args: argparse.Namespace,
    device: torch.device,
    peer: Callable[..., torch.Tensor] | None,
    timer: Timer,
    limits: tuple[float, float],
    progress: Progress,
    save: Callable[[], None],
    *,
    deadline: float,
) -> None:
    """Every token count of one shape into ``result.points`` (``deadline``: the run's start,
    against ``--time-budget-s``); ``save()`` after each point."""
    from moe_kernels.core.compose import WorkspaceCache
    from moe_kernels.selection.select import select

    name, shape, quant = result.name, result.shape, args.quant
    tuned: dict[str, dict[int, float]] = {}
    if args.tune_out is not None and name != "untuned":
        source = f"moe-kernels bench experts --tune-out, {datetime.date.today().isoformat()}, torch {torch.__version__}"
        tuned = tune_shape(
            shape, sorted(args.tokens), timer.graphed, tile_candidates=args.tile_candidates, progress=progress.say,
            tables_dir=args.tune_out, source=source, quant=quant,
        )  # fmt: skip
    w = make_weights(shape, quant=quant)
    # a cache of its own per shape, so that the scratch of one shape is freed before the next
    selection = select(shape.layer(max(args.tokens), quant), device=device, workspace_cache=WorkspaceCache())
    result.decided_by = selection.decided_by
    bf16 = None
    if quant != "none":
        twin = select(shape.layer(max(args.tokens)), device=device, workspace_cache=WorkspaceCache())
        bf16 = (dequantized(w), twin)
    for done, tokens in enumerate(args.tokens):
        if args.time_budget_s and time.perf_counter() - deadline > args.time_budget_s:
            progress.say(f"time budget of {args.time_budget_s:.0f} s spent: stopping before {name} T={tokens}")
            progress.advance(len(args.tokens) - done)
            break
        try:
            point = bench_point(shape, tokens, w, selection, peer, timer, args, limits, tuned, bf16)
        except torch.cuda.OutOfMemoryError as e:
            progress.say(f"{name} T={tokens}: out of memory ({str(e).splitlines()[0]}); skipping larger T")
            progress.advance(len(args.tokens) - done)
            torch.cuda.empty_cache()
            break
        result.points.append(point)
        other = "bf16" if bf16 is not None else "peer"
        ratio = _ratio(point.us.get(other), point.us.get("select"))
        shown = f"{ratio:.2f}" if isinstance(ratio, float) else ratio
        progress.say(
            f"{name} T={tokens}: select {point.us['select']:.1f} us ({point.select_pair}), {other}/select {shown}"
        )
        progress.advance()
        torch.cuda.empty_cache()
        save()
    selection.kernel.release()
    del w, selection, bf16
    torch.cuda.empty_cache()


def _write(args: argparse.Namespace, results: list[ShapeResult], header: list[str]) -> None:
    """Write what is measured so far (a run cut short still leaves its results)."""
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "experts.md").write_text(report(results, header))
    raw = [
        {"name": r.name, "shape": asdict(r.shape), "decided_by": r.decided_by, "points": [asdict(p) for p in r.points]}
        for r in results
    ]
    (args.out / "experts.json").write_text(json.dumps({"header": header, "shapes": raw}, indent=1))
    from moe_kernels.tools.bench.plot import plot_panels

    why_not = plot_panels(panels(results), args.out / "experts.png")
    if why_not is not None and results and results[-1].points:
        print(f"bench experts: experts.png not drawn: {why_not}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_kernels.tools.bench.experts", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
