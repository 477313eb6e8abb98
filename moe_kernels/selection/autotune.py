"""Tuning on first use: measure, on this GPU, the points of a layer no tuning table covers.

A user's model is usually not one we tuned. When :func:`~moe_kernels.selection.select.select`
finds token counts of its grid that no table measured for this GPU, layer shape and format, it
times every valid pair at those counts (the tuner, :mod:`moe_kernels.selection.tuner`, without
its tile search: the fused path runs its heuristic tiles), within a time budget, and writes the
times into the first-use cache (:func:`moe_kernels.core.tuning.cache_dir`: per user, per library
versions), so the next process reads them instead of measuring again. Points the budget did not
reach are left to the parts' documented heuristics, and the log says so.

It never runs where it cannot measure honestly or safely: not on a CPU, not under expert
parallelism (every rank must choose the same collectives, and a per-rank measurement could
differ), not while a CUDA graph is being captured, and not when ``MOE_KERNELS_TUNE=0``.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from moe_kernels.core import tuning
from moe_kernels.core.contract import LayerContext

#: ``0`` turns tuning on first use off; a number of seconds sets its budget per layer shape
ENV_SWITCH = "MOE_KERNELS_TUNE"
#: seconds one layer shape may spend measuring before the rest of its points are left unmeasured
#: (the first call of each new GEMM shape also pays its JIT compile, once per process)
DEFAULT_BUDGET_S = 30.0


def budget_s() -> float:
    """The seconds per layer shape: ``$MOE_KERNELS_TUNE`` when it is a positive number, else
    :data:`DEFAULT_BUDGET_S`."""
    try:
        seconds = float(os.environ.get(ENV_SWITCH, ""))
    except ValueError:
        return DEFAULT_BUDGET_S
    return seconds if seconds > 0 else DEFAULT_BUDGET_S


log = logging.getLogger("moe_kernels")


def why_not(ctx: LayerContext) -> str | None:
    """Why tuning on first use does not run for this layer here, or ``None`` when it may."""
    if os.environ.get(ENV_SWITCH) == "0":
        return f"{ENV_SWITCH}=0"
    if ctx.placement.ep_size > 1:
        return "under expert parallelism every rank must choose alike (tune with `moe-kernels tune`)"
    if ctx.device.type != "cuda":
        return f"it measures on a CUDA GPU, not {ctx.device.type}"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def missing_points(ctx: LayerContext, grid: list[int]) -> list[int]:
    """The token counts of ``grid`` at which no table has times for this layer's shape."""
    table = tuning.table_for(ctx.device)
    measured: set[int] = set()
    if table is not None:
        for times in table.pair_times(tuning.ShapeKey.of(ctx.cfg)).values():
            measured |= set(times)
    return [t for t in grid if t not in measured]


def tune_points(ctx: LayerContext, points: list[int], seconds: float | None = None) -> list[int]:
    """Measure every valid pair of the layer at ``points`` (smallest first) until ``seconds``
    (default :func:`budget_s`) are spent; write them to the first-use cache and return the points
    measured."""
    from moe_kernels.selection.problems import BenchShape
    from moe_kernels.selection.timing import Timer
    from moe_kernels.selection.tuner import tune_shape

    shape = BenchShape.of(ctx.cfg)
    timer = Timer(max_runs=20, target_s=0.05)
    source = f"tuned on first use ({tuning.library_versions()})"
    seconds = budget_s() if seconds is None else seconds
    start, done = time.perf_counter(), []
    log.info("tuning %s on first use at T=%s (budget %.0f s)", tuning.ShapeKey.of(ctx.cfg), points, seconds)
    with torch.cuda.device(ctx.device):
        for t in sorted(points):
            if time.perf_counter() - start > seconds:
                break
            tune_shape(
                shape, [t], timer.graphed, tile_candidates=0, progress=log.debug, tables_dir=tuning.cache_dir(),
                source=source, quant=ctx.cfg.quant.scheme,
            )  # fmt: skip
            done.append(t)
    left = sorted(set(points) - set(done))
    if left:
        log.warning("tuning on first use spent its %.0f s budget; T=%s left to the parts' heuristics", seconds, left)
    tuning.forget_tables()
    return done
