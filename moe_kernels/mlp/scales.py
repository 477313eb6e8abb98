"""Where fp8 activation scales live: one float32 per 128 columns of a row, token-major.

DeepGEMM's SM90 fp8 kernels read activation scales ``[R, S]`` (``S = ceil(cols / 128)``) with
the token dimension contiguous, strides ``(1, R)`` (``[E, M, S]``: ``(S * M, 1, M)``), and take
such a tensor as it is; any other layout costs them a transpose launch per GEMM (DeepGEMM 2.8
``get_mn_major_tma_aligned_tensor``). Workspaces hold the storage ``[S, R]`` and parts view it
back with :func:`scale_view`. The row counts used here are multiples of 4, which the TMA
descriptor also asks of the column stride.
"""

from __future__ import annotations

import torch

from moe_kernels.config import FP8_ACT_GROUP
from moe_kernels.core.contract import WorkspaceSpec


def scale_spec(rows: int, cols: int) -> WorkspaceSpec:
    """Storage for the scales of fp8 rows ``[rows, cols]``."""
    return WorkspaceSpec((-(-cols // FP8_ACT_GROUP), rows), torch.float32)


def masked_scale_spec(experts: int, rows: int, cols: int) -> WorkspaceSpec:
    """Storage for the scales of fp8 rows ``[experts, rows, cols]``."""
    return WorkspaceSpec((experts, -(-cols // FP8_ACT_GROUP), rows), torch.float32)


def scale_view(storage: torch.Tensor) -> torch.Tensor:
    """``[S, R]`` storage -> ``[R, S]`` scales with strides ``(1, R)``; ``[E, S, M]`` -> ``[E, M, S]``."""
    return storage.transpose(-2, -1)
