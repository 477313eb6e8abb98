"""Check and time a whole ``FusedMoE`` layer (router + chosen kernel) against the reference.

``moe-kernels bench layer`` times the layer over token counts on a GPU, next to the
reference pair (``LocalPrepareAndFinalize + TorchReferenceExperts`` composed directly, on the
same weights, placement and routing). ``moe-kernels run`` uses the same helpers for one token
count on any device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moe_kernels.config import MoEConfig, ParallelConfig, describe_validation_error

if TYPE_CHECKING:
    from moe_kernels.selection.select import Selection

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

import torch
from pydantic import ValidationError

from moe_kernels.config import ConfigError, LayerConfig, load_config
from moe_kernels.core.compose import Kernel, ModularKernel, compose
from moe_kernels.core.placement import ExpertPlacement
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.mlp.weights import ExpertWeights, quantize_weights
from moe_kernels.model.layer import FusedMoE
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
from moe_kernels.selection.timing import time_cuda
from moe_kernels.tools.progress import Progress

#: ``timer(fn)`` -> median microseconds of one ``fn()`` call
Timer = Callable[[Callable[[], object]], float]


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median of CUDA-event timings after warm-up, L2 flushed before each run."""
    return time_cuda(fn)


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
    progress: Progress | None = None,
    kernel: Kernel | None = None,
) -> FusedMoE:
    """A ``FusedMoE`` with random weights scaled so activations stay O(1): each matrix is
    N(0, 1/fan_in), each expert bias N(0, 1/fan_in) too. Every local expert gets its own weights, so
    a kernel that mixes experts up shows in the error. Quantized layers quantize the drawn weights.
    ``progress`` advances by one per local expert."""
    layer = FusedMoE(cfg, device=device, kernel=kernel)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i = cfg.moe.hidden_size, cfg.moe.intermediate_size
    mlp = layer.cfg.mlp

    def normal(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.empty(*shape, device=device).normal_(0.0, fan_in**-0.5, generator=gen)

    with torch.no_grad():
        layer.load_weights(router_weight=normal(cfg.moe.num_experts, h, fan_in=h))
        if mlp.weights.gate_and_up_together:
            # one expert at a time in its stored format, then all of them at once
            stored = []
            for _ in layer.local_experts:
                w13, w2 = normal(*mlp.w13_shape, fan_in=h), normal(*mlp.w2_shape, fan_in=mlp.inter)
                stored.append(quantize_weights(w13[None], w2[None], mlp.weights))
                if progress is not None:
                    progress.advance()
            weights = _stacked(stored)
            if mlp.biases:
                n = len(stored)
                b13, b2 = normal(n, mlp.w13_shape[0], fan_in=h), normal(n, h, fan_in=mlp.inter)
                weights = replace(weights, w13_bias=b13.to(mlp.dtype), w2_bias=b2.to(mlp.dtype))
            layer.load_expert_weights(weights)
        else:
            for e in layer.local_experts:
                gate, up = normal(2, i, h, fan_in=h)
                layer.load_weights(gate_proj={e: gate}, up_proj={e: up}, down_proj={e: normal(h, i, fan_in=i)})
                if mlp.biases:
                    layer.load_weights(
                        gate_proj_bias={e: normal(i, fan_in=h)},
                        up_proj_bias={e: normal(i, fan_in=h)},
                        down_proj_bias={e: normal(h, fan_in=i)},
                    )
                if progress is not None:
                    progress.advance()
        if layer.shared_w13 is not None:
            width = cfg.moe.shared_width
            gate, up = normal(2, width, h, fan_in=h)
            expert_gate = normal(1, h, fan_in=h) if layer.shared_gate is not None else None
            layer.load_weights(
                shared_gate_proj=gate,
                shared_up_proj=up,
                shared_down_proj=normal(h, width, fan_in=width),
                shared_expert_gate=expert_gate,
            )
    return layer


def _stacked(experts: list[ExpertWeights]) -> ExpertWeights:
    """One :class:`ExpertWeights` of single-expert ones (their tensors concatenated)."""
    first = experts[0]
    stacked: dict[str, Any] = {
        f.name: torch.cat([getattr(e, f.name) for e in experts])
        for f in fields(first)
        if isinstance(getattr(first, f.name), torch.Tensor)
    }
    return replace(first, **stacked)


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
    #: the layer timed by the ``more_timers`` of :func:`check_and_time`, by their names
    more_us: dict[str, float] = field(default_factory=dict)

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
    more_timers: Mapping[str, Timer] | None = None,
) -> LayerResult:
    """Run ``layer`` on ``tokens`` random rows, compare with the reference kernel on the same
    routing, then time the layer (and the reference, when asked; and the layer again with each of
    ``more_timers``, e.g. the host's time of a call). Single-process only."""
    cfg = layer.cfg
    device = layer.kernel.ctx.device
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
        more = {name: more_timer(lambda: layer(x)) for name, more_timer in (more_timers or {}).items()}
    m = cfg.moe
    flops = 6.0 * tokens * m.top_k * m.hidden_size * m.intermediate_size
    return LayerResult(tokens, diff, diff / scale if scale > 0 else diff, layer_us, ref_us, flops, more)


class CliError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


def require_cuda(command: str, why: str, gpus: int = 1) -> None:
    """Refuse ``command`` (exit status 2) on a machine with fewer than ``gpus`` CUDA GPUs: a
    GPU command that did nothing must not look like success to a script
    (``tune --out DIR && MOE_KERNELS_TABLES=DIR ...``)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < gpus:
        need = "a CUDA GPU" if gpus == 1 else f"{gpus} or more CUDA GPUs"
        raise CliError(f"{command}: {why}, so it needs {need}; {visible} visible (nothing was run)")


def one_rank_config(cfg: LayerConfig, ep_size: int, ep_rank: int, where: str) -> LayerConfig:
    """``cfg`` as rank ``ep_rank`` of ``ep_size`` sees it (its experts only)."""
    if ep_rank >= ep_size:
        raise CliError(f"--ep-rank {ep_rank} must be < --ep-size {ep_size}")
    if ep_size == 1:
        return cfg
    try:
        parallel = ParallelConfig.model_validate({**cfg.parallel.model_dump(), "ep_size": ep_size, "ep_rank": ep_rank})
        return LayerConfig.model_validate({**cfg.model_dump(), "parallel": parallel})
    except ValidationError as e:
        raise CliError(f"--ep-size {ep_size} for {where}: {describe_validation_error(e)}") from None


def select_for_run(cfg: LayerConfig, device: torch.device) -> Selection:
    from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
    from moe_kernels.selection.select import select

    if cfg.parallel.ep_size == 1:
        return select(cfg, device=device)
    # one rank's share, computed by a single process: this rank's experts only
    return select(cfg, device=device, prepare_finalize_factories=[lambda _: LocalPrepareAndFinalize(partial=True)])


def run_activation_bytes(cfg: LayerConfig, tokens: int) -> int:
    """What ``run`` holds beside the layer: the input, the output and the reference's float32
    copies of a few ``[T, H]`` tensors, plus the float32 copy of one expert that drawing the
    weights and the reference hold at a time."""
    m = cfg.moe
    return 8 * tokens * m.hidden_size * 4 + 2 * 3 * m.hidden_size * m.intermediate_size * 4


def load_layer_config(path: str, dtype: str | None = None) -> LayerConfig:
    """Read a layer YAML, optionally with ``moe.dtype`` replaced; errors become CliError
    naming the file."""
    try:
        cfg = load_config(path)
    except (FileNotFoundError, ConfigError) as e:
        raise CliError(str(e)) from None
    return _with_dtype(cfg, dtype, path) if dtype else cfg


def _with_dtype(cfg: LayerConfig, dtype: str, where: str) -> LayerConfig:
    try:
        moe = MoEConfig.model_validate({**cfg.moe.model_dump(), "dtype": dtype})
        return LayerConfig.model_validate({**cfg.model_dump(), "moe": moe})
    except ValidationError as e:
        hint = ""
        if "fp8" in dtype or "float8" in dtype:  # what a user asking for fp8 means
            hint = (
                "; fp8 weights are a quantization scheme: quant.scheme: fp8_w8a8_block (configs/deepseek-v3-fp8.yaml)"
            )
        raise CliError(f"--dtype {dtype!r} for {where}: {describe_validation_error(e)}{hint}") from None


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default CUDA when present, else the CPU; a CUDA request without CUDA
    is an error, not a silent fallback."""
    from moe_kernels.core.compose import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as e:
        raise CliError(f"--device: {e}") from None
