"""Prepare/finalize without expert parallelism: every expert of the layer is on this device.

* :class:`LocalPrepareAndFinalize` (STANDARD): hands ``x`` and the local ids through; the
  experts write the layer output in place, so finalize has nothing left to do.
* :class:`LocalMaskedPrepareAndFinalize` (MASKED): scatters the tokens into fixed-capacity
  per-expert buffers ``[E, M, H]``; finalize weights and sums each token's rows back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_kernels.backends.triton import triton_check
from moe_kernels.core.contract import (
    Check,
    H,
    LayerContext,
    Layout,
    MaskedTokens,
    PrepareAndFinalize,
    PrepareResult,
    Residual,
    StandardTokens,
    TokenFormat,
    Workspace,
    WorkspaceSpec,
    align_up,
    expected_rows_per_expert,
)
from moe_kernels.core.placement import choose_slots, slots_to_local
from moe_kernels.mlp.act_quant import scale_view


class _Local(PrepareAndFinalize[H]):
    """What both local parts share: no exchange, ids mapped to local ids by the placement."""

    supports_chunking = True
    supports_cuda_graphs = True

    def check_parallel(self, ctx: LayerContext) -> Check:
        ep = ctx.placement.ep_size
        if ep > 1:
            return Check.failed("parallel", f"moves no tokens between ranks; ep_size={ep} needs an EP dispatcher")
        return super().check_parallel(ctx)

    def bind_placement(self, ctx: LayerContext) -> None:
        super().bind_placement(ctx)
        placement = ctx.placement
        # the identity map costs a gather per call for nothing; slots need no map
        identity = placement.ep_size == 1 and placement.is_contiguous
        self._slot_map = None if identity or ctx.ids_are_slots else placement.slot_map(ctx.device)

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global ids ``[T, K]`` (or slots, ``ctx.ids_are_slots``) -> this rank's local ids (a
        replica chosen per token), ``-1`` for none or another rank's expert; the chosen replicas
        are counted in ``ctx.expert_load``."""
        placement = self.ctx.placement
        slots = topk_ids if self._slot_map is None else choose_slots(topk_ids, self._slot_map, self.ctx.expert_load)
        return slots if placement.ep_size == 1 else slots_to_local(slots, placement)


class LocalPrepareAndFinalize(_Local[None]):
    """STANDARD, no dispatch: the experts see ``x [T, H]`` and local ids and write ``out`` directly.

    ``partial=True`` also accepts a layer with ``ep_size > 1`` run by a single process: the
    experts compute this rank's share only (slots of other ranks' experts count as ``-1``) and
    the caller must add the ranks' outputs (e.g. with a reduce-scatter). It is never selected
    automatically: a partial sum where a full one is expected would be a silent wrong result.
    """

    output_layout = Layout.STANDARD

    def __init__(self, *, partial: bool = False) -> None:
        self.partial = partial

    @property
    def name(self) -> str:
        return "LocalPrepareAndFinalize(partial)" if self.partial else "LocalPrepareAndFinalize"

    def check_parallel(self, ctx: LayerContext) -> Check:
        if self.partial and ctx.group is None:
            return Check.passed("parallel", f"{ctx.placement.describe()}; computes this rank's share only")
        return super().check_parallel(ctx)

    def check_format(self, ctx: LayerContext, fmt: TokenFormat) -> Check:
        if fmt.alignment != 1:
            return Check.failed("format", "hands x through unpermuted (alignment 1)")
        # fp8 experts quantize on their own way in (fused into their scatter): x stays as is
        return Check.passed("format", "x handed through unchanged")

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 0.0, "no dispatch; the experts write the output in place"

    def prepare(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace) -> PrepareResult[None]:
        return PrepareResult(StandardTokens(x, self.local_ids(topk_ids), topk_weights), None)

    def expert_output(self, prepared: PrepareResult[None], out: torch.Tensor) -> torch.Tensor | None:
        return out

    def finalize(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[None], residual: Residual | None = None
    ) -> None:
        # the composer hands the residual to the experts' final write instead (no extra pass)
        if expert_output.data_ptr() != out.data_ptr():
            out.copy_(expert_output)
        if residual is not None:
            residual.wait()
            out.add_(residual.tensor)


@dataclass(frozen=True)
class MaskedRoute:
    """What finalize needs back: each slot's row ``dst_row [T, K]`` int64 in ``[E * M, H]``, the
    router weights ``[T, K]`` float32, and the ``[E, M, H]`` buffer the experts wrote."""

    dst_row: torch.Tensor
    topk_weights: torch.Tensor
    expert_output: torch.Tensor


class LocalMaskedPrepareAndFinalize(_Local[MaskedRoute]):
    """MASKED: scatters ``x [T, H]`` into ``[E_local, M, H]`` (Triton) and weights and sums the
    experts' rows back into ``[T, H]`` in finalize.

    ``M`` is the layer's largest call (``parallel.max_tokens_per_rank``, or the chunk size)
    rounded up to the experts' row multiple, fixed when the kernel is built: static shapes for
    CUDA graphs. An expert receives at most one row per token (a token's repeated ids share one
    row), so ``M >= T`` never overflows. Memory grows as ``E x M x H``: selection counts it
    against the memory budget.
    """

    output_layout = Layout.MASKED

    def check_device(self, ctx: LayerContext) -> Check:
        return triton_check(ctx.device)

    def check_format(self, ctx: LayerContext, fmt: TokenFormat) -> Check:
        quantized = "quantized while scattered, " if fmt.act_quant is not None else ""
        return Check.passed("format", f"{quantized}rows per expert rounded up to a multiple of {fmt.alignment}")

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 10.0, "no dispatch; masked memory grows as E x M x H, so the standard layout ranks first"

    def capacity(self, ctx: LayerContext, fmt: TokenFormat) -> int:
        """Rows per expert ``M``."""
        return align_up(ctx.max_tokens, fmt.alignment)

    def max_expert_rows(self, ctx: LayerContext, fmt: TokenFormat) -> int:
        return self.capacity(ctx, fmt)

    def workspace_specs(self, ctx: LayerContext, fmt: TokenFormat) -> dict[str, WorkspaceSpec]:
        e, m, h = ctx.placement.num_local_experts, self.capacity(ctx, fmt), ctx.cfg.moe.hidden_size
        dtype = ctx.cfg.moe.dtype
        specs = {"masked_out": WorkspaceSpec((e, m, h), dtype)}
        quant = fmt.act_quant
        if quant is None:
            specs["masked_x"] = WorkspaceSpec((e, m, h), dtype)
        else:
            specs["masked_x"] = WorkspaceSpec(*quant.rows((e, m), h))
            specs["masked_x_scale"] = WorkspaceSpec(*quant.masked_scale_storage(e, m, h))
        return specs

    def prepare(
        self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace
    ) -> PrepareResult[MaskedRoute]:
        from moe_kernels.kernels.permute import masked_layout, scatter_rows

        ids = self.local_ids(topk_ids)
        masked_x = workspace["masked_x"]
        e, capacity, _ = masked_x.shape
        layout = masked_layout(ids, e, capacity)
        quant = self.format.act_quant
        scale = None if quant is None else scale_view(workspace["masked_x_scale"])
        scatter_rows(x, layout.dst_row, masked_x, scale_out=scale, group=quant.group if quant is not None else 1)
        expected_m = expected_rows_per_expert(ids.shape[0], ids.shape[1], e, capacity)
        tokens = MaskedTokens(masked_x, layout.counts, expected_m, scale)
        return PrepareResult(tokens, MaskedRoute(layout.dst_row, topk_weights, workspace["masked_out"]))

    def expert_output(self, prepared: PrepareResult[MaskedRoute], out: torch.Tensor) -> torch.Tensor | None:
        return prepared.handle.expert_output

    def finalize(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[MaskedRoute], residual: Residual | None = None
    ) -> None:
        from moe_kernels.kernels.gather import weighted_gather

        dst_row, topk_weights = prepared.handle.dst_row, prepared.handle.topk_weights
        e, m, h = expert_output.shape
        if residual is not None:
            residual.wait()
        added = None if residual is None else residual.tensor
        weighted_gather(expert_output.view(e * m, h), dst_row, topk_weights, out, residual=added)
