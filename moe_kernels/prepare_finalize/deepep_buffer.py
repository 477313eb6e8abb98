"""DeepEP 2.5 (``deep_ep.EPBuffer``): one buffer per process group (the probes are
:mod:`moe_kernels.backends.deep_ep`).

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_kernels.backends import deep_ep as backend
from moe_kernels.core.distributed import at_teardown

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
    deep_ep, info = backend.probe_deep_ep()
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
            return backend.FALLBACK_NUM_SMS
        return int(buffer.get_theoretical_num_sms(num_experts, top_k))
    except Exception:  # any failure of the estimate: a fixed count that works on H100/H200
        return backend.FALLBACK_NUM_SMS


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
