"""The tuner: measure on this GPU what selection and the Triton kernels should use, and write it
as a tuning table (:mod:`moe_kernels.core.tuning`).

For each layer and each token count of the grid:

1. the tile configs of the fused Triton decode path: its candidate tilings
   (:func:`moe_kernels.core.tiles.candidate_configs`, the ``tile_candidates`` nearest
   the heuristic's) timed through the whole path, at the token counts where it is a contender;
2. every valid pair of the registry (the reference loop left out), composed for calls of T
   tokens, with the tuned tiles in force.

Times are GPU time of one call replayed from a CUDA graph, L2 flushed, median. The table is
written after every point (a run cut short keeps what it measured), merged with what that file
already holds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moe_kernels.core import tuning
from moe_kernels.selection.problems import BenchShape, make_problem, make_weights, valid_pairs
from moe_kernels.selection.timing import copy_bandwidth_gbs

DEFAULT_TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


#: the fused path's tiles are tuned where it can win: up to this many rows per expert
TILE_MAX_ROWS_PER_EXPERT = 256


def tune_tiles(
    shape: BenchShape,
    tokens: int,
    candidates: int,
    measure: Callable[[Callable[[], object], str], float],
) -> tuple[Any, Any, float]:
    """The fastest ``(gemm1, gemm2)`` tiling of the fused (bf16) path at ``tokens`` tokens, and its time:
    GEMM1's candidates with GEMM2 at its default, then GEMM2's with the best GEMM1 (both on the
    same row block, as the layout requires)."""
    from moe_kernels.core.compose import WorkspaceCache, compose
    from moe_kernels.core.tiles import candidate_configs, default_configs
    from moe_kernels.experts.fused_triton import FusedTritonExperts
    from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize

    k, e, h, i = shape.top_k, shape.num_experts, shape.hidden, shape.inter
    cfg = shape.layer(tokens)
    w = make_weights(shape)
    x, tw, ids = make_problem(shape, tokens, seed=tokens)
    default1, default2 = default_configs(tokens, k, e, h, i)
    space1, space2 = candidate_configs(tokens, k, e, h, i)

    def nearest(space: list[Any], default: Any) -> list[Any]:
        # the candidates that differ least from the heuristic's choice, it included
        def distance(c: Any) -> tuple[int, ...]:
            return tuple(int(a != b) for a, b in zip(asdict(c).values(), asdict(default).values(), strict=True))

        return sorted(space, key=lambda c: (sum(distance(c)), distance(c)))[:candidates]

    def timed(g1: Any, g2: Any) -> float:
        experts = FusedTritonExperts(tiles={tokens: (g1, g2)})
        kernel = compose(LocalPrepareAndFinalize(), experts, cfg, workspace_cache=WorkspaceCache())
        return measure(lambda: kernel(x, w, tw, ids, check_values=False), f"tiles {g1} {g2}")

    def partner(config: Any) -> Any:
        # GEMM2's default on the same row block (one layout serves both GEMMs)
        return dataclasses.replace(default2, block_m=config.block_m)

    best1 = min(nearest(space1, default1), key=lambda g1: timed(g1, partner(g1)))
    seconds = [c for c in nearest(space2, default2) if c.block_m == best1.block_m] or [partner(best1)]
    us, best2 = min(((timed(best1, g2), g2) for g2 in seconds), key=lambda r: r[0])
    return best1, best2, us


def tune_shape(
    shape: BenchShape,
    grid: list[int],
    measure: Callable[[Callable[[], object], str], float],
    *,
    tile_candidates: int,
    progress: Callable[[str], None],
    tables_dir: Path,
    source: str,
    gpu: str | None = None,
    quant: str = "none",
    measured: Callable[[int], None] | None = None,
) -> dict[str, dict[int, float]]:
    """Tune one layer: tiles first (written to the table so the pairs use them; ``tile_candidates=0``
    keeps the heuristic tiles), then every valid pair. Returns ``pair name -> {T: us}``; the table
    in ``tables_dir`` is updated as it goes, and ``measured(T)`` is called after each T's pairs."""

    key = str(tuning.ShapeKey.of(shape.layer(max(grid), quant)))
    for tokens in grid:
        fused_contender = tokens * shape.top_k / shape.num_experts <= TILE_MAX_ROWS_PER_EXPERT
        if quant != "none" or not fused_contender or tile_candidates == 0:
            continue
        g1, g2, us = tune_tiles(shape, tokens, tile_candidates, measure)
        progress(f"{key} T={tokens}: fused tiles {g1} / {g2}: {us:.1f} us")
        tiles = {"FusedTritonExperts": {tokens: {"gemm1": asdict(g1), "gemm2": asdict(g2)}}}
        write_table(tables_dir, key, {"kernels": tiles}, source, gpu)  # each point as it is done

    pairs: dict[str, dict[int, float]] = {}
    w = make_weights(shape, quant=quant)
    for tokens in grid:
        x, tw, ids = make_problem(shape, tokens, seed=tokens)
        for name, build in valid_pairs(shape.layer(tokens, quant)):
            try:
                kernel = build()
                call = functools.partial(kernel, x, w, tw, ids, check_values=False)
                pairs.setdefault(name, {})[tokens] = measure(call, f"{name} T={tokens}")
            except torch.cuda.OutOfMemoryError:
                progress(f"{key} T={tokens}: {name} ran out of memory; left unmeasured")
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        best = min((times[tokens], n) for n, times in pairs.items() if tokens in times)
        progress(f"{key} T={tokens}: fastest {best[1]} {best[0]:.1f} us")
        write_table(tables_dir, key, {"pairs": {n: dict(t) for n, t in pairs.items()}}, source, gpu)
        if measured is not None:
            measured(tokens)
    return pairs


def write_table(directory: Path, key: str, entry: dict[str, Any], source: str, gpu: str | None = None) -> Path:
    """Merge ``entry`` (``section -> name -> {T: value}``) into ``key`` of ``gpu``'s table (default:
    this GPU's) in ``directory``, token count by token count: a run over part of the grid refines
    those points and keeps the others. A directory selection does not read yet becomes the
    ``MOE_KERNELS_TABLES`` of this process."""
    gpu = gpu or torch.cuda.get_device_name()
    path = directory / f"{tuning.slug(gpu)}.json"
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = (
        json.loads(path.read_text()) if path.is_file() else {"format": tuning.FORMAT, "gpu": gpu, "shapes": {}}
    )
    data["source"] = source
    if data.get("copy_gbps") is None and torch.cuda.is_available():
        data["copy_gbps"] = round(copy_bandwidth_gbs(), 1)
    shape = data["shapes"].setdefault(key, {})
    for section, values in entry.items():
        for name, per_t in values.items():
            shape.setdefault(section, {}).setdefault(name, {}).update({str(t): v for t, v in per_t.items()})
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    if directory.resolve() not in {d.resolve() for d in tuning.table_dirs()}:
        os.environ[tuning.ENV_DIR] = str(directory)
    tuning.forget_tables()
    return path
