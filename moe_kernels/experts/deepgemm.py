"""Expert MLPs on DeepGEMM's grouped GEMMs (Hopper SM90, Blackwell SM100), bf16 or fp8.

Three layouts, one class each, all without host synchronisation. The weights' format picks the
GEMM: bf16 weights run ``m_grouped_bf16_gemm_nt_*``; fp8 weights with 128 x 128 block scales
(``quant.scheme: fp8_w8a8_block``) run ``m_grouped_fp8_gemm_nt_*`` on activations quantized per
token and 128 columns (the quantization fused into the scatter and into the activation, so a
bf16 copy of a GEMM input never exists).

* :class:`DeepGemmExperts` (STANDARD ``x [T, H]`` + top-k ids): Triton permute into DeepGEMM's
  contiguous layout (expert segments aligned to its contiguous-layout alignment, padding rows
  marked ``-1``), GEMM1, activation, GEMM2, weighted gather back to ``[T, H]``.
* :class:`MaskedDeepGemmExperts` (MASKED ``[E, M, H]`` + counts): two masked GEMMs; raw rows out
  (finalize weights them).
* :class:`ExpandedDeepGemmExperts` (EXPANDED: DeepEP's expanded dispatch output): the contiguous
  GEMM with ``use_psum_layout=True`` reads the dispatched rows in place; each row is scaled by
  its router weight, rows outside every expert segment are written as zeros.

Probing, constraints and the GEMM calls are :mod:`moe_kernels.backends.deep_gemm`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from moe_kernels.backends import deep_gemm
from moe_kernels.backends.triton import triton_check
from moe_kernels.core.contract import (
    Check,
    ExpandedTokens,
    LayerContext,
    Layout,
    MaskedTokens,
    PermuteExpertsUnpermute,
    StandardTokens,
    TokenFormat,
    Workspace,
    WorkspaceSpec,
)
from moe_kernels.experts.common import (
    check_token_quant,
    contiguous_workspace,
    gemm_input,
    gemm_input_specs,
    masked_workspace,
    run_contiguous,
    run_masked,
)
from moe_kernels.mlp.formats import Dense, Fp8Block
from moe_kernels.mlp.weights import ExpertWeights


def quantized(ctx: LayerContext) -> bool:
    """Whether the layer's GEMMs take fp8 operands."""
    return ctx.mlp.act_quant is not None


class DeepGemmPart(PermuteExpertsUnpermute):
    """What every DeepGEMM experts class shares: bf16 activations, bf16 or fp8 block-scaled
    weights, SM90/SM100 (fp8: SM90), deep_gemm importable, K % 64 == 0, Triton for the glue
    around the GEMMs, no host sync (capturable in CUDA graphs)."""

    dtypes = (torch.bfloat16,)
    weight_formats = (Dense, Fp8Block)
    supports_cuda_graphs = True

    def check_device(self, ctx: LayerContext) -> Check:
        return deep_gemm.device_check(ctx.device, fp8=quantized(ctx))

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [
            *super().checks(ctx),
            deep_gemm.library_check(fp8=quantized(ctx)),
            deep_gemm.k_multiple_check(ctx.mlp.hidden, ctx.mlp.inter),
            # permute, activation and gather are the Triton kernels of moe_kernels.kernels
            triton_check(ctx.device, name="triton"),
        ]

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        if quantized(ctx):
            return 10.0, "DeepGEMM fp8 grouped GEMMs: half the weight bytes of bf16, fp8 tensor cores"
        return 10.0, "DeepGEMM grouped GEMMs (at parity with torch._grouped_mm on prefill, at the HBM limit masked)"


def deep_gemm_masked(expected_m: int) -> functools.partial[None]:
    """DeepGEMM's masked GEMM as a :data:`~moe_kernels.experts.common.GroupedGemm`."""
    return functools.partial(deep_gemm.masked, expected_m=expected_m)


class DeepGemmExperts(DeepGemmPart):
    """STANDARD in, ``[T, H]`` out (weighted and reduced), on DeepGEMM's contiguous layout.

    permute (Triton: histogram, aligned segment starts, scatter ``x`` into ``[R, H]``, quantized
    when fp8) -> GEMM1 ``[R, H] x [E, 2I, H]`` -> activation ``[R, I]`` -> GEMM2 ``[R, I] x
    [E, H, I]`` -> weighted gather into ``out [T, H]`` (fp32 accumulation, fixed top-k order).

    ``R = contiguous_rows_bound(T*K, E, alignment)`` is computed on the host from T alone, so no
    value is read back from the GPU; tiles past the real rows are marked ``-1`` and skipped by
    DeepGEMM. Shapes depend only on T, so a CUDA graph per batch size captures it.
    """

    input_layout = Layout.STANDARD

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        e = ctx.placement.num_local_experts
        return contiguous_workspace(ctx.mlp, num_rows, ctx.cfg.moe.top_k, e, deep_gemm.alignment() or 1)

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        alignment = deep_gemm.alignment() or 1
        run_contiguous(tokens, weights, out, workspace, self.ctx.mlp, alignment, deep_gemm.contiguous)


class MaskedDeepGemmExperts(DeepGemmPart):
    """MASKED in and out: ``x [E, M, H]`` (fp8: with ``x_scale [E, M, H/128]``) with ``counts
    [E]`` int32 valid rows per expert -> raw rows ``[E, M, H]`` (finalize weights and sums).
    Rows past ``counts[e]`` are not computed. Static shapes, no host sync: capturable."""

    input_layout = Layout.MASKED

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        # M a multiple of the masked GEMM's largest row tile (its TMA store writes whole tiles)
        return TokenFormat(Layout.MASKED, alignment=deep_gemm.masked_rows_multiple(), act_quant=ctx.mlp.act_quant)

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        return masked_workspace(ctx.mlp, ctx.placement.num_local_experts, num_rows)

    def apply(self, tokens: MaskedTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        mlp = self.ctx.mlp
        check_token_quant(self.name, tokens, mlp)
        gemm = deep_gemm_masked(tokens.expected_m)
        run_masked(tokens.x, tokens.x_scale, tokens.counts, weights, out, workspace, mlp, gemm)


class ExpandedDeepGemmExperts(DeepGemmPart):
    """EXPANDED in and out: ``x [R, H]`` laid out by DeepEP's expanded dispatch (fp8 dispatch:
    float8_e4m3fn with ``x_scale [R, H/128]``) -> ``out [R, H]``.

    Expert e owns rows ``[align_up(expert_ends[e-1], alignment), expert_ends[e])`` -- exactly
    DeepGEMM's psum layout, so both GEMMs read the dispatched rows in place
    (``use_psum_layout=True``, ``grouped_layout = expert_ends``, ``expected_m_for_psum_layout =
    expected_m``); fp8 scales are taken as they come (token-major with a column stride that is a
    multiple of 4 is what DeepGEMM's SM90 kernels read without a transpose: DeepEP's
    ``use_tma_aligned_col_major_sf=True``, :mod:`moe_kernels.mlp.act_quant`). The activation
    (quantized for GEMM2 when fp8) runs on valid rows only. The last step writes every row of
    ``out``: valid rows scaled by ``row_weights`` (DeepEP's combine sums without weights), all
    other rows (segment padding, rows past the last expert) as zeros, so a combine that summed
    them would add nothing. No host sync: capturable in a CUDA graph. Its format asks the
    dispatcher for DeepGEMM's contiguous alignment.
    """

    input_layout = Layout.EXPANDED

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        return TokenFormat(Layout.EXPANDED, alignment=deep_gemm.alignment() or 1, act_quant=ctx.mlp.act_quant)

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [*super().checks(ctx), *deep_gemm.psum_layout_checks(fp8=quantized(ctx))]

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        mlp = ctx.mlp
        specs = {"gate_up": WorkspaceSpec((num_rows, mlp.activation.gemm1_rows(mlp.inter)), mlp.dtype)}
        specs |= gemm_input_specs("activation", (num_rows,), mlp.inter, mlp)
        return specs | {"expert_rows": WorkspaceSpec((num_rows, mlp.hidden), mlp.dtype)}

    def apply(self, tokens: ExpandedTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        from moe_kernels.kernels import activate

        mlp = self.ctx.mlp
        check_token_quant(self.name, tokens, mlp)
        row_expert, dst_row, expected_m = psum_rows(tokens)
        ends = tokens.expert_ends
        gate_up, rows = workspace["gate_up"], workspace["expert_rows"]
        act, act_scale = gemm_input(workspace, "activation")
        group = mlp.act_quant.group if mlp.act_quant is not None else 1
        w13, w2 = (weights.w13, weights.w13_scale), (weights.w2, weights.w2_scale)
        deep_gemm.contiguous((tokens.x, tokens.x_scale), w13, gate_up, ends, psum_expected_m=expected_m)
        # rows outside every segment are skipped: their activation keeps stale values, which
        # GEMM2 may compute from but the last step never reads
        activate(gate_up, act, activation=mlp.activation, scale_out=act_scale, group=group, grouped_layout=row_expert)
        deep_gemm.contiguous((act, act_scale), w2, rows, ends, psum_expected_m=expected_m)
        write_expanded_output(rows, dst_row, tokens, out)


def psum_rows(tokens: ExpandedTokens) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check that ``tokens`` (``num_rows > 0``) are in DeepGEMM's psum layout and map their rows:
    ``(row_expert [R] int32, dst_row [R, 1] int64, expected_m)`` (see :func:`expanded_row_map`;
    ``expected_m`` clamped to >= 1 for ``expected_m_for_psum_layout``). Raises ``ValueError`` when
    the tokens' alignment is not DeepGEMM's and ``TypeError`` when ``expert_ends`` is not
    contiguous int32."""
    alignment = deep_gemm.alignment()
    if tokens.alignment != alignment:
        raise ValueError(
            f"expanded tokens are aligned to {tokens.alignment} rows but DeepGEMM's contiguous "
            f"layout uses {alignment}: dispatch with expert_alignment={alignment}"
        )
    ends = tokens.expert_ends
    if ends.dtype != torch.int32 or not ends.is_contiguous():
        raise TypeError(f"expert_ends must be contiguous int32, got {ends.dtype}")
    row_expert, dst_row = expanded_row_map(ends, tokens.num_rows, alignment)
    return row_expert, dst_row, max(1, int(tokens.expected_m))


def write_expanded_output(rows: torch.Tensor, dst_row: torch.Tensor, tokens: ExpandedTokens, out: torch.Tensor) -> None:
    """The EXPANDED experts' last step: ``out[r] = row_weights[r] * rows[r]`` for the rows
    ``dst_row`` maps to themselves, zeros where it is ``-1`` (segment padding, rows past the last
    expert), so a combine that summed those rows would add nothing. Every row of ``out`` is
    written; ``rows [R, H]`` bf16 may hold garbage outside the segments."""
    from moe_kernels.kernels import weighted_gather

    weighted_gather(rows, dst_row, tokens.row_weights.reshape(tokens.num_rows, 1), out)


def expanded_row_map(expert_ends: torch.Tensor, num_rows: int, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the psum layout of ``expert_ends [E]`` (int32 inclusive prefix sums) over ``num_rows``
    rows: ``row_expert [R]`` int32 (each row's expert, ``-1`` outside every segment) and
    ``dst_row [R, 1]`` int64 (``r`` for valid rows, ``-1`` otherwise). A few small torch ops on
    the device; no host sync."""
    device = expert_ends.device
    num_experts = expert_ends.shape[0]
    ends = expert_ends.to(torch.int64)
    starts = torch.zeros_like(ends)
    starts[1:] = (ends[:-1] + alignment - 1) // alignment * alignment
    r = torch.arange(num_rows, dtype=torch.int64, device=device)
    # first expert whose end lies past r: empty experts (end == previous end) are never chosen
    expert = torch.searchsorted(ends, r, right=True)
    clamped = expert.clamp(max=num_experts - 1)
    valid = (expert < num_experts) & (r >= starts[clamped])
    row_expert = torch.where(valid, clamped, -1).to(torch.int32)
    dst_row = torch.where(valid, r, -1).view(num_rows, 1)
    return row_expert, dst_row
