"""Triton kernels of the MoE pipeline: permutation, activation, grouped GEMM, the fused decode
path, fp8 quantization and un-permutation.

Launch wrappers take tensors and plain numbers only; they never synchronise with the host.
"""

from .activation import silu_and_mul
from .fused_moe import FusedConfig, GatherLayout, fused_experts, fused_workspace_shapes, gather_layout
from .gather import weighted_gather
from .grouped_gemm import grouped_gemm_contiguous, grouped_gemm_masked
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
    "FusedConfig",
    "GatherLayout",
    "MaskedLayout",
    "contiguous_layout",
    "contiguous_rows_bound",
    "expert_counts",
    "fused_experts",
    "fused_workspace_shapes",
    "gather_layout",
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "masked_layout",
    "scatter_rows",
    "silu_and_mul",
    "weighted_gather",
]
