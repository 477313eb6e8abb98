"""Every Triton kernel a layer launches compiles for Hopper (SM90), checked without a GPU: the CPU
suite runs the kernels in Triton's interpreter, which never compiles them. The check runs in a
process of its own (tests/sm90_compile.py says how)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the kernels of the fused, contiguous and masked Triton paths, the routing and the replica choice
EXPECTED = {
    "_route_kernel", "_gather_layout_kernel", "_fused_gemm_kernel", "_weighted_gather_kernel",
    "_grouped_gemm_kernel", "_activate_kernel", "_scatter_rows_kernel", "_count_rank_kernel",
    "_masked_rank_kernel", "_choose_slots_kernel",
}  # fmt: skip

BROKEN_KERNEL = """
import sys
sys.path.insert(0, {tests!r})
import torch, triton, triton.language as tl
from sm90_compile import compile_only

@triton.jit
def broken(x_ptr, BLOCK: tl.constexpr):
    a = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.dot(a, a))  # tl.dot takes 2-D tiles

with compile_only([]):
    broken[(1,)](torch.zeros(16), BLOCK=16)
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_every_kernel_a_layer_launches_compiles_for_sm90() -> None:
    proc = _run("tests/sm90_compile.py")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("0 failure(s)"), proc.stdout[-4000:] + proc.stderr
    compiled = {word for line in proc.stdout.splitlines() for word in line.split() if word.endswith("_kernel")}
    assert EXPECTED <= compiled, f"not compiled: {sorted(EXPECTED - compiled)}"


def test_a_kernel_that_does_not_compile_is_reported(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"  # Triton reads a kernel's source from its file
    script.write_text(BROKEN_KERNEL.format(tests=str(ROOT / "tests")))
    proc = _run(str(script))
    assert proc.returncode != 0 and "CompilationError" in proc.stderr, proc.stderr[-2000:]
