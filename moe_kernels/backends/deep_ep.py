"""DeepEP (``deep_ep``, registry package ``deepinfer-ep``): the probes, the NCCL it needs, its
compiled limits and the networking it will use. Probes never raise; each answers with a
:class:`~moe_kernels.core.contract.Check`:

* :func:`deep_ep_check`: ``import deep_ep`` works (it also checks at import that the NCCL
  library loaded in this process is the one DeepEP was linked against, and starts its JIT).
* :func:`nccl_check`: the NCCL *loaded* in this process is >= :data:`NCCL_MIN` (DeepEP 2.5 calls
  ``ncclCommQueryProperties``); before 2.31 DeepEP also needs the compile-time and runtime
  versions to be equal. ``torch.cuda.nccl.version()`` reports the version torch was *compiled*
  with, so the loaded library is asked directly (``ncclGetVersion``).
* :func:`gin_check`: GPU-initiated networking (DeepEP's default) needs an RDMA NIC; on an
  NVLink-only machine ``EP_DISABLE_GIN=1`` must be set.

The buffer DeepEP kernels run on is managed in :mod:`moe_kernels.prepare_finalize.deepep_buffer`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import os
from pathlib import Path
from types import ModuleType

import torch

from moe_kernels.core.contract import Check

#: DeepEP 2.5 needs ncclCommQueryProperties (2.29.2); 2.31 lifts the compile == runtime rule
NCCL_MIN = (2, 29, 2)
#: the NCCL docs/gpu-setup.md installs: DeepEP's README asks for it; any >= NCCL_MIN runs
NCCL_SETUP = (2, 32, 3)
NCCL_RUNTIME_GATED = (2, 31, 0)

#: DeepEP 2.5's kernels use TMA: Hopper and newer
ARCH_MAJORS = (9, 10)

#: limits compiled into DeepEP 2.5 (csrc/kernels, layout/ep/workspace.cuh); exceeding them
#: trips device asserts or writes out of bounds, so the parts refuse them up front
MAX_TOP_K = 32
MAX_EXPERTS = 2048
MAX_EXPERTS_PER_RANK = 512
MAX_RANKS = 1024

#: SMs for dispatch/combine when DeepEP cannot read the NVLink bandwidth (its own estimate
#: then falls to 4 SMs, far too few)
FALLBACK_NUM_SMS = 24


# --- probes ------------------------------------------------------------------------------


@functools.cache
def probe_deep_ep() -> tuple[ModuleType | None, str]:
    """``(deep_ep, version)`` or ``(None, why it does not import)``; imported once."""
    try:
        module = importlib.import_module("deep_ep")
    except BaseException as exc:  # its import asserts on NCCL mismatches; any failure is an answer
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return None, f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if not hasattr(module, "EPBuffer"):
        return None, f"deep_ep {getattr(module, '__version__', '?')} has no EPBuffer (DeepEP >= 2.5 needed)"
    return module, str(getattr(module, "__version__", "unknown version"))


def deep_ep_check() -> Check:
    module, info = probe_deep_ep()
    if module is None:
        return Check.failed("deep_ep", f"needs DeepEP 2.5 (deep_ep.EPBuffer), which does not import here: {info}")
    return Check.passed("deep_ep", f"deep_ep {info}")


def _decode_nccl(code: int) -> tuple[int, int, int]:
    # NCCL >= 2.9 encodes major*10000 + minor*100 + patch; older ones major*1000 + minor*100 + patch
    if code >= 10000:
        return code // 10000, (code % 10000) // 100, code % 100
    return code // 1000, (code % 1000) // 100, code % 100


_LOADED_NCCL: tuple[tuple[int, int, int], str] | None = None


def nccl_version() -> tuple[tuple[int, int, int] | None, str]:
    """``((major, minor, patch), where it was read)``; ``(None, why)`` without NCCL. Only an
    answer from the loaded library is remembered: NCCL may be mapped later in the process."""
    global _LOADED_NCCL
    if _LOADED_NCCL is not None:
        return _LOADED_NCCL
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "libnccl" in line and "/" in line})
    except OSError:
        loaded = []
    for path in loaded:
        try:
            lib = ctypes.CDLL(path)  # already mapped: this only looks the handle up
            code = ctypes.c_int()
            if lib.ncclGetVersion(ctypes.byref(code)) == 0:
                _LOADED_NCCL = _decode_nccl(code.value), f"loaded library {path}"
                return _LOADED_NCCL
        except (OSError, AttributeError):
            continue
    try:
        if torch.cuda.is_available():
            raw = torch.cuda.nccl.version()
            major, minor, patch = tuple(raw) if isinstance(raw, tuple) else _decode_nccl(int(raw))
            return (int(major), int(minor), int(patch)), "torch's compile-time version (no libnccl mapped)"
    except Exception:  # a CPU-only torch has no NCCL at all
        pass
    return None, "no NCCL in this process (CPU-only torch or NCCL not loaded)"


def nccl_check() -> Check:
    version, source = nccl_version()
    if version is None:
        return Check.failed("nccl", f"DeepEP 2.5 needs NCCL >= {format_version(NCCL_MIN)}: {source}")
    if version < NCCL_MIN:
        return Check.failed(
            "nccl", f"DeepEP 2.5 needs NCCL >= {format_version(NCCL_MIN)}, found {format_version(version)} ({source})"
        )
    if version < NCCL_RUNTIME_GATED:
        return Check.passed(
            "nccl",
            f"NCCL {format_version(version)} ({source}); below 2.31 DeepEP must be compiled against exactly this NCCL",
        )
    return Check.passed("nccl", f"NCCL {format_version(version)} ({source})")


def format_version(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def expanded_capacity_rows(world: int, max_tokens: int, top_k: int, num_local_experts: int, alignment: int) -> int:
    """Rows DeepEP allocates for an expanded dispatch without a host sync: every rank could send
    every token to ``min(top_k, E_local)`` of this rank's experts, plus each expert's alignment
    padding (DeepEP 2.5 ``csrc/buffers/ep.hpp``)."""
    rows = world * max_tokens * min(top_k, num_local_experts) + (alignment - 1) * num_local_experts
    return math.ceil(rows / alignment) * alignment


#: where Linux lists RDMA devices (InfiniBand and RoCE NICs alike)
RDMA_DEVICES = Path("/sys/class/infiniband")


def gin_check() -> Check:
    """Whether DeepEP's networking matches this machine: NVLink only (``EP_DISABLE_GIN=1``), or
    GPU-initiated networking with an RDMA NIC present."""
    if os.environ.get("EP_DISABLE_GIN") == "1":
        return Check.passed("gin", "EP_DISABLE_GIN=1: DeepEP uses NVLink only (no RDMA NIC needed)")
    nics = sorted(p.name for p in RDMA_DEVICES.iterdir()) if RDMA_DEVICES.is_dir() else []
    if nics:
        return Check.passed("gin", f"GIN on, RDMA devices {', '.join(nics)}")
    return Check.failed(
        "gin", f"GIN on but no RDMA device in {RDMA_DEVICES}: set EP_DISABLE_GIN=1 on an NVLink-only machine"
    )
