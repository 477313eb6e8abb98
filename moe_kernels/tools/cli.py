"""``moe-kernels`` (also ``python -m moe_kernels``): run, list, explain, bench.

moe-kernels run --config configs/qwen3-30b-a3b.yaml --tokens 16   check + time one layer
moe-kernels list                                                  every part, can it run here
moe-kernels explain --config configs/deepseek-v3.yaml             why this kernel was chosen
moe-kernels tune --config configs/deepseek-v3.yaml                measure this GPU, write a tuning table
moe-kernels bench layer|experts|ep|shared|profile|variants ...             GPU benchmarks
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch

from moe_kernels._version import __version__
from moe_kernels.config import LayerConfig, MoEConfig
from moe_kernels.core.contract import LayerContext
from moe_kernels.model import memory
from moe_kernels.tools.harness import (
    CliError,
    _with_dtype,
    load_layer_config,
    one_rank_config,
    resolve_device,
    run_activation_bytes,
    select_for_run,
)
from moe_kernels.tools.progress import Progress
from moe_kernels.tools.terminal import aligned_table, dtype_name, format_us, key_value_table, terminal_width, wrap

#: what ``list`` checks the parts against when no --config is given: a small unquantized layer
DEFAULT_LIST_CONFIG = LayerConfig(
    name="default", moe=MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=256)
)

#: ``bench`` subcommands written as modules with ``add_arguments(parser)`` and ``run(args)``
BENCH_MODULES = {
    "experts": ("moe_kernels.tools.bench.experts", "time every experts implementation on one problem"),
    "ep": ("moe_kernels.tools.bench.ep", "time expert-parallel dispatch/combine across GPUs"),
    "layer": ("moe_kernels.tools.bench.layer", "time a whole FusedMoE layer against the reference"),
    "shared": ("moe_kernels.tools.bench.shared", "time the shared experts beside the routed ones, overlapped or not"),
    "profile": ("moe_kernels.tools.bench.profile", "where one call's GPU time goes, kernel by kernel, beside the peer"),
    "variants": ("moe_kernels.tools.bench.variants", "cost of an activation variant and biases (fused path)"),
}


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
    except BrokenPipeError:
        # the reader went away (`moe-kernels list | head`): stop quietly, as Unix tools do; the
        # output still buffered goes to /dev/null so that the interpreter's exit flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool its pipe closed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-kernels", description="Composable MoE kernels: run, inspect, benchmark.")
    parser.add_argument("--version", action="version", version=f"moe-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,list,explain,tune,doctor,bench}")

    run = sub.add_parser("run", help="check a layer with random weights against the reference and time it")
    _add_config_args(run, config_required=True)
    run.add_argument("--tokens", type=_positive_int, default=64, help="tokens in the batch (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    _add_rank_args(run)
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="every registered part and whether it can run here")
    _add_config_args(lst, config_required=False)
    lst.add_argument("--verbose", action="store_true", help="every failed check, not only the first")
    lst.set_defaults(func=cmd_list)

    explain = sub.add_parser("explain", help="which kernel a layer gets here, and why each other pair was refused")
    _add_config_args(explain, config_required=True)
    explain.add_argument(
        "--tokens",
        type=_positive_int,
        help="the largest batch the layer will run (sets parallel.max_tokens_per_rank)",
    )
    explain.add_argument("--verbose", action="store_true", help="every refused pair with every failed check")
    _add_rank_args(explain)
    explain.set_defaults(func=cmd_explain)

    mount_bench(sub, "tune", "moe_kernels.tools.tune", "measure tiles and pairs on this GPU; write a tuning table")
    mount_bench(sub, "doctor", "moe_kernels.tools.doctor", "check this machine's GPU paths and say what is missing")

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
    from moe_kernels.tools.harness import check_and_time, default_timer, random_layer

    cfg = one_process_config(load_layer_config(args.config, args.dtype), args)
    device = resolve_device(args.device)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(wrap(f"[{time.perf_counter() - start:6.1f}s] {msg}"), file=sys.stderr, flush=True)

    selection = select_for_run(cfg, device)
    if not selection.plan:
        raise CliError(f"no registered kernel can run {cfg.name or args.config} here:\n{selection.explain()}")
    estimate = memory.layer_memory(cfg, selection, run_activation_bytes(cfg, args.tokens))
    progress(f"{cfg.name or args.config} on {device}: {estimate.describe()}")
    _refuse_if_too_big(estimate, cfg, device, args)
    with Progress(cfg.num_local_experts, "random weights", unit="expert") as drawing:
        layer = random_layer(cfg, device, seed=args.seed, progress=drawing, kernel=selection.kernel)
    result = check_and_time(
        layer, args.tokens, timer=default_timer(device), seed=args.seed, time_reference=False, progress=progress
    )
    tolerance = cfg.mlp.tolerance
    ok = result.rel_err <= tolerance
    m = cfg.moe
    rows = [
        ("config", f"{cfg.name or '-'}  ({args.config})"),
        (
            "layer",
            f"E={m.num_experts} top_k={m.top_k} H={m.hidden_size} I={m.intermediate_size} {dtype_name(m.dtype)}"
            + (f" {cfg.quant.scheme}" if cfg.quant.scheme != "none" else ""),
        ),
        ("experts here", layer.placement.describe()),
        ("device", str(device)),
        ("tokens", str(args.tokens)),
        ("kernel", layer.kernel.name),
        ("reference", "TorchReferenceExperts behind the same prepare/finalize layout (composed directly)"),
        ("max abs err", f"{result.max_abs_err:.3e}"),
        ("rel err", f"{result.rel_err:.3e}  (max|out - ref| / max|ref|, tolerance {tolerance:g})"),
        ("result", "OK" if ok else "FAILED: the error exceeds the tolerance"),
        ("time", f"{format_us(result.layer_us)} per forward ({_timer_name(device)})"),
    ]
    print(key_value_table(rows))
    if all(c.candidate.experts.name == "TorchReferenceExperts" for c in selection.plan):
        print(wrap("note: the chosen kernel is the reference itself, so the check compares two runs of it"))
    return 0 if ok else 1


def _refuse_if_too_big(
    estimate: memory.MemoryEstimate, cfg: LayerConfig, device: torch.device, args: argparse.Namespace
) -> None:
    """The library's refusal (:func:`moe_kernels.model.memory.refusal`), worded for the command line."""
    available = memory.available_bytes(device)
    why = memory.refusal(estimate, device, available)
    if why is None:
        return
    assert available is not None  # refusal() only refuses a known amount
    ep = memory.fitting_ep_size(estimate, cfg, available)
    hint = (
        f"; run one expert-parallel rank's share instead (what a rank holds anyway): --ep-size {ep} --ep-rank 0 "
        f"needs about {memory.format_bytes(estimate.ep_share(ep))}"
        if ep
        else " (fewer --tokens or a smaller config would fit)"
    )
    raise CliError(f"{cfg.name or args.config} {why}{hint}")


# --- list ---------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from moe_kernels.core.compose import layer_context

    cfg = load_layer_config(args.config, args.dtype) if args.config else DEFAULT_LIST_CONFIG
    if args.dtype and not args.config:
        cfg = _with_dtype(cfg, args.dtype, "--dtype")
    device = resolve_device(args.device)
    rows = _part_rows(cfg, layer_context(cfg, device=device), verbose=args.verbose)
    m = cfg.moe
    print(
        wrap(
            f"parts for layer {cfg.name or '-'} (E={m.num_experts} top_k={m.top_k} H={m.hidden_size} "
            f"I={m.intermediate_size} {dtype_name(m.dtype)}, ep_size={cfg.parallel.ep_size}) on {device}:"
        )
    )
    print(aligned_table(("kind", "name", "layout", "runs", "why"), rows))
    return 0


def _part_rows(cfg: LayerConfig, ctx: LayerContext, *, verbose: bool) -> list[tuple[str, str, str, str, str]]:
    """``(kind, name, layout, runs, why)`` of every registered part for ``ctx``."""
    from moe_kernels.core.contract import PermuteExpertsUnpermute, PrepareAndFinalize
    from moe_kernels.selection import registry

    rows: list[tuple[str, str, str, str, str]] = []
    for make in (*registry.PREPARE_FINALIZE, *registry.EXPERTS):
        try:
            part = make(cfg)
        except Exception as e:  # the registry promises factories never fail; show it if one does
            kind = "prepare/finalize" if make in registry.PREPARE_FINALIZE else "experts"
            rows.append((kind, "?", "-", "no", f"building it failed: {type(e).__name__}: {e}"))
            continue
        if isinstance(part, PrepareAndFinalize):
            kind, layout = "prepare/finalize", part.output_layout
        else:
            assert isinstance(part, PermuteExpertsUnpermute)  # the registry's two kinds
            kind, layout = "experts", part.input_layout
        checks = part.checks(ctx)
        failed = [c for c in checks if not c.ok]
        why = checks[0].reason
        if failed:
            why = "; ".join(f"{c.name}: {c.reason}" for c in (failed if verbose else failed[:1]))
            if len(failed) > 1 and not verbose:
                why += f" (+{len(failed) - 1} more, --verbose)"
        rows.append((kind, part.name, layout.value, "no" if failed else "yes", why))
    return rows


# --- explain ------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    cfg = load_layer_config(args.config, args.dtype)
    if args.tokens is not None:
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"max_tokens_per_rank": args.tokens})})
    cfg = one_process_config(cfg, args)
    selection = select_for_run(cfg, resolve_device(args.device))
    print(f"{cfg.name or args.config}")
    print(selection.explain(verbose=args.verbose, width=terminal_width()))
    if not selection.plan:
        print(f"moe-kernels: error: no registered kernel can run {cfg.name or args.config} here", file=sys.stderr)
        return 1
    return 0


# --- shared helpers -----------------------------------------------------------------------


def _add_config_args(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.add_argument("--config", required=config_required, help="a layer YAML, e.g. configs/qwen3-30b-a3b.yaml")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", help="override moe.dtype: bfloat16, float16 or float32")


def one_process_config(cfg: LayerConfig, args: argparse.Namespace) -> LayerConfig:
    """``cfg`` as one process runs it: rank ``--ep-rank`` of ``--ep-size``'s experts, or, for a
    config with ``parallel.ep_size > 1`` and no ``--ep-size``, its own rank's share (one process
    cannot join an expert-parallel group; `moe-kernels bench ep` measures the dispatch)."""
    if cfg.parallel.ep_size > 1 and args.ep_size == 1:
        args.ep_size, args.ep_rank = cfg.parallel.ep_size, cfg.parallel.ep_rank
        single = cfg.parallel.model_copy(update={"ep_size": 1, "ep_rank": 0})
        cfg = cfg.model_copy(update={"parallel": single})
        print(
            wrap(f"{args.config}: one process: rank {args.ep_rank} of ep_size={args.ep_size}'s experts (--ep-rank)"),
            file=sys.stderr,
        )
    return one_rank_config(cfg, args.ep_size, args.ep_rank, args.config)


def _add_rank_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep-size", type=_positive_int, default=1, help="one rank's share of an EP layer: ranks")
    parser.add_argument("--ep-rank", type=int, default=0, help="... and which rank (default: %(default)s)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "median of CUDA-event timings, L2 flushed"
    return "median wall time, perf_counter"
