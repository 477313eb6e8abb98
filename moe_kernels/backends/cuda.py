"""The CUDA device itself: its architecture (the one SM check every part asks) and SM count."""

from __future__ import annotations

from collections.abc import Collection

import torch

from moe_kernels.core.contract import Check


def capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, ``None`` for any other device or without CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def sm_check(device: torch.device, majors: Collection[int], what: str, *, name: str = "device") -> Check:
    """``device`` is a CUDA GPU whose compute capability major is one of ``majors``; the failure
    says what needs it (``what``) and what was found."""
    arch = "/".join(f"SM{m}0" for m in sorted(majors))
    cap = capability(device)
    if cap is None:
        return Check.failed(name, f"{what} needs a CUDA GPU of {arch}, not {device.type}")
    if cap[0] not in majors:
        return Check.failed(name, f"{what} runs on {arch} only, this GPU is SM{cap[0]}{cap[1]}")
    return Check.passed(name, f"SM{cap[0]}{cap[1]}")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM or H200)."""
    return int(torch.cuda.get_device_properties(device).multi_processor_count)
