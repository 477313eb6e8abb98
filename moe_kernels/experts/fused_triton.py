"""The fused Triton decode path as an experts implementation (:mod:`moe_kernels.kernels.fused_moe`).

No scatter: GEMM1 reads its A tile straight from ``x`` through the expert-sorted slots, SiLU-and-
mul is fused into it, GEMM2 applies the router weight in its epilogue, and the top-k sum (fixed k
order, fp32) adds the residual in the same pass: 4 launches (3 at top-1), with the layout built
in one program at decode sizes. The tile configs come from this GPU's tuning table for the layer
shape and token count (``moe-kernels tune``), else from the kernels' documented heuristic.

fp8 weights (every :data:`~moe_kernels.mlp.formats.FP8_FORMATS` format) take the same launches
as weight-only fp8: each GEMM upcasts its e4m3 B tile to bf16 in its loads (exact) and applies
the weight scales per K tile; the activations are not quantized. At decode the weights are the
bytes that count, and halving them is the whole gain; quantizing the A tile in every program (the
w8a8 recipe the grouped fp8 paths follow) measured 1.5-6x slower. The result is closer to the
bf16 layer than the w8a8 paths' (no activation rounding). 4-bit weights
(:data:`~moe_kernels.mlp.formats.PACKED_FORMATS`) stay packed and are dequantized in the loads
the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from moe_kernels.backends import cuda
from moe_kernels.backends.triton import interpreting
from moe_kernels.core import tuning
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Layout,
    StandardTokens,
    TokenFormat,
    Workspace,
    WorkspaceSpec,
    largest_specs,
)
from moe_kernels.core.tiles import HOPPER_SMS, default_configs
from moe_kernels.experts.triton import TritonPart
from moe_kernels.mlp import fp8
from moe_kernels.mlp.formats import FP8_FORMATS, PACKED_FORMATS, Dense, Fp8Scaled, Packed4Bit
from moe_kernels.mlp.weights import ExpertWeights

Tiles = tuple[Any, Any]  # (gemm1, gemm2) FusedConfig

#: at or below this many rows per expert on average the GEMMs stream weights (decode), the regime
#: the fused path is built for; the kernels' own heuristic switches tile shapes at the same point
DECODE_ROWS_PER_EXPERT = 128


def rows_per_local_expert(ctx: LayerContext) -> float:
    """The rows a local expert takes on average at the layer's largest call (``T * K / E_local``),
    what :data:`DECODE_ROWS_PER_EXPERT` is compared with."""
    return ctx.max_tokens * ctx.cfg.moe.top_k / ctx.placement.num_local_experts


class FusedTritonExperts(TritonPart):
    """STANDARD in, ``[T, H]`` out (weighted, reduced), unquantized, fp8 or 4-bit weights, gated
    activations.
    ``tiles``: ``{T: (gemm1, gemm2)}`` :class:`~moe_kernels.kernels.fused_moe.FusedConfig` pairs
    to use instead of the tuning table (the tuner measures candidates this way); a call with T
    tokens takes the entry of the smallest T' >= T (:func:`moe_kernels.core.tuning.point_for`)."""

    input_layout = Layout.STANDARD
    weight_formats = (Dense, *FP8_FORMATS, *PACKED_FORMATS)

    def __init__(self, tiles: Mapping[int, Tiles] | None = None) -> None:
        self.tiles = dict(tiles) if tiles is not None else None
        self._table_tiles: tuning.TableMemo[dict[int, Tiles]] = tuning.TableMemo()

    def check_mlp(self, ctx: LayerContext) -> Check:
        verdict = super().check_mlp(ctx)
        if verdict.ok and not ctx.mlp.activation.gated:
            return Check.failed("mlp", f"its GEMM1 computes gated activations, not {ctx.mlp.activation.kind}")
        return verdict

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        # weight-only on every format: the tokens stay unquantized
        return TokenFormat(self.input_layout)

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        if ctx.device.type == "cpu" and interpreting():
            return 500.0, "Triton under the CPU interpreter: correct but slow"
        rows = rows_per_local_expert(ctx)
        if isinstance(ctx.mlp.weights, Fp8Scaled):
            # H100, DeepSeek-V3 EP8-local (docs/gpu-results.md, 2026-11-23): 1.02-1.2x the fastest
            # fp8 pair at T <= 64, far slower at prefill; a measured table overrides this
            return 60.0, "fused Triton on fp8 weights (weight-only): measured behind the grouped fp8 paths"
        if rows <= DECODE_ROWS_PER_EXPERT:
            return 5.0, f"fused Triton decode path: weights streamed once, 4 launches ({rows:.0f} rows per expert)"
        return 30.0, f"fused Triton path at {rows:.0f} rows per expert: prefill GEMMs favour DeepGEMM/_grouped_mm"

    def measured_tiles(self, ctx: LayerContext) -> dict[int, Tiles]:
        """``{T: (gemm1, gemm2)}`` given or measured for the layer on this GPU (empty: none)."""
        if self.tiles is not None:
            return self.tiles
        return self._table_tiles.get(ctx.device, ctx.cfg, self._tiles_in_table)

    def _tiles_in_table(self, table: tuning.GpuTable | None, key: tuning.ShapeKey) -> dict[int, Tiles]:
        from moe_kernels.kernels import FusedConfig

        entries = {} if table is None else table.kernel_configs(key, self.name)
        return {t: (FusedConfig(**c["gemm1"]), FusedConfig(**c["gemm2"])) for t, c in entries.items()}

    def tiles_source(self, ctx: LayerContext) -> str:
        return "given" if self.tiles is not None else ("tuning table" if self.measured_tiles(ctx) else "heuristic")

    def configs_for(self, ctx: LayerContext, num_tokens: int) -> Tiles:
        """The ``(gemm1, gemm2)`` tilings for a call of ``num_tokens`` tokens (fp8: ``block_k`` at
        most the weights' 128-column scale block, whatever a bf16 heuristic or table says)."""
        tiles = self.measured_tiles(ctx)
        if tiles:
            pair = tuning.point_for(tiles, num_tokens)[1]
        else:
            moe = ctx.cfg.moe
            num_sms = cuda.num_sms(ctx.device) if ctx.device.type == "cuda" else HOPPER_SMS
            pair = default_configs(
                num_tokens, moe.top_k, ctx.placement.num_local_experts, moe.hidden_size, ctx.mlp.inter, num_sms
            )
        if isinstance(ctx.mlp.weights, Fp8Scaled):
            return tuple(dataclasses.replace(c, block_k=min(c.block_k, fp8.SCALE_BLOCK)) for c in pair)  # type: ignore[return-value]
        return pair

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        from moe_kernels.kernels import fused_workspace_shapes

        moe = ctx.cfg.moe
        gemm1, _ = self.configs_for(ctx, num_rows)
        shapes = fused_workspace_shapes(
            num_rows, moe.top_k, ctx.placement.num_local_experts, moe.hidden_size, ctx.mlp.inter,
            moe.dtype, gemm1.block_m,
        )  # fmt: skip
        return {name: WorkspaceSpec(tuple(shape), dtype) for name, (shape, dtype) in shapes.items()}

    def max_workspace_specs(self, ctx: LayerContext, max_rows: int) -> dict[str, WorkspaceSpec]:
        # the row block (and so the padded row bound) changes with T: take each name's largest
        # over the token counts where the tiling may change (powers of two, the tuned points)
        points = {max_rows, *(t for t in self.measured_tiles(ctx) if t < max_rows)}
        t = 1
        while t < max_rows:
            points.add(t)
            t *= 2
        return largest_specs(self.workspace_specs(ctx, rows) for rows in points)

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        from moe_kernels.kernels import fused_experts

        gemm1, gemm2 = self.configs_for(self.ctx, tokens.num_rows)
        residual = tokens.residual
        if residual is not None:
            residual.wait()
        fused_experts(
            tokens.x,
            weights.w13,
            weights.w2,
            tokens.topk_weights,
            tokens.topk_ids,
            out,
            workspace=workspace,
            gemm1=gemm1,
            gemm2=gemm2,
            residual=None if residual is None else residual.tensor,
            activation=self.ctx.mlp.activation,
            w13_bias=weights.w13_bias,
            w2_bias=weights.w2_bias,
            **_scale_kwargs(weights),
        )


def _scale_kwargs(weights: ExpertWeights) -> dict[str, Any]:
    """``fused_experts``' fp8 or packed arguments for these weights (none unquantized)."""
    from moe_kernels.kernels import PackedWeight

    fmt = weights.weight_format
    if isinstance(fmt, Packed4Bit):
        packed = (
            PackedWeight(fmt.packing, fmt.group, weights.w13_zero),
            PackedWeight(fmt.packing, fmt.group, weights.w2_zero),
        )
        return {"w13_scale": weights.w13_scale, "w2_scale": weights.w2_scale, "packed": packed}
    if not isinstance(fmt, Fp8Scaled):
        return {}
    blocks = (fmt.scale_block(*weights.w13.shape[1:]), fmt.scale_block(*weights.w2.shape[1:]))
    return {"w13_scale": weights.w13_scale, "w2_scale": weights.w2_scale, "scale_blocks": blocks}
