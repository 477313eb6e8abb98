"""Triton: whether it imports, its version, and where its kernels can run."""

from __future__ import annotations

import functools
import importlib

import torch

from moe_kernels.core.contract import Check
from moe_kernels.kernels._common import interpreting

__all__ = ["interpreting", "triton_check", "version"]


@functools.cache
def version() -> str | None:
    """Triton's version, ``None`` when it does not import (an answer, never an error)."""
    try:
        return str(importlib.import_module("triton").__version__)
    except Exception:  # an absent or broken install is an answer
        return None


def triton_check(device: torch.device, *, name: str = "device") -> Check:
    """Triton kernels run on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1``."""
    found = version()
    if found is None:
        return Check.failed(name, "needs triton, which does not import here")
    if device.type == "cuda":
        return Check.passed(name, f"triton {found} on {device}")
    if device.type == "cpu" and interpreting():
        return Check.passed(name, "triton interpreter on the CPU (TRITON_INTERPRET=1)")
    return Check.failed(name, f"Triton needs a CUDA device or TRITON_INTERPRET=1 on the CPU, not {device.type}")
