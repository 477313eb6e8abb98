"""Expert MLPs on ``torch._grouped_mm`` (PyTorch's CUTLASS grouped GEMM): the fast path on
Hopper/Blackwell GPUs without DeepGEMM. Its constraints are :mod:`moe_kernels.backends.grouped_mm`.
:class:`DequantizedGroupedMMExperts` runs 4-bit layers on it through a bf16 copy made per call.
"""

from __future__ import annotations

import torch

from moe_kernels.backends import grouped_mm
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
from moe_kernels.experts.fused_triton import DECODE_ROWS_PER_EXPERT, rows_per_local_expert
from moe_kernels.mlp.formats import PACKED_FORMATS, Dense, Packed4Bit
from moe_kernels.mlp.weights import ExpertWeights


class GroupedMMExperts(PermuteExpertsUnpermute):
    """STANDARD in, ``[T, H]`` out (weighted and reduced), on ``torch._grouped_mm``.

    Triton permute (histogram, scatter ``x`` into expert-sorted rows, no padding) ->
    ``_grouped_mm(rows [R, H], w13^T [E, H, 2I], offs=segment_ends)`` -> Triton activation
    (rows past the last segment skipped) -> ``_grouped_mm(act [R, I], w2^T [E, I, H])`` ->
    weighted gather into ``out [T, H]``. ``R = T * K`` (host-known), so no host sync; the
    GEMM outputs come from PyTorch's caching allocator (under CUDA-graph capture, from the
    graph's private pool, which the graph keeps alive).
    """

    input_layout = Layout.STANDARD
    dtypes = (torch.bfloat16,)
    supports_cuda_graphs = True
    expert_biases = True

    def check_device(self, ctx: LayerContext) -> Check:
        return grouped_mm.device_check(ctx.device)

    def checks(self, ctx: LayerContext) -> list[Check]:
        # permute, activation and gather are the Triton kernels of moe_kernels.kernels
        return [
            *super().checks(ctx),
            grouped_mm.grouped_mm_check(ctx.placement.num_local_experts),
            triton_check(ctx.device, name="triton"),
        ]

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 12.0, "torch._grouped_mm: parity with DeepGEMM on prefill GEMMs, 5-8 % slower on decode (H100)"

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        mlp, rows = ctx.mlp, num_rows * ctx.cfg.moe.top_k
        return {
            "permuted": WorkspaceSpec((rows, mlp.hidden), mlp.dtype),
            "activation": WorkspaceSpec((rows, mlp.inter), mlp.dtype),
        }

    def apply(
        self,
        tokens: StandardTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import activate, contiguous_layout, scatter_rows

        # alignment 1: _grouped_mm needs no padding, so R = T*K exactly; rows past the last
        # segment (slots with id -1) belong to no group and are marked -1 in grouped_layout.
        layout = contiguous_layout(tokens.topk_ids, weights.num_experts, 1)
        rows, act = workspace["permuted"], workspace["activation"]
        scatter_rows(tokens.x, layout.dst_row, rows)
        gate_up = torch._grouped_mm(rows, weights.w13.transpose(-2, -1), offs=layout.segment_ends)
        _add_bias(gate_up, weights.w13_bias, layout.grouped_layout)
        activate(gate_up, act, activation=self.ctx.mlp.activation, grouped_layout=layout.grouped_layout)
        expert_rows = torch._grouped_mm(act, weights.w2.transpose(-2, -1), offs=layout.segment_ends)
        _add_bias(expert_rows, weights.w2_bias, layout.grouped_layout)
        write_output(expert_rows, layout.dst_row, tokens, out)


def _add_bias(rows: torch.Tensor, bias: torch.Tensor | None, grouped_layout: torch.Tensor) -> None:
    """``rows[r] += bias[grouped_layout[r]]`` (``rows [R, N]``, ``bias [E, N]``): ``_grouped_mm`` has
    no bias epilogue, so expert biases cost one gather-add per GEMM here. Rows of no expert (``-1``)
    take expert 0's bias; nothing reads them."""
    if bias is not None:
        rows += bias.index_select(0, grouped_layout.clamp(min=0))


class DequantizedGroupedMMExperts(GroupedMMExperts):
    """:class:`GroupedMMExperts` for 4-bit weights (int4, mxfp4): each call first dequantizes the
    local experts' packed weights into bf16 workspaces ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (one
    pass: the packed bytes read, the bf16 weights written), then runs the bf16 grouped GEMMs.

    The pass costs about what reading bf16 weights costs, so it pays only where the GEMMs are
    bound by compute (prefill): the fused Triton path dequantizes in its loads and leads at decode.
    The workspaces hold a bf16 copy of the rank's experts (a workspace cache shares them between
    layers); the selector measures both and picks per batch size.
    """

    weight_formats = PACKED_FORMATS

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        rows = rows_per_local_expert(ctx)
        # H100 (docs/performance.md, ninth session): 1.7-1.8x the fused path at DeepSeek-V3
        # EP8-local T = 4096, level at Qwen3-30B-A3B; at 64 rows per expert the pass costs 1.8x
        if rows <= DECODE_ROWS_PER_EXPERT:
            return 40.0, f"a bf16 copy per call costs more than it saves at {rows:.0f} rows per expert"
        return 20.0, f"4-bit weights dequantized to bf16 per call, then torch._grouped_mm ({rows:.0f} rows per expert)"

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        mlp, experts = ctx.mlp, ctx.placement.num_local_experts
        return {
            **super().workspace_specs(ctx, num_rows),
            "w13": WorkspaceSpec((experts, *mlp.w13_shape), mlp.dtype),
            "w2": WorkspaceSpec((experts, *mlp.w2_shape), mlp.dtype),
        }

    def apply(  # type: ignore[override]  # STANDARD only, as the class it extends
        self,
        tokens: StandardTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import PackedWeight, dequantize_packed

        fmt = weights.weight_format
        assert isinstance(fmt, Packed4Bit)  # weight_formats: the composer refused the others
        assert weights.w13_scale is not None and weights.w2_scale is not None
        w13, w2 = workspace["w13"], workspace["w2"]
        dequantize_packed(weights.w13, weights.w13_scale, PackedWeight(fmt.packing, fmt.group, weights.w13_zero), w13)
        dequantize_packed(weights.w2, weights.w2_scale, PackedWeight(fmt.packing, fmt.group, weights.w2_zero), w2)
        dense = ExpertWeights(w13, w2, format=Dense(), w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)
        super().apply(tokens, dense, out, workspace)
