"""``moe-kernels tune``: run the tuner (:mod:`moe_kernels.selection.tuner`) over ``--config`` YAMLs
(taken EP-local) or named ``--shapes`` and write ``--out/<gpu>.json``, merged with what that file
already holds for other shapes; point ``MOE_KERNELS_TABLES`` at ``--out`` to use it, or copy it
into ``moe_kernels/tables`` to ship it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from moe_kernels.core import tuning
from moe_kernels.selection.problems import SHAPES, BenchShape
from moe_kernels.selection.timing import Timer
from moe_kernels.selection.tuner import DEFAULT_TOKENS, tune_shape
from moe_kernels.tools.args import positive_ints, shape_names
from moe_kernels.tools.harness import require_cuda
from moe_kernels.tools.progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], help="a layer YAML (repeatable), taken EP-local")
    parser.add_argument("--shapes", type=shape_names, default=[], help=f"named shapes, from {', '.join(SHAPES)}")
    parser.add_argument(
        "--tokens", type=positive_ints, default=DEFAULT_TOKENS, help="the token grid (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=Path("tables"), help="where the table goes (default: ./tables)")
    parser.add_argument("--tile-candidates", type=int, default=6, help="tilings timed per GEMM (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="most timed runs per measurement (default: %(default)s)")
    parser.add_argument("--target-ms", type=float, default=100.0, help="time budget of one measurement")


def layers(args: argparse.Namespace) -> list[BenchShape]:
    from moe_kernels.config import ConfigError, load_config

    shapes = [SHAPES[name] for name in args.shapes]
    for path in args.config:
        try:
            shapes.append(BenchShape.of(load_config(path)))
        except (FileNotFoundError, ConfigError) as e:
            raise SystemExit(f"tune: {e}") from None
    return shapes


def run(args: argparse.Namespace) -> int:
    require_cuda("tune", "it measures kernels on the GPU it writes a table for")
    shapes = layers(args)
    if not shapes:
        print("tune: give --config FILE or --shapes NAMES", file=sys.stderr)
        return 2
    source = f"moe-kernels tune, {datetime.date.today().isoformat()}, torch {torch.__version__}"
    timer = Timer(args.runs, args.target_ms / 1e3)
    tokens = sorted(args.tokens)
    with Progress(len(shapes) * len(tokens), "tune") as progress:
        for shape in shapes:
            progress.say(f"tuning {shape.label}")
            tune_shape(
                shape, tokens, timer.graphed, tile_candidates=args.tile_candidates, progress=progress.say,
                tables_dir=args.out, source=source, measured=lambda _t: progress.advance(),
            )  # fmt: skip
    print(f"tune: wrote {args.out / (tuning.slug(torch.cuda.get_device_name()) + '.json')}")
    return 0
