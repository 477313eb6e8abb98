"""Triton kernels of the MoE pipeline: permutation (fp8 quantization fused in), the activation
between the GEMMs, grouped GEMM (bf16 or fp8), the fused decode path, 4-bit weights dequantized
to bf16 and un-permutation.

Launch wrappers take tensors and plain numbers only; they never synchronise with the host.
"""

from .activation import activate
from .dequant import PackedWeight, dequantize_packed
from .fused_moe import FusedConfig, GatherLayout, fused_experts, fused_workspace_shapes, gather_layout
from .gather import weighted_gather
from .grouped_gemm import grouped_gemm_contiguous, grouped_gemm_masked
from .permute import (
    ContiguousLayout,
    MaskedLayout,
    contiguous_layout,
    contiguous_rows_bound,
    masked_layout,
    quantize_rows,
    scatter_rows,
)

__all__ = [
    "ContiguousLayout",
    "FusedConfig",
    "GatherLayout",
    "MaskedLayout",
    "activate",
    "contiguous_layout",
    "contiguous_rows_bound",
    "PackedWeight",
    "dequantize_packed",
    "fused_experts",
    "fused_workspace_shapes",
    "gather_layout",
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "masked_layout",
    "quantize_rows",
    "scatter_rows",
    "weighted_gather",
]
