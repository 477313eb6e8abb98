"""FP8 block-scaled expert MLPs (``quant.scheme: fp8_w8a8_block``): w8a8 with 128 x 128 weight
blocks and 1 x 128 activation groups, fp32 accumulation, bf16 out -- DeepSeek-V3's format.

* :class:`Fp8DeepGemmExperts` (STANDARD, prefill): the contiguous layout, ``x`` quantized while
  it is scattered (one kernel), ``m_grouped_fp8_gemm_nt_contiguous`` x 2 with a fused
  SiLU-and-mul-and-quantize between, weighted gather.
* :class:`Fp8MaskedDeepGemmExperts` (MASKED, decode, CUDA-graph capturable): the prepare/finalize
  hands fp8 ``[E, M, H]`` rows and their scales; ``m_grouped_fp8_gemm_nt_masked`` x 2.
* :class:`Fp8ExpandedDeepGemmExperts` (EXPANDED, DeepEP's fp8 dispatch): the dispatched fp8 rows
  and scales read in place by ``m_grouped_fp8_gemm_nt_contiguous(..., use_psum_layout=True)`` x 2,
  each row scaled by its router weight.
* :class:`Fp8HybridDeepGemmExperts` (STANDARD): masked below a token threshold, contiguous above.
* :class:`Fp8TritonExperts` (STANDARD): the same contiguous pipeline on the Triton block-scaled
  fp8 grouped GEMM, for GPUs without DeepGEMM.

Activation scales live in the layout DeepGEMM's SM90 kernels read as they are
(:mod:`moe_kernels.mlp.scales`). SM100 DeepGEMM keeps only the exponent of
fp32 scales (it wants UE8M0, powers of two): checkpoint scales are not, so these DeepGEMM
classes claim SM90 only.
"""

from __future__ import annotations

import torch

from moe_kernels.backends.triton import triton_check
from moe_kernels.config import FP8_ACT_GROUP as GROUP
from moe_kernels.core.contract import (
    Check,
    ExpandedTokens,
    LayerContext,
    Layout,
    MaskedTokens,
    PermuteExpertsUnpermute,
    StandardTokens,
    TokenFormat,
    WorkspaceSpec,
    largest_specs,
)
from moe_kernels.experts.common import write_output
from moe_kernels.experts.deepgemm import (
    _deep_gemm,
    align_up,
    deep_gemm_alignment,
    deep_gemm_part_checks,
    deep_gemm_status,
    masked_rows_multiple,
    psum_layout_checks,
    psum_rows,
    write_expanded_output,
)
from moe_kernels.mlp.scales import masked_scale_spec, scale_spec, scale_view
from moe_kernels.mlp.weights import FP8_DTYPE, ExpertWeights

#: DeepGEMM's fp8 grouped entry points
FP8_SYMBOLS = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked")


def fp8_deep_gemm_check() -> Check:
    ok, why = deep_gemm_status()
    if not ok:
        return Check.failed("deep_gemm", why)
    missing = [s for s in FP8_SYMBOLS if not hasattr(_deep_gemm(), s)]
    if missing:
        return Check.failed("deep_gemm", f"{why}, but without the fp8 grouped GEMMs {missing}")
    return Check.passed("deep_gemm", f"{why}, fp8 grouped GEMMs")


class _Fp8Part(PermuteExpertsUnpermute):
    dtypes = (torch.bfloat16,)
    quant_schemes = ("fp8_w8a8_block",)
    supports_cuda_graphs = True

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        return TokenFormat(self.input_layout, fp8=True)


class _Fp8DeepGemmPart(_Fp8Part):
    def check_device(self, ctx: LayerContext) -> Check:
        device = ctx.device
        if device.type != "cuda" or not torch.cuda.is_available():
            return Check.failed("device", f"DeepGEMM's fp8 GEMMs need an SM90 GPU, not {device.type}")
        major, minor = torch.cuda.get_device_capability(device)
        if major != 9:
            return Check.failed(
                "device",
                f"fp32 block scales are for SM90 (SM100 DeepGEMM wants UE8M0 scales, not implemented); "
                f"this GPU is SM{major}{minor}",
            )
        return Check.passed("device", f"SM{major}{minor}")

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [*super().checks(ctx), *deep_gemm_part_checks(ctx, fp8_deep_gemm_check())]

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 10.0, "DeepGEMM fp8 grouped GEMMs: half the weight bytes of bf16, fp8 tensor cores"


# --- the pipelines ----------------------------------------------------------------------------


def contiguous_fp8_workspace(ctx: LayerContext, num_tokens: int, alignment: int) -> dict[str, WorkspaceSpec]:
    from moe_kernels.kernels import contiguous_rows_bound

    if num_tokens == 0:
        return {}
    moe = ctx.cfg.moe
    h, i = moe.hidden_size, moe.intermediate_size
    rows = contiguous_rows_bound(num_tokens * moe.top_k, ctx.placement.num_local_experts, alignment)
    return {
        "permuted_q": WorkspaceSpec((rows, h), FP8_DTYPE),
        "permuted_scale": scale_spec(rows, h),
        "gate_up": WorkspaceSpec((rows, 2 * i), torch.bfloat16),
        "activation_q": WorkspaceSpec((rows, i), FP8_DTYPE),
        "activation_scale": scale_spec(rows, i),
        "expert_rows": WorkspaceSpec((rows, h), torch.bfloat16),
    }


def apply_contiguous_fp8(
    tokens: StandardTokens,
    weights: ExpertWeights,
    out: torch.Tensor,
    workspace: dict[str, torch.Tensor],
    alignment: int,
    gemm: str,
) -> None:
    """STANDARD bf16 tokens through the contiguous fp8 pipeline into ``out [T, H]`` (weighted,
    reduced). ``gemm``: ``"deep_gemm"`` or ``"triton"``."""
    from moe_kernels.kernels import contiguous_layout
    from moe_kernels.kernels.quant import (
        grouped_gemm_fp8_contiguous,
        scatter_rows_quant_fp8,
        silu_and_mul_quant_fp8,
    )

    layout = contiguous_layout(tokens.topk_ids, weights.num_experts, alignment)
    q, sq = workspace["permuted_q"], scale_view(workspace["permuted_scale"])
    gate_up, rows = workspace["gate_up"], workspace["expert_rows"]
    aq, sa = workspace["activation_q"], scale_view(workspace["activation_scale"])
    # padding rows keep stale values and scales: their tiles are computed (or skipped) but the
    # gather reads only rows named by dst_row
    scatter_rows_quant_fp8(tokens.x, layout.dst_row, q, sq, group=GROUP)
    if gemm == "deep_gemm":
        dg = _deep_gemm()
        dg.m_grouped_fp8_gemm_nt_contiguous((q, sq), (weights.w13, weights.w13_scale), gate_up, layout.grouped_layout)
    else:
        grouped_gemm_fp8_contiguous(
            q, sq, weights.w13, weights.w13_scale, layout.grouped_layout, gate_up, alignment=alignment
        )
    silu_and_mul_quant_fp8(gate_up, aq, sa, group=GROUP, grouped_layout=layout.grouped_layout)
    if gemm == "deep_gemm":
        dg.m_grouped_fp8_gemm_nt_contiguous((aq, sa), (weights.w2, weights.w2_scale), rows, layout.grouped_layout)
    else:
        grouped_gemm_fp8_contiguous(
            aq, sa, weights.w2, weights.w2_scale, layout.grouped_layout, rows, alignment=alignment
        )
    write_output(rows, layout.dst_row, tokens, out)


def masked_fp8_workspace(ctx: LayerContext, rows_per_expert: int, *, with_rows: bool) -> dict[str, WorkspaceSpec]:
    moe, e = ctx.cfg.moe, ctx.placement.num_local_experts
    h, i, m = moe.hidden_size, moe.intermediate_size, rows_per_expert
    specs = {
        "gate_up": WorkspaceSpec((e, m, 2 * i), torch.bfloat16),
        "activation_q": WorkspaceSpec((e, m, i), FP8_DTYPE),
        "activation_scale": masked_scale_spec(e, m, i),
    }
    if with_rows:
        specs["masked_q"] = WorkspaceSpec((e, m, h), FP8_DTYPE)
        specs["masked_scale"] = masked_scale_spec(e, m, h)
        specs["masked_rows"] = WorkspaceSpec((e, m, h), torch.bfloat16)
    return specs


def masked_fp8_mlp(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weights: ExpertWeights,
    counts: torch.Tensor,
    expected_m: int,
    workspace: dict[str, torch.Tensor],
    out: torch.Tensor,
) -> None:
    """``out[e, :counts[e]] = w2[e] @ silu_and_mul(w13[e] @ x[e, :counts[e]])`` on fp8 rows
    ``x_q [E, M, H]`` with scales ``[E, M, H/128]`` (token-major); ``out [E, M, H]`` bf16."""
    from moe_kernels.kernels.quant import silu_and_mul_quant_fp8

    m = x_q.shape[1]
    expected_m = max(1, min(int(expected_m), m))
    gate_up = workspace["gate_up"]
    aq, sa = workspace["activation_q"], scale_view(workspace["activation_scale"])
    dg = _deep_gemm()
    dg.m_grouped_fp8_gemm_nt_masked((x_q, x_scale), (weights.w13, weights.w13_scale), gate_up, counts, expected_m)
    silu_and_mul_quant_fp8(gate_up, aq, sa, group=GROUP, counts=counts)
    dg.m_grouped_fp8_gemm_nt_masked((aq, sa), (weights.w2, weights.w2_scale), out, counts, expected_m)


# --- the classes ------------------------------------------------------------------------------


class Fp8DeepGemmExperts(_Fp8DeepGemmPart):
    """STANDARD in (bf16 ``x [T, H]``), ``[T, H]`` out: scatter + quantize (one kernel) into the
    contiguous layout, DeepGEMM fp8 GEMM1, SiLU-and-mul + quantize, DeepGEMM fp8 GEMM2, weighted
    gather. Host-side sizes only: capturable per batch size."""

    input_layout = Layout.STANDARD

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        return contiguous_fp8_workspace(ctx, num_rows, deep_gemm_alignment() or 1)

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: torch.Tensor, workspace: dict) -> None:
        if tokens.num_rows == 0:
            return
        apply_contiguous_fp8(tokens, weights, out, workspace, deep_gemm_alignment() or 1, "deep_gemm")


class Fp8MaskedDeepGemmExperts(_Fp8DeepGemmPart):
    """MASKED in and out: fp8 ``x [E, M, H]`` with ``x_scale [E, M, H/128]`` and ``counts [E]``
    -> raw bf16 rows ``[E, M, H]`` (finalize weights and sums). Static shapes, no host sync."""

    input_layout = Layout.MASKED

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        return TokenFormat(Layout.MASKED, alignment=masked_rows_multiple(), fp8=True)

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        return masked_fp8_workspace(ctx, num_rows, with_rows=False)

    def apply(self, tokens: MaskedTokens, weights: ExpertWeights, out: torch.Tensor, workspace: dict) -> None:
        if tokens.num_rows == 0:
            return
        if tokens.x_scale is None:
            raise ValueError(f"{self.name} takes fp8 masked tokens with x_scale; got {tokens.x.dtype} without scales")
        masked_fp8_mlp(tokens.x, tokens.x_scale, weights, tokens.counts, tokens.expected_m, workspace, out)


class Fp8ExpandedDeepGemmExperts(_Fp8DeepGemmPart):
    """EXPANDED in and out: fp8 ``x [R, H]`` with ``x_scale [R, H/128]`` float32, laid out by
    DeepEP's expanded fp8 dispatch -> bf16 ``out [R, H]``; the fp8 twin of
    :class:`~moe_kernels.experts.deepgemm.ExpandedDeepGemmExperts`.

    Expert e owns rows ``[align_up(expert_ends[e-1], alignment), expert_ends[e])``, DeepGEMM's psum
    layout, so ``m_grouped_fp8_gemm_nt_contiguous((x, x_scale), (w13, w13_scale), ...,
    use_psum_layout=True, expected_m_for_psum_layout=expected_m)`` reads the dispatched rows and
    scales in place; the scales are taken as they come (token-major with a column stride that
    is a multiple of 4 is what DeepGEMM's SM90 kernels read without a transpose: DeepEP's
    ``use_tma_aligned_col_major_sf=True``, :mod:`moe_kernels.mlp.scales`). SiLU-and-mul and the fp8
    quantization of GEMM2's input run as one kernel on valid rows only; GEMM2 the same way into
    bf16; the last step writes every row of ``out``: valid rows times ``row_weights``, all other
    rows zeros. No host sync: capturable in a CUDA graph. Its format asks the dispatcher for fp8
    rows at DeepGEMM's contiguous alignment.
    """

    input_layout = Layout.EXPANDED

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        return TokenFormat(Layout.EXPANDED, alignment=deep_gemm_alignment() or 1, fp8=True)

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [*super().checks(ctx), *psum_layout_checks("m_grouped_fp8_gemm_nt_contiguous")]

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        if num_rows == 0:
            return {}
        h, i = ctx.cfg.moe.hidden_size, ctx.cfg.moe.intermediate_size
        return {
            "gate_up": WorkspaceSpec((num_rows, 2 * i), torch.bfloat16),
            "activation_q": WorkspaceSpec((num_rows, i), FP8_DTYPE),
            # a column stride that is a multiple of 4 (TMA): DeepGEMM then reads the scales as they are
            "activation_scale": scale_spec(align_up(num_rows, 4), i),
            "expert_rows": WorkspaceSpec((num_rows, h), torch.bfloat16),
        }

    def apply(self, tokens: ExpandedTokens, weights: ExpertWeights, out: torch.Tensor, workspace: dict) -> None:
        from moe_kernels.kernels.quant import silu_and_mul_quant_fp8

        r = tokens.num_rows
        if r == 0:
            return
        if tokens.x_scale is None:
            raise ValueError(f"{self.name} takes fp8 expanded tokens with x_scale; got {tokens.x.dtype} without scales")
        row_expert, dst_row, expected_m = psum_rows(tokens)
        ends = tokens.expert_ends
        gate_up, rows = workspace["gate_up"], workspace["expert_rows"]
        aq, sa = workspace["activation_q"], scale_view(workspace["activation_scale"])[:r]
        dg = _deep_gemm()
        dg.m_grouped_fp8_gemm_nt_contiguous(
            (tokens.x, tokens.x_scale),
            (weights.w13, weights.w13_scale),
            gate_up,
            ends,
            use_psum_layout=True,
            expected_m_for_psum_layout=expected_m,
        )
        # rows outside every segment are skipped: their activation and scales keep stale values,
        # which GEMM2 may compute from but the last step never reads
        silu_and_mul_quant_fp8(gate_up, aq, sa, group=GROUP, grouped_layout=row_expert)
        dg.m_grouped_fp8_gemm_nt_contiguous(
            (aq, sa),
            (weights.w2, weights.w2_scale),
            rows,
            ends,
            use_psum_layout=True,
            expected_m_for_psum_layout=expected_m,
        )
        write_expanded_output(rows, dst_row, tokens, out)


class Fp8HybridDeepGemmExperts(_Fp8DeepGemmPart):
    """STANDARD in, ``[T, H]`` out: the fp8 masked path (scatter + quantize into ``[E, M, H]``)
    for ``T <= threshold``, the fp8 contiguous path above. The threshold works as
    :class:`~moe_kernels.experts.hybrid.HybridDeepGemmExperts`' does (default: its documented
    default; no fp8 crossover has been measured)."""

    input_layout = Layout.STANDARD

    def __init__(self, threshold: int | None = None) -> None:
        from moe_kernels.experts.hybrid import DEFAULT_THRESHOLD

        if threshold is not None and threshold < 0:
            raise ValueError(f"threshold must be >= 0 tokens, got {threshold}")
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    def _masked(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.threshold

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        if num_rows == 0:
            return {}
        if self._masked(num_rows):
            return masked_fp8_workspace(ctx, align_up(num_rows, masked_rows_multiple()), with_rows=True)
        return contiguous_fp8_workspace(ctx, num_rows, deep_gemm_alignment() or 1)

    def max_workspace_specs(self, ctx: LayerContext, max_rows: int) -> dict[str, WorkspaceSpec]:
        return largest_specs(self.workspace_specs(ctx, rows) for rows in {max_rows, min(max_rows, self.threshold)})

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: torch.Tensor, workspace: dict) -> None:
        from moe_kernels.kernels import masked_layout
        from moe_kernels.kernels.quant import scatter_rows_quant_fp8

        t = tokens.num_rows
        if t == 0:
            return
        if not self._masked(t):
            apply_contiguous_fp8(tokens, weights, out, workspace, deep_gemm_alignment() or 1, "deep_gemm")
            return
        e, k = weights.num_experts, tokens.topk_ids.shape[1]
        capacity = align_up(t, masked_rows_multiple())
        layout = masked_layout(tokens.topk_ids, e, capacity)
        q, sq = workspace["masked_q"], scale_view(workspace["masked_scale"])
        scatter_rows_quant_fp8(tokens.x, layout.dst_row, q, sq, group=GROUP)
        rows = workspace["masked_rows"]
        masked_fp8_mlp(q, sq, weights, layout.counts, -(-t * k // e), workspace, rows)
        write_output(rows, layout.dst_row, tokens, out)


class Fp8TritonExperts(_Fp8Part):
    """STANDARD in, ``[T, H]`` out, on the Triton block-scaled fp8 grouped GEMM: the contiguous
    fp8 pipeline for GPUs without DeepGEMM (any CUDA GPU with fp8 support; the CPU under the
    Triton interpreter)."""

    input_layout = Layout.STANDARD

    def check_device(self, ctx: LayerContext) -> Check:
        base = triton_check(ctx.device)
        if base.ok and ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(ctx.device)
            return Check.failed("device", f"fp8 tensor cores need SM89+, this GPU is SM{major}{minor}")
        return base

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 40.0, "Triton block-scaled fp8 grouped GEMM (portable fallback)"

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        from moe_kernels.kernels.quant import BLOCK_M

        return contiguous_fp8_workspace(ctx, num_rows, BLOCK_M)

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: torch.Tensor, workspace: dict) -> None:
        from moe_kernels.kernels.quant import BLOCK_M

        if tokens.num_rows == 0:
            return
        apply_contiguous_fp8(tokens, weights, out, workspace, BLOCK_M, "triton")
