"""DeepGEMM experts that choose the masked or the contiguous layout per call from the batch size.

Small batches (decode): the masked GEMM skips each expert's empty tiles and measured 5-8 %
faster than ``torch._grouped_mm`` at the HBM limit, but its scratch grows as
``E x T x (H + 3I)``. Large batches (prefill): the contiguous layout's memory is proportional
to the routed rows only. ``T`` is a host int, so choosing costs no sync, and for a given ``T``
the choice is fixed: a CUDA graph captured per batch size replays one path. bf16 or fp8, as the
weights are (:mod:`moe_kernels.experts.deepgemm`).

The threshold is the measured crossover of the two paths on this GPU, layer shape and format
(the tuning table's times of :class:`~moe_kernels.experts.deepgemm.MaskedDeepGemmExperts` and
:class:`~moe_kernels.experts.deepgemm.DeepGemmExperts`), else a default from earlier
measurements.
"""

from __future__ import annotations

from torch import Tensor

from moe_kernels.backends import deep_gemm
from moe_kernels.core import tuning
from moe_kernels.core.contract import (
    LayerContext,
    Layout,
    StandardTokens,
    Workspace,
    WorkspaceSpec,
    align_up,
    largest_specs,
    workspace_bytes,
)
from moe_kernels.experts.common import (
    contiguous_workspace,
    gemm_input,
    gemm_input_specs,
    masked_workspace,
    run_contiguous,
    run_masked,
    write_output,
)
from moe_kernels.experts.deepgemm import DeepGemmExperts, DeepGemmPart, MaskedDeepGemmExperts, deep_gemm_masked
from moe_kernels.mlp.weights import ExpertWeights

#: For a GPU or shape without measurements: the three shapes measured on an H100 (2026-11-23,
#: docs/performance.md) all crossed over between T=1024 and T=4096, masked faster up to 1024.
DEFAULT_THRESHOLD = 1024
DEFAULT_THRESHOLD_SOURCE = "default: masked was faster up to T=1024 on every shape measured on an H100 (2026-11-23)"

#: The masked layout needs ``E x align(T) x (H + 3I)`` of scratch (SGLang once saw 16 GB).
#: Above this many bytes the hybrid takes the contiguous path whatever the threshold says.
#: A policy choice, not a measurement.
MASKED_WORKSPACE_BUDGET_BYTES = 2 * 2**30


class HybridDeepGemmExperts(DeepGemmPart):
    """STANDARD in, ``[T, H]`` out (weighted and reduced).

    ``T <= threshold`` (and the masked scratch within ``masked_memory_budget`` bytes): masked --
    Triton ``masked_layout`` with capacity ``align_up(T, masked_rows_multiple())`` (an expert gets
    at most one row per token, so nothing overflows), scatter (quantizing when fp8) into
    ``[E, M, H]``, two masked DeepGEMM GEMMs with the activation between, weighted gather.
    Otherwise contiguous, exactly as :class:`~moe_kernels.experts.deepgemm.DeepGemmExperts`.

    Args:
        threshold: largest T that takes the masked path; ``None`` = the measured crossover for
            the layer on this GPU (or :data:`DEFAULT_THRESHOLD`). ``0`` forces contiguous, a
            huge value masked (within the memory budget).
        masked_memory_budget: most bytes of masked scratch; ``None`` = :data:`MASKED_WORKSPACE_BUDGET_BYTES`.
    """

    input_layout = Layout.STANDARD

    def __init__(self, threshold: int | None = None, *, masked_memory_budget: int | None = None) -> None:
        if threshold is not None and threshold < 0:
            raise ValueError(f"threshold must be >= 0 tokens, got {threshold}")
        if masked_memory_budget is not None and masked_memory_budget < 0:
            raise ValueError(f"masked_memory_budget must be >= 0 bytes, got {masked_memory_budget}")
        self.threshold = threshold
        self._measured_threshold: tuning.TableMemo[tuple[int, str]] = tuning.TableMemo()
        self.masked_memory_budget = (
            MASKED_WORKSPACE_BUDGET_BYTES if masked_memory_budget is None else masked_memory_budget
        )

    def __repr__(self) -> str:
        return f"HybridDeepGemmExperts(threshold={self.threshold}, masked_memory_budget={self.masked_memory_budget})"

    def threshold_for(self, ctx: LayerContext) -> tuple[int, str]:
        """The threshold in force for the layer, and where it comes from (worked out once per
        table: every call asks)."""
        if self.threshold is not None:
            return self.threshold, "given"
        return self._measured_threshold.get(ctx.device, ctx.cfg, _crossover_in_table)

    def _masked_specs(self, ctx: LayerContext, num_tokens: int) -> dict[str, WorkspaceSpec]:
        mlp, e = ctx.mlp, ctx.placement.num_local_experts
        capacity = align_up(num_tokens, deep_gemm.masked_rows_multiple())
        specs = masked_workspace(mlp, e, capacity) | gemm_input_specs("masked_rows", (e, capacity), mlp.hidden, mlp)
        if mlp.act_quant is not None:
            # GEMM2's bf16 output cannot go over its fp8 input
            specs["masked_out"] = WorkspaceSpec((e, capacity, mlp.hidden), mlp.dtype)
        return specs

    def masked_bytes(self, ctx: LayerContext, num_tokens: int) -> int:
        """Scratch of the masked path: rows ``[E, M, H]``, gate/up ``[E, M, 2I]`` and the
        activation ``[E, M, I]`` (with their scales and a separate output when quantized)."""
        return workspace_bytes(self._masked_specs(ctx, num_tokens))

    def use_masked(self, ctx: LayerContext, num_tokens: int) -> bool:
        """The path for a call with ``num_tokens`` tokens (host ints only)."""
        if num_tokens == 0 or num_tokens > self.threshold_for(ctx)[0]:
            return False
        return self.masked_bytes(ctx, num_tokens) <= self.masked_memory_budget

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        if self.use_masked(ctx, num_rows):
            return self._masked_specs(ctx, num_rows)
        e = ctx.placement.num_local_experts
        return contiguous_workspace(ctx.mlp, num_rows, ctx.cfg.moe.top_k, e, deep_gemm.alignment() or 1)

    def max_workspace_specs(self, ctx: LayerContext, max_rows: int) -> dict[str, WorkspaceSpec]:
        # the masked path peaks at the largest T it takes, the contiguous one at max_rows
        candidates = [self.workspace_specs(ctx, max_rows)]
        masked_t = min(max_rows, self.threshold_for(ctx)[0])
        while masked_t > 0 and not self.use_masked(ctx, masked_t):
            masked_t //= 2  # the memory budget cut the masked path below the threshold
        if masked_t > 0:
            candidates.append(self.workspace_specs(ctx, masked_t))
        return largest_specs(candidates)

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        mlp, t = self.ctx.mlp, tokens.num_rows
        if not self.use_masked(self.ctx, t):
            run_contiguous(tokens, weights, out, workspace, mlp, deep_gemm.alignment() or 1, deep_gemm.contiguous)
            return

        from moe_kernels.kernels import masked_layout, scatter_rows

        num_experts, top_k = weights.num_experts, tokens.topk_ids.shape[1]
        rows, rows_scale = gemm_input(workspace, "masked_rows")
        layout = masked_layout(tokens.topk_ids, num_experts, rows.shape[1])
        group = mlp.act_quant.group if mlp.act_quant is not None else 1
        scatter_rows(tokens.x, layout.dst_row, rows, scale_out=rows_scale, group=group)
        # DeepGEMM tunes for the mean rows per expert; with EP some slots are -1, so this is an
        # upper estimate (the host cannot count them without a sync).
        expected_m = -(-t * top_k // num_experts)
        expert_out = workspace.get("masked_out", rows)
        run_masked(rows, rows_scale, layout.counts, weights, expert_out, workspace, mlp, deep_gemm_masked(expected_m))
        write_output(expert_out, layout.dst_row, tokens, out)


def _crossover_in_table(table: tuning.GpuTable | None, key: tuning.ShapeKey) -> tuple[int, str]:
    """The masked/contiguous threshold the table measured for ``key``, else the default."""
    if table is not None:
        masked = table.experts_times(key, MaskedDeepGemmExperts.__name__)
        contiguous = table.experts_times(key, DeepGemmExperts.__name__)
        threshold, note = tuning.crossover(masked, contiguous)
        if threshold is not None:
            return threshold, f"measured crossover ({table.gpu}, {table.source}): {note}"
    return DEFAULT_THRESHOLD, DEFAULT_THRESHOLD_SOURCE
