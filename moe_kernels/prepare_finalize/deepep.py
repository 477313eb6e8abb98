"""Expert parallelism over DeepEP 2.5's ``EPBuffer`` (NVLink kernels), EXPANDED output.

Both parts dispatch with ``do_expand=True``: DeepEP writes one row per (token, local expert),
grouped by expert, each expert's segment starting on a multiple of the alignment DeepGEMM's
contiguous layout needs. That is :class:`~moe_kernels.contract.ExpandedTokens` as is -- the
received tensors are handed to the experts without a copy:

* ``x = recv_x [R, H]`` bf16,
* ``expert_ends = handle.psum_num_recv_tokens_per_expert [E_local]`` int32 (expert e's rows are
  ``[align(ends[e-1]), ends[e])``),
* ``row_weights = recv_topk_weights [R]`` float32.

``EPBuffer.combine`` sums a token's rows **without** the router weights (the ``topk_weights``
it takes are only reduced and returned), so EXPANDED experts scale each row by its weight and
finalize is the combine alone.

* :class:`DeepEPHighThroughputPrepareAndFinalize` (``do_cpu_sync=True``): the host waits for
  the received counts, so ``R`` is exact (no wasted rows); one host sync per call.
* :class:`DeepEPLowLatencyPrepareAndFinalize` (``do_cpu_sync=False``): outputs sized for the
  worst case (:func:`~.deepep_buffer.expanded_capacity_rows`), counts only on the GPU, no
  host sync anywhere: capturable in a CUDA graph.

Rules DeepEP 2.5 does not check on the device and these parts enforce (a violation writes
through a peer's NVLink window -- ``cudaErrorIllegalAddress`` -- or hangs):

* every rank passes the same ``num_max_tokens_per_rank`` and sizes its buffer identically
  (the buffer is symmetric memory; slot offsets are ``src_rank * num_max_tokens_per_rank``):
  the ranks' layer parameters are compared once, before the buffer is built;
* ``T <= num_max_tokens_per_rank`` on every call; ``top_k <= 32``; ``num_experts <= 2048``;
  ``num_experts / ep_size <= 512``; expert ids in ``[-1, num_experts)`` and distinct within a
  token (the composer checks ids unless told not to or while capturing);
* ``num_max_tokens_per_rank``, ``hidden``, ``num_experts``, ``top_k``, the alignment, the SM
  count and the mode are JIT template parameters: they are fixed per part, so each part
  compiles its kernels once (warm up before timing or capturing);
* a rank with no tokens still calls both collectives (it sends one token routed nowhere).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from moe_kernels.config import LayerConfig
from moe_kernels.contract import (
    ActivationFormat,
    Check,
    ExpandedTokens,
    PrepareAndFinalize,
    PrepareResult,
    check_device_type,
)
from moe_kernels.distributed import check_agreement, check_expert_map, group_backend
from moe_kernels.prepare_finalize import deepep_buffer as epb

#: at or below this many tokens per rank a call is decode-sized: the low-latency mode wins
DECODE_MAX_TOKENS = 256

#: the low-latency mode allocates its worst-case ``recv_x`` every call; refuse beyond this
LOW_LATENCY_RECV_BUDGET_BYTES = 4 * 2**30


class _Route:
    """What finalize needs back: DeepEP's handle, the buffer it belongs to, the caller's T."""

    __slots__ = ("handle", "buffer", "num_tokens")

    def __init__(self, handle: Any, buffer: Any, num_tokens: int) -> None:
        self.handle = handle
        self.buffer = buffer
        self.num_tokens = num_tokens


class _DeepEPPrepareAndFinalize(PrepareAndFinalize):
    """Shared by both modes; see the module docstring.

    ``group``: the expert-parallel NCCL process group (``None`` builds a part whose checks
    refuse, so registries can build it anywhere). ``max_num_tokens_per_rank``: the most tokens
    any rank passes in one call (``ParallelConfig.max_tokens_per_rank``; identical on all ranks).
    ``num_sms``: SMs for dispatch/combine (default: DeepEP's estimate, 24 when it cannot read
    NVLink bandwidth). ``expert_alignment``: segment alignment (default: DeepGEMM's contiguous
    alignment, 128 on SM90). ``zero_padding``: have DeepEP zero the alignment gaps; off by
    default because the experts never read them and zeroing up to ``(A-1) * E_local`` rows per
    call costs more than a decode dispatch itself.
    """

    output_format = ActivationFormat.EXPANDED
    devices = ("cuda",)
    dtypes = (torch.bfloat16,)  # EPBuffer.combine takes bf16 only
    supports_chunking = False
    #: DeepEP's mode switch: wait on the host for exact sizes (HT) or size for the worst case (LL)
    do_cpu_sync: ClassVar[bool]

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        max_num_tokens_per_rank: int,
        *,
        num_sms: int | None = None,
        expert_alignment: int | None = None,
        zero_padding: bool = False,
    ) -> None:
        if max_num_tokens_per_rank <= 0:
            raise ValueError(f"max_num_tokens_per_rank must be positive, got {max_num_tokens_per_rank}")
        if num_sms is not None and num_sms <= 0:
            raise ValueError(f"num_sms must be positive, got {num_sms}")
        if expert_alignment is not None and expert_alignment <= 0:
            raise ValueError(f"expert_alignment must be positive, got {expert_alignment}")
        self.group = group
        self._max_tokens = max_num_tokens_per_rank
        self._num_sms = num_sms
        self._alignment = expert_alignment
        self.zero_padding = zero_padding
        self._sms = 0  # settled by _setup (with the other ranks) on the first call
        self._ready = False
        self._map_checked = False

    # --- capabilities ---------------------------------------------------------------------

    @property
    def expert_alignment(self) -> int:
        return self._alignment if self._alignment is not None else epb.expert_alignment()

    def check_device(self, device: torch.device) -> Check:
        base = check_device_type("device", device, self.devices)
        if not base.ok:
            return Check.failed("device", f"DeepEP needs a CUDA GPU, not {device.type}")
        from moe_kernels.platform import sm_check

        return sm_check(device, 9, "DeepEP 2.5 (TMA kernels)")

    def check_parallel(self, cfg: LayerConfig) -> Check:
        par = cfg.parallel
        if self.group is None:
            return Check.failed("parallel", "needs the expert-parallel process group (pass group= to select)")
        if par.ep_size == 1:
            return Check.failed(
                "parallel", "ep_size=1: nothing to exchange; LocalPrepareAndFinalize runs it without communication"
            )
        if par.ep_size > epb.MAX_RANKS:
            return Check.failed("parallel", f"DeepEP 2.5 handles at most {epb.MAX_RANKS} ranks, ep_size={par.ep_size}")
        size, rank = self.group.size(), self.group.rank()
        if size != par.ep_size or rank != par.ep_rank:
            return Check.failed(
                "parallel",
                f"the process group has size {size}, rank {rank}; the config says ep_size={par.ep_size}, "
                f"ep_rank={par.ep_rank}",
            )
        backend = group_backend(self.group)
        if "nccl" not in backend:
            return Check.failed("parallel", f"DeepEP runs on an NCCL process group, this one is {backend}")
        if par.max_tokens_per_rank > self._max_tokens:
            return Check.failed(
                "parallel",
                f"the layer may pass {par.max_tokens_per_rank} tokens per rank; this part was built for "
                f"{self._max_tokens} (num_max_tokens_per_rank)",
            )
        return super().check_parallel(cfg)

    def check_limits(self, cfg: LayerConfig) -> Check:
        """DeepEP 2.5's compiled limits (beyond them its kernels write out of bounds or trap)."""
        moe, ep = cfg.moe, cfg.parallel.ep_size
        if moe.top_k > epb.MAX_TOP_K:
            return Check.failed("limits", f"DeepEP handles top_k <= {epb.MAX_TOP_K}, got {moe.top_k}")
        if moe.num_experts > epb.MAX_EXPERTS:
            return Check.failed("limits", f"DeepEP handles <= {epb.MAX_EXPERTS} experts, got {moe.num_experts}")
        if moe.num_experts % ep:
            return Check.failed("limits", f"num_experts ({moe.num_experts}) must be divisible by ep_size ({ep})")
        if moe.num_experts // ep > epb.MAX_EXPERTS_PER_RANK:
            return Check.failed(
                "limits", f"DeepEP handles <= {epb.MAX_EXPERTS_PER_RANK} experts per rank, got {moe.num_experts // ep}"
            )
        return Check.passed("limits", f"top_k={moe.top_k}, {moe.num_experts // ep} experts per rank")

    def checks(self, cfg: LayerConfig, device: torch.device) -> list[Check]:
        return [*super().checks(cfg, device), epb.deep_ep_check(), epb.nccl_check(), self.check_limits(cfg)]

    # --- the chain ------------------------------------------------------------------------

    def num_dispatchers(self) -> int:
        return self._require_group().size()

    def max_num_tokens_per_rank(self) -> int | None:
        return self._max_tokens

    def prepare(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        num_experts: int,
        num_local_experts: int,
        expert_map: torch.Tensor | None,
    ) -> PrepareResult:
        """Dispatch ``x [T, H]`` bf16 by ``topk_ids [T, K]`` (global ids, ``-1`` = none) into
        the expanded layout on the owning ranks; see the module docstring for the result."""
        group = self._require_group()
        world = group.size()
        t, k = topk_ids.shape
        if t > self._max_tokens:
            raise ValueError(
                f"x has {t} tokens; this DeepEP part takes at most {self._max_tokens} per rank "
                "(num_max_tokens_per_rank: more would overrun the peers' receive slots)"
            )
        if num_local_experts * world != num_experts:
            raise ValueError(
                f"num_experts ({num_experts}) must equal num_local_experts ({num_local_experts}) x ranks ({world})"
            )
        if x.dtype != torch.bfloat16:
            raise TypeError(f"DeepEP dispatches bf16 activations, got {x.dtype}")
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not self._ready:
            if capturing:
                raise RuntimeError(f"{self.name} must run once before CUDA-graph capture (it builds the buffer then)")
            self._setup(x.shape[1], k, num_experts, num_local_experts)
        if expert_map is not None and not self._map_checked and not capturing:
            check_expert_map(expert_map, group.rank(), num_local_experts)
            self._map_checked = True

        deep_ep, _ = epb.probe_deep_ep()
        buffer = epb.get_buffer(group, num_max_tokens_per_rank=self._max_tokens, hidden=x.shape[1], top_k=k)
        if t == 0:
            # an empty rank still joins both collectives: one token routed to no expert
            x = x.new_zeros((1, x.shape[1]))
            ids = torch.full((1, k), -1, dtype=deep_ep.topk_idx_t, device=x.device)
            weights = torch.zeros((1, k), dtype=torch.float32, device=x.device)
        else:
            ids = topk_ids.to(deep_ep.topk_idx_t).contiguous()
            weights = topk_weights.contiguous()
        alignment = self.expert_alignment
        recv_x, _, recv_weights, handle, _ = buffer.dispatch(
            x,
            topk_idx=ids,
            topk_weights=weights,
            num_experts=num_experts,
            num_max_tokens_per_rank=self._max_tokens,
            expert_alignment=alignment,
            num_sms=self._sms,
            do_cpu_sync=self.do_cpu_sync,
            do_expand=True,
            do_zero_padding=self.zero_padding,
        )
        tokens = ExpandedTokens(
            x=recv_x,
            expert_ends=handle.psum_num_recv_tokens_per_expert,
            row_weights=recv_weights,
            alignment=alignment,
            expected_m=self._expected_m(handle, t, world, k, num_experts, num_local_experts),
        )
        return PrepareResult(tokens, handle=_Route(handle, buffer, t))

    def finalize(self, out: torch.Tensor, expert_output: torch.Tensor, prepared: PrepareResult) -> None:
        """Combine the weighted rows ``expert_output [R, H]`` bf16 back to their source ranks:
        ``out[t]`` = the sum of token t's rows (DeepEP applies no weights here)."""
        route: _Route = prepared.handle
        combined, _, _ = route.buffer.combine(expert_output.contiguous(), handle=route.handle)
        out.copy_(combined[: route.num_tokens])

    # --- internals ------------------------------------------------------------------------

    def _setup(self, hidden: int, top_k: int, num_experts: int, num_local_experts: int) -> None:
        """Agree with the other ranks on everything that sizes the buffer or enters a JIT
        template, then build (or reuse) the group's buffer and settle the SM count."""
        group = self._require_group()
        check_agreement(
            group,
            self.name,
            {
                "mode (do_cpu_sync)": self.do_cpu_sync,
                "hidden_size": hidden,
                "top_k": top_k,
                "num_experts": num_experts,
                "num_local_experts": num_local_experts,
                "max_num_tokens_per_rank": self._max_tokens,
                "expert_alignment": self.expert_alignment,
                "num_sms (0 = automatic)": self._num_sms or 0,
            },
        )
        buffer = epb.get_buffer(group, num_max_tokens_per_rank=self._max_tokens, hidden=hidden, top_k=top_k)
        sms = self._num_sms or epb.num_sms_for(buffer, num_experts, top_k)
        sms += sms % 2  # DeepEP rounds up to even; agree on what it will use
        if self._num_sms is None:
            check_agreement(group, self.name, {"num_sms": sms})
        self._sms = sms
        self._ready = True

    @abstractmethod
    def _expected_m(self, handle: Any, t: int, world: int, top_k: int, num_experts: int, num_local_experts: int) -> int:
        """A host-side estimate of the valid rows per local expert (DeepGEMM tunes for it)."""

    def _require_group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError(f"{self.name} was built without a process group")
        return self.group


class DeepEPHighThroughputPrepareAndFinalize(_DeepEPPrepareAndFinalize):
    """EXPANDED dispatch with exact, host-known sizes (``do_cpu_sync=True``): for prefill and
    large batches. One host sync per call (the CPU waits for the received counts)."""

    do_cpu_sync = True
    supports_cuda_graphs = False

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        if cfg.parallel.max_tokens_per_rank > DECODE_MAX_TOKENS:
            return 10.0, "DeepEP high-throughput: NVLink kernels, zero-copy expanded layout, exact sizes"
        return 25.0, (
            f"DeepEP high-throughput at <= {DECODE_MAX_TOKENS} tokens per rank: its host sync per call "
            "dominates; the low-latency mode is preferred"
        )

    def _expected_m(self, handle: Any, t: int, world: int, top_k: int, num_experts: int, num_local_experts: int) -> int:
        # the host already knows the (aligned) rows per expert
        return max(1, math.ceil(handle.num_expanded_tokens / num_local_experts))


class DeepEPLowLatencyPrepareAndFinalize(_DeepEPPrepareAndFinalize):
    """EXPANDED dispatch with capacity-sized outputs and GPU-only counts (``do_cpu_sync=False``):
    for decode; no host sync in prepare or finalize, so prepare -> experts -> finalize can be
    captured in a CUDA graph (after one eager call has built the buffer and compiled the kernels).
    """

    do_cpu_sync = False
    supports_cuda_graphs = True

    def check_parallel(self, cfg: LayerConfig) -> Check:
        base = super().check_parallel(cfg)
        if not base.ok:
            return base
        moe, ep = cfg.moe, cfg.parallel.ep_size
        rows = epb.expanded_capacity_rows(ep, self._max_tokens, moe.top_k, moe.num_experts // ep, self.expert_alignment)
        nbytes = rows * moe.hidden_size * moe.dtype.itemsize
        if nbytes > LOW_LATENCY_RECV_BUDGET_BYTES:
            return Check.failed(
                "parallel",
                f"low-latency outputs are sized for the worst case: {rows} rows x H={moe.hidden_size} = "
                f"{nbytes / 2**30:.1f} GiB per call at max_tokens_per_rank={self._max_tokens} "
                f"(budget {LOW_LATENCY_RECV_BUDGET_BYTES / 2**30:.0f} GiB); lower max_tokens_per_rank "
                "or use the high-throughput mode",
            )
        return base

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        if cfg.parallel.cuda_graphs:
            return 5.0, "DeepEP low-latency: no host sync, the DeepEP mode a CUDA graph can capture"
        if cfg.parallel.max_tokens_per_rank <= DECODE_MAX_TOKENS:
            return 8.0, f"DeepEP low-latency: no host sync at decode sizes (<= {DECODE_MAX_TOKENS} tokens per rank)"
        return 30.0, "DeepEP low-latency at large batches: worst-case-sized outputs waste memory and bandwidth"

    def _expected_m(self, handle: Any, t: int, world: int, top_k: int, num_experts: int, num_local_experts: int) -> int:
        # nothing may be read from the GPU: assume every rank routes like this one, balanced
        return max(1, math.ceil(world * t * top_k / num_experts))
