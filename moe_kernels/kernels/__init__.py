"""Triton kernels of the MoE pipeline: permutation, activation, grouped GEMM and un-permutation.

Launch wrappers take tensors and plain numbers only; they never synchronise with the host.
"""

from .activation import silu_and_mul
from .gather import weighted_gather
from .grouped_gemm import contiguous_alignment, grouped_gemm_contiguous, grouped_gemm_masked
from .permute import (
    ContiguousLayout,
    MaskedLayout,
    contiguous_layout,
    contiguous_rows_bound,
    expert_counts,
    masked_layout,
    scatter_rows,
)

__all__ = [
    "ContiguousLayout",
    "MaskedLayout",
    "contiguous_alignment",
    "contiguous_layout",
    "contiguous_rows_bound",
    "expert_counts",
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "masked_layout",
    "scatter_rows",
    "silu_and_mul",
    "weighted_gather",
]
