"""Expert MLPs on the Triton grouped GEMM (any CUDA GPU; the CPU under TRITON_INTERPRET=1),
bf16/fp16/fp32 or fp8 with block scales.

Unquantized, GEMM1 and the activation are one kernel (the ``[rows, 2I]`` intermediate never
reaches memory), so each layout needs two GEMM launches. fp8 weights (``fp8_w8a8_block``) run the
block-scaled fp8 variant of the same kernel on activations quantized per token and 128 columns;
the activation is then its own kernel, which quantizes GEMM2's input on the way out.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from moe_kernels.backends.triton import interpreting, triton_check
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Layout,
    MaskedTokens,
    Operand,
    PermuteExpertsUnpermute,
    StandardTokens,
    Workspace,
    WorkspaceSpec,
)
from moe_kernels.experts.common import (
    GroupedGemm,
    bias_kwargs,
    check_token_quant,
    contiguous_workspace,
    masked_workspace,
    run_contiguous,
    run_masked,
)
from moe_kernels.mlp.formats import FP8_FORMATS, PACKED_FORMATS, Dense, Fp8Scaled, Packed4Bit, WeightFormat
from moe_kernels.mlp.spec import ExpertMLP
from moe_kernels.mlp.weights import ExpertWeights

#: fp8 tensor cores need compute capability 8.9 or newer
FP8_MIN_CAPABILITY = (8, 9)


class TritonPart(PermuteExpertsUnpermute):
    """What the Triton experts share: where Triton runs (fp8: SM89+), capturable in CUDA graphs."""

    supports_cuda_graphs = True
    expert_biases = True

    def check_device(self, ctx: LayerContext) -> Check:
        base = triton_check(ctx.device)
        if base.ok and ctx.mlp.act_quant is not None and ctx.device.type == "cuda":
            cap = torch.cuda.get_device_capability(ctx.device)
            if cap < FP8_MIN_CAPABILITY:
                return Check.failed("device", f"fp8 tensor cores need SM89+, this GPU is SM{cap[0]}{cap[1]}")
        return base

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        if ctx.device.type == "cpu" and interpreting():
            return 500.0, "Triton under the CPU interpreter: correct but slow"
        if ctx.mlp.act_quant is not None:
            return 40.0, "Triton block-scaled fp8 grouped GEMM (portable fallback)"
        return 50.0, "Triton grouped GEMM with the activation fused into GEMM1 (portable fallback)"


def _scale_block(fmt: WeightFormat | None, w: torch.Tensor, weights: ExpertWeights | None) -> dict[str, object]:
    """The kernels' ``b_scale_block`` (fp8) or ``packed`` (4-bit; its zero points are those of
    whichever of ``weights``' projections ``w`` is) for ``w`` stored as ``fmt``."""
    if isinstance(fmt, Fp8Scaled):
        return {"b_scale_block": fmt.scale_block(w.shape[1], w.shape[2])}
    if isinstance(fmt, Packed4Bit):
        from moe_kernels.kernels import PackedWeight

        zero = None
        if weights is not None:
            zero = weights.w13_zero if w is weights.w13 else weights.w2_zero
        return {"packed": PackedWeight(fmt.packing, fmt.group, zero)}
    return {}


def _triton_gemm(
    a: Operand,
    w: Operand,
    out: torch.Tensor,
    rows: torch.Tensor,
    *,
    masked: bool,
    mlp: ExpertMLP | None = None,
    bias: torch.Tensor | None = None,
    fmt: WeightFormat | None = None,
    weights: ExpertWeights | None = None,
) -> None:
    """The Triton grouped GEMM as a :data:`~moe_kernels.experts.common.GroupedGemm`, on the masked
    layout (``rows``: counts) or the contiguous one (``rows``: the grouped layout). ``mlp``: fuse
    its activation; ``bias``: add it in the epilogue; ``fmt``: how ``w`` is stored, and ``weights``
    the layer's, for int4 zero points: bind them with ``functools.partial``."""
    from moe_kernels.kernels import grouped_gemm_contiguous, grouped_gemm_masked
    from moe_kernels.kernels.grouped_gemm import BLOCK_M

    kwargs: dict[str, Any] = dict(a_scale=a[1], b_scale=w[1], activation=mlp.activation if mlp else None, bias=bias)
    kwargs |= _scale_block(fmt, w[0], weights)
    if masked:
        grouped_gemm_masked(a[0], w[0], rows, out, **kwargs)
    else:
        grouped_gemm_contiguous(a[0], w[0], rows, out, alignment=BLOCK_M, **kwargs)


_triton_contiguous = functools.partial(_triton_gemm, masked=False)
_triton_masked = functools.partial(_triton_gemm, masked=True)


def _fused_gemm1(mlp: ExpertMLP, gemm: GroupedGemm) -> GroupedGemm | None:
    """GEMM1 with the activation fused in, where the kernel can (unquantized, gated)."""
    if mlp.act_quant is not None or not mlp.activation.gated:
        return None
    return functools.partial(gemm, mlp=mlp)


class TritonExperts(TritonPart):
    """STANDARD in, ``[T, H]`` out (weighted, reduced).

    scatter ``x`` into expert-contiguous segments (aligned to the GEMM's row tile; quantized on
    the way when fp8) -> GEMM1 + activation (fp8: GEMM1, then the activation quantizing GEMM2's
    input) -> GEMM2 -> weighted gather. Sizes come from a host bound on the layout rows
    (``T*K + min(E, T*K) * (align - 1)``), so nothing syncs with the host; the padding rows are
    skipped by the GEMMs and never read by the gather. Shapes depend only on T, so it can be
    captured in a CUDA graph per batch size.
    """

    input_layout = Layout.STANDARD
    weight_formats = (Dense, *FP8_FORMATS, *PACKED_FORMATS)

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        from moe_kernels.kernels.grouped_gemm import BLOCK_M

        mlp, e = ctx.mlp, ctx.placement.num_local_experts
        fused = _fused_gemm1(mlp, _triton_contiguous) is not None
        return contiguous_workspace(mlp, num_rows, ctx.cfg.moe.top_k, e, BLOCK_M, fused_gemm1=fused)

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        from moe_kernels.kernels.grouped_gemm import BLOCK_M

        mlp = self.ctx.mlp
        gemm = functools.partial(_triton_contiguous, fmt=mlp.weights, weights=weights)
        run_contiguous(tokens, weights, out, workspace, mlp, BLOCK_M, gemm, _fused_gemm1(mlp, gemm))


class MaskedTritonExperts(TritonPart):
    """MASKED in and out: ``[E, M, H]`` (fp8: with ``x_scale [E, M, H/128]``) with ``counts
    [E]``; rows past an expert's count are neither computed nor written. Fixed shapes, no host
    sync: capturable in CUDA graphs."""

    input_layout = Layout.MASKED
    weight_formats = (Dense, *FP8_FORMATS, *PACKED_FORMATS)

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        mlp, e = ctx.mlp, ctx.placement.num_local_experts
        specs = masked_workspace(mlp, e, num_rows)
        if _fused_gemm1(mlp, _triton_masked) is not None:
            del specs["gate_up"]
        return specs

    def apply(self, tokens: MaskedTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        mlp = self.ctx.mlp
        check_token_quant(self.name, tokens, mlp)
        gemm = functools.partial(_triton_masked, fmt=mlp.weights, weights=weights)
        fused = _fused_gemm1(mlp, gemm)
        if fused is None:
            run_masked(tokens.x, tokens.x_scale, tokens.counts, weights, out, workspace, mlp, gemm)
            return
        act = workspace["activation"]
        fused((tokens.x, None), (weights.w13, weights.w13_scale), act, tokens.counts, **bias_kwargs(weights.w13_bias))
        gemm((act, None), (weights.w2, weights.w2_scale), out, tokens.counts, **bias_kwargs(weights.w2_bias))
