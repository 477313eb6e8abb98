"""Expert MLPs on ``torch._grouped_mm`` (PyTorch's CUTLASS grouped GEMM): the fast path on
Hopper/Blackwell GPUs without DeepGEMM.

``torch._grouped_mm(a [M, K], b [E, K, N], offs=[E] int32 cumulative row ends) -> [M, N]``
computes group ``e`` on rows ``[offs[e-1], offs[e])``. Its constraints (PyTorch source,
``aten/src/ATen/native/cuda/GroupedBlas.cpp``, ``GroupedMMUtils.h``, ``GroupMMCommon.cuh``):

* the fast kernel runs only for bf16 ``a``, ``b`` and output on compute capability 9.x or 10.x
  (``scaled_mm_arch_allowed(sm90_only, sm100_only)``); anything else takes a fallback that
  copies ``offs`` to the host (a sync) and loops over groups -- so we accept bf16 on SM90/SM100 only;
* ``offs`` is 1-D int32 with one entry per group; empty groups are fine for 2-D x 3-D, and group
  row counts need no alignment (only strides: rows of 16 bytes, i.e. H and I multiples of 8,
  which :class:`~moe_kernels.config.MoEConfig` already enforces);
* one thread per group prepares the problem descriptors (a launch of ``<<<1, E>>>``), so at
  most 1024 groups;
* the output is allocated by the op (no ``out=``); rows past ``offs[-1]`` are left
  uninitialised.
"""

from __future__ import annotations

import torch

from moe_kernels.backends.triton import triton_check
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Layout,
    PermuteExpertsUnpermute,
    StandardTokens,
    WorkspaceSpec,
)
from moe_kernels.experts.common import write_output
from moe_kernels.mlp.weights import ExpertWeights

#: compute capability majors on which ``torch._grouped_mm`` has its no-sync bf16 kernel
FAST_ARCH_MAJORS = (9, 10)
#: the descriptor-preparing launch uses one thread per group
MAX_GROUPS = 1024


class GroupedMMExperts(PermuteExpertsUnpermute):
    """STANDARD in, ``[T, H]`` out (weighted and reduced), on ``torch._grouped_mm``.

    Triton permute (histogram, scatter ``x`` into expert-sorted rows, no padding) ->
    ``_grouped_mm(rows [R, H], w13^T [E, H, 2I], offs=segment_ends)`` -> Triton SiLU-and-mul
    (rows past the last segment skipped) -> ``_grouped_mm(act [R, I], w2^T [E, I, H])`` ->
    weighted gather into ``out [T, H]``. ``R = T * K`` (host-known), so no host sync; the
    GEMM outputs come from PyTorch's caching allocator (under CUDA-graph capture, from the
    graph's private pool, which the graph keeps alive).
    """

    input_layout = Layout.STANDARD
    dtypes = (torch.bfloat16,)
    supports_cuda_graphs = True

    def check_device(self, ctx: LayerContext) -> Check:
        device = ctx.device
        if device.type != "cuda" or not torch.cuda.is_available():
            return Check.failed(
                "device",
                f"torch._grouped_mm's no-sync bf16 kernel needs a CUDA GPU of SM90 or SM100, not {device.type}",
            )
        major, minor = torch.cuda.get_device_capability(device)
        if major not in FAST_ARCH_MAJORS:
            return Check.failed(
                "device",
                f"torch._grouped_mm runs its grouped kernel on SM90/SM100 only; on SM{major}{minor} it falls back "
                "to a per-group loop that syncs with the host",
            )
        return Check.passed("device", f"SM{major}{minor}")

    def check_torch(self, ctx: LayerContext) -> Check:
        if not hasattr(torch, "_grouped_mm"):
            return Check.failed("grouped_mm", f"torch {torch.__version__} has no torch._grouped_mm (needs >= 2.8)")
        groups = ctx.placement.num_local_experts
        if groups > MAX_GROUPS:
            return Check.failed("grouped_mm", f"torch._grouped_mm takes at most {MAX_GROUPS} groups, got {groups}")
        return Check.passed("grouped_mm", f"torch {torch.__version__}")

    def checks(self, ctx: LayerContext) -> list[Check]:
        # permute, SiLU-and-mul and gather are the Triton kernels of moe_kernels.kernels
        return [*super().checks(ctx), self.check_torch(ctx), triton_check(ctx.device)._replace(name="triton")]

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 12.0, "torch._grouped_mm: parity with DeepGEMM on prefill GEMMs, 5-8 % slower on decode (H100)"

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        moe = ctx.cfg.moe
        rows = num_rows * moe.top_k
        if rows == 0:
            return {}
        return {
            "permuted": WorkspaceSpec((rows, moe.hidden_size), moe.dtype),
            "activation": WorkspaceSpec((rows, moe.intermediate_size), moe.dtype),
        }

    def apply(
        self,
        tokens: StandardTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import contiguous_layout, scatter_rows, silu_and_mul

        if tokens.topk_ids.numel() == 0:
            return
        # alignment 1: _grouped_mm needs no padding, so R = T*K exactly; rows past the last
        # segment (slots with id -1) belong to no group and are marked -1 in grouped_layout.
        layout = contiguous_layout(tokens.topk_ids, weights.num_experts, 1)
        rows, act = workspace["permuted"], workspace["activation"]
        scatter_rows(tokens.x, layout.dst_row, rows)
        gate_up = torch._grouped_mm(rows, weights.w13.transpose(-2, -1), offs=layout.segment_ends)
        silu_and_mul(gate_up, act, grouped_layout=layout.grouped_layout)
        expert_rows = torch._grouped_mm(act, weights.w2.transpose(-2, -1), offs=layout.segment_ends)
        write_output(expert_rows, layout.dst_row, tokens, out)
