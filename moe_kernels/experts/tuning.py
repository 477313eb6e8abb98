"""Measured numbers that rank the DeepGEMM / ``torch._grouped_mm`` experts and set the hybrid's threshold.

Everything here is data with its source; the experts classes only read it. To refresh it, run
``moe-kernels bench experts --out DIR`` on the GPU you care about: it prints (and writes to
``DIR/experts.md``) a ``tuning.py`` snippet with the per-shape timings and the measured
masked/contiguous crossover, to paste over :data:`EXPERTS_US` and :data:`HYBRID_THRESHOLDS`.

Scores are "lower is better" estimates of relative cost (see
:meth:`moe_kernels.contract._Part.preference`). The scale is shared with the other experts:
the Triton experts score 50 and the plain torch reference 1000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_kernels.config import LayerConfig


@dataclass(frozen=True)
class Measurement:
    """One number we rank by, and where it came from."""

    what: str
    value: float
    unit: str
    source: str


_FIELD_NOTES = "docs field notes (shared/notes/field-notes.md), one H100, 2026-11-23, one run"

#: GEMM-only peer measurements the default ranking rests on (DeepGEMM contiguous / masked vs
#: ``torch._grouped_mm`` vs a per-expert ``a @ w.T`` loop on the same routing).
GEMM_MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("DeepGEMM contiguous, E=32 x 1024 rows, N=4096, K=7168", 745, "TFLOP/s", _FIELD_NOTES),
    Measurement("torch._grouped_mm, E=32 x 1024 rows, N=4096, K=7168", 768, "TFLOP/s", _FIELD_NOTES),
    Measurement("DeepGEMM contiguous, E=32 x 128 rows, N=4096, K=7168", 335, "TFLOP/s", _FIELD_NOTES),
    Measurement("torch._grouped_mm, E=32 x 128 rows, N=4096, K=7168", 344, "TFLOP/s", _FIELD_NOTES),
    Measurement("DeepGEMM contiguous, E=128 x 256 rows, N=1536, K=2048", 513, "TFLOP/s", _FIELD_NOTES),
    Measurement("torch._grouped_mm, E=128 x 256 rows, N=1536, K=2048", 517, "TFLOP/s", _FIELD_NOTES),
    Measurement("DeepGEMM masked, decode, E=32 x 1-64 rows, N=4096, K=7168", 640, "us", _FIELD_NOTES),
    Measurement("torch._grouped_mm, decode, E=32 x 1-64 rows, N=4096, K=7168", 676, "us (676-697)", _FIELD_NOTES),
)

#: Default scores when a layer shape has no whole-experts measurement in :data:`EXPERTS_US`.
#: From :data:`GEMM_MEASUREMENTS`: on prefill DeepGEMM and ``torch._grouped_mm`` are at parity
#: (within 3 %), on decode DeepGEMM's masked GEMM is 5-8 % faster (at the HBM limit). So the
#: hybrid (masked for small batches, contiguous for large) ranks first, contiguous-only
#: DeepGEMM next (parity on prefill, 128-row tiles per expert on decode), ``torch._grouped_mm``
#: after it (slower on decode) -- all well ahead of the Triton experts (50).
DEFAULT_SCORES: dict[str, tuple[float, str]] = {
    "HybridDeepGemmExperts": (10.0, "DeepGEMM masked on decode (5-8 % faster than _grouped_mm), contiguous on prefill"),
    "DeepGemmExperts": (11.0, "DeepGEMM contiguous: at parity with _grouped_mm on prefill GEMMs"),
    "GroupedMMExperts": (12.0, "torch._grouped_mm: parity with DeepGEMM on prefill, 5-8 % slower on decode"),
    "BatchedDeepGemmExperts": (10.0, "DeepGEMM masked: at the HBM limit on decode (640 vs 676-697 us for _grouped_mm)"),
    "ExpandedDeepGemmExperts": (10.0, "DeepGEMM psum layout: reads DeepEP's expanded rows with no scatter"),
    # the lead's Triton experts score 50 on their own; listed so experts_preference can rank
    # them by the same measured table where a shape has one
    "TritonExperts": (50.0, "Triton grouped GEMM with fused SiLU-and-mul (portable fallback)"),
}

#: Whole-experts timings per local layer shape ``(E_local, H, I)`` -> implementation -> {T: us}:
#: ``moe-kernels bench experts`` (top-8 over the local experts, uniform routing), GPU time of
#: one ``apply`` replayed from a CUDA graph, L2 flushed. "HybridDeepGemmExperts" is the masked
#: time for T <= its threshold below, the contiguous time above. Produced by the benchmark's
#: snippet; paste a new one over this block to re-tune.
EXPERTS_US_SOURCE = "moe-kernels bench experts, NVIDIA H100 80GB HBM3, 2026-11-23 (CUDA-graph replay)"
EXPERTS_US: dict[tuple[int, int, int], dict[str, dict[int, float]]] = {
    (32, 7168, 2048): {
        "DeepGemmExperts": {1: 281.8, 8: 1039.4, 64: 1234.4, 256: 1357.7, 1024: 1931.8, 4096: 4975.9, 16384: 19121.4},
        "GroupedMMExperts": {1: 317.7, 8: 965.8, 64: 1075.3, 256: 1096.2, 1024: 1740.4, 4096: 5002.5, 16384: 18679.3},
        "TritonExperts": {1: 288.1, 8: 898.0, 64: 1034.8, 256: 1192.0, 1024: 2612.4, 4096: 9152.2, 16384: 33942.7},
        "HybridDeepGemmExperts": {
            1: 277.4,
            8: 882.2,
            64: 1001.7,
            256: 1053.1,
            1024: 1630.3,
            4096: 4975.9,
            16384: 19121.4,
        },
    },  # deepseek-v3
    (128, 2048, 768): {
        "DeepGemmExperts": {1: 59.9, 8: 252.8, 64: 554.2, 256: 597.3, 1024: 698.6, 4096: 1019.7, 16384: 2675.4},
        "GroupedMMExperts": {1: 73.4, 8: 232.4, 64: 474.2, 256: 500.0, 1024: 547.7, 4096: 910.9, 16384: 2723.3},
        "TritonExperts": {1: 64.7, 8: 208.4, 64: 452.0, 256: 487.9, 1024: 618.8, 4096: 1375.6, 16384: 4467.0},
        "HybridDeepGemmExperts": {1: 85.5, 8: 226.0, 64: 475.5, 256: 506.2, 1024: 646.5, 4096: 1019.7, 16384: 2675.4},
    },  # qwen3-30b-a3b
    (16, 4096, 1536): {
        "DeepGemmExperts": {1: 143.9, 8: 266.6, 64: 291.2, 256: 346.8, 1024: 654.4, 4096: 2043.7, 16384: 8282.4},
        "GroupedMMExperts": {1: 162.2, 8: 267.8, 64: 266.4, 256: 352.7, 1024: 645.0, 4096: 2104.1, 16384: 8564.7},
        "TritonExperts": {1: 140.3, 8: 255.3, 64: 264.6, 256: 356.6, 1024: 983.4, 4096: 4038.4, 16384: 15404.6},
        "HybridDeepGemmExperts": {1: 138.6, 8: 244.5, 64: 247.3, 256: 285.2, 1024: 591.7, 4096: 2043.7, 16384: 8282.4},
    },  # qwen3-235b-a22b
}

#: The hybrid uses the masked layout when ``T <= threshold``. Per local layer shape: the
#: threshold that best fits the measurements above (bench.experts.crossover); T was measured
#: at 1, 8, 64, 256, 1024, 4096, so the true crossover lies somewhere in (1024, 4096].
HYBRID_THRESHOLDS: dict[tuple[int, int, int], int] = {
    (32, 7168, 2048): 1024,  # deepseek-v3: masked no slower at T = 1..1024, slower at 4096
    (128, 2048, 768): 1024,  # qwen3-30b-a3b: masked slower at T = 1 and 4096, faster at 8..1024
    (16, 4096, 1536): 1024,  # qwen3-235b-a22b: masked no slower at T = 1..1024, slower at 4096
}

#: For shapes not in :data:`HYBRID_THRESHOLDS`: every shape measured so far crossed over
#: between T=1024 and T=4096 (masked faster up to 1024, contiguous faster at 4096).
DEFAULT_HYBRID_THRESHOLD = 1024
DEFAULT_HYBRID_THRESHOLD_SOURCE = (
    "measured crossover of the three benchmarked shapes (H100, 2026-11-23), applied to an unmeasured shape"
)

#: The masked layout needs ``E x align(T) x (H + 3I)`` bf16 of scratch (SGLang once saw 16 GB).
#: Above this many bytes the hybrid takes the contiguous path whatever the threshold says.
#: A policy choice, not a measurement.
MASKED_WORKSPACE_BUDGET_BYTES = 2 * 2**30


def shape_key(cfg: LayerConfig) -> tuple[int, int, int]:
    """``(E_local, H, I)``: the key of the per-shape tables."""
    return cfg.num_local_experts, cfg.moe.hidden_size, cfg.moe.intermediate_size


def hybrid_threshold(num_experts: int, hidden: int, inter: int) -> tuple[int, str]:
    """The hybrid's masked/contiguous threshold for a local layer shape, and its source."""
    key = (num_experts, hidden, inter)
    if key in HYBRID_THRESHOLDS:
        return HYBRID_THRESHOLDS[key], f"measured crossover ({EXPERTS_US_SOURCE})"
    return DEFAULT_HYBRID_THRESHOLD, DEFAULT_HYBRID_THRESHOLD_SOURCE


def relative_cost(name: str, key: tuple[int, int, int]) -> float | None:
    """Geometric mean over the measured token counts of ``time(name) / fastest time`` among the
    implementations in :data:`EXPERTS_US` for ``key``; ``None`` when ``name`` was not measured."""
    table = EXPERTS_US.get(key, {})
    mine = table.get(name)
    if not mine:
        return None
    ratios = []
    for t, us in mine.items():
        best = min(times[t] for times in table.values() if t in times)
        ratios.append(us / best)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def experts_preference(name: str, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
    """Score of experts class ``name`` for ``cfg`` on ``device``: 10 x its measured relative cost
    on this layer shape when :data:`EXPERTS_US` has it (Hopper), else :data:`DEFAULT_SCORES`."""
    default, why = DEFAULT_SCORES[name]
    sm90 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9
    ratio = relative_cost(name, shape_key(cfg)) if sm90 else None
    if ratio is None:
        return default, f"{why} (GEMM-level H100 measurements, field notes 2026-11-23)"
    return 10.0 * ratio, f"measured {ratio:.2f}x the fastest experts on this shape ({EXPERTS_US_SOURCE})"
