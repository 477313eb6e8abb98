"""Expert MLPs on the Triton grouped GEMM (any CUDA GPU; the CPU under TRITON_INTERPRET=1).

GEMM1 and SiLU-and-mul are one kernel (the ``[rows, 2I]`` intermediate never reaches memory),
so each layout needs two GEMM launches.
"""

from __future__ import annotations

import torch

from moe_kernels.config import LayerConfig
from moe_kernels.contract import (
    ActivationFormat,
    BatchedTokens,
    Check,
    PermuteExpertsUnpermute,
    StandardTokens,
    WorkspaceSpec,
)
from moe_kernels.experts.tuning import experts_preference
from moe_kernels.platform import triton_check, triton_interpreting


class _TritonPart(PermuteExpertsUnpermute):
    def check_device(self, device: torch.device) -> Check:
        return triton_check(device)

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        if device.type == "cpu" and triton_interpreting():
            return 500.0, "Triton under the CPU interpreter: correct but slow"
        if self.input_format is ActivationFormat.STANDARD:
            # ranked from the same H100 table as DeepGEMM and torch._grouped_mm where the shape
            # was measured (docs/experts.md)
            return experts_preference("TritonExperts", cfg, device)
        return 50.0, "Triton masked grouped GEMM with fused SiLU-and-mul (portable fallback)"


class TritonExperts(_TritonPart):
    """STANDARD in, ``[T, H]`` out (weighted, reduced).

    scatter ``x`` into expert-contiguous segments (aligned to the GEMM's row tile) ->
    GEMM1 + SiLU-and-mul -> GEMM2 -> weighted gather. Sizes come from a host bound on the
    layout rows (``T*K + min(E, T*K) * (align - 1)``), so nothing syncs with the host; the
    padding rows are skipped by the GEMMs and never read by the gather. Shapes depend only
    on T, so it can be captured in a CUDA graph per batch size.
    """

    input_format = ActivationFormat.STANDARD
    supports_cuda_graphs = True

    def workspace_shapes(self, tokens: StandardTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        from moe_kernels.kernels import contiguous_alignment, contiguous_rows_bound

        rows = contiguous_rows_bound(tokens.topk_ids.numel(), w13.shape[0], contiguous_alignment())
        hidden, inter = w2.shape[1], w2.shape[2]
        return {
            "permuted": WorkspaceSpec((rows, hidden), tokens.x.dtype),
            "activation": WorkspaceSpec((rows, inter), tokens.x.dtype),
            "expert_rows": WorkspaceSpec((rows, hidden), tokens.x.dtype),
        }

    def apply(
        self,
        tokens: StandardTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import (
            contiguous_alignment,
            contiguous_layout,
            grouped_gemm_contiguous,
            scatter_rows,
            weighted_gather,
        )

        if tokens.x.shape[0] == 0:
            return
        align = contiguous_alignment()
        layout = contiguous_layout(tokens.topk_ids, w13.shape[0], align)
        permuted, act, rows = workspace["permuted"], workspace["activation"], workspace["expert_rows"]
        scatter_rows(tokens.x, layout.dst_row, permuted)
        grouped_gemm_contiguous(permuted, w13, layout.grouped_layout, act, fuse_silu_and_mul=True, alignment=align)
        grouped_gemm_contiguous(act, w2, layout.grouped_layout, rows, alignment=align)
        weighted_gather(rows, layout.dst_row, tokens.topk_weights, out)


class BatchedTritonExperts(_TritonPart):
    """BATCHED in and out: ``[E, M, H]`` with ``expert_num_tokens [E]``; rows past an
    expert's count are neither computed nor written. Fixed shapes, no host sync: capturable
    in CUDA graphs."""

    input_format = ActivationFormat.BATCHED
    supports_cuda_graphs = True

    def workspace_shapes(self, tokens: BatchedTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        e, m, _ = tokens.x.shape
        return {"activation": WorkspaceSpec((e, m, w2.shape[2]), tokens.x.dtype)}

    def apply(
        self,
        tokens: BatchedTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import grouped_gemm_masked

        if tokens.x.shape[1] == 0:
            return
        act = workspace["activation"]
        grouped_gemm_masked(tokens.x, w13, tokens.expert_num_tokens, act, fuse_silu_and_mul=True)
        grouped_gemm_masked(act, w2, tokens.expert_num_tokens, out)
