"""DeepEP 2.5 (``deep_ep.EPBuffer``): probing the install, and one buffer per process group.

Probes never raise; each answers with a :class:`~moe_kernels.contract.Check`:

* :func:`deep_ep_check`: ``import deep_ep`` works (it also checks at import that the NCCL
  library loaded in this process is the one DeepEP was linked against, and starts its JIT).
* :func:`nccl_check`: the NCCL *loaded* in this process is >= 2.29.2 (DeepEP 2.5 calls
  ``ncclCommQueryProperties``); before 2.31 DeepEP also needs the compile-time and runtime
  versions to be equal. ``torch.cuda.nccl.version()`` reports the version torch was *compiled*
  with, so the loaded library is asked directly (``ncclGetVersion``).

Buffer lifecycle (:func:`get_buffer`): one ``EPBuffer`` per process group, shared by every
layer and by both modes, created on first use (a collective: every rank's first call
creates it), sized with ``EPBuffer.get_buffer_size_hint`` for the largest
``(num_max_tokens_per_rank, hidden, top_k)`` asked so far, regrown (destroyed and recreated)
when a later layer needs more, and never created or regrown during CUDA-graph capture: run
every layer once before capturing. :func:`release_all` destroys the buffers (they are built
with ``explicitly_destroy=True``); call it before ``dist.destroy_process_group()``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from moe_kernels.contract import Check

#: DeepEP 2.5 needs ncclCommQueryProperties (2.29.2); 2.31 lifts the compile == runtime rule
NCCL_MIN = (2, 29, 2)
NCCL_RUNTIME_GATED = (2, 31, 0)

#: limits compiled into DeepEP 2.5 (csrc/kernels, layout/ep/workspace.cuh); exceeding them
#: trips device asserts or writes out of bounds, so the parts refuse them up front
MAX_TOP_K = 32
MAX_EXPERTS = 2048
MAX_EXPERTS_PER_RANK = 512
MAX_RANKS = 1024

#: DeepGEMM's SM90 contiguous-layout alignment, used when deep_gemm cannot be asked
DEFAULT_EXPERT_ALIGNMENT = 128

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
        return Check.failed("nccl", f"DeepEP 2.5 needs NCCL >= {_fmt(NCCL_MIN)}: {source}")
    if version < NCCL_MIN:
        return Check.failed("nccl", f"DeepEP 2.5 needs NCCL >= {_fmt(NCCL_MIN)}, found {_fmt(version)} ({source})")
    if version < NCCL_RUNTIME_GATED:
        return Check.passed(
            "nccl", f"NCCL {_fmt(version)} ({source}); below 2.31 DeepEP must be compiled against exactly this NCCL"
        )
    return Check.passed("nccl", f"NCCL {_fmt(version)} ({source})")


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


@functools.cache
def expert_alignment() -> int:
    """Row alignment of each expert's segment: DeepGEMM's contiguous-layout alignment
    (``deep_gemm.get_mk_alignment_for_contiguous_layout()``), 128 (SM90) without DeepGEMM."""
    try:
        dg = importlib.import_module("deep_gemm")
        # older DeepGEMM releases name it get_m_alignment_for_contiguous_layout
        getter = getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or dg.get_m_alignment_for_contiguous_layout
        return int(getter())
    except Exception:  # DeepGEMM absent or without the symbol: its documented SM90 value
        return DEFAULT_EXPERT_ALIGNMENT


def expanded_capacity_rows(world: int, max_tokens: int, top_k: int, num_local_experts: int, alignment: int) -> int:
    """Rows DeepEP allocates for an expanded dispatch without a host sync: every rank could send
    every token to ``min(top_k, E_local)`` of this rank's experts, plus each expert's alignment
    padding (DeepEP 2.5 ``csrc/buffers/ep.hpp``)."""
    rows = world * max_tokens * min(top_k, num_local_experts) + (alignment - 1) * num_local_experts
    return math.ceil(rows / alignment) * alignment


# --- one buffer per process group ---------------------------------------------------------


@dataclass
class _Entry:
    buffer: Any
    num_bytes: int


_BUFFERS: dict[Any, _Entry] = {}
#: get_buffer_size_hint answers, so a call costs a dict lookup once the buffer exists
_HINTS: dict[tuple[Any, int, int, int], int] = {}


def get_buffer(group: dist.ProcessGroup, *, num_max_tokens_per_rank: int, hidden: int, top_k: int) -> Any:
    """The group's ``deep_ep.EPBuffer``, large enough for dispatches of up to
    ``num_max_tokens_per_rank`` tokens of ``hidden`` bf16 values with ``top_k`` experts.

    Collective when it creates or regrows the buffer: every rank must call it with the same
    arguments at the same point (the parts check that the ranks agree before calling it).
    """
    deep_ep, info = probe_deep_ep()
    if deep_ep is None:
        raise RuntimeError(f"DeepEP is not available: {info}")
    key = (group, num_max_tokens_per_rank, hidden, top_k)
    need = _HINTS.get(key)
    if need is None:
        need = int(
            deep_ep.EPBuffer.get_buffer_size_hint(
                group, num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden, num_topk=top_k
            )
        )
        _HINTS[key] = need
    entry = _BUFFERS.get(group)
    if entry is not None and entry.num_bytes >= need:
        return entry.buffer
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the DeepEP buffer must be created (or grown) before CUDA-graph capture: run every MoE layer "
            "once eagerly with its largest max_tokens_per_rank before capturing"
        )
    num_bytes = max(need, entry.num_bytes if entry is not None else 0)
    if entry is not None:
        # every handle of the old buffer died with the call that made it; graphs captured
        # against it would not, hence the capture rule above
        _synchronize()
        entry.buffer.destroy()
        del _BUFFERS[group]
    buffer = deep_ep.EPBuffer(group, num_bytes=num_bytes, explicitly_destroy=True)
    _BUFFERS[group] = _Entry(buffer, num_bytes)
    return buffer


def num_sms_for(buffer: Any, num_experts: int, top_k: int) -> int:
    """SMs for dispatch/combine: DeepEP's bandwidth model, unless it could not read the NVLink
    bandwidth (it then answers 4, which starves the copy), in which case a fixed 24."""
    try:
        from deep_ep.utils.envs import get_nvlink_gbs

        if get_nvlink_gbs() <= 0:
            return FALLBACK_NUM_SMS
        return int(buffer.get_theoretical_num_sms(num_experts, top_k))
    except Exception:  # any failure of the estimate: a fixed count that works on H100/H200
        return FALLBACK_NUM_SMS


def release(group: dist.ProcessGroup) -> None:
    """Destroy ``group``'s buffer, if any (collective-free; do it on every rank)."""
    entry = _BUFFERS.pop(group, None)
    if entry is not None:
        _synchronize()
        entry.buffer.destroy()


def _synchronize() -> None:
    # kernels still in flight may use the buffer
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_all() -> None:
    """Destroy every buffer; call before ``dist.destroy_process_group()``."""
    for group in list(_BUFFERS):
        release(group)
    _HINTS.clear()
