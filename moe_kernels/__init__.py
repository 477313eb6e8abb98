"""moe_kernels: composable Mixture-of-Experts kernels for LLM inference.

The chain: router -> PrepareAndFinalize.prepare -> PermuteExpertsUnpermute.apply ->
PrepareAndFinalize.finalize. See :mod:`moe_kernels.core.contract`. Every registered part is
importable from here.
"""

import logging

from moe_kernels._version import __version__
from moe_kernels.config import ConfigError, LayerConfig, MoEConfig, ParallelConfig, QuantConfig, load_config
from moe_kernels.core.compose import (
    IncompatibleKernelsError,
    ModularKernel,
    TokenRangeKernel,
    WorkspaceCache,
    WorkspaceError,
    compose,
)
from moe_kernels.core.contract import (
    Check,
    ExpandedTokens,
    LayerContext,
    Layout,
    MaskedTokens,
    PermuteExpertsUnpermute,
    PrepareAndFinalize,
    PrepareResult,
    StandardTokens,
    TokenFormat,
    WorkspaceSpec,
)
from moe_kernels.core.placement import ExpertPlacement
from moe_kernels.experts.deepgemm import DeepGemmExperts, ExpandedDeepGemmExperts, MaskedDeepGemmExperts
from moe_kernels.experts.fused_triton import FusedTritonExperts
from moe_kernels.experts.grouped_mm import DequantizedGroupedMMExperts, GroupedMMExperts
from moe_kernels.experts.hybrid import HybridDeepGemmExperts
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.experts.triton import MaskedTritonExperts, TritonExperts
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.layer import FusedMoE
from moe_kernels.model.memory import LayerMemoryError
from moe_kernels.model.router import Router, Routing, route
from moe_kernels.prepare_finalize.deepep import (
    DeepEPHighThroughputPrepareAndFinalize,
    DeepEPLowLatencyPrepareAndFinalize,
)
from moe_kernels.prepare_finalize.local import LocalMaskedPrepareAndFinalize, LocalPrepareAndFinalize
from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize
from moe_kernels.selection.select import Selection, select

# the package logger says nothing unless the application configures logging (e.g.
# logging.basicConfig(level=logging.INFO)): a library must not print by default
logging.getLogger("moe_kernels").addHandler(logging.NullHandler())

__all__ = [
    "Check",
    "ConfigError",
    "DeepEPHighThroughputPrepareAndFinalize",
    "DeepEPLowLatencyPrepareAndFinalize",
    "DeepGemmExperts",
    "ExpandedDeepGemmExperts",
    "ExpandedTokens",
    "ExpertPlacement",
    "ExpertWeights",
    "FusedMoE",
    "FusedTritonExperts",
    "GroupedMMExperts",
    "DequantizedGroupedMMExperts",
    "HybridDeepGemmExperts",
    "IncompatibleKernelsError",
    "LayerConfig",
    "LayerContext",
    "LayerMemoryError",
    "Layout",
    "LocalMaskedPrepareAndFinalize",
    "LocalPrepareAndFinalize",
    "MaskedDeepGemmExperts",
    "MaskedTokens",
    "MaskedTritonExperts",
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
    "TokenFormat",
    "TokenRangeKernel",
    "TorchAllToAllPrepareAndFinalize",
    "TorchReferenceExperts",
    "TritonExperts",
    "WorkspaceCache",
    "WorkspaceError",
    "WorkspaceSpec",
    "__version__",
    "compose",
    "load_config",
    "route",
    "Routing",
    "select",
]
