"""``moe-kernels bench variants``: what an activation variant and expert biases cost on the fused
decode path, against plain SwiGLU without biases on the same shape, weights and routing.

The default shape is gpt-oss-20b's MoE layer (32 experts, top-4, H = I = 2880, bf16); the variant
is gpt-oss's (SwiGLU clamped at 7 with alpha 1.702 and ``up + 1``, gate/up and down biases). Each
point is :func:`~moe_kernels.kernels.fused_moe.fused_experts` replayed from a CUDA graph (L2 flushed,
median) with the heuristic tiles of that token count, the same for both; ``extra`` is
``variant / plain - 1``. The target is at most 5 % at decode sizes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moe_kernels.mlp.activations import SILU, Activation
from moe_kernels.selection.timing import Timer
from moe_kernels.tools.args import positive_ints
from moe_kernels.tools.bench.tables import format_table
from moe_kernels.tools.harness import require_cuda

#: gpt-oss's expert activation (its config: swiglu_alpha 1.702, swiglu_limit 7.0; up + 1)
GPT_OSS = Activation("silu", alpha=1.702, limit=7.0, up_offset=1.0)
TARGET_EXTRA = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=int, default=32, help="E (default: gpt-oss-20b's 32)")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2880, help="H")
    parser.add_argument("--inter", type=int, default=2880, help="I")
    parser.add_argument("--tokens", type=positive_ints, default=[1, 4, 16, 64, 256])
    parser.add_argument("--no-biases", action="store_true", help="time the activation variant alone")
    parser.add_argument("--runs", type=int, default=200, help="most timed replays per point")
    parser.add_argument("--out", help="file for the table (markdown)")


def _problem(args: argparse.Namespace, tokens: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights (N(0, 1/fan_in)), biases, inputs and a routing of ``tokens`` tokens."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, k = args.experts, args.hidden, args.inter, args.top_k

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    scores = torch.rand(tokens, e, device="cuda", generator=gen)
    weights, ids = scores.topk(k, dim=1)
    return {
        "x": randn(tokens, h, scale=1.0),
        "w13": randn(e, 2 * i, h, scale=h**-0.5),
        "w2": randn(e, h, i, scale=i**-0.5),
        "w13_bias": randn(e, 2 * i, scale=0.1),
        "w2_bias": randn(e, h, scale=0.1),
        "topk_weights": torch.softmax(weights, dim=1),
        "topk_ids": ids.to(torch.int32),
    }


def _time_point(args: argparse.Namespace, timer: Timer, tokens: int) -> tuple[float, float]:
    """Microseconds of the plain and of the variant fused path at ``tokens`` tokens."""
    from moe_kernels.core.tiles import default_configs
    from moe_kernels.kernels import fused_experts, fused_workspace_shapes

    p = _problem(args, tokens)
    gemm1, gemm2 = default_configs(tokens, args.top_k, args.experts, args.hidden, args.inter)
    shapes = fused_workspace_shapes(
        tokens, args.top_k, args.experts, args.hidden, args.inter, torch.bfloat16, gemm1.block_m
    )
    workspace = {name: torch.empty(shape, dtype=dtype, device="cuda") for name, (shape, dtype) in shapes.items()}
    out = torch.empty_like(p["x"])
    biases = (None, None) if args.no_biases else (p["w13_bias"], p["w2_bias"])

    def call(activation: Activation, b13: torch.Tensor | None, b2: torch.Tensor | None) -> None:
        fused_experts(
            p["x"], p["w13"], p["w2"], p["topk_weights"], p["topk_ids"], out,
            workspace=workspace, gemm1=gemm1, gemm2=gemm2, activation=activation, w13_bias=b13, w2_bias=b2,
        )  # fmt: skip

    plain = timer.graphed(lambda: call(SILU, None, None), f"plain T={tokens}")
    variant = timer.graphed(lambda: call(GPT_OSS, *biases), f"variant T={tokens}")
    return plain, variant


def run(args: argparse.Namespace) -> int:
    require_cuda("bench variants", "it times with CUDA events")
    timer = Timer(max_runs=args.runs, target_s=0.5)
    rows, worst = [], 0.0
    for tokens in args.tokens:
        plain, variant = _time_point(args, timer, tokens)
        extra = variant / plain - 1.0
        worst = max(worst, extra)
        rows.append([tokens, plain, variant, f"{100 * extra:+.1f} %"])
    what = "clamped SwiGLU (alpha, up + 1)" + ("" if args.no_biases else " + expert biases")
    title = (
        f"fused decode path, E={args.experts} top-{args.top_k} H={args.hidden} I={args.inter} bf16, "
        f"on {torch.cuda.get_device_name()}: plain SwiGLU vs {what}"
    )
    table = format_table(["T", "plain us", "variant us", "extra"], rows)
    verdict = f"worst extra {100 * worst:+.1f} % (target <= {100 * TARGET_EXTRA:.0f} %)"
    print(f"{title}\n\n{table}\n\n{verdict}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{title}\n\n{table}\n\n{verdict}\n")
    if timer.failures:
        print(f"bench: {len(timer.failures)} points timed eagerly (capture failed)", file=sys.stderr)
    return 0
