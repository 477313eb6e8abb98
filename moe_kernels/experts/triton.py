"""Expert MLPs on the Triton grouped GEMM (any CUDA GPU; the CPU under TRITON_INTERPRET=1).

GEMM1 and SiLU-and-mul are one kernel (the ``[rows, 2I]`` intermediate never reaches memory),
so each layout needs two GEMM launches.
"""

from __future__ import annotations

import torch

from moe_kernels.backends.triton import triton_check, triton_interpreting
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Layout,
    MaskedTokens,
    PermuteExpertsUnpermute,
    StandardTokens,
    WorkspaceSpec,
)
from moe_kernels.experts.common import write_output
from moe_kernels.mlp.weights import ExpertWeights


class _TritonPart(PermuteExpertsUnpermute):
    supports_cuda_graphs = True

    def check_device(self, ctx: LayerContext) -> Check:
        return triton_check(ctx.device)

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        if ctx.device.type == "cpu" and triton_interpreting():
            return 500.0, "Triton under the CPU interpreter: correct but slow"
        return 50.0, "Triton grouped GEMM with fused SiLU-and-mul (portable fallback)"


class TritonExperts(_TritonPart):
    """STANDARD in, ``[T, H]`` out (weighted, reduced).

    scatter ``x`` into expert-contiguous segments (aligned to the GEMM's row tile) ->
    GEMM1 + SiLU-and-mul -> GEMM2 -> weighted gather. Sizes come from a host bound on the
    layout rows (``T*K + min(E, T*K) * (align - 1)``), so nothing syncs with the host; the
    padding rows are skipped by the GEMMs and never read by the gather. Shapes depend only
    on T, so it can be captured in a CUDA graph per batch size.
    """

    input_layout = Layout.STANDARD

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        from moe_kernels.kernels import contiguous_rows_bound
        from moe_kernels.kernels.grouped_gemm import BLOCK_M

        moe = ctx.cfg.moe
        rows = contiguous_rows_bound(num_rows * moe.top_k, ctx.placement.num_local_experts, BLOCK_M)
        return {
            "permuted": WorkspaceSpec((rows, moe.hidden_size), moe.dtype),
            "activation": WorkspaceSpec((rows, moe.intermediate_size), moe.dtype),
            "expert_rows": WorkspaceSpec((rows, moe.hidden_size), moe.dtype),
        }

    def apply(
        self,
        tokens: StandardTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import contiguous_layout, grouped_gemm_contiguous, scatter_rows
        from moe_kernels.kernels.grouped_gemm import BLOCK_M

        if tokens.num_rows == 0:
            return
        layout = contiguous_layout(tokens.topk_ids, weights.num_experts, BLOCK_M)
        permuted, act, rows = workspace["permuted"], workspace["activation"], workspace["expert_rows"]
        scatter_rows(tokens.x, layout.dst_row, permuted)
        grouped_gemm_contiguous(
            permuted, weights.w13, layout.grouped_layout, act, fuse_silu_and_mul=True, alignment=BLOCK_M
        )
        grouped_gemm_contiguous(act, weights.w2, layout.grouped_layout, rows, alignment=BLOCK_M)
        write_output(rows, layout.dst_row, tokens, out)


class MaskedTritonExperts(_TritonPart):
    """MASKED in and out: ``[E, M, H]`` with ``counts [E]``; rows past an expert's count are
    neither computed nor written. Fixed shapes, no host sync: capturable in CUDA graphs."""

    input_layout = Layout.MASKED

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        moe = ctx.cfg.moe
        shape = (ctx.placement.num_local_experts, num_rows, moe.intermediate_size)
        return {"activation": WorkspaceSpec(shape, moe.dtype)}

    def apply(
        self,
        tokens: MaskedTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import grouped_gemm_masked

        if tokens.num_rows == 0:
            return
        act = workspace["activation"]
        grouped_gemm_masked(tokens.x, weights.w13, tokens.counts, act, fuse_silu_and_mul=True)
        grouped_gemm_masked(act, weights.w2, tokens.counts, out)
