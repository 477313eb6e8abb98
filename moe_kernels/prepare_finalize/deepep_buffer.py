"""DeepEP 2.5 (``deep_ep.EPBuffer``): probing the install, and one buffer per process group.

Probes never raise; each answers with a :class:`~moe_kernels.core.contract.Check`:

* :func:`deep_ep_check`: ``import deep_ep`` works (it also checks at import that the NCCL
  library loaded in this process is the one DeepEP was linked against, and starts its JIT).
* :func:`nccl_check`: the NCCL *loaded* in this process is >= 2.29.2 (DeepEP 2.5 calls
  ``ncclCommQueryProperties``); before 2.31 DeepEP also needs the compile-time and runtime
  versions to be equal. ``torch.cuda.nccl.version()`` reports the version torch was *compiled*
  with, so the loaded library is asked directly (``ncclGetVersion``).

Buffer lifecycle: one ``EPBuffer`` per process group, shared by every layer and by both modes.
Each DeepEP part reserves it (:func:`reserve`) when its kernel is built (a collective: every rank
binds the same layers in the same order, which the parts check first), sized with
``EPBuffer.get_buffer_size_hint`` for the largest ``(num_max_tokens_per_rank, hidden, top_k,
fp8 dispatch)`` reserved so far; a larger later reservation regrows it (destroy and recreate)
-- unless a captured CUDA graph has used it, in which case growing would leave the graph writing
through freed memory, so it raises. :func:`release` drops one part's reservation and destroys the
buffer with the last one (buffers are built with ``explicitly_destroy=True``);
:func:`release_all` runs at process-group teardown
(:func:`moe_kernels.core.distributed.at_teardown`).
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

from moe_kernels.core.contract import Check
from moe_kernels.core.distributed import at_teardown

#: DeepEP 2.5 needs ncclCommQueryProperties (2.29.2); 2.31 lifts the compile == runtime rule
NCCL_MIN = (2, 29, 2)
NCCL_RUNTIME_GATED = (2, 31, 0)

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
    users: int = 0
    captured: bool = False


_BUFFERS: dict[Any, _Entry] = {}
#: get_buffer_size_hint answers, so a reservation costs a dict lookup once the buffer exists
_HINTS: dict[tuple[Any, int, int, int, bool], int] = {}


def reserve(
    group: dist.ProcessGroup, *, num_max_tokens_per_rank: int, hidden: int, top_k: int, fp8_dispatch: bool = False
) -> Any:
    """Count one more user of ``group``'s ``deep_ep.EPBuffer`` and make it large enough for
    dispatches of up to ``num_max_tokens_per_rank`` tokens of ``hidden`` values (bf16, or fp8
    with their scales when ``fp8_dispatch``) with ``top_k`` experts, and for their bf16 combine
    (DeepEP's hint counts both); returns the buffer.

    Collective when it creates or regrows the buffer: every rank must call it with the same
    arguments at the same point. Raises ``RuntimeError`` during CUDA-graph capture, or when the
    buffer must grow after a capture used it.
    """
    deep_ep, info = probe_deep_ep()
    if deep_ep is None:
        raise RuntimeError(f"DeepEP is not available: {info}")
    key = (group, num_max_tokens_per_rank, hidden, top_k, fp8_dispatch)
    need = _HINTS.get(key)
    if need is None:
        need = int(
            deep_ep.EPBuffer.get_buffer_size_hint(
                group,
                num_max_tokens_per_rank=num_max_tokens_per_rank,
                hidden=hidden,
                num_topk=top_k,
                use_fp8_dispatch=fp8_dispatch,
            )
        )
        _HINTS[key] = need
    entry = _BUFFERS.get(group)
    if entry is None or entry.num_bytes < need:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the DeepEP buffer must be created (or grown) before CUDA-graph capture: build every layer first"
            )
        if entry is not None and entry.captured:
            raise RuntimeError(
                f"the DeepEP buffer ({entry.num_bytes / 2**20:.0f} MiB) is used by a captured CUDA graph and cannot "
                f"grow to {need / 2**20:.0f} MiB: build every MoE layer before capturing any graph"
            )
        users = 0
        if entry is not None:
            users = entry.users
            # kernels still in flight may use the old buffer
            _synchronize()
            entry.buffer.destroy()
        buffer = deep_ep.EPBuffer(group, num_bytes=need, explicitly_destroy=True)
        entry = _BUFFERS[group] = _Entry(buffer, need, users)
        at_teardown(release_all)
    entry.users += 1
    return entry.buffer


def current(group: dist.ProcessGroup) -> Any:
    """``group``'s buffer as it is now (a later, larger reservation may have replaced it)."""
    entry = _BUFFERS.get(group)
    if entry is None:
        raise RuntimeError("no DeepEP buffer is reserved for this process group (was the kernel released?)")
    return entry.buffer


def mark_captured(group: dist.ProcessGroup) -> None:
    """Record that a CUDA-graph capture used ``group``'s buffer (it may never be replaced)."""
    _BUFFERS[group].captured = True


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
    """Drop one user of ``group``'s buffer; the last one destroys it. Destroying is collective
    (a GPU barrier and NCCL window deregistration): every rank must release the same kernels."""
    entry = _BUFFERS.get(group)
    if entry is None:
        return
    entry.users -= 1
    if entry.users <= 0:
        del _BUFFERS[group]
        _synchronize()
        entry.buffer.destroy()


def _synchronize() -> None:
    # kernels still in flight may use the buffer
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_all() -> None:
    """Destroy every buffer (collective, as :func:`release`); runs before
    ``dist.destroy_process_group()``."""
    for group in list(_BUFFERS):
        entry = _BUFFERS.pop(group)
        _synchronize()
        entry.buffer.destroy()
    _HINTS.clear()
