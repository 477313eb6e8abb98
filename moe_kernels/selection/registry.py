"""Every part :func:`moe_kernels.selection.select.select` may choose from, as factories: the one list of parts.

Selection, the tuner, the benchmarks, ``moe-kernels list`` and the combination tester all
iterate these lists. A factory builds a part for a layer; building must never fail on a machine
that cannot run the part (its checks say so instead), and nothing about the process group or
placement goes in here: parts get those when they are bound. To add a part, add its factory.
Quantized formats are not separate parts: each experts class computes the formats it declares
(``weight_formats``) and refuses the others with a reason.
"""

from __future__ import annotations

from collections.abc import Callable

from moe_kernels.config import LayerConfig
from moe_kernels.core.contract import PermuteExpertsUnpermute, PrepareAndFinalize
from moe_kernels.experts.deepgemm import DeepGemmExperts, ExpandedDeepGemmExperts, MaskedDeepGemmExperts
from moe_kernels.experts.fused_triton import FusedTritonExperts
from moe_kernels.experts.grouped_mm import DequantizedGroupedMMExperts, GroupedMMExperts
from moe_kernels.experts.hybrid import HybridDeepGemmExperts
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.experts.triton import MaskedTritonExperts, TritonExperts
from moe_kernels.prepare_finalize.deepep import (
    DeepEPHighThroughputPrepareAndFinalize,
    DeepEPLowLatencyPrepareAndFinalize,
)
from moe_kernels.prepare_finalize.local import LocalMaskedPrepareAndFinalize, LocalPrepareAndFinalize
from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

PREPARE_FINALIZE: list[Callable[[LayerConfig], PrepareAndFinalize]] = [
    lambda cfg: LocalPrepareAndFinalize(),
    lambda cfg: LocalMaskedPrepareAndFinalize(),
    lambda cfg: DeepEPHighThroughputPrepareAndFinalize(),
    lambda cfg: DeepEPLowLatencyPrepareAndFinalize(),
    lambda cfg: TorchAllToAllPrepareAndFinalize(),
]

EXPERTS: list[Callable[[LayerConfig], PermuteExpertsUnpermute]] = [
    lambda cfg: TorchReferenceExperts(),
    lambda cfg: FusedTritonExperts(),
    lambda cfg: TritonExperts(),
    lambda cfg: MaskedTritonExperts(),
    lambda cfg: HybridDeepGemmExperts(),
    lambda cfg: DeepGemmExperts(),
    lambda cfg: GroupedMMExperts(),
    lambda cfg: DequantizedGroupedMMExperts(),
    lambda cfg: MaskedDeepGemmExperts(),
    lambda cfg: ExpandedDeepGemmExperts(),
]
