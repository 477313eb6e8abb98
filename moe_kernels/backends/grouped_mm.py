"""``torch._grouped_mm`` (PyTorch's CUTLASS grouped GEMM): whether this torch has its fast kernel.

``torch._grouped_mm(a [M, K], b [E, K, N], offs=[E] int32 cumulative row ends) -> [M, N]``
computes group ``e`` on rows ``[offs[e-1], offs[e])``. Its constraints (PyTorch source,
``aten/src/ATen/native/cuda/GroupedBlas.cpp``, ``GroupedMMUtils.h``, ``GroupMMCommon.cuh``):

* the fast kernel runs only for bf16 ``a``, ``b`` and output on compute capability 9.x or 10.x
  (``scaled_mm_arch_allowed(sm90_only, sm100_only)``); anything else takes a fallback that
  copies ``offs`` to the host (a sync) and loops over groups -- so we accept bf16 on SM90/SM100 only;
* ``offs`` is 1-D int32 with one entry per group; empty groups are fine for 2-D x 3-D, and group
  row counts need no alignment (only strides: rows of 16 bytes, i.e. H and I multiples of 8,
  which :class:`~moe_kernels.config.MoEConfig` already enforces);
* one thread per group prepares the problem descriptors (a launch of ``<<<1, E>>>``), so at
  most 1024 groups;
* the output is allocated by the op (no ``out=``); rows past ``offs[-1]`` are left
  uninitialised.
"""

from __future__ import annotations

import torch

from moe_kernels.backends.cuda import sm_check
from moe_kernels.core.contract import Check

#: compute capability majors on which ``torch._grouped_mm`` has its no-sync bf16 kernel
FAST_ARCH_MAJORS = (9, 10)
#: the descriptor-preparing launch uses one thread per group
MAX_GROUPS = 1024


def device_check(device: torch.device) -> Check:
    return sm_check(device, FAST_ARCH_MAJORS, "torch._grouped_mm's no-sync bf16 kernel (elsewhere it loops per group)")


def grouped_mm_check(groups: int) -> Check:
    """This torch has ``torch._grouped_mm`` and it takes ``groups`` groups."""
    if not hasattr(torch, "_grouped_mm"):
        return Check.failed("grouped_mm", f"torch {torch.__version__} has no torch._grouped_mm (needs >= 2.8)")
    if groups > MAX_GROUPS:
        return Check.failed("grouped_mm", f"torch._grouped_mm takes at most {MAX_GROUPS} groups, got {groups}")
    return Check.passed("grouped_mm", f"torch {torch.__version__}")
