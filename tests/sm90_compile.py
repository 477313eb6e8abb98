"""Compile every Triton kernel a layer launches for Hopper (SM90), on a machine without a GPU.

The CPU suite runs the kernels in Triton's interpreter, which checks what they compute but not
that they compile: a type error in a branch, an op the GPU backend lacks, or a tile that needs
more shared memory than an SM has shows only on a GPU. This script runs real layer calls with
CPU tensors while Triton believes its device is an SM90 GPU: each launch compiles (the whole
pipeline down to ptxas' cubin) and returns without running, and the results are garbage and
never read. Run it in a process of its own, without ``TRITON_INTERPRET`` (the kernels must be
compiled functions, not interpreted ones)::

    python tests/sm90_compile.py            # one line per compiled specialization; exit 1 on a failure
    python tests/sm90_compile.py --loops    # ... with each kernel's longest loop in SASS

Each line gives the kernel's warps, shared memory, registers per thread and bytes spilled to
local memory (a spill is reported, not failed: it costs speed, not correctness).

The parts' device checks are told the CPU can run Triton (as under the interpreter); the kernels'
own interpreter switches stay off, so what compiles is what a GPU runs.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: bytes of shared memory one block may use on an H100/H200 (228 KB per SM, 1 KB reserved)
SM90_SHARED_BYTES = 227 * 1024


def _cuobjdump(kernel: Any, *args: str) -> str | None:
    """CUDA's ``cuobjdump`` (which Triton ships) run on the kernel's cubin; None without it."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, *args, cubin.name], capture_output=True, text=True).stdout


def _registers_and_spills(kernel: Any) -> str:
    """``", R regs, S B spilled"`` from the cubin, or ""."""
    usage = dict(re.findall(r"(REG|LOCAL):(\d+)", _cuobjdump(kernel, "-res-usage") or ""))
    return f", {usage['REG']} regs, {usage['LOCAL']} B spilled" if usage else ""


def _loop_instructions(kernel: Any) -> str:
    """``", loop of N instructions: OP n, ..."``: the machine code (SASS) of the kernel's longest
    loop -- the K loop of a GEMM -- and its commonest opcodes, or "". What a weight costs to
    unpack shows here: divide by the weights one thread handles per iteration."""
    sass = _cuobjdump(kernel, "-sass")
    if not sass:
        return ""
    lines = [(int(at, 16), op) for at, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    longest: list[str] = []
    for at, op in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < at:  # a backward branch closes a loop
            body = [o for a, o in lines if int(target.group(1), 16) <= a <= at]
            longest = max(longest, body, key=len)
    opcodes = collections.Counter(o.split()[1 if o.startswith("@") else 0].split(".")[0] for o in longest)
    top = ", ".join(f"{name} {n}" for name, n in opcodes.most_common(6))
    return f", loop of {len(longest)} instructions: {top}" if longest else ""


class _Sm90Driver:
    """What ``JITFunction.run`` asks of Triton's driver before it launches: the target, a device
    and a stream. Nothing is ever launched (the runs are warm-ups)."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextmanager
def compile_only(compiled: list[tuple[str, Any]]) -> Iterator[None]:
    """Every Triton launch compiles for SM90 and returns without running; ``(kernel name,
    compiled kernel)`` pairs are appended to ``compiled``. Triton's driver stays the SM90
    stand-in afterwards: this machine has no other (run the script in a process of its own)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def warm_up(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    # what the kernels would have written stays zeros: torch ops that index with it (a replica's
    # slot, a layout's row) then read in-range garbage instead of memory left uninitialized
    empty, empty_like = torch.empty, torch.empty_like
    driver.set_active(_Sm90Driver())
    JITFunction.run = warm_up  # type: ignore[method-assign]
    torch.empty = lambda *a, **k: empty(*a, **k).zero_()  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: empty_like(*a, **k).zero_()  # type: ignore[assignment]
    try:
        yield
    finally:
        JITFunction.run = run  # type: ignore[method-assign]
        torch.empty, torch.empty_like = empty, empty_like  # type: ignore[assignment]


def _let_the_cpu_run_triton() -> None:
    """The parts' and the router's device checks accept the CPU, as under the interpreter."""
    from moe_kernels.backends import triton as triton_backend
    from moe_kernels.experts import fused_triton, triton
    from moe_kernels.model import router

    for module in (triton_backend, triton, fused_triton, router):
        module.interpreting = lambda: True  # type: ignore[attr-defined]


def _random_layer(cfg: Any, kernel: Any, placement: Any) -> Any:
    """A ``FusedMoE`` with random weights in ``cfg``'s format, biases and correction bias too."""
    from moe_kernels import FusedMoE
    from moe_kernels.mlp.weights import quantize_weights

    layer = FusedMoE(cfg, device="cpu", kernel=kernel, placement=placement)
    mlp, experts = cfg.mlp, len(layer.local_experts)
    rows = mlp.activation.gemm1_rows(mlp.inter)
    w13 = torch.randn(experts, rows, mlp.hidden, dtype=mlp.dtype) * mlp.hidden**-0.5
    w2 = torch.randn(experts, mlp.hidden, mlp.inter, dtype=mlp.dtype) * mlp.inter**-0.5
    weights = quantize_weights(w13, w2, mlp.weights)
    if cfg.moe.expert_bias:
        weights = dataclasses.replace(weights, w13_bias=torch.randn(experts, rows, dtype=mlp.dtype),
                                      w2_bias=torch.randn(experts, mlp.hidden, dtype=mlp.dtype))  # fmt: skip
    layer.load_expert_weights(weights)
    extras: dict[str, Any] = {"router_weight": torch.randn(cfg.moe.num_experts, mlp.hidden)}
    if cfg.moe.correction_bias:
        extras["e_score_correction_bias"] = torch.randn(cfg.moe.num_experts) * 0.1
    layer.load_weights(**extras)
    return layer


def _build(label: str, pf: Any, experts: Any, moe: Any, quant: Any, placement: Any = None) -> tuple:
    """``(label, a random layer of the pair, token counts)``."""
    from moe_kernels import LayerConfig, ParallelConfig, compose

    cfg = LayerConfig(name=label, moe=moe, quant=quant, parallel=ParallelConfig(max_tokens_per_rank=1024))
    kernel = compose(pf, experts, cfg, placement=placement, device="cpu")
    return label, _random_layer(cfg, kernel, placement), [1, 64, 1024]


def _tuned_tile_layers() -> Iterator[tuple[str, Any, list[int]]]:
    """The fused path with each tiling the shipped tables measured (per GPU, shape and format): the
    tiles decide what compiles, not the layer's size, so a small layer stands in for each shape."""
    from moe_kernels import FusedTritonExperts, LocalPrepareAndFinalize, MoEConfig, QuantConfig
    from moe_kernels.core import tuning
    from moe_kernels.kernels import FusedConfig

    moe = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=256, dtype=torch.bfloat16)
    seen: set[tuple[str, str]] = set()
    for path in sorted(tuning.SHIPPED_DIR.glob("*.json")):
        for key, entry in tuning.load_table(path).shapes.items():
            scheme = key.rsplit(",", 1)[-1]
            for t, config in entry.get("kernels", {}).get(FusedTritonExperts.__name__, {}).items():
                if (scheme, repr(config)) in seen:
                    continue
                seen.add((scheme, repr(config)))
                tiles = (FusedConfig(**config["gemm1"]), FusedConfig(**config["gemm2"]))
                label = f"{path.stem} {key}, tiles of T={t},"
                part = FusedTritonExperts(tiles={1: tiles})
                _, layer, _ = _build(label, LocalPrepareAndFinalize(), part, moe, QuantConfig(scheme=scheme))
                yield label, layer, [64]


def _layers() -> Iterator[tuple[str, Any, list[int]]]:
    """``(label, FusedMoE, token counts)``: the Triton pairs on every weight format, activation
    variants, biases, grouped sigmoid routing with a correction bias, and replicas."""
    from moe_kernels import (
        FusedTritonExperts,
        LocalMaskedPrepareAndFinalize,
        LocalPrepareAndFinalize,
        MaskedTritonExperts,
        MoEConfig,
        QuantConfig,
        TritonExperts,
    )
    from moe_kernels.core.placement import ExpertPlacement
    from moe_kernels.mlp.activations import Activation

    pairs = {
        "fused": (LocalPrepareAndFinalize, FusedTritonExperts),
        "contiguous": (LocalPrepareAndFinalize, TritonExperts),
        "masked": (LocalMaskedPrepareAndFinalize, MaskedTritonExperts),
    }
    quants = {
        "bf16": QuantConfig(),
        "fp8-block": QuantConfig(scheme="fp8_w8a8_block"),
        "fp8-channel": QuantConfig(scheme="fp8_w8a8_channel"),
        "fp8-tensor": QuantConfig(scheme="fp8_w8a8_tensor"),
        "int4": QuantConfig(scheme="int4_w4a16", group_size=128, symmetric=False),
        "mxfp4": QuantConfig(scheme="mxfp4"),
    }
    base = dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=256, dtype=torch.bfloat16)

    def build(label: str, pair: str, moe: MoEConfig, quant: QuantConfig, placement: Any = None) -> tuple:
        pf, experts = pairs[pair]
        return _build(label, pf(), experts(), moe, quant, placement)

    for pair in pairs:
        for name, quant in quants.items():
            yield build(f"{pair} {name}", pair, MoEConfig(**base), quant)
    variants = {
        "clamped swiglu + biases": dict(activation=Activation("silu", alpha=1.702, limit=7.0, up_offset=1.0),
                                        expert_bias=True),
        "gelu_tanh": dict(activation=Activation("gelu_tanh")),
        "sigmoid, groups, bias": dict(scoring="sigmoid", num_expert_group=4, topk_group=2, correction_bias=True,
                                      routed_scaling_factor=2.5),
    }  # fmt: skip
    for name, fields in variants.items():
        yield build(f"fused {name}", "fused", MoEConfig(**{**base, **fields}), QuantConfig())
    relu2 = MoEConfig(**{**base, "activation": Activation("relu2")})
    yield build("contiguous relu2 (not gated)", "contiguous", relu2, QuantConfig())
    yield build("fused, 4 replicas", "fused", MoEConfig(**base), QuantConfig(), ExpertPlacement.redundant(16, 4))


def _calls() -> Iterator[tuple[str, Callable[[], object]]]:
    """``(label, call)``: each layer of :func:`_layers` at its token counts, and the kernels a CPU
    layer does not launch (the replica choice runs in torch off a GPU)."""
    from moe_kernels.core.placement import ExpertPlacement
    from moe_kernels.kernels.replicas import replica_slots

    for label, layer, token_counts in itertools.chain(_layers(), _tuned_tile_layers()):
        for tokens in token_counts:
            x = torch.randn(tokens, layer.cfg.moe.hidden_size, dtype=layer.cfg.moe.dtype)
            yield f"{label} T={tokens}", lambda layer=layer, x=x: layer(x)
    table = ExpertPlacement.redundant(256, 32, ep_size=8).slot_map("cpu")
    load = torch.zeros(288, dtype=torch.int32)
    for tokens in (1, 64):
        ids = torch.randint(0, 256, (tokens, 8), dtype=torch.int32)
        yield f"replica choice T={tokens}", lambda ids=ids: replica_slots(ids, table, load)


def compile_all(say: Callable[[str], None] = print, loops: bool = False) -> list[str]:
    """Compile every kernel :func:`_calls` launches; the failures, one line each. ``loops``: each
    line also gives the kernel's longest loop in SASS (:func:`_loop_instructions`)."""
    _let_the_cpu_run_triton()
    failures: list[str] = []
    seen: set[int] = set()
    for label, call in _calls():
        compiled: list[tuple[str, Any]] = []
        try:
            with compile_only(compiled):
                call()
        except Exception as e:  # a compile error names the kernel and the line; keep going
            failures.append(f"{label}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            say(f"FAILED {failures[-1]}")
            continue
        for name, kernel in compiled:
            if id(kernel) in seen:
                continue
            seen.add(id(kernel))
            shared = kernel.metadata.shared
            if shared > SM90_SHARED_BYTES:
                failures.append(f"{label}: {name} needs {shared} bytes of shared memory, an SM90 block has at most "
                                f"{SM90_SHARED_BYTES}")  # fmt: skip
            usage = _registers_and_spills(kernel) + (_loop_instructions(kernel) if loops else "")
            say(f"{label:36s} {name:26s} {kernel.metadata.num_warps} warps, {shared:6d} B shared{usage}")
    return failures


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sm90_compile.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    failed = compile_all(loops="--loops" in sys.argv[1:])
    print(f"{len(failed)} failure(s)" + "".join(f"\n  {f}" for f in failed))
    sys.exit(1 if failed else 0)
