"""``moe-kernels`` (also ``python -m moe_kernels``): run, list, explain, bench.

moe-kernels run --config configs/qwen3-30b-a3b.yaml --tokens 16   check + time one layer
moe-kernels list                                                  every part, can it run here
moe-kernels explain --config configs/deepseek-v3.yaml             why this kernel was chosen
moe-kernels bench layer|experts|ep ...                            GPU benchmarks
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, load_config

#: what ``list`` checks the parts against when no --config is given: a small unquantized layer
DEFAULT_LIST_CONFIG = LayerConfig(
    name="default", moe=MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
)

#: ``bench`` subcommands written as modules with ``add_arguments(parser)`` and ``run(args)``
BENCH_MODULES = {
    "experts": ("moe_kernels.bench.experts", "time every experts implementation on one problem"),
    "ep": ("moe_kernels.bench.ep", "time expert-parallel dispatch/combine across GPUs"),
    "layer": ("moe_kernels.bench.layer", "time a whole FusedMoE layer against the reference"),
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moe-kernels``; returns the exit status."""
    parser = build_parser()
    # A benchmark that could not be loaded takes any arguments (it only says it is missing);
    # every other command rejects unknown ones as argparse would.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except CliError as e:
        print(f"moe-kernels: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-kernels", description="Composable MoE kernels: run, inspect, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,list,explain,bench}")

    run = sub.add_parser("run", help="check a layer with random weights against the reference and time it")
    _add_config_args(run, config_required=True)
    run.add_argument("--tokens", type=_positive_int, default=64, help="tokens in the batch (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="every registered part and whether it can run here")
    _add_config_args(lst, config_required=False)
    lst.set_defaults(func=cmd_list)

    explain = sub.add_parser("explain", help="which kernel a layer gets here, and why each other pair was refused")
    _add_config_args(explain, config_required=True)
    explain.add_argument(
        "--tokens",
        type=_positive_int,
        help="the largest batch the layer will run (sets parallel.max_tokens_per_rank)",
    )
    explain.set_defaults(func=cmd_explain)

    bench = sub.add_parser("bench", help="benchmarks on a GPU")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCH_MODULES) + "}")
    for name, (module, help_text) in BENCH_MODULES.items():
        mount_bench(bench_sub, name, module, help_text)
    return parser


def mount_bench(subparsers: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    """Add ``bench NAME`` from ``module`` (its ``add_arguments`` and ``run``). A module that
    is absent or fails to import still gets a subcommand, which says so: the other
    commands must keep working while a benchmark is being written."""
    try:
        mod = importlib.import_module(module)
        add_arguments, run = mod.add_arguments, mod.run
    except Exception as e:  # any failure to load a benchmark is reported when it is asked for
        reason = f"{module} is not available ({type(e).__name__}: {e})"
        parser = subparsers.add_parser(name, help=f"{help_text} [unavailable]", add_help=False)
        parser.set_defaults(func=_unavailable(f"bench {name}: {reason}"), takes_any_arguments=True)
        return
    parser = subparsers.add_parser(name, help=help_text)
    add_arguments(parser)
    parser.set_defaults(func=run)


def _unavailable(message: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise CliError(message)

    return run


# --- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from moe_kernels.bench.layer import TOLERANCE, check_and_time, default_timer, random_layer, weight_bytes

    cfg = load_layer_config(args.config, args.dtype)
    if cfg.parallel.ep_size > 1:
        raise CliError(
            f"{args.config}: run is single-process, so parallel.ep_size must be 1 (got {cfg.parallel.ep_size}); "
            "use `moe-kernels bench ep` for expert parallelism"
        )
    device = resolve_device(args.device)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    nbytes = weight_bytes(cfg.moe)
    progress(
        f"{cfg.name or args.config}: {cfg.moe.num_experts} experts, {_format_bytes(nbytes)} of weights on {device}"
    )
    memory = _physical_memory_bytes()
    if device.type == "cpu" and memory and nbytes > 0.7 * memory:
        progress(f"warning: the weights take {_format_bytes(nbytes)} of this machine's {_format_bytes(memory)}")
    from moe_kernels.select import select

    selection = select(moe=cfg.moe, parallel=cfg.parallel, quant=cfg.quant, device=device)
    if not any(c.valid for c in selection.candidates):
        raise CliError(f"no registered kernel can run {cfg.name or args.config} here:\n{selection.explain()}")
    layer = random_layer(cfg, device, seed=args.seed, progress=progress, kernel=selection.kernel)
    result = check_and_time(
        layer, args.tokens, timer=default_timer(device), seed=args.seed, time_reference=False, progress=progress
    )
    tolerance = TOLERANCE[cfg.moe.dtype]
    ok = result.rel_err <= tolerance
    m = cfg.moe
    rows = [
        ("config", f"{cfg.name or '-'}  ({args.config})"),
        (
            "layer",
            f"E={m.num_experts} top_k={m.top_k} H={m.hidden_size} I={m.intermediate_size} {_dtype_name(m.dtype)}",
        ),
        ("device", str(device)),
        ("tokens", str(args.tokens)),
        ("kernel", layer.kernel.name),
        ("reference", "LocalPrepareAndFinalize + TorchReferenceExperts (composed directly)"),
        ("max abs err", f"{result.max_abs_err:.3e}"),
        ("rel err", f"{result.rel_err:.3e}  (max|out - ref| / max|ref|, tolerance {tolerance:g})"),
        ("result", "OK" if ok else "FAILED: the error exceeds the tolerance"),
        ("time", f"{_format_us(result.layer_us)} per forward ({_timer_name(device)})"),
    ]
    print(_key_value_table(rows))
    if layer.kernel.experts.name == "TorchReferenceExperts":
        print("note: the chosen kernel is the reference itself, so the check compares two runs of it")
    return 0 if ok else 1


# --- list ---------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from moe_kernels import registry

    cfg = load_layer_config(args.config, args.dtype) if args.config else DEFAULT_LIST_CONFIG
    if args.dtype and not args.config:
        cfg = _with_dtype(cfg, args.dtype, "--dtype")
    device = resolve_device(args.device)
    rows: list[tuple[str, str, str, str, str]] = []
    for kind, factories in (("prepare/finalize", registry.PREPARE_FINALIZE), ("experts", registry.EXPERTS)):
        for make in factories:
            try:
                part = make(cfg, None) if kind == "prepare/finalize" else make(cfg)
            except Exception as e:  # the registry promises factories never fail; show it if one does
                rows.append((kind, "?", "-", "no", f"building it failed: {type(e).__name__}: {e}"))
                continue
            fmt = part.output_format if kind == "prepare/finalize" else part.input_format
            checks = part.checks(cfg, device)
            failed = [c for c in checks if not c.ok]
            why = "; ".join(f"{c.name}: {c.reason}" for c in (failed or checks[:1]))
            rows.append((kind, part.name, fmt.value, "no" if failed else "yes", why))
    m = cfg.moe
    print(
        f"parts checked for layer {cfg.name or '-'} (E={m.num_experts} top_k={m.top_k} H={m.hidden_size} "
        f"I={m.intermediate_size} {_dtype_name(m.dtype)}, ep_size={cfg.parallel.ep_size}) on {device}:"
    )
    print(_aligned_table(("kind", "name", "format", "runs here", "why"), rows))
    return 0


# --- explain ------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    from moe_kernels.select import select

    cfg = load_layer_config(args.config, args.dtype)
    parallel = cfg.parallel
    if args.tokens is not None:
        parallel = ParallelConfig.model_validate({**parallel.model_dump(), "max_tokens_per_rank": args.tokens})
    selection = select(moe=cfg.moe, parallel=parallel, quant=cfg.quant, device=resolve_device(args.device))
    print(f"{cfg.name or args.config}")
    print(selection.explain())
    return 0


# --- shared helpers -----------------------------------------------------------------------


def load_layer_config(path: str, dtype: str | None = None) -> LayerConfig:
    """Read a layer YAML, optionally with ``moe.dtype`` replaced; errors become CliError
    naming the file."""
    if not Path(path).is_file():
        raise CliError(f"config file not found: {path} (the configs/ folder holds the shipped ones)")
    try:
        cfg = load_config(path)
    except (ValueError, yaml.YAMLError) as e:  # pydantic's ValidationError is a ValueError
        raise CliError(f"{path}: {e}") from None
    return _with_dtype(cfg, dtype, path) if dtype else cfg


def _with_dtype(cfg: LayerConfig, dtype: str, where: str) -> LayerConfig:
    try:
        moe = MoEConfig.model_validate({**cfg.moe.model_dump(), "dtype": dtype})
    except ValueError as e:
        raise CliError(f"--dtype {dtype!r} for {where}: {e}") from None
    return cfg.model_copy(update={"moe": moe})


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default CUDA when present, else the CPU; a CUDA request without CUDA
    is an error, not a silent fallback."""
    if name is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def _add_config_args(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.add_argument("--config", required=config_required, help="a layer YAML, e.g. configs/qwen3-30b-a3b.yaml")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", help="override moe.dtype: bfloat16, float16 or float32")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "median of CUDA-event timings, L2 flushed"
    return "median wall time, perf_counter"


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _format_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.1f} us"


def _key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is free text and not padded."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    line = lambda cells: "  ".join([*(c.ljust(w) for c, w in zip(cells, widths, strict=False)), cells[-1]])
    return "\n".join([line(headers), line(["-" * w for w in widths] + ["-" * len(headers[-1])]), *map(line, rows)])
