"""How activations enter the GEMMs when they are quantized, and where their scales live.

:class:`ActQuant` today is DeepGEMM's SM90 recipe: float8_e4m3fn values with one float32 scale
per token and ``group`` (128) columns, computed on the fly (:mod:`moe_kernels.mlp.fp8` gives the
numbers). A :class:`~moe_kernels.core.contract.TokenFormat` carries one when the experts need
their input quantized, so a prepare/finalize that moves or lays out rows quantizes them first
(fp8 rows travel at about half the bytes).

Scale layout: DeepGEMM's SM90 fp8 kernels read activation scales ``[R, S]`` (``S = ceil(cols /
group)``) with the token dimension contiguous, strides ``(1, R)`` (``[E, M, S]``: ``(S * M, 1,
M)``), and take such a tensor as it is; any other layout costs them a transpose launch per GEMM
(DeepGEMM 2.8 ``get_mn_major_tma_aligned_tensor``). Workspaces hold the storage ``[S, R]`` and
parts view it back with :func:`scale_view`. The row counts used here are multiples of 4, which
the TMA descriptor also asks of the column stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_kernels.mlp import fp8

#: ``(shape, dtype)`` of a buffer
TensorSpec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class ActQuant:
    """Activations as ``dtype`` values with one float32 scale per row and ``group`` columns."""

    dtype: torch.dtype = fp8.FP8_DTYPE
    group: int = fp8.SCALE_BLOCK

    def scale_cols(self, cols: int) -> int:
        return -(-cols // self.group)

    def rows(self, lead: tuple[int, ...], cols: int) -> TensorSpec:
        """The quantized values of rows ``[*lead, cols]``."""
        return (*lead, cols), self.dtype

    def scale_storage(self, rows: int, cols: int) -> TensorSpec:
        """Storage ``[S, rows]`` for the scales of ``[rows, cols]`` (view it with :func:`scale_view`)."""
        return (self.scale_cols(cols), rows), torch.float32

    def masked_scale_storage(self, experts: int, rows: int, cols: int) -> TensorSpec:
        """Storage ``[E, S, rows]`` for the scales of ``[experts, rows, cols]``."""
        return (experts, self.scale_cols(cols), rows), torch.float32

    def describe(self) -> str:
        kind = "fp8 (e4m3)" if self.dtype == fp8.FP8_DTYPE else str(self.dtype).removeprefix("torch.")
        return f"{kind} activations, one float32 scale per {self.group} columns"


def scale_view(storage: torch.Tensor) -> torch.Tensor:
    """``[S, R]`` storage -> ``[R, S]`` scales with strides ``(1, R)``; ``[E, S, M]`` -> ``[E, M, S]``."""
    return storage.transpose(-2, -1)
