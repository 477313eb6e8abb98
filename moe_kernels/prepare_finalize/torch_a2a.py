"""Expert parallelism over ``torch.distributed.all_to_all_single`` (gloo on CPUs, NCCL on GPUs).

The fallback where DeepEP cannot run. Each token travels once to every rank that owns at
least one of its top-k experts, with its ids translated to that rank's local ids (``-1`` for
experts elsewhere) and its weights; the receiving rank's STANDARD experts return one
weighted, already-summed partial row per received token; finalize sends those rows back and
each source rank adds the partials of a token in fp32 (in rank order, so the sum is bitwise
reproducible), then casts.

One call = four collectives: the split sizes (``[W]`` counts; ``all_to_all_single`` needs them
on the host, so this part syncs with the host and cannot be captured in a CUDA graph), the
rows, their ids+weights, and the partial rows coming back. Every rank must call
``prepare``/``finalize`` for every layer call, also with zero tokens.

The received row count changes with the routing, so the experts' workspaces are reserved for
the balanced case (``max_tokens_per_rank`` rows) and grow on demand: this part is never
captured in a CUDA graph, where growing would be unsafe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Layout,
    Pending,
    PrepareResult,
    Residual,
    StandardTokens,
    TokenFormat,
    Workspace,
    check_device_type,
)
from moe_kernels.core.distributed import group_backend
from moe_kernels.mlp import fp8
from moe_kernels.prepare_finalize.ep_base import ExpertParallelPrepareAndFinalize


@dataclass(frozen=True)
class Route:
    """The dispatch bookkeeping finalize reverses: ``token [S]`` int64 (source token of each
    sent row, grouped by destination rank), the split sizes both ways and the source T."""

    token: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    num_tokens: int


class TorchAllToAllPrepareAndFinalize(ExpertParallelPrepareAndFinalize[Route]):
    """STANDARD prepare/finalize that moves tokens between the ranks of the EP group."""

    output_layout = Layout.STANDARD
    supports_cuda_graphs = False  # the split sizes must reach the host every call

    # --- capabilities ---------------------------------------------------------------------

    def check_device(self, ctx: LayerContext) -> Check:
        base = check_device_type("device", ctx.device, self.devices)
        if not base.ok or ctx.group is None:
            return base
        backend = group_backend(ctx.group)
        needed = "nccl" if ctx.device.type == "cuda" else "gloo"
        if needed not in backend:
            return Check.failed(
                "device",
                f"all_to_all of {ctx.device.type} tensors needs a {needed} process group, this one is {backend}",
            )
        return Check.passed("device", f"{ctx.device.type} over {backend}")

    def check_format(self, ctx: LayerContext, fmt: TokenFormat) -> Check:
        if fmt.alignment != 1:
            return Check.failed("format", "sends whole tokens (alignment 1)")
        if fmt.act_quant is not None:
            return Check.passed("format", f"one row per (token, destination rank) as {fmt.act_quant.describe()}")
        return Check.passed("format", "one row per (token, destination rank)")

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 60.0, "torch all_to_all_single: a host sync and four collectives per call (fallback without DeepEP)"

    # --- the chain ------------------------------------------------------------------------

    def prepare(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace) -> PrepareResult[Route]:
        """Send each token of ``x [T, H]`` once to every rank owning one of its experts.

        Returns StandardTokens over the received rows ``[R, H]`` (grouped by source rank, in
        source token order), local ids ``[R, K]`` int32 (``-1`` = expert elsewhere) and weights
        ``[R, K]`` float32.
        """
        return self.prepare_async(x, topk_weights, topk_ids, workspace).wait()

    def prepare_async(
        self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace
    ) -> Pending[PrepareResult[Route]]:
        """:meth:`prepare` with the row exchanges left running (``async_op``); the split sizes
        are still exchanged and read on the host first, which ``all_to_all_single`` needs."""
        group = self.group
        world = group.size()
        e_local = self.ctx.placement.num_local_experts
        t, k = topk_ids.shape
        slots = self.slots(topk_ids.long())
        owner = torch.where(slots >= 0, slots // e_local, torch.full_like(slots, -1))  # [T, K]
        ranks = torch.arange(world, device=x.device)
        goes_to = (owner.unsqueeze(-1) == ranks).any(dim=1)  # [T, W]
        # row-major nonzero of [W, T]: grouped by destination rank, token order inside
        dest, token = goes_to.t().nonzero(as_tuple=True)
        send_counts = goes_to.sum(dim=0)  # [W] int64

        dest_col = dest.unsqueeze(1)
        local_ids = torch.where(owner[token] == dest_col, slots[token] - dest_col * e_local, -1)
        send_meta = torch.empty((token.shape[0], 2 * k), dtype=torch.int32, device=x.device)
        send_meta[:, :k] = local_ids
        send_meta[:, k:] = topk_weights[token].view(torch.int32)  # weights travel bit-exact

        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()  # the host sync
        num_recv = sum(recv_split)

        recv_meta = send_meta.new_empty((num_recv, 2 * k))
        meta_sent = dist.all_to_all_single(recv_meta, send_meta, recv_split, send_split, group=group, async_op=True)
        rows = self._exchange_rows(x, token, recv_split, send_split)

        def finish() -> PrepareResult[Route]:
            meta_sent.wait()
            tokens = StandardTokens(
                x=rows.wait(),
                topk_ids=recv_meta[:, :k].contiguous(),
                topk_weights=recv_meta[:, k:].contiguous().view(torch.float32),
            )
            return PrepareResult(tokens, Route(token, send_split, recv_split, t))

        return Pending(finish)

    def _exchange_rows(
        self, x: torch.Tensor, token: torch.Tensor, recv_split: list[int], send_split: list[int]
    ) -> Pending[torch.Tensor]:
        """Send row ``x[token[i]]`` for each sent row; the received ``[R, H]`` rows once waited on.

        Quantized format: rows travel as fp8 with one float32 scale per group of columns (about
        half the bytes) and are dequantized on arrival; the experts quantize them again on their
        way in, which finds the same group scales and so the same fp8 values (up to the bf16
        rounding of the dequantized value)."""
        group = self.group
        num_recv = sum(recv_split)
        quant = self.format.act_quant
        if quant is None:
            recv_x = x.new_empty((num_recv, x.shape[1]))
            # as bytes: gloo's all_to_all does not take every float dtype
            sent = dist.all_to_all_single(
                _bytes(recv_x), _bytes(x[token]), recv_split, send_split, group=group, async_op=True
            )
            return Pending(lambda: (sent.wait(), recv_x)[1])
        from moe_kernels.kernels import quantize_rows

        q = torch.empty(x.shape, dtype=quant.dtype, device=x.device)
        scale = torch.empty((x.shape[0], quant.scale_cols(x.shape[1])), dtype=torch.float32, device=x.device)
        quantize_rows(x, q, scale, group=quant.group)
        recv_q = q.new_empty((num_recv, x.shape[1]))
        recv_scale = scale.new_empty((num_recv, scale.shape[1]))
        sent = [
            dist.all_to_all_single(_bytes(recv), _bytes(src[token]), recv_split, send_split, group=group, async_op=True)
            for recv, src in ((recv_q, q), (recv_scale, scale))
        ]

        def finish() -> torch.Tensor:
            for work in sent:
                work.wait()
            return fp8.dequantize_groups(recv_q, recv_scale, quant.group).to(x.dtype)

        return Pending(finish)

    def finalize(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[Route], residual: Residual | None = None
    ) -> None:
        """Send the partial rows ``expert_output [R, H]`` back and write ``out [T, H]``: the
        fp32 sum of each token's partials, one per rank it visited (zero for a token routed
        nowhere), plus ``residual``."""
        self.finalize_async(out, expert_output, prepared, residual).wait()

    def finalize_async(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[Route], residual: Residual | None = None
    ) -> Pending[None]:
        route = prepared.handle
        partial = expert_output.contiguous()
        back = partial.new_empty((route.token.shape[0], partial.shape[1]))
        sent = dist.all_to_all_single(
            _bytes(back), _bytes(partial), route.send_split, route.recv_split, group=self.group, async_op=True
        )

        def finish() -> None:
            sent.wait()
            acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            if residual is not None:
                residual.wait()
                acc += residual.tensor.float()
            start = 0
            for n in route.send_split:
                # a token appears at most once per rank's segment: no colliding adds, fixed order
                if n:
                    acc.index_add_(0, route.token[start : start + n], back[start : start + n].float())
                start += n
            out.copy_(acc)

        return Pending(finish)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[N, H]`` tensor seen as ``[N, H * itemsize]`` bytes (a view, no copy)."""
    return t.view(torch.uint8)
