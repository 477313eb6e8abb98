"""``moe-kernels bench experts``: time every experts implementation on EP-local layer shapes.

For each shape and token count T it times (CUDA events, L2 flushed, median), on one random
routing:

* the experts classes through their ``apply`` (workspaces from a cache, no composer):
  DeepGEMM contiguous, DeepGEMM masked (the hybrid forced to its masked path), torch._grouped_mm,
  Triton;
* the GEMMs alone on the same routing (raw DeepGEMM contiguous / masked and raw
  ``torch._grouped_mm``, inputs already permuted): the floor the glue adds to;
* a straightforward torch-ops MoE (:func:`torch_ops_moe`: sort/index_select permute,
  ``torch._grouped_mm``, torch SiLU-and-mul, ``index_add_`` unpermute) -- the baseline;
* a per-expert torch loop (small T only: it syncs with the host per expert);
* the permute kernels alone (layout + scatter, weighted gather) as bytes/s against the
  measured copy bandwidth, and for decode (T <= 64) the experts time against the HBM bound
  (weight bytes of the experts the routing touches / copy bandwidth).

Routing, the simple documented choice: each of the T tokens picks top-k distinct experts
uniformly among the *local* experts, so the experts see T*K rows. (With EP the rows a rank sees
come from more tokens: at DeepSeek-V3's EP=8 a token has on average one of its 8 experts on a
rank, so T here stands for about T*8 tokens across the EP group.) It ends with the
masked/contiguous crossover per shape (the hybrid's threshold) and a snippet for
``moe_kernels/experts/tuning.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_kernels.bench.timing import copy_bandwidth_gbs, format_table, time_cuda
from moe_kernels.compose import WorkspaceCache
from moe_kernels.contract import PermuteExpertsUnpermute, StandardTokens


@dataclass(frozen=True)
class BenchShape:
    """An EP-local layer: ``num_experts`` local experts, each token picks ``top_k`` of them."""

    label: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int

    @property
    def key(self) -> tuple[int, int, int]:
        return self.num_experts, self.hidden, self.inter


SHAPES: dict[str, BenchShape] = {
    "deepseek-v3": BenchShape("DeepSeek-V3, EP=8 (32 of 256 experts), top-8", 32, 8, 7168, 2048),
    "qwen3-30b-a3b": BenchShape("Qwen3-30B-A3B (128 experts), top-8", 128, 8, 2048, 768),
    "qwen3-235b-a22b": BenchShape("Qwen3-235B-A22B, EP=8 (16 of 128 experts), top-8", 16, 8, 4096, 1536),
}
DEFAULT_TOKENS = [1, 8, 64, 256, 1024, 4096, 16384]
HUGE = 10**9

#: experts implementations timed through ``apply``: column -> (tuning.py name, factory)
EXPERTS_COLUMNS = ("deepgemm", "masked", "grouped_mm", "triton")
TUNING_NAMES = {
    "deepgemm": "DeepGemmExperts",
    "grouped_mm": "GroupedMMExperts",
    "triton": "TritonExperts",
}


@dataclass
class Point:
    """Everything measured for one (shape, T); times in microseconds, None = not run."""

    tokens: int
    us: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    max_rel_err: float = 0.0
    active_experts: int = 0
    hbm_bound_us: float | None = None
    scatter_gbs: float | None = None
    gather_gbs: float | None = None


@dataclass
class ShapeResult:
    name: str
    shape: BenchShape
    points: list[Point] = field(default_factory=list)
    threshold: int | None = None
    threshold_note: str = ""


# --- the baselines ------------------------------------------------------------------------


def torch_ops_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The straightforward torch MoE the kernels must beat (the BASELINE, not a library path):
    argsort the slots by expert, ``index_select`` the rows, ``torch._grouped_mm`` twice with a
    torch SiLU-and-mul between, scale by the router weights and ``index_add_`` back (fp32).
    No host sync (group ends by ``searchsorted``, not ``bincount``), so it too can be timed
    from a CUDA graph."""
    t, k = topk_ids.shape
    e, inter = w13.shape[0], w2.shape[2]
    flat = topk_ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, e)  # -1 slots sort last, past every group
    order = torch.argsort(key, stable=True)
    token = order // k
    bounds = torch.arange(1, e + 1, device=key.device)
    offs = torch.searchsorted(key[order], bounds).to(torch.int32)  # slots with key < e', e' = 1..E
    rows = x.index_select(0, token)
    h = torch._grouped_mm(rows, w13.transpose(-2, -1), offs=offs)
    act = F.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)
    weight = torch.where(key[order] < e, topk_weights.reshape(-1)[order], 0.0)
    # rows past the last group are uninitialised: where(), not a multiply, keeps NaN out
    y = torch.where((key[order] < e)[:, None], y.float() * weight[:, None], 0.0)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y).to(x.dtype)


def per_expert_loop(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """One small GEMM pair per expert with boolean selection (syncs per expert): small T only."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].T
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].T
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None])
    return out.to(x.dtype)


# --- measuring ----------------------------------------------------------------------------


class Timer:
    """CUDA-event medians with a per-measurement time budget (big points get fewer runs)."""

    def __init__(self, max_runs: int, target_s: float) -> None:
        self.max_runs, self.target_s = max_runs, target_s
        self.failures: list[str] = []

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # JIT compiles, workspace growth
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        single = time.perf_counter() - start
        runs = int(min(self.max_runs, max(5, self.target_s / max(single, 1e-6))))
        return time_cuda(fn, warmup=2, runs=runs).median_us

    def graphed(self, fn: Callable[[], object]) -> float:
        """GPU time of ``fn`` replayed from a CUDA graph (no host launch overhead, as in decode
        serving). ``fn`` must not sync; it is run once eagerly first (JIT, workspace growth)."""
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # report and time eagerly rather than lose the whole run
            torch.cuda.synchronize()
            self.failures.append(f"{getattr(fn, '__name__', 'fn')}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            print(f"bench experts: CUDA-graph capture failed, timing eagerly: {self.failures[-1]}", file=sys.stderr)
            return self(fn)
        try:
            return self(graph.replay)
        finally:
            del graph


def useful_flops(shape: BenchShape, tokens: int) -> float:
    """2 * T * K * (H * 2I + I * H): the GEMM work of the routed slots (no padding)."""
    return 2.0 * tokens * shape.top_k * (shape.hidden * 2 * shape.inter + shape.inter * shape.hidden)


def make_problem(shape: BenchShape, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, shape.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(tokens, shape.num_experts, device="cuda", generator=gen).argsort(dim=1)[:, : shape.top_k]
    weights = torch.rand(tokens, shape.top_k, device="cuda", generator=gen)
    weights /= weights.sum(dim=1, keepdim=True)
    return x, weights, ids.to(torch.int32).contiguous()


def make_weights(shape: BenchShape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(i**-0.5)
    return w13, w2


def experts_factories(has_deep_gemm: bool, has_grouped_mm: bool) -> dict[str, Callable[[], PermuteExpertsUnpermute]]:
    from moe_kernels.experts.triton import TritonExperts

    made: dict[str, Callable[[], PermuteExpertsUnpermute]] = {}
    if has_deep_gemm:
        from moe_kernels.experts.deepgemm import DeepGemmExperts
        from moe_kernels.experts.hybrid import HybridDeepGemmExperts

        made["deepgemm"] = DeepGemmExperts
        made["masked"] = lambda: HybridDeepGemmExperts(threshold=HUGE, masked_memory_budget=2**62)
    if has_grouped_mm:
        from moe_kernels.experts.grouped_mm import GroupedMMExperts

        made["grouped_mm"] = GroupedMMExperts
    made["triton"] = TritonExperts
    return made


def masked_bytes(shape: BenchShape, tokens: int) -> int:
    m = -(-tokens // 128) * 128
    return shape.num_experts * m * (shape.hidden + 3 * shape.inter) * 2


def bench_point(
    shape: BenchShape,
    tokens: int,
    w13: torch.Tensor,
    w2: torch.Tensor,
    factories: dict[str, Callable[[], PermuteExpertsUnpermute]],
    timer: Timer,
    args: argparse.Namespace,
    copy_gbs: float,
) -> Point:
    point = Point(tokens)
    x, weights, ids = make_problem(shape, tokens, seed=tokens)
    tokens_obj = StandardTokens(x, ids, weights, shape.num_experts)
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    free = torch.cuda.mem_get_info()[0]

    # the baseline first: its output is what every implementation is checked against
    ref = torch_ops_moe(x, w13, w2, weights, ids).float()
    point.us["torch_ops"] = timer.graphed(lambda: torch_ops_moe(x, w13, w2, weights, ids))
    if tokens <= args.loop_max_tokens:
        point.us["loop"] = timer(lambda: per_expert_loop(x, w13, w2, weights, ids))
    else:
        point.skipped["loop"] = f"T > {args.loop_max_tokens}"

    cache = WorkspaceCache()
    scale = max(ref.abs().max().item(), 1e-6)
    for column, make in factories.items():
        if column == "masked":
            if tokens > args.crossover_max_tokens:
                point.skipped[column] = f"T > {args.crossover_max_tokens}"
                continue
            if masked_bytes(shape, tokens) > 0.4 * free:
                point.skipped[column] = "masked scratch would not fit"
                continue
        experts = make()
        out = torch.empty_like(x)
        ws = cache.get(experts.workspace_shapes(tokens_obj, w13, w2), x.device)
        run = lambda experts=experts, out=out, ws=ws: experts.apply(tokens_obj, w13, w2, out, ws)
        point.us[f"{column}_eager"] = timer(run)
        point.us[column] = timer.graphed(run)
        point.max_rel_err = max(point.max_rel_err, (out.float() - ref).abs().max().item() / scale)
        del ws
    cache.clear()

    # the GEMMs alone, inputs already permuted
    if "deepgemm" in factories:
        point.us["gemm_deepgemm"] = raw_deepgemm_contiguous(x, ids, w13, w2, timer)
        if "masked" in point.us:
            point.us["gemm_masked"] = raw_deepgemm_masked(x, ids, w13, w2, timer)
    if "grouped_mm" in factories:
        point.us["gemm_grouped_mm"] = raw_grouped_mm(x, ids, w13, w2, timer)

    # the permute kernels alone
    point.us["scatter"], point.us["gather"] = permute_kernels(x, weights, ids, e, "deepgemm" in factories, timer)
    row_bytes = h * x.element_size()
    slots = tokens * shape.top_k
    point.scatter_gbs = (tokens + slots) * row_bytes / point.us["scatter"] / 1e3
    point.gather_gbs = (slots + tokens) * row_bytes / point.us["gather"] / 1e3

    point.active_experts = int(torch.unique(ids).numel())
    if tokens <= 64:
        weight_bytes = point.active_experts * 3 * h * i * w13.element_size()
        point.hbm_bound_us = weight_bytes / (copy_gbs * 1e9) * 1e6
    return point


def raw_deepgemm_contiguous(
    x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, timer: Timer
) -> float:
    """Both DeepGEMM contiguous GEMMs alone on already permuted rows."""
    import deep_gemm

    from moe_kernels.experts.deepgemm import contiguous_alignment
    from moe_kernels.kernels import contiguous_layout, scatter_rows, silu_and_mul

    inter = w2.shape[2]
    lay = contiguous_layout(ids, w13.shape[0], contiguous_alignment())
    rows = x.new_empty(lay.num_rows_bound, x.shape[1])
    scatter_rows(x, lay.dst_row, rows)
    gate_up, act, y = x.new_empty(rows.shape[0], 2 * inter), x.new_empty(rows.shape[0], inter), torch.empty_like(rows)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(rows, w13, gate_up, lay.grouped_layout)
    silu_and_mul(gate_up, act, grouped_layout=lay.grouped_layout)

    def gemms() -> None:
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(rows, w13, gate_up, lay.grouped_layout)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(act, w2, y, lay.grouped_layout)

    return timer.graphed(gemms)


def raw_deepgemm_masked(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, timer: Timer) -> float:
    """Both DeepGEMM masked GEMMs alone on rows already scattered into ``[E, M, H]``."""
    import deep_gemm

    from moe_kernels.experts.deepgemm import align_up, masked_rows_multiple
    from moe_kernels.kernels import masked_layout, scatter_rows, silu_and_mul

    e, inter, (t, k) = w13.shape[0], w2.shape[2], ids.shape
    cap = align_up(t, masked_rows_multiple())
    lay = masked_layout(ids, e, cap)
    xb = x.new_empty(e, cap, x.shape[1])
    scatter_rows(x, lay.dst_row, xb)
    gate_up, act, yb = x.new_empty(e, cap, 2 * inter), x.new_empty(e, cap, inter), torch.empty_like(xb)
    expected_m = -(-t * k // e)
    deep_gemm.m_grouped_bf16_gemm_nt_masked(xb, w13, gate_up, lay.counts, expected_m)
    silu_and_mul(gate_up, act, counts=lay.counts)

    def gemms() -> None:
        deep_gemm.m_grouped_bf16_gemm_nt_masked(xb, w13, gate_up, lay.counts, expected_m)
        deep_gemm.m_grouped_bf16_gemm_nt_masked(act, w2, yb, lay.counts, expected_m)

    return timer.graphed(gemms)


def raw_grouped_mm(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, timer: Timer) -> float:
    """Both ``torch._grouped_mm`` calls alone on already permuted (unpadded) rows."""
    from moe_kernels.kernels import contiguous_layout, scatter_rows, silu_and_mul

    lay = contiguous_layout(ids, w13.shape[0], 1)
    rows = x.new_empty(lay.num_rows_bound, x.shape[1])
    scatter_rows(x, lay.dst_row, rows)
    w13t, w2t = w13.transpose(-2, -1), w2.transpose(-2, -1)
    act = x.new_empty(rows.shape[0], w2.shape[2])
    silu_and_mul(torch._grouped_mm(rows, w13t, offs=lay.segment_ends), act, grouped_layout=lay.grouped_layout)

    def gemms() -> None:
        torch._grouped_mm(rows, w13t, offs=lay.segment_ends)
        torch._grouped_mm(act, w2t, offs=lay.segment_ends)

    return timer.graphed(gemms)


def permute_kernels(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int, deep_gemm_alignment: bool, timer: Timer
) -> tuple[float, float]:
    """(layout + scatter, weighted gather) in us, at DeepGEMM's alignment (else the Triton GEMM's)."""
    from moe_kernels.kernels import contiguous_layout, scatter_rows, weighted_gather

    if deep_gemm_alignment:
        from moe_kernels.experts.deepgemm import contiguous_alignment
    else:
        from moe_kernels.kernels import contiguous_alignment
    alignment = contiguous_alignment()
    lay = contiguous_layout(ids, num_experts, alignment)
    rows = x.new_empty(lay.num_rows_bound, x.shape[1])
    out = torch.empty_like(x)
    scatter_us = timer.graphed(lambda: scatter_rows(x, contiguous_layout(ids, num_experts, alignment).dst_row, rows))
    gather_us = timer.graphed(lambda: weighted_gather(rows, lay.dst_row, weights, out))
    return scatter_us, gather_us


# --- reporting ----------------------------------------------------------------------------


def best_experts(point: Point) -> tuple[str, float] | None:
    timed = [(c, point.us[c]) for c in EXPERTS_COLUMNS if c in point.us]
    return min(timed, key=lambda cu: cu[1]) if timed else None


def crossover(points: list[Point]) -> tuple[int | None, str]:
    """The hybrid threshold (masked for ``T <= threshold``) that fits the measurements best:
    among 0 and the measured T, the one minimising the summed ``log(chosen path / faster path)``
    over the measured T (the smallest on ties); ``None`` without masked/contiguous pairs."""
    both = sorted((p for p in points if "masked" in p.us and "deepgemm" in p.us), key=lambda p: p.tokens)
    if not both:
        return None, "no DeepGEMM masked/contiguous pair measured"

    def loss(threshold: int) -> float:
        total = 0.0
        for p in both:
            chosen = p.us["masked"] if p.tokens <= threshold else p.us["deepgemm"]
            total += math.log(chosen / min(p.us["masked"], p.us["deepgemm"]))
        return total

    threshold = min([0, *(p.tokens for p in both)], key=lambda t: (loss(t), t))
    wins = [p.tokens for p in both if p.us["masked"] <= p.us["deepgemm"]]
    note = f"masked measured no slower at T in {wins or 'none'} of {[p.tokens for p in both]}"
    if loss(threshold) > 0:
        note += f"; this threshold costs {math.expm1(loss(threshold) / len(both)):.1%} over per-T best on average"
    return threshold, note


def _ratio(num: float | None, den: float | None) -> float | str:
    return num / den if num and den else "-"


def shape_table(result: ShapeResult) -> str:
    headers = [
        "T",
        "DG contig us",
        "DG masked us",
        "grouped_mm us",
        "Triton us",
        "best",
        "best eager us",
        "best TFLOP/s",
        "GEMMs us",
        "best/GEMMs",
        "torch-ops us",
        "torch-ops/best",
        "loop/best",
        "HBM bound us",
        "best/HBM",
        "scatter GB/s",
        "gather GB/s",
        "max rel err",
    ]
    rows = []
    for p in result.points:
        best = best_experts(p)
        best_col, best_us = best if best else ("-", None)
        gemms = [p.us[c] for c in ("gemm_deepgemm", "gemm_masked", "gemm_grouped_mm") if c in p.us]
        gemm_us = min(gemms) if gemms else None
        rows.append(
            [
                p.tokens,
                *(p.us.get(c, "-") for c in EXPERTS_COLUMNS),
                best_col,
                p.us.get(f"{best_col}_eager", "-"),
                useful_flops(result.shape, p.tokens) / best_us / 1e6 if best_us else "-",
                gemm_us or "-",
                _ratio(best_us, gemm_us),
                p.us.get("torch_ops", "-"),
                _ratio(p.us.get("torch_ops"), best_us),
                _ratio(p.us.get("loop"), best_us),
                p.hbm_bound_us or "-",
                _ratio(best_us, p.hbm_bound_us),
                p.scatter_gbs or "-",
                p.gather_gbs or "-",
                f"{p.max_rel_err:.1e}",
            ]
        )
    return format_table(headers, rows)


def tuning_snippet(results: list[ShapeResult], source: str) -> str:
    lines = [f'EXPERTS_US_SOURCE = "{source}"', "EXPERTS_US = {"]
    for r in results:
        table: dict[str, dict[int, float]] = {}
        for p in r.points:
            for column, name in TUNING_NAMES.items():
                if column in p.us:
                    table.setdefault(name, {})[p.tokens] = round(p.us[column], 1)
            if r.threshold is not None and "deepgemm" in p.us:
                masked = "masked" in p.us and p.tokens <= r.threshold
                us = p.us["masked"] if masked else p.us["deepgemm"]
                table.setdefault("HybridDeepGemmExperts", {})[p.tokens] = round(us, 1)
        lines.append(f"    {r.shape.key}: {table!r},  # {r.name}")
    lines.append("}")
    lines.append("HYBRID_THRESHOLDS = {")
    for r in results:
        if r.threshold is not None:
            lines.append(f"    {r.shape.key}: {r.threshold},  # {r.name}: {r.threshold_note}")
    lines.append("}")
    return "\n".join(lines)


def report(results: list[ShapeResult], header: list[str], source: str) -> str:
    parts = ["# Experts benchmark", "", *header, ""]
    for r in results:
        parts += [f"## {r.name}: {r.shape.label}, E={r.shape.num_experts} H={r.shape.hidden} I={r.shape.inter}", ""]
        parts += [shape_table(r), ""]
        skipped = sorted({f"{c}: {why}" for p in r.points for c, why in p.skipped.items()})
        if skipped:
            parts += ["Not run: " + "; ".join(skipped), ""]
        if r.threshold is not None:
            parts += [f"Hybrid crossover: masked up to T = {r.threshold} ({r.threshold_note}).", ""]
    parts += [
        "## Snippet for moe_kernels/experts/tuning.py",
        "",
        "```python",
        tuning_snippet(results, source),
        "```",
        "",
    ]
    return "\n".join(parts)


# --- CLI ----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return values


def _shape_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        type=_shape_list,
        default=list(SHAPES),
        help=f"comma-separated, from {', '.join(SHAPES)} (default: all)",
    )
    parser.add_argument(
        "--tokens", type=_int_list, default=DEFAULT_TOKENS, help="comma-separated token counts (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="directory for experts.md, experts.json and experts.png")
    parser.add_argument("--runs", type=int, default=30, help="most timed runs per measurement (default: %(default)s)")
    parser.add_argument(
        "--target-ms", type=float, default=250.0, help="time budget of one measurement, fewer runs when slow"
    )
    parser.add_argument("--loop-max-tokens", type=int, default=64, help="largest T for the per-expert loop")
    parser.add_argument(
        "--crossover-max-tokens", type=int, default=4096, help="largest T for the masked path (its memory grows E x T)"
    )
    parser.add_argument("--time-budget-s", type=float, help="stop starting new points after this many seconds")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG even when matplotlib is present")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the tables (stdout) and progress (stderr)."""
    if not torch.cuda.is_available():
        print("bench experts: skipped: it times with CUDA events and this machine has no CUDA GPU")
        return 0
    from moe_kernels.experts.deepgemm import deep_gemm_status

    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    dg_ok, dg_why = deep_gemm_status()
    has_grouped_mm = hasattr(torch, "_grouped_mm") and major in (9, 10)
    copy_gbs = copy_bandwidth_gbs()
    gpu = torch.cuda.get_device_name(device)
    source = f"moe-kernels bench experts, {gpu}, {datetime.date.today().isoformat()}"
    header = [
        f"- GPU: {gpu} (SM{major}{minor}), torch {torch.__version__}, {dg_why if dg_ok else 'no DeepGEMM: ' + dg_why}",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; copy bandwidth {copy_gbs:.0f} GB/s "
        "(read + write)",
        "- routing: every token picks top-k distinct local experts uniformly at random; T*K rows per rank",
        "- times: GPU time of one call replayed from a CUDA graph (median of CUDA-event runs, L2 flushed before "
        "each), as decode serving runs; 'best eager us' is the same call launched from Python (host-bound at "
        "small T); experts timed through apply (no composer); the per-expert loop syncs, so it runs eagerly",
        "- TFLOP/s counts 2*T*K*(H*2I + I*H); GEMMs = the faster of raw DeepGEMM (contiguous or masked) and raw "
        "torch._grouped_mm on the same routing; HBM bound = touched experts' weight bytes / copy bandwidth",
    ]
    progress(header[0].removeprefix("- "))
    factories = experts_factories(dg_ok, has_grouped_mm)
    timer = Timer(args.runs, args.target_ms / 1e3)
    results: list[ShapeResult] = []
    stopped = False
    for name in args.shapes:
        shape = SHAPES[name]
        w13, w2 = make_weights(shape)
        result = ShapeResult(name, shape)
        results.append(result)
        for tokens in args.tokens:
            if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                progress(f"time budget of {args.time_budget_s:.0f} s spent: stopping before {name} T={tokens}")
                stopped = True
                break
            progress(f"{name} T={tokens} ...")
            try:
                point = bench_point(shape, tokens, w13, w2, factories, timer, args, copy_gbs)
            except torch.cuda.OutOfMemoryError as e:
                progress(f"{name} T={tokens}: out of memory ({str(e).splitlines()[0]}); skipping larger T")
                torch.cuda.empty_cache()
                break
            result.points.append(point)
            best = best_experts(point)
            progress(
                f"{name} T={tokens}: "
                + ", ".join(f"{c} {us:.1f} us" for c, us in point.us.items())
                + (f"; best {best[0]}" if best else "")
            )
            torch.cuda.empty_cache()
            _write(args, results, header, source)
        result.threshold, result.threshold_note = crossover(result.points)
        if result.threshold is not None:
            progress(f"{name}: recommended hybrid threshold {result.threshold} ({result.threshold_note})")
        del w13, w2
        torch.cuda.empty_cache()
        _write(args, results, header, source)
        if stopped:
            break

    if timer.failures:
        header.append("- CUDA-graph capture failed for (timed eagerly instead): " + "; ".join(timer.failures))
    print(report(results, header, source))
    _write(args, results, header, source)
    return 0


def _write(args: argparse.Namespace, results: list[ShapeResult], header: list[str], source: str) -> None:
    """Write what is measured so far (a run cut short still leaves its results)."""
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "experts.md").write_text(report(results, header, source))
    raw = [
        {"name": r.name, "shape": asdict(r.shape), "threshold": r.threshold, "points": [asdict(p) for p in r.points]}
        for r in results
    ]
    (args.out / "experts.json").write_text(json.dumps(raw, indent=1))
    if not args.no_plot:
        from moe_kernels.bench.plot import plot_experts

        plot_experts(results, args.out / "experts.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.bench.experts", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
