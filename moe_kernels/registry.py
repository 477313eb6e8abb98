"""Every part :func:`moe_kernels.select.select` may choose from, as factories.

A factory builds a part for a layer (and, for prepare/finalize, the expert-parallel process
group); building must never fail on a machine that cannot run the part: the part's checks
say so instead. To add a part, add its factory here.
"""

from __future__ import annotations

from moe_kernels.experts.deepgemm import BatchedDeepGemmExperts, DeepGemmExperts, ExpandedDeepGemmExperts
from moe_kernels.experts.grouped_mm import GroupedMMExperts
from moe_kernels.experts.hybrid import HybridDeepGemmExperts
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.experts.triton import BatchedTritonExperts, TritonExperts
from moe_kernels.prepare_finalize.deepep import (
    DeepEPHighThroughputPrepareAndFinalize,
    DeepEPLowLatencyPrepareAndFinalize,
)
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

PREPARE_FINALIZE = [
    lambda cfg, group: LocalPrepareAndFinalize(),
    lambda cfg, group: LocalPrepareAndFinalize(
        batched=True, capacity=cfg.parallel.max_tokens_per_rank if cfg.parallel.cuda_graphs else None
    ),
    lambda cfg, group: DeepEPHighThroughputPrepareAndFinalize(group, cfg.parallel.max_tokens_per_rank),
    lambda cfg, group: DeepEPLowLatencyPrepareAndFinalize(group, cfg.parallel.max_tokens_per_rank),
    lambda cfg, group: TorchAllToAllPrepareAndFinalize(group, cfg.parallel.max_tokens_per_rank),
]

EXPERTS = [
    lambda cfg: TorchReferenceExperts(),
    lambda cfg: TritonExperts(),
    lambda cfg: BatchedTritonExperts(),
    lambda cfg: HybridDeepGemmExperts(),
    lambda cfg: DeepGemmExperts(),
    lambda cfg: GroupedMMExperts(),
    lambda cfg: BatchedDeepGemmExperts(),
    lambda cfg: ExpandedDeepGemmExperts(),
]
