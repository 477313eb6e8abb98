"""Check and time a whole ``FusedMoE`` layer (router + chosen kernel) against the reference.

``moe-kernels bench layer`` times the layer over token counts on a GPU, next to the
reference pair (``LocalPrepareAndFinalize + TorchReferenceExperts`` composed directly, on the
same weights, placement and routing). ``moe-kernels run`` uses the same helpers for one token
count on any device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_kernels.bench.shapes import positive_ints
from moe_kernels.bench.timing import format_table, time_cuda
from moe_kernels.compose import Kernel, ModularKernel, compose
from moe_kernels.config import ConfigError, LayerConfig, load_config
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.layer import FusedMoE
from moe_kernels.placement import ExpertPlacement
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize

#: ``timer(fn)`` -> median microseconds of one ``fn()`` call
Timer = Callable[[Callable[[], object]], float]

#: largest accepted ``max |out - ref| / max |ref|`` per (dtype, quant scheme). bf16: vLLM's
#: combination tester uses 3e-2 against a torch reference; fp32 leaves room for TF32 tensor-core
#: GEMMs. fp8: the reference runs on the dequantized weights but unquantized activations, and
#: rounding to e4m3 (3 mantissa bits) moves each activation by up to 2^-4 of itself (about
#: 3.6 % standard deviation); that passes through two GEMMs and the SiLU, so a few percent of
#: the output's scale is expected and 0.1 of its maximum leaves room without hiding a wrong row.
TOLERANCE: dict[tuple[torch.dtype, str], float] = {
    (torch.bfloat16, "none"): 3e-2,
    (torch.float16, "none"): 1e-2,
    (torch.float32, "none"): 5e-3,
    (torch.bfloat16, "fp8_w8a8_block"): 0.1,
}


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median of CUDA-event timings after warm-up, L2 flushed before each run."""
    return time_cuda(fn).median_us


def cpu_timer(fn: Callable[[], object], *, budget_s: float = 1.0, max_runs: int = 5) -> float:
    """Median wall time of up to ``max_runs`` calls, stopping once ``budget_s`` is spent
    (at least one call: a big layer on the CPU takes seconds per call)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def default_timer(device: torch.device) -> Timer:
    return cuda_timer if device.type == "cuda" else cpu_timer


def random_layer(
    cfg: LayerConfig,
    device: torch.device,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    kernel: Kernel | None = None,
) -> FusedMoE:
    """A ``FusedMoE`` with random weights scaled so activations stay O(1): each matrix is
    N(0, 1/fan_in). Every local expert gets its own weights, so a kernel that mixes experts
    up shows in the error. FP8 layers quantize the drawn weights."""
    layer = FusedMoE(cfg, device=device, kernel=kernel)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i = cfg.moe.hidden_size, cfg.moe.intermediate_size
    with torch.no_grad():
        router = torch.empty(cfg.moe.num_experts, h, device=device).normal_(0.0, h**-0.5, generator=gen)
        layer.load_weights(router_weight=router)
        n = cfg.num_local_experts
        step = max(1, n // 8)  # about 8 progress lines for a big layer
        for done, e in enumerate(layer.local_experts, start=1):
            gate, up = torch.empty(2, i, h, device=device).normal_(0.0, h**-0.5, generator=gen)
            down = torch.empty(h, i, device=device).normal_(0.0, i**-0.5, generator=gen)
            layer.load_weights(gate_proj={e: gate}, up_proj={e: up}, down_proj={e: down})
            if progress is not None and n >= 16 and done % step == 0:
                progress(f"random weights: {done}/{n} experts")
        if layer.shared_w13 is not None:
            width = cfg.moe.shared_width
            gate, up = torch.empty(2, width, h, device=device).normal_(0.0, h**-0.5, generator=gen)
            down = torch.empty(h, width, device=device).normal_(0.0, width**-0.5, generator=gen)
            gated = layer.shared_gate is not None
            expert_gate = torch.empty(1, h, device=device).normal_(0.0, h**-0.5, generator=gen) if gated else None
            layer.load_weights(
                shared_gate_proj=gate, shared_up_proj=up, shared_down_proj=down, shared_expert_gate=expert_gate
            )
    return layer


def reference_kernel(cfg: LayerConfig, device: torch.device, placement: ExpertPlacement) -> ModularKernel:
    """The yardstick: the plain torch experts behind the no-dispatch prepare/finalize (a
    partial one for one rank's share of an EP layer)."""
    pf = LocalPrepareAndFinalize(partial=placement.ep_size > 1)
    return compose(pf, TorchReferenceExperts(), cfg, placement=placement, device=device)


@dataclass(frozen=True)
class LayerResult:
    """One token count: the layer's error against the reference and the times (us)."""

    tokens: int
    max_abs_err: float
    rel_err: float
    layer_us: float
    reference_us: float | None
    flops: float  # of the expert GEMMs: 2 x T x K x (2I x H + H x I)

    @property
    def tflops(self) -> float:
        """Useful expert-GEMM throughput of the layer (the router not counted)."""
        return self.flops / (self.layer_us * 1e-6) / 1e12 if self.layer_us > 0 else float("nan")


def check_and_time(
    layer: FusedMoE,
    tokens: int,
    *,
    timer: Timer,
    seed: int = 0,
    time_reference: bool = True,
    progress: Callable[[str], None] | None = None,
) -> LayerResult:
    """Run ``layer`` on ``tokens`` random rows, compare with the reference kernel on the same
    routing, then time the layer (and the reference, when asked). Single-process only."""
    cfg = layer.cfg
    device = layer.w13.device
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.moe.hidden_size, generator=gen, device=device).to(cfg.moe.dtype)
    ref_kernel = reference_kernel(cfg, device, layer.placement)
    say = progress or (lambda _msg: None)
    with torch.inference_mode():
        say(f"layer forward on {tokens} tokens")
        out = layer(x)
        say("reference forward")
        topk_weights, topk_ids = layer.router(x)
        # the shared experts are plain torch either way: the check is about the routed kernel
        shared = layer.shared_experts(x) if layer.shared_w13 is not None else None
        run_ref = lambda: ref_kernel(x, layer.weights, topk_weights, topk_ids, residual=shared)
        ref = run_ref()
        diff = (out.float() - ref.float()).abs().max().item() if tokens else 0.0
        scale = ref.float().abs().max().item() if tokens else 0.0
        say("timing")
        layer_us = timer(lambda: layer(x))
        ref_us = timer(run_ref) if time_reference else None
    m = cfg.moe
    flops = 6.0 * tokens * m.top_k * m.hidden_size * m.intermediate_size
    return LayerResult(tokens, diff, diff / scale if scale > 0 else diff, layer_us, ref_us, flops)


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
    if not torch.cuda.is_available():
        print(
            "bench layer: skipped: it times with CUDA events and this machine has no CUDA GPU. "
            "On the CPU, `moe-kernels run --config ...` checks a layer and times one call."
        )
        return 0
    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ConfigError) as e:
        print(f"bench layer: {e}", file=sys.stderr)
        return 2
    if args.dtype:
        cfg = LayerConfig.model_validate({**cfg.model_dump(), "moe": {**cfg.moe.model_dump(), "dtype": args.dtype}})
    device = torch.device("cuda", torch.cuda.current_device())
    layer = random_layer(cfg, device, seed=args.seed)
    results = measure(layer, args.tokens, timer=cuda_timer, seed=args.seed, time_reference=not args.no_reference)
    print(f"{cfg.name or args.config} on {torch.cuda.get_device_name(device)}: {layer.kernel.name}")
    tolerance = TOLERANCE[(cfg.moe.dtype, cfg.quant.scheme)]
    print(format_results(results, tolerance))
    return 0 if all(r.rel_err <= tolerance for r in results) else 1


def measure(
    layer: FusedMoE, token_counts: list[int], *, timer: Timer, seed: int = 0, time_reference: bool = True
) -> list[LayerResult]:
    """:func:`check_and_time` for each token count, printing progress to stderr."""
    results = []
    for t in token_counts:
        print(f"bench layer: {t} tokens ...", file=sys.stderr, flush=True)
        results.append(check_and_time(layer, t, timer=timer, seed=seed, time_reference=time_reference))
    return results


def format_results(results: list[LayerResult], tolerance: float) -> str:
    headers = ["tokens", "layer us", "TFLOP/s", "reference us", "speed-up", "rel err", "ok"]
    rows: list[list[object]] = []
    for r in results:
        ref = "-" if r.reference_us is None else r.reference_us
        speedup = "-" if r.reference_us is None else f"{r.reference_us / r.layer_us:.1f}x"
        rows.append([r.tokens, r.layer_us, r.tflops, ref, speedup, f"{r.rel_err:.2e}", r.rel_err <= tolerance])
    return format_table(headers, rows)
