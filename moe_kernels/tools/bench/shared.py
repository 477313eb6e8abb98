"""``moe-kernels bench shared``: what the shared experts cost beside the routed ones, overlapped or not.

One rank's share of a layer with shared experts (``--ep-size``/``--ep-rank``: that rank's routed
experts, the whole shared MLP, the kernel :func:`~moe_kernels.selection.select.select` builds for it),
timed per token count from CUDA-graph replays (L2 flushed, median), with the routing fixed:

* ``routed``: the routed kernel alone;
* ``shared``: the shared MLP alone;
* ``serial``: the shared MLP, then the routed kernel adding its output in the final write;
* ``overlapped``: the shared MLP on a side stream beside the routed kernel (FusedMoE's default
  on GPUs), joined before the final write.

``shared cost`` = (overlapped - routed) / shared: the fraction of its own time the shared expert
still costs when overlapped (1 = no overlap at all).

``--reserve-sms 0,16,32``: also time ``overlapped`` with DeepGEMM limited to all SMs but that
many (``deep_gemm.set_num_sms``), leaving them to the side stream: DeepGEMM's kernels are
persistent, one CTA per SM, so without a reservation the shared expert waits for them. The cost
is then counted against the unrestricted ``routed`` time (what the reservation slows the routed
path by is part of it).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import torch

from moe_kernels.backends import deep_gemm
from moe_kernels.selection.timing import Timer
from moe_kernels.tools.args import non_negative_ints, positive_ints
from moe_kernels.tools.bench.tables import format_table
from moe_kernels.tools.harness import require_cuda
from moe_kernels.tools.progress import Progress

if TYPE_CHECKING:
    from moe_kernels.model.layer import FusedMoE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/deepseek-v3.yaml", help="a layer with shared experts")
    parser.add_argument("--ep-size", type=int, default=8, help="take one rank's share of this EP size")
    parser.add_argument("--ep-rank", type=int, default=0)
    parser.add_argument("--tokens", type=positive_ints, default=[64, 256, 1024, 4096])
    parser.add_argument(
        "--reserve-sms",
        type=non_negative_ints,
        default=[0],
        help="comma-separated SM counts kept from DeepGEMM for the side stream (default: 0)",
    )
    parser.add_argument("--out", help="file for the table (markdown)")


def run(args: argparse.Namespace) -> int:
    require_cuda("bench shared", "it times with CUDA events")
    from moe_kernels.tools.harness import load_layer_config, one_rank_config, random_layer, select_for_run

    cfg = one_rank_config(load_layer_config(args.config), args.ep_size, args.ep_rank, args.config)
    if not cfg.moe.num_shared_experts:
        print(f"bench shared: {args.config} has no shared experts", file=sys.stderr)
        return 2
    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"max_tokens_per_rank": max(args.tokens)})})
    device = torch.device("cuda", torch.cuda.current_device())
    layer = random_layer(cfg, device, kernel=select_for_run(cfg, device).kernel)
    side = torch.cuda.Stream(device)
    timer = Timer(30, 0.2)
    rows = []
    layer._side_stream = side
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    if any(args.reserve_sms) and not deep_gemm.status()[0]:
        print(f"bench shared: --reserve-sms limits DeepGEMM, which is not usable here: {deep_gemm.status()[1]}")
        return 2
    if max(args.reserve_sms) >= sm_count:
        print(f"bench shared: --reserve-sms must leave DeepGEMM at least one of the {sm_count} SMs")
        return 2
    with Progress(len(args.tokens) * len(args.reserve_sms), "bench shared") as progress:
        for t in args.tokens:
            x = torch.randn(t, cfg.moe.hidden_size, device=device, dtype=cfg.moe.dtype)
            us = measure(layer, x, timer)
            for reserve in args.reserve_sms:
                overlapped = (
                    us["overlapped"] if reserve == 0 else overlapped_with_sms(layer, x, timer, sm_count - reserve)
                )
                cost = (overlapped - us["routed"]) / us["shared"]
                rows.append([t, reserve, us["routed"], us["shared"], us["serial"], overlapped, f"{cost:.2f}"])
                progress.say(
                    f"bench shared: T={t}: {us}, {reserve} SMs reserved: overlapped {overlapped:.1f} us, "
                    f"shared cost {cost:.2f}"
                )
                progress.advance()
    title = (
        f"{cfg.name}, one rank of EP={args.ep_size} ({cfg.num_local_experts} routed experts + shared "
        f"{cfg.moe.shared_width}), {torch.cuda.get_device_name(device)}, kernel {layer.kernel.name}"
    )
    headers = ["T", "reserved SMs", "routed us", "shared us", "serial us", "overlapped us", "shared cost"]
    table = format_table(headers, rows)
    print(f"{title}\n\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{title}\n\n{table}\n")
    return 0


def measure(layer: FusedMoE, x: torch.Tensor, timer: Timer, only: str | None = None) -> dict[str, float]:
    """The four timings of one token count (see the module docstring), or just ``only``."""
    tw, ids = layer.router(x)
    w, kernel = layer.weights, layer.kernel
    calls = {
        "routed": lambda: kernel(x, w, tw, ids, check_values=False),
        "shared": lambda: layer.shared_experts(x),
        "serial": lambda: kernel(x, w, tw, ids, residual=layer.shared_experts(x), check_values=False),
        "overlapped": lambda: kernel(x, w, tw, ids, residual=layer._start_shared_experts(x), check_values=False),
    }
    return {name: timer.graphed(fn, name) for name, fn in calls.items() if only in (None, name)}


def overlapped_with_sms(layer: FusedMoE, x: torch.Tensor, timer: Timer, num_sms: int) -> float:
    """``overlapped`` with DeepGEMM's kernels limited to ``num_sms`` SMs (captured that way)."""
    before = deep_gemm.num_sms()
    deep_gemm.set_num_sms(num_sms)
    try:
        return measure(layer, x, timer, only="overlapped")["overlapped"]
    finally:
        deep_gemm.set_num_sms(before)
