"""``moe-kernels bench layer``: check and time a whole ``FusedMoE`` layer (router + chosen kernel)
against the reference pair, over token counts, on a GPU.

The layer is timed as an eager caller runs it (CUDA events around each call, L2 flushed), so
``layer us`` is the GPU time or the host's, whichever is longer; ``host us`` is the host's alone
(:func:`~moe_kernels.selection.timing.host_us`) and ``graph us`` the GPU's alone (the call replayed
from a CUDA graph, as engines run decode). Where ``layer us`` is close to ``host us`` the eager
call is host-bound."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping

import torch

from moe_kernels.config import ConfigError, LayerConfig, load_config
from moe_kernels.model.layer import FusedMoE
from moe_kernels.selection import timing
from moe_kernels.tools.args import positive_ints
from moe_kernels.tools.bench.tables import format_table
from moe_kernels.tools.harness import LayerResult, Timer, check_and_time, cuda_timer, random_layer, require_cuda
from moe_kernels.tools.progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/qwen3-30b-a3b.yaml", help="layer YAML (default: %(default)s)")
    parser.add_argument(
        "--tokens",
        type=positive_ints,
        default=[1, 8, 64, 512, 4096],
        help="comma-separated token counts (default: 1,8,64,512,4096)",
    )
    parser.add_argument("--dtype", help="override moe.dtype (bfloat16, float16, float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="do not time the reference kernel")


def run(args: argparse.Namespace) -> int:
    """``moe-kernels bench layer``: a table of layer times on the current CUDA device."""
    require_cuda("bench layer", "it times with CUDA events (on the CPU `moe-kernels run` checks and times a layer)")
    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ConfigError) as e:
        print(f"bench layer: {e}", file=sys.stderr)
        return 2
    if args.dtype:
        cfg = LayerConfig.model_validate({**cfg.model_dump(), "moe": {**cfg.moe.model_dump(), "dtype": args.dtype}})
    device = torch.device("cuda", torch.cuda.current_device())
    layer = random_layer(cfg, device, seed=args.seed)
    more = {"host us": timing.host_us, "graph us": graph_us}
    results = measure(
        layer, args.tokens, timer=cuda_timer, seed=args.seed, time_reference=not args.no_reference, more_timers=more
    )
    print(f"{cfg.name or args.config} on {torch.cuda.get_device_name(device)}: {layer.kernel.name}")
    tolerance = cfg.mlp.tolerance
    print(format_results(results, tolerance))
    return 0 if all(r.rel_err <= tolerance for r in results) else 1


def graph_us(fn: Callable[[], object]) -> float:
    """GPU microseconds of ``fn`` replayed from a CUDA graph (L2 flushed, median): no host time."""
    return timing.Timer(max_runs=30, target_s=0.1).graphed(fn, "layer")


def measure(
    layer: FusedMoE,
    token_counts: list[int],
    *,
    timer: Timer,
    seed: int = 0,
    time_reference: bool = True,
    more_timers: Mapping[str, Timer] | None = None,
) -> list[LayerResult]:
    """:func:`check_and_time` for each token count, with progress on stderr."""
    results = []
    with Progress(len(token_counts), "bench layer") as progress:
        for t in token_counts:
            results.append(
                check_and_time(layer, t, timer=timer, seed=seed, time_reference=time_reference, more_timers=more_timers)
            )
            progress.say(f"bench layer: T={t}: {results[-1].layer_us:.1f} us, rel err {results[-1].rel_err:.1e}")
            progress.advance()
    return results


def format_results(results: list[LayerResult], tolerance: float) -> str:
    more = list(results[0].more_us) if results else []
    headers = ["tokens", "layer us", *more, "TFLOP/s", "reference us", "speed-up", "rel err", "ok"]
    rows: list[list[object]] = []
    for r in results:
        ref = "-" if r.reference_us is None else r.reference_us
        speedup = "-" if r.reference_us is None else f"{r.reference_us / r.layer_us:.1f}x"
        extra = [r.more_us[name] for name in more]
        rows.append([r.tokens, r.layer_us, *extra, r.tflops, ref, speedup, f"{r.rel_err:.2e}", r.rel_err <= tolerance])
    return format_table(headers, rows)
