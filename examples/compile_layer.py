"""Compile a FusedMoE layer through its registered op and time the op boundary.

``torch.compile(layer, fullgraph=True, dynamic=True)`` traces one graph whose MoE call is the
``moe_kernels::fused_moe_layer`` op (docs/integration.md). This script checks, over several token
counts, that the compiled layer equals the eager one with a single compilation, then times both
at one token (the boundary's cost is largest there relative to the work) and splits the compiled
call's extra host time into the op boundary and the compiled graph's entry::

    python examples/compile_layer.py                                  # tiny layer, CPU or GPU
    python examples/compile_layer.py configs/qwen3-30b-a3b.yaml       # on a GPU
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo.testing
from torch._dynamo.decorators import mark_unbacked

from moe_kernels import load_config
from moe_kernels.core.compose import resolve_device
from moe_kernels.selection.timing import host_us
from moe_kernels.tools.harness import default_timer, random_layer

TOKENS = (7, 1, 64, 300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny-test.yaml")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: a GPU if any)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = load_config(args.config)
    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"max_tokens_per_rank": 512})})
    layer = random_layer(cfg, device)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if device.type == "cuda" else "aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)

    def tokens(t: int) -> torch.Tensor:
        x = torch.randn(t, cfg.moe.hidden_size, device=device, dtype=cfg.moe.dtype)
        mark_unbacked(x, 0)  # a backed T would be specialized (and recompiled) at T = 1
        return x

    for t in TOKENS:
        x = tokens(t)
        same = torch.equal(compiled(x), layer(x))
        print(f"T={t:4d}: compiled {'==' if same else '!='} eager")
    print(f"compilations over T in {TOKENS}: {counter.frame_count}")

    x = tokens(1)
    timer = default_timer(device)
    eager_us, compiled_us = timer(lambda: layer(x)), timer(lambda: compiled(x))
    overhead = 100.0 * (compiled_us - eager_us) / eager_us
    print(f"T=1 on {device}: eager {eager_us:.1f} us, compiled {compiled_us:.1f} us ({overhead:+.1f} %)")
    # Where a compiled call's extra time goes, on the host (the GPU work is the same): the op
    # boundary (the registered op's dispatch around the eager forward) and the compiled graph's
    # entry (guards and wrappers, paid once per call of a compiled graph: once per step when an
    # engine compiles the whole model, once per layer here).
    host = host_us if device.type == "cuda" else timer
    op = torch.ops.moe_kernels.fused_moe_layer
    eager_host = host(lambda: layer.forward_eager(x))
    op_host = host(lambda: op(x, layer._op_key))
    compiled_host = host(lambda: compiled(x))
    print(
        f"host time per call: eager {eager_host:.1f} us, through the op {op_host:.1f} us, "
        f"compiled {compiled_host:.1f} us"
    )
    print(
        f"  the op boundary: {op_host - eager_host:+.1f} us ({100.0 * (op_host - eager_host) / eager_us:+.1f} % of "
        f"the eager call); the compiled graph's entry: {compiled_host - op_host:+.1f} us"
    )


if __name__ == "__main__":
    main()
