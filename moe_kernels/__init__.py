"""moe_kernels: composable Mixture-of-Experts kernels for LLM inference.

The chain: router -> PrepareAndFinalize.prepare -> PermuteExpertsUnpermute.apply ->
PrepareAndFinalize.finalize. See :mod:`moe_kernels.contract`.
"""

from moe_kernels.compose import IncompatibleKernelsError, ModularKernel, WorkspaceCache, compose
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig, load_config
from moe_kernels.contract import (
    ActivationFormat,
    BatchedTokens,
    Check,
    ExpandedTokens,
    PermuteExpertsUnpermute,
    PrepareAndFinalize,
    PrepareResult,
    StandardTokens,
    WeightAndReduce,
    WorkspaceSpec,
)
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.layer import FusedMoE
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
from moe_kernels.router import Router, route
from moe_kernels.select import Selection, select

__all__ = [
    "ActivationFormat",
    "BatchedTokens",
    "Check",
    "ExpandedTokens",
    "FusedMoE",
    "IncompatibleKernelsError",
    "LayerConfig",
    "LocalPrepareAndFinalize",
    "MoEConfig",
    "ModularKernel",
    "ParallelConfig",
    "PermuteExpertsUnpermute",
    "PrepareAndFinalize",
    "PrepareResult",
    "QuantConfig",
    "Router",
    "Selection",
    "StandardTokens",
    "TorchReferenceExperts",
    "WeightAndReduce",
    "WorkspaceCache",
    "WorkspaceSpec",
    "compose",
    "load_config",
    "route",
    "select",
]
