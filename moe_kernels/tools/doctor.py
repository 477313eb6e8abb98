"""``moe-kernels doctor``: one screen on what this machine can run, and what each missing piece costs.

Every line is a probe that never raises: the GPU and its SM version, torch and its CUDA, the
NCCL library actually loaded, Triton, ``deep_gemm`` with its bf16 and fp8 grouped GEMMs,
``deep_ep`` with ``EPBuffer``, GIN or NVLink-only, and the tuning table for this GPU. A missing
piece names the registered parts it takes away and the fix (``docs/gpu-setup.md``).
``--require deepgemm,deepep`` exits 1 when a required piece is missing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

#: what --require accepts
CAPABILITIES = ("gpu", "triton", "deepgemm", "deepgemm-fp8", "deepep", "table")
SETUP = "docs/gpu-setup.md"


@dataclass(frozen=True)
class Finding:
    """One probe: ``capability`` (for --require), what was found, and when missing, its cost and fix."""

    capability: str
    label: str
    ok: bool
    found: str
    costs: str = ""
    fix: str = ""


def parts_needing(check_names: set[str]) -> str:
    """The registered parts refused here by a check of one of ``check_names`` (on a small
    unquantized and a small fp8 layer)."""
    from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
    from moe_kernels.core.compose import layer_context
    from moe_kernels.selection import registry

    moe = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=256)
    layers = [LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=64))]
    layers.append(layers[0].model_copy(update={"quant": QuantConfig(scheme="fp8_w8a8_block")}))
    names: list[str] = []
    for cfg in layers:
        ctx = layer_context(cfg, device="cpu") if not torch.cuda.is_available() else layer_context(cfg)
        for make in (*registry.PREPARE_FINALIZE, *registry.EXPERTS):
            part = make(cfg)
            if part.name not in names and any(not c.ok and c.name in check_names for c in part.checks(ctx)):
                names.append(part.name)
    return ", ".join(names) or "none"


def findings() -> list[Finding]:
    """Every probe, in the order ``doctor`` prints them."""
    from moe_kernels.backends.triton import triton_check

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    out = [_gpu_finding(dev)]
    out.append(Finding("", "torch", True, f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"))
    out.append(_nccl_finding())
    tri = triton_check(dev)
    out.append(Finding("triton", "Triton", tri.ok, tri.reason, "" if tri.ok else parts_needing({"device", "triton"})))
    out.extend(_deep_gemm_findings())
    out.extend(_deep_ep_findings())
    out.append(_table_finding(dev))
    return out


def _gpu_finding(dev: torch.device) -> Finding:
    if dev.type != "cuda":
        return Finding(
            "gpu", "GPU", False, "no CUDA GPU visible", "every GPU path (the CPU runs the reference and, "
            "under TRITON_INTERPRET=1, the Triton kernels)", f"a Hopper GPU and a CUDA build of torch ({SETUP})",
        )  # fmt: skip
    props = torch.cuda.get_device_properties(dev)
    memory = f"{props.total_memory / 2**30:.1f} GiB"
    gpu = f"{props.name}, SM{props.major}{props.minor}, {props.multi_processor_count} SMs, {memory}"
    return Finding("gpu", "GPU", props.major >= 9, gpu, "" if props.major >= 9 else "the Hopper-only paths")


def _nccl_finding() -> Finding:
    from moe_kernels.backends.deep_ep import NCCL_MIN, NCCL_SETUP, format_version, nccl_check, nccl_version

    nccl, where = nccl_version()
    if nccl is None:
        return Finding("", "NCCL", False, where, "DeepEP", f"nvidia-nccl-cu13=={format_version(NCCL_SETUP)} ({SETUP})")
    check = nccl_check()
    fix = f"NCCL >= {format_version(NCCL_MIN)} ({SETUP})"
    return Finding("", "NCCL", check.ok, check.reason, "" if check.ok else "DeepEP", fix)


def _deep_gemm_findings() -> list[Finding]:
    from moe_kernels.backends import deep_gemm

    ok, why = deep_gemm.status()
    if ok:
        psum_ok, _ = deep_gemm.psum_layout_status(fp8=False)
        why = f"{why}; {'psum layout' if psum_ok else 'no psum layout'}"
    fix = f"pip install deepinfer-gemm (builds DeepGEMM; {SETUP})"
    fp8 = deep_gemm.library_check(fp8=True)
    return [
        Finding("deepgemm", "deep_gemm", ok, why, "" if ok else parts_needing({"deep_gemm"}), fix),
        Finding("deepgemm-fp8", "deep_gemm fp8", fp8.ok, fp8.reason, "" if fp8.ok else "the fp8 DeepGEMM experts", fix),
    ]


def _deep_ep_findings() -> list[Finding]:
    """``deep_ep`` itself, then its networking: GIN is said to be on only after the RDMA NIC
    it needs was probed for (:func:`~moe_kernels.backends.deep_ep.gin_check`)."""
    from moe_kernels.backends import deep_ep

    ep = deep_ep.deep_ep_check()
    costs = "" if ep.ok else "DeepEPHighThroughput/LowLatencyPrepareAndFinalize"
    gin = deep_ep.gin_check()
    gin_costs = "" if gin.ok else "DeepEP across nodes or, without the setting, at all"
    return [
        Finding("deepep", "deep_ep", ep.ok, ep.reason, costs, f"pip install deepinfer-ep after NCCL ({SETUP})"),
        Finding("", "GIN", gin.ok, gin.reason, gin_costs),
    ]


def _table_finding(dev: torch.device) -> Finding:
    from moe_kernels.core.tuning import table_dirs, table_for

    table = table_for(dev) if dev.type == "cuda" else None
    if table is not None:
        return Finding("table", "tuning table", True, f"{table.path}: {len(table.shapes)} shape(s), {table.source}")
    return Finding(
        "table", "tuning table", False, f"none for this GPU in {', '.join(map(str, table_dirs()))}",
        "measured selection (the parts' heuristics decide)",
        "moe-kernels tune --config YOUR.yaml --out DIR, then MOE_KERNELS_TABLES=DIR",
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require",
        default="",
        help=f"comma-separated capabilities that must be present (exit 1 otherwise): {', '.join(CAPABILITIES)}",
    )


def run(args: argparse.Namespace) -> int:
    required = [c.strip() for c in args.require.split(",") if c.strip()]
    unknown = [c for c in required if c not in CAPABILITIES]
    if unknown:
        print(f"doctor: unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}", file=sys.stderr)
        return 2
    import textwrap

    from moe_kernels.tools.terminal import terminal_width

    width = terminal_width()
    results = findings()
    for f in results:
        mark = "ok " if f.ok else "-- "
        lines = [f"{mark}{f.label:<14}{f.found}"]
        if not f.ok and f.costs:
            lines.append(f"   {'':<14}without it: {f.costs}")
        if not f.ok and f.fix:
            lines.append(f"   {'':<14}fix: {f.fix}")
        for line in lines:
            print(textwrap.fill(line, width, subsequent_indent=" " * 17, break_on_hyphens=False))
    missing = [c for c in required if any(f.capability == c and not f.ok for f in results)]
    if missing:
        print(f"doctor: missing required: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0
