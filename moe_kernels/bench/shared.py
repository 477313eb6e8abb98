"""``moe-kernels bench shared``: what the shared experts cost beside the routed ones, overlapped or not.

One rank's share of a layer with shared experts (``--ep-size``/``--ep-rank``: that rank's routed
experts, the whole shared MLP, the kernel :func:`~moe_kernels.select.select` builds for it),
timed per token count from CUDA-graph replays (L2 flushed, median), with the routing fixed:

* ``routed``: the routed kernel alone;
* ``shared``: the shared MLP alone;
* ``serial``: the shared MLP, then the routed kernel adding its output in the final write;
* ``overlapped``: the shared MLP on a side stream beside the routed kernel (FusedMoE's default
  on GPUs), joined before the final write.

``shared cost`` = (overlapped - routed) / shared: the fraction of its own time the shared expert
still costs when overlapped (1 = no overlap at all).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import torch

from moe_kernels.bench.problems import Timer
from moe_kernels.bench.shapes import positive_ints
from moe_kernels.bench.timing import format_table

if TYPE_CHECKING:
    from moe_kernels.layer import FusedMoE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/deepseek-v3.yaml", help="a layer with shared experts")
    parser.add_argument("--ep-size", type=int, default=8, help="take one rank's share of this EP size")
    parser.add_argument("--ep-rank", type=int, default=0)
    parser.add_argument("--tokens", type=positive_ints, default=[64, 256, 1024, 4096])
    parser.add_argument("--out", help="file for the table (markdown)")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("bench shared: skipped: it times with CUDA events and this machine has no CUDA GPU")
        return 0
    from moe_kernels.bench.layer import random_layer
    from moe_kernels.cli import load_layer_config, one_rank_config, select_for_run

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
    for t in args.tokens:
        us = measure(layer, torch.randn(t, cfg.moe.hidden_size, device=device, dtype=cfg.moe.dtype), timer)
        cost = (us["overlapped"] - us["routed"]) / us["shared"]
        rows.append([t, us["routed"], us["shared"], us["serial"], us["overlapped"], f"{cost:.2f}"])
        print(f"bench shared: T={t}: {us}, shared cost {cost:.2f}", file=sys.stderr, flush=True)
    title = (
        f"{cfg.name}, one rank of EP={args.ep_size} ({cfg.num_local_experts} routed experts + shared "
        f"{cfg.moe.shared_width}), {torch.cuda.get_device_name(device)}, kernel {layer.kernel.name}"
    )
    table = format_table(["T", "routed us", "shared us", "serial us", "overlapped us", "shared cost"], rows)
    print(f"{title}\n\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{title}\n\n{table}\n")
    return 0


def measure(layer: FusedMoE, x: torch.Tensor, timer: Timer) -> dict[str, float]:
    """The four timings of one token count (see the module docstring)."""
    tw, ids = layer.router(x)
    w, kernel = layer.weights, layer.kernel
    return {
        "routed": timer.graphed(lambda: kernel(x, w, tw, ids, check_values=False), "routed"),
        "shared": timer.graphed(lambda: layer.shared_experts(x), "shared"),
        "serial": timer.graphed(
            lambda: kernel(x, w, tw, ids, residual=layer.shared_experts(x), check_values=False), "serial"
        ),
        "overlapped": timer.graphed(
            lambda: kernel(x, w, tw, ids, residual=layer._start_shared_experts(x), check_values=False), "overlapped"
        ),
    }
