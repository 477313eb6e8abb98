"""Expert parallelism over DeepEP 2.5's ``EPBuffer`` (NVLink kernels), EXPANDED output.

Both parts dispatch with ``do_expand=True``: DeepEP writes one row per (token, local expert),
grouped by expert, each expert's segment starting on a multiple of the alignment the experts'
format asks for (DeepGEMM's contiguous-layout alignment for the DeepGEMM experts). That is
:class:`~moe_kernels.core.contract.ExpandedTokens` as is -- the received tensors are handed to the
experts without a copy:

* ``x = recv_x [R, H]`` bf16,
* ``expert_ends = handle.psum_num_recv_tokens_per_expert [E_local]`` int32 (expert e's rows are
  ``[align(ends[e-1]), ends[e])``),
* ``row_weights = recv_topk_weights [R]`` float32.

``EPBuffer.combine`` sums a token's rows **without** the router weights (the ``topk_weights``
it takes are only reduced and returned), so EXPANDED experts scale each row by its weight and
finalize is the combine alone.

fp8 dispatch, when the experts' format asks for fp8 activations
(:class:`~moe_kernels.experts.deepgemm.ExpandedDeepGemmExperts` on fp8 weights): prepare first quantizes ``x`` per
token and 128 columns (:func:`~moe_kernels.kernels.permute.quantize_rows`, scale
``max(amax, 1e-4) / 448``) into this part's workspaces and dispatches the tuple ``(x_q [T, H]
float8_e4m3fn, scales [T, H/128] float32 row-major)`` with ``use_tma_aligned_col_major_sf=True``.
The experts get, again without a copy:

* ``x = recv_x[0] [R, H]`` float8_e4m3fn,
* ``x_scale = recv_x[1] [R, H/128]`` float32, token-major with column stride ``align(R, 4)``
  (strides ``(1, align(R, 4))``): the layout DeepGEMM's SM90 fp8 GEMMs read as it is
  (:mod:`moe_kernels.mlp.scales`; any other layout costs them a transpose launch per GEMM).

A row then travels as ``H + 4 H / 128`` bytes instead of ``2 H`` (51.6 %); combine stays bf16.

* :class:`DeepEPHighThroughputPrepareAndFinalize` (``do_cpu_sync=True``): the host waits for
  the received counts, so ``R`` is exact (no wasted rows); one host sync per call.
* :class:`DeepEPLowLatencyPrepareAndFinalize` (``do_cpu_sync=False``): outputs sized for the
  worst case (:func:`~.deepep_buffer.expanded_capacity_rows`), counts only on the GPU, no
  host sync anywhere: capturable in a CUDA graph.

DeepEP routes by contiguous ownership (expert ``e`` on rank ``e // E_local``); any other
:class:`~moe_kernels.core.placement.ExpertPlacement` is honoured by translating the ids first (one
gather on the device, no sync).

Rules DeepEP 2.5 does not check (a violation writes through a peer's NVLink window --
``cudaErrorIllegalAddress`` --, traps the receiving GPU or hangs), which these parts enforce:

* every rank passes the same ``num_max_tokens_per_rank``, hidden size, expert count and top-k
  and sizes its buffer identically (the buffer is symmetric memory; slot offsets are
  ``src_rank * num_max_tokens_per_rank``): the ranks' layer parameters are compared when the
  kernel is built, before the buffer is;
* expert ids in ``[-1, num_experts)`` (larger ids write out of bounds) and distinct within a
  token (a repeat traps the receiving GPU): the composer checks ids unless told not to or
  while capturing; FusedMoE's router makes distinct ids by construction;
* ``hidden % 256 == 0`` (combine's kernel does not compile otherwise) -- checked with the
  compiled limits below.

DeepEP itself checks on the host (and raises): ``T <= num_max_tokens_per_rank``, the
``topk_idx`` dtype, ``num_experts % ranks == 0``, ``top_k <= 32``, ``num_experts <= 2048``,
``num_experts / ep_size <= 512``. Further facts:

* ``num_max_tokens_per_rank``, ``hidden``, ``num_experts``, ``top_k``, the alignment, the SM
  count and the mode are JIT template parameters: they are fixed per part, so each part
  compiles its kernels once (warm up before timing or capturing);
* a rank with no tokens still calls both collectives (it sends one token routed nowhere);
* row order inside an expert's segment is not deterministic (atomic slot assignment); the
  experts compute every row independently, so the output does not depend on it;
* ``torch.use_deterministic_algorithms(True)`` makes every DeepEP call assert (it fills
  uninitialized memory): leave it off.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from moe_kernels.backends import deep_ep as deep_ep_backend
from moe_kernels.backends.cuda import sm_check
from moe_kernels.backends.triton import triton_check
from moe_kernels.core.contract import (
    Check,
    ExpandedTokens,
    LayerContext,
    Layout,
    Pending,
    PrepareResult,
    Residual,
    TokenFormat,
    Workspace,
    WorkspaceSpec,
)
from moe_kernels.core.distributed import check_agreement, group_backend
from moe_kernels.mlp import fp8
from moe_kernels.prepare_finalize import deepep_buffer as epb
from moe_kernels.prepare_finalize.ep_base import ExpertParallelPrepareAndFinalize

#: at or below this many tokens per rank a call is decode-sized: the low-latency mode wins
DECODE_MAX_TOKENS = 256

#: the low-latency mode's worst-case ``recv_x`` (with its scales when fp8); refuse layers that
#: would need more
LOW_LATENCY_RECV_BUDGET_BYTES = 4 * 2**30

#: DeepEP's fp8 dispatch carries one float32 scale per this many columns (DeepGEMM's recipe)
DISPATCH_SCALE_GROUP = fp8.SCALE_BLOCK

#: combine's kernel is written for hidden sizes in multiples of 256 elements (DeepEP 2.5
#: csrc/kernels/.../combine.cuh); other sizes fail to compile at the first finalize
HIDDEN_MULTIPLE = 256


@dataclass(frozen=True)
class DeepEPRoute:
    """What finalize needs back: DeepEP's handle, the buffer it belongs to, the caller's T."""

    handle: Any
    buffer: Any
    num_tokens: int


class _DeepEPPrepareAndFinalize(ExpertParallelPrepareAndFinalize[DeepEPRoute]):
    """Shared by both modes; see the module docstring.

    ``num_sms``: SMs for dispatch/combine (default: DeepEP's estimate, 24 when it cannot read
    NVLink bandwidth). ``expert_alignment``: pin the segment alignment (default: whatever the
    experts' format asks for). ``zero_padding``: have DeepEP zero the alignment gaps; off by
    default because the experts never read them and zeroing up to ``(A-1) * E_local`` rows per
    call costs more than a decode dispatch itself.
    """

    output_layout = Layout.EXPANDED
    devices = ("cuda",)
    dtypes = (torch.bfloat16,)  # EPBuffer.combine takes bf16 only
    #: DeepEP's mode switch: wait on the host for exact sizes (HT) or size for the worst case (LL)
    do_cpu_sync: ClassVar[bool]

    def __init__(self, *, num_sms: int | None = None, expert_alignment: int | None = None, zero_padding: bool = False):
        if num_sms is not None and num_sms <= 0:
            raise ValueError(f"num_sms must be positive, got {num_sms}")
        if expert_alignment is not None and expert_alignment <= 0:
            raise ValueError(f"expert_alignment must be positive, got {expert_alignment}")
        self.num_sms = num_sms
        self.expert_alignment = expert_alignment
        self.zero_padding = zero_padding

    # --- capabilities ---------------------------------------------------------------------

    def check_device(self, ctx: LayerContext) -> Check:
        return sm_check(ctx.device, deep_ep_backend.ARCH_MAJORS, "DeepEP")

    def check_format(self, ctx: LayerContext, fmt: TokenFormat) -> Check:
        pinned = self.expert_alignment
        if pinned is not None and pinned % fmt.alignment:
            return Check.failed("format", f"{self.name} was built with expert_alignment={pinned}")
        aligned = f"expert segments aligned to {pinned or fmt.alignment} rows"
        quant = fmt.act_quant
        if quant is None:
            return Check.passed("format", aligned)
        hidden = ctx.cfg.moe.hidden_size
        if quant.dtype != fp8.FP8_DTYPE or quant.group != DISPATCH_SCALE_GROUP:
            want = f"fp8 with one scale per {DISPATCH_SCALE_GROUP} columns"
            return Check.failed("format", f"DeepEP dispatches {want}, not {quant.describe()}")
        if hidden % quant.group:
            return Check.failed(
                "format",
                f"fp8 dispatch sends one float32 scale per {quant.group} columns, "
                f"but hidden_size={hidden} is not a multiple of {quant.group}",
            )
        quantizer = triton_check(ctx.device)
        if not quantizer.ok:
            return Check.failed("format", f"fp8 dispatch quantizes x with a Triton kernel first: {quantizer.reason}")
        return Check.passed(
            "format", f"fp8 rows with float32 scales per {quant.group} columns (about half the bytes), {aligned}"
        )

    def check_parallel(self, ctx: LayerContext) -> Check:
        base = super().check_parallel(ctx)
        if not base.ok:
            return base
        limit = deep_ep_backend.MAX_RANKS
        if ctx.placement.ep_size > limit:
            return Check.failed(
                "parallel", f"DeepEP 2.5 handles at most {limit} ranks, ep_size={ctx.placement.ep_size}"
            )
        assert ctx.group is not None  # the base check refuses a missing group
        backend = group_backend(ctx.group)
        if "nccl" not in backend:
            return Check.failed("parallel", f"DeepEP runs on an NCCL process group, this one is {backend}")
        return base

    def check_limits(self, ctx: LayerContext) -> Check:
        """DeepEP 2.5's compiled limits (beyond them its kernels write out of bounds or trap)."""
        moe, e_local = ctx.cfg.moe, ctx.placement.num_local_experts
        if moe.top_k > deep_ep_backend.MAX_TOP_K:
            return Check.failed("limits", f"DeepEP handles top_k <= {deep_ep_backend.MAX_TOP_K}, got {moe.top_k}")
        physical = ctx.placement.num_physical_experts
        if physical > deep_ep_backend.MAX_EXPERTS:
            limit = deep_ep_backend.MAX_EXPERTS
            return Check.failed("limits", f"DeepEP handles <= {limit} experts, got {physical} (physical experts)")
        if e_local > deep_ep_backend.MAX_EXPERTS_PER_RANK:
            return Check.failed(
                "limits", f"DeepEP handles <= {deep_ep_backend.MAX_EXPERTS_PER_RANK} experts per rank, got {e_local}"
            )
        if moe.hidden_size % HIDDEN_MULTIPLE:
            return Check.failed(
                "limits", f"DeepEP's combine needs hidden_size % {HIDDEN_MULTIPLE} == 0, got {moe.hidden_size}"
            )
        return Check.passed("limits", f"top_k={moe.top_k}, {e_local} experts per rank")

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [
            *super().checks(ctx),
            deep_ep_backend.deep_ep_check(),
            deep_ep_backend.nccl_check(),
            self.check_limits(ctx),
        ]

    # --- lifecycle ------------------------------------------------------------------------

    def alignment(self, fmt: TokenFormat) -> int:
        return self.expert_alignment or fmt.alignment

    def agreement(self, ctx: LayerContext, fmt: TokenFormat) -> dict[str, int | bool | torch.dtype]:
        return {
            **super().agreement(ctx, fmt),
            "mode (do_cpu_sync)": self.do_cpu_sync,
            "expert_alignment": self.alignment(fmt),
            "num_sms (0 = automatic)": self.num_sms or 0,
        }

    def bind(self, ctx: LayerContext, fmt: TokenFormat) -> None:
        """Agree with the other ranks on everything that sizes the buffer or enters a JIT
        template, reserve the group's buffer and settle the SM count."""
        super().bind(ctx, fmt)
        moe = ctx.cfg.moe
        self._max_tokens = ctx.cfg.parallel.max_tokens_per_rank
        buffer = epb.reserve(
            self.group,
            num_max_tokens_per_rank=self._max_tokens,
            hidden=moe.hidden_size,
            top_k=moe.top_k,
            fp8_dispatch=fmt.act_quant is not None,
        )
        self._reserved = True
        sms = self.num_sms or epb.num_sms_for(buffer, ctx.placement.num_physical_experts, moe.top_k)
        sms += sms % 2  # DeepEP rounds up to even; agree on what it will use
        if self.num_sms is None:
            try:
                check_agreement(self.group, self.name, {"num_sms": sms})
            except ValueError:
                # raised on every rank alike, so the (collective) release pairs up
                self.release()
                raise
        self._sms = sms
        self._alignment = self.alignment(fmt)

    def release(self) -> None:
        if getattr(self, "_reserved", False):
            self._reserved = False
            epb.release(self.group)

    # --- the chain ------------------------------------------------------------------------

    def workspace_specs(self, ctx: LayerContext, fmt: TokenFormat) -> dict[str, WorkspaceSpec]:
        quant = fmt.act_quant
        if quant is None:
            return {}
        # what an fp8 dispatch sends: the quantized rows and their scales, row-major; at least
        # one row, since an empty rank sends one token routed nowhere
        t, h = ctx.max_tokens, ctx.cfg.moe.hidden_size
        return {
            "dispatch_x": WorkspaceSpec(*quant.rows((t,), h)),
            "dispatch_x_scale": WorkspaceSpec((t, quant.scale_cols(h)), torch.float32),
        }

    def prepare(
        self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace
    ) -> PrepareResult[DeepEPRoute]:
        """Dispatch ``x [T, H]`` bf16 (quantized to fp8 first when the format says so) by
        ``topk_ids [T, K]`` (global ids, ``-1`` = none) into the expanded layout on the owning
        ranks; see the module docstring for the result."""
        return self._dispatch(x, topk_weights, topk_ids, workspace, overlap=False).wait()

    def prepare_async(
        self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace
    ) -> Pending[PrepareResult[DeepEPRoute]]:
        """:meth:`prepare` on DeepEP's communication stream (``async_with_compute_stream``): the
        compute stream goes on until the result is waited on (its event)."""
        return self._dispatch(x, topk_weights, topk_ids, workspace, overlap=True)

    def _dispatch(
        self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace, *, overlap: bool
    ) -> Pending[PrepareResult[DeepEPRoute]]:
        group = self.group
        fp8 = self.format.act_quant is not None
        t, k = topk_ids.shape
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            epb.mark_captured(group)
        deep_ep, _ = deep_ep_backend.probe_deep_ep()
        buffer = epb.current(group)
        if t == 0:
            # an empty rank still joins both collectives: one token routed to no expert
            x = x.new_zeros((1, x.shape[1]))
            ids = torch.full((1, k), -1, dtype=deep_ep.topk_idx_t, device=x.device)
            weights = torch.zeros((1, k), dtype=torch.float32, device=x.device)
        else:
            ids = self.slots(topk_ids).to(deep_ep.topk_idx_t).contiguous()
            weights = topk_weights.contiguous()
        recv_x, _, recv_weights, handle, event = buffer.dispatch(
            self._quantize(x, workspace) if fp8 else x,
            topk_idx=ids,
            topk_weights=weights,
            num_experts=self.ctx.placement.num_physical_experts,
            num_max_tokens_per_rank=self._max_tokens,
            expert_alignment=self._alignment,
            num_sms=self._sms,
            do_cpu_sync=self.do_cpu_sync,
            do_expand=True,
            do_zero_padding=self.zero_padding,
            use_tma_aligned_col_major_sf=fp8,
            async_with_compute_stream=overlap,
        )

        def finish() -> PrepareResult[DeepEPRoute]:
            if overlap:
                event.current_stream_wait()
            rows, scales = recv_x if fp8 else (recv_x, None)
            tokens = ExpandedTokens(
                x=rows,
                expert_ends=handle.psum_num_recv_tokens_per_expert,
                row_weights=recv_weights,
                alignment=self._alignment,
                expected_m=self._expected_m(handle, t),
                x_scale=scales,
            )
            return PrepareResult(tokens, DeepEPRoute(handle, buffer, t))

        return Pending(finish)

    def _quantize(self, x: torch.Tensor, workspace: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` bf16 -> ``(float8_e4m3fn [T, H], float32 scales [T, H/128])``, both
        row-major views of this part's workspaces: what an fp8 dispatch sends (DeepEP reads the
        scales through their strides and lays them out for the receiver itself)."""
        from moe_kernels.kernels import quantize_rows

        t = x.shape[0]
        q, scale = workspace["dispatch_x"][:t], workspace["dispatch_x_scale"][:t]
        return quantize_rows(x, q, scale, group=DISPATCH_SCALE_GROUP)

    def finalize(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[DeepEPRoute], residual: Residual | None = None
    ) -> None:
        """Combine the weighted rows ``expert_output [R, H]`` bf16 back to their source ranks:
        ``out[t]`` = the sum of token t's rows (DeepEP applies no weights here) + ``residual``."""
        self._combine(out, expert_output, prepared, residual, overlap=False).wait()

    def finalize_async(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[DeepEPRoute], residual: Residual | None = None
    ) -> Pending[None]:
        return self._combine(out, expert_output, prepared, residual, overlap=True)

    def _combine(
        self,
        out: torch.Tensor,
        expert_output: torch.Tensor,
        prepared: PrepareResult[DeepEPRoute],
        residual: Residual | None,
        *,
        overlap: bool,
    ) -> Pending[None]:
        route = prepared.handle
        combined, _, event = route.buffer.combine(
            expert_output.contiguous(), handle=route.handle, async_with_compute_stream=overlap
        )

        def finish() -> None:
            if overlap:
                event.current_stream_wait()
            rows = combined[: route.num_tokens]
            if residual is None:
                out.copy_(rows)
                return
            residual.wait()
            torch.add(rows, residual.tensor, out=out)  # in the copy's place: no extra pass

        return Pending(finish)

    def capacity_rows(self, ctx: LayerContext, fmt: TokenFormat) -> int:
        """Rows of a worst-case expanded dispatch (every rank sends every token here)."""
        moe, placement = ctx.cfg.moe, ctx.placement
        return deep_ep_backend.expanded_capacity_rows(
            placement.ep_size,
            ctx.cfg.parallel.max_tokens_per_rank,
            moe.top_k,
            placement.num_local_experts,
            self.alignment(fmt),
        )

    @abstractmethod
    def _expected_m(self, handle: Any, t: int) -> int:
        """A host-side estimate of the valid rows per local expert (DeepGEMM tunes for it)."""


class DeepEPHighThroughputPrepareAndFinalize(_DeepEPPrepareAndFinalize):
    """EXPANDED dispatch with exact, host-known sizes (``do_cpu_sync=True``): for prefill and
    large batches. One host sync per call (the CPU waits for the received counts). The received
    rows vary per call, so the experts' workspaces are reserved for a balanced routing and grow
    on demand (this part is never captured in a CUDA graph)."""

    do_cpu_sync = True
    supports_cuda_graphs = False

    def max_expert_rows(self, ctx: LayerContext, fmt: TokenFormat) -> int:
        moe, e_local = ctx.cfg.moe, ctx.placement.num_local_experts
        balanced = ctx.cfg.parallel.max_tokens_per_rank * min(moe.top_k, e_local)
        return deep_ep_backend.expanded_capacity_rows(1, balanced, 1, e_local, self.alignment(fmt))

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        if ctx.cfg.parallel.max_tokens_per_rank > DECODE_MAX_TOKENS:
            return 10.0, "DeepEP high-throughput: NVLink kernels, zero-copy expanded layout, exact sizes"
        return 25.0, (
            f"DeepEP high-throughput at <= {DECODE_MAX_TOKENS} tokens per rank: its host sync per call "
            "dominates; the low-latency mode is preferred"
        )

    def _expected_m(self, handle: Any, t: int) -> int:
        # the host already knows the (aligned) rows per expert
        return max(1, math.ceil(handle.num_expanded_tokens / self.ctx.placement.num_local_experts))


class DeepEPLowLatencyPrepareAndFinalize(_DeepEPPrepareAndFinalize):
    """EXPANDED dispatch with capacity-sized outputs and GPU-only counts (``do_cpu_sync=False``):
    for decode; no host sync in prepare or finalize, so prepare -> experts -> finalize can be
    captured in a CUDA graph (the buffer is built and the shapes fixed when the kernel is
    built; warm the JIT up with one eager call before capturing).
    """

    do_cpu_sync = False
    supports_cuda_graphs = True

    def check_format(self, ctx: LayerContext, fmt: TokenFormat) -> Check:
        """Also the worst-case ``recv_x``: its rows follow the format's alignment and its bytes
        whether the rows are fp8 (with their scales) or bf16."""
        base = super().check_format(ctx, fmt)
        if not base.ok:
            return base
        rows, h = self.capacity_rows(ctx, fmt), ctx.cfg.moe.hidden_size
        if fmt.act_quant is not None:
            # fp8 rows, and float32 scales whose column stride DeepEP pads to 4 rows (TMA alignment)
            scale_bytes = math.ceil(rows / 4) * 4 * fmt.act_quant.scale_cols(h) * 4
            nbytes, what = rows * h * fp8.FP8_DTYPE.itemsize + scale_bytes, "fp8 + float32 scales"
        else:
            nbytes, what = rows * h * ctx.cfg.moe.dtype.itemsize, str(ctx.cfg.moe.dtype).removeprefix("torch.")
        if nbytes > LOW_LATENCY_RECV_BUDGET_BYTES:
            return Check.failed(
                "format",
                f"low-latency outputs are sized for the worst case: {rows} rows x H={h} {what} = "
                f"{nbytes / 2**30:.1f} GiB per call at max_tokens_per_rank={ctx.cfg.parallel.max_tokens_per_rank} "
                f"(budget {LOW_LATENCY_RECV_BUDGET_BYTES / 2**30:.0f} GiB); lower max_tokens_per_rank "
                "or use the high-throughput mode",
            )
        return base

    def max_expert_rows(self, ctx: LayerContext, fmt: TokenFormat) -> int:
        return self.capacity_rows(ctx, fmt)

    def workspace_specs(self, ctx: LayerContext, fmt: TokenFormat) -> dict[str, WorkspaceSpec]:
        # the experts' output rows (in the activation dtype, fp8 dispatch or not), at the fixed
        # capacity a captured graph replays with
        rows = self.capacity_rows(ctx, fmt)
        specs = super().workspace_specs(ctx, fmt)
        specs["expert_output"] = WorkspaceSpec((rows, ctx.cfg.moe.hidden_size), ctx.cfg.moe.dtype)
        return specs

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        if ctx.cfg.parallel.cuda_graphs:
            return 5.0, "DeepEP low-latency: no host sync, the DeepEP mode a CUDA graph can capture"
        if ctx.cfg.parallel.max_tokens_per_rank <= DECODE_MAX_TOKENS:
            return 8.0, f"DeepEP low-latency: no host sync at decode sizes (<= {DECODE_MAX_TOKENS} tokens per rank)"
        return 30.0, "DeepEP low-latency at large batches: worst-case-sized outputs waste memory and bandwidth"

    def _expected_m(self, handle: Any, t: int) -> int:
        # nothing may be read from the GPU: assume every rank routes like this one, balanced
        placement, moe = self.ctx.placement, self.ctx.cfg.moe
        return max(1, math.ceil(placement.ep_size * t * moe.top_k / placement.num_physical_experts))
