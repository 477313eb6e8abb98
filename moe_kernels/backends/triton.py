"""What this machine can run: probes that never raise, each answering with a :class:`Check`."""

from __future__ import annotations

import functools
import importlib
import os

import torch

from moe_kernels.core.contract import Check


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_version() -> str | None:
    try:
        return importlib.import_module("triton").__version__
    except Exception:  # an absent or broken install is an answer, not an error
        return None


def triton_check(device: torch.device) -> Check:
    """Triton kernels run on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1``."""
    version = _triton_version()
    if version is None:
        return Check.failed("device", "needs triton, which does not import here")
    if device.type == "cuda":
        return Check.passed("device", f"triton {version} on {device}")
    if device.type == "cpu" and triton_interpreting():
        return Check.passed("device", "triton interpreter on the CPU (TRITON_INTERPRET=1)")
    return Check.failed("device", f"Triton needs a CUDA device or TRITON_INTERPRET=1 on the CPU, not {device.type}")


def sm_check(device: torch.device, min_major: int, what: str) -> Check:
    """The device is a CUDA GPU of compute capability ``min_major``.x or newer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return Check.failed("device", f"{what} needs a CUDA GPU of SM{min_major}0+, not {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if major < min_major:
        return Check.failed("device", f"{what} needs SM{min_major}0+, this GPU is SM{major}{minor}")
    return Check.passed("device", f"SM{major}{minor}")
