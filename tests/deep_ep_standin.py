"""A CPU stand-in for DeepEP 2.5's ``deep_ep`` module: ``EPBuffer`` over ``torch.distributed``.

DeepEP's NVLink kernels need two or more Hopper GPUs, so the code around them
(``moe_kernels.prepare_finalize.deepep``) would otherwise only ever run blind. This module
re-implements the semantics of the parts that code uses -- expanded ``dispatch``, unweighted
``combine``, the handle, buffer sizing, the SM estimate -- on CPU tensors with collectives of
any backend that has ``all_to_all_single`` and ``all_gather_object`` (gloo in CI). Call
:func:`install` in each rank process (before anything imports ``deep_ep``) to make
``import deep_ep`` and ``from deep_ep.utils.envs import get_nvlink_gbs`` resolve here.

What it models: one NVLink domain (every rank a scale-up peer, no RDMA, so
``num_scaleout_ranks == 1``), an H100/H200 SXM device (132 SMs, 18 NVLink links), and the
defaults ``allow_multiple_reduction=True`` and ``do_expand=True``.

Semantics reproduced (DeepEP 2.5 source, ``csrc/buffers/ep.hpp``, ``deep_ep/buffers/ep.py``
and the kernels under ``deep_ep/include/deep_ep/impls/ep``):

* expanded layout: local expert ``e`` of rank ``r`` (global ``r * E_local + e``) owns rows
  ``[align(psum[e-1], A), psum[e])`` of ``recv_x [rows, H]``, where
  ``psum = handle.psum_num_recv_tokens_per_expert`` (int32 ``[E_local]``) is each segment's
  aligned start plus its true count; ``recv_topk_weights`` is float32 ``[rows]``;
  ``recv_topk_idx`` is ``None``;
* ``do_cpu_sync=True``: ``rows = sum(align(count_e, A))`` exactly;
  ``do_cpu_sync=False``: ``rows = align(R * T_max * min(K, E_local) + (A - 1) * E_local, A)``,
  ``handle.num_recv_tokens = R * T_max`` and ``handle.num_recv_tokens_per_expert_list == []``;
* ``do_zero_padding=True`` zeroes the alignment gaps *inside* segments (rows, weights and fp8
  scales); the capacity tail past the last segment is never cleared;
* fp8 dispatch: ``x = (float8_e4m3fn [T, H], sf [T, P])`` with a 4-byte ``sf`` dtype (float32
  scales or int32 packs of four UE8M0 bytes, any strides); ``recv_x`` becomes the tuple
  ``(float8_e4m3fn [rows, H], sf dtype [rows, P])``, the scales row-major, or column-major with
  a column stride of ``align(rows, 4)`` when ``use_tma_aligned_col_major_sf=True``;
* ``combine`` sums a token's rows **without** weights: each expert rank first reduces the rows
  of a token it holds (fp32 accumulation in top-k lane order, rounded to bf16), the source
  rank then adds ``bias`` and those partial sums (fp32, ranks in order of their first lane,
  rounded to bf16). ``topk_weights [rows]`` float32, when given, is only gathered back:
  ``combined_topk_weights [T, K]`` holds each lane's row weight, 0 for ``-1`` lanes. A token
  routed nowhere combines to zeros (or to its bias);
* events: ``async_with_compute_stream=False`` returns an ``EventOverlap`` without an event
  (``current_stream_wait()`` then fails its assertion, as in DeepEP); ``True`` returns one whose
  wait does nothing; ``defer_epilogue=True`` returns only the ``EventOverlap``, whose
  ``current_stream_wait()`` returns the results once;
* ``EPBuffer(deterministic=True)`` orders each segment by source rank, then source token.

Host checks DeepEP also makes raise :class:`HostAssertionError` (DeepEP raises ``RuntimeError``
"Assertion exception (file:line): cond" there; its Python-level ``assert`` checks stay
``AssertionError`` here). The stand-in is STRICTER than DeepEP where DeepEP does not check and a
violation corrupts memory, traps the GPU or hangs; those raise :class:`UncheckedByDeepEPError`:

* an expert id outside ``[-1, num_experts)`` (DeepEP treats any negative id as "none" and writes
  out of bounds for ids >= num_experts), or the same expert twice in one token (a device trap
  on the receiving rank, ``dispatch_copy_epilogue.cuh:108``);
* ``topk_weights`` with a different top-k width than ``topk_idx`` (only the token count is
  compared, ``ep.hpp:371``);
* ranks disagreeing on ``num_experts``, ``num_max_tokens_per_rank``, top-k, the hidden row size,
  the activation dtype, the scale layout or whether weights are sent (JIT template parameters
  and the wire format of the symmetric buffer), or on ``num_bytes`` at construction; one rank
  calling ``dispatch`` while another calls ``combine``;
* ``x`` of ``combine`` not having exactly the dispatched row count (DeepEP's check is a
  tautology in expanded mode, ``ep.hpp:832``; fewer rows are read out of bounds);
* ``x`` of ``dispatch`` that is neither bf16 nor an ``(float8_e4m3fn, scales)`` tuple (DeepEP
  only checks the element size); ``expert_alignment < 1``; ``num_max_tokens_per_rank < 1``;
* any rank failing a check: every rank raises (the failing one its own error, the others an
  :class:`UncheckedByDeepEPError` naming it), where DeepEP's other ranks would wait in the
  kernel until the GPU timeout traps.

Where it differs from DeepEP (pin these on GPUs):

1. CPU tensors and gloo instead of CUDA and NCCL symmetric memory; no streams, so events are
   no-ops and asynchronous or deferred calls have already finished when they return.
2. Row order inside a segment: DeepEP's is nondeterministic (an ``atomicAdd`` per row,
   ``dispatch_copy_epilogue.cuh:122``) unless ``deterministic=True``; here it is a seeded shuffle
   (``DEEP_EP_STANDIN_SEED``, default 0), so consumers cannot depend on an order.
3. Rows DeepEP leaves unwritten (alignment gaps without zero padding, the ``do_cpu_sync=False``
   capacity tail) hold stale memory there; here they hold NaN (bf16, fp8 0x7F, float32 weights
   and scales) or -1 (int32 UE8M0 scale packs, whose 0xFF bytes are UE8M0's NaN), so a test
   catches anyone reading them.
4. ``combine`` rounding emulates DeepEP's two stages (per expert rank, then per source rank)
   with fp32 accumulation in lane order; GPU bf16 ``hadd2`` for two terms and accumulation
   details may differ in the last bit.
5. Handle internals: ``recv_src_metadata`` rows past the received count (``do_cpu_sync=False``)
   are -1 (stale on the GPU); ``dst_buffer_slot_idx`` numbers slots in token order (atomic order
   on the GPU); ``token_metadata_at_forward`` and ``channel_linked_list`` are ``None``
   (single-domain DeepEP also leaves them ``None``).
6. ``get_buffer_size_hint`` and the buffer-size checks use DeepEP's single-NVLink-domain
   formulas only; ``get_theoretical_num_sms`` uses its bandwidth model with 132 SMs and this
   module's ``get_nvlink_gbs`` (18 x 26.562 GB/s x ``factor``; ``DEEP_EP_STANDIN_NVLINK_GBS``
   overrides the link total, ``0`` simulates a failed ``nvidia-smi`` probe). DeepEP caches both
   answers; this module reads the variable on every call.
7. Limits DeepEP enforces when it JIT-compiles a kernel (top-k <= 32, ``combine``'s hidden
   a multiple of 256) are host errors here, raised before any communication.
8. ``destroy()`` is a collective barrier of the group, like DeepEP's GPU barrier and NCCL
   window deregistration; DeepEP's destructor also destroys (collectively) a buffer built with
   ``explicitly_destroy=False``, which this stand-in does not emulate.
9. A rank with zero tokens works here; on GPUs DeepEP's host checks accept it, but the kernels'
   behaviour with an empty ``x`` is unverified.

Not implemented (``NotImplementedError``): the non-expanded layout, cached dispatch
(``handle=``), ``allow_multiple_reduction=False``, load-balancing regions and ``lb_*`` methods.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

__version__ = "2.5.0+cpu-standin"

#: DeepEP's ``deep_ep.topk_idx_t`` (built with EP_NUM_TOPK_IDX_BITS=64, the default)
topk_idx_t = torch.int64

#: the modelled device: H100/H200 SXM
NUM_DEVICE_SMS = 132
NUM_NVLINK_LINKS = 18
NVLINK_LINK_GBS = 26.562

#: DeepEP's compiled constants (deep_ep/include/deep_ep/common/compiled.cuh, layout/ep/workspace.cuh)
ALLOCATION_ALIGNMENT_BYTES = 2 * 1024 * 1024
TMA_ALIGNMENT_BYTES = 32
RDMA_ALIGNMENT_BYTES = 64
MAX_TOPK = 32
MAX_RANKS = 1024
MAX_EXPERTS = 2048
MAX_EXPERTS_PER_RANK = 512
#: combine's vector width: 32 lanes x 16-byte loads of bf16 (combine.cuh:110)
COMBINE_HIDDEN_MULTIPLE = 256
#: the host-side SM read/write bandwidth DeepEP assumes (deep_ep/utils/envs.py)
SM_READ_GBS = 180.0
SM_WRITE_GBS = 45.0

SEED_ENV = "DEEP_EP_STANDIN_SEED"
NVLINK_ENV = "DEEP_EP_STANDIN_NVLINK_GBS"


class HostAssertionError(RuntimeError):
    """A check DeepEP also makes on the host (it raises ``RuntimeError`` there)."""


class UncheckedByDeepEPError(RuntimeError):
    """A violation DeepEP does not check: on GPUs it corrupts memory, traps or hangs."""


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _reinterpret(columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``[n, w]`` uint8 (columns of a packed row) as ``dtype`` ``[n, w / itemsize]``. A
    copy: the slice may start at an offset a wider dtype cannot view."""
    return columns.clone(memory_format=torch.contiguous_format).view(dtype)


def _host_check(ok: bool, what: str, where: str) -> None:
    if not ok:
        raise HostAssertionError(f"{what} (DeepEP checks this on the host: {where})")


def _strict_check(ok: bool, what: str, consequence: str) -> None:
    if not ok:
        raise UncheckedByDeepEPError(f"{what} (DeepEP does not check this: {consequence})")


def _check_torch_deterministic() -> None:
    # DeepEP refuses both flags at once: torch.empty would then launch a fill kernel that races
    # its communication stream (deep_ep/utils/envs.py check_torch_deterministic)
    assert not (torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory), (
        "DeepEP cannot run with deterministic algorithms and fill_uninitialized_memory both on"
    )


# --- deep_ep.utils.envs --------------------------------------------------------------------


def get_nvlink_gbs(factor: float = 0.9) -> float:
    """Total NVLink bandwidth in GB/s times ``factor``, 0 when "detection fails".

    DeepEP parses ``nvidia-smi nvlink -s``; here the link total is 18 x 26.562 GB/s (H100/H200
    SXM) unless ``DEEP_EP_STANDIN_NVLINK_GBS`` sets it (``0`` = detection failed)."""
    total = float(os.environ.get(NVLINK_ENV, NUM_NVLINK_LINKS * NVLINK_LINK_GBS))
    return total * factor if total > 0 else 0.0


utils = ModuleType("deep_ep.utils", "CPU stand-in of deep_ep.utils")
utils.envs = ModuleType("deep_ep.utils.envs", "CPU stand-in of deep_ep.utils.envs")
utils.envs.get_nvlink_gbs = get_nvlink_gbs
utils.envs.check_torch_deterministic = _check_torch_deterministic


def install() -> ModuleType:
    """Make ``import deep_ep`` and ``import deep_ep.utils.envs`` resolve to this stand-in in the
    calling process; returns the module. Call it before anything imports ``deep_ep``."""
    module = sys.modules[__name__]
    sys.modules["deep_ep"] = module
    sys.modules["deep_ep.utils"] = utils
    sys.modules["deep_ep.utils.envs"] = utils.envs
    return module


# --- events --------------------------------------------------------------------------------


class EventHandle:
    """DeepEP's CUDA event on the communication stream; on CPUs everything already happened."""

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event: nothing to wait for here."""


class EventOverlap:
    """DeepEP's event wrapper: ``current_stream_wait()`` waits, then runs the registered hook
    (a deferred epilogue) once and returns its result."""

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Callable[[], Any] | None = None
        self._release_on_exit = False

    def current_stream_wait(self, release_handle: bool = False) -> Any:
        """Wait and return the hook's result (``None`` without a hook or on a second call).
        Fails like DeepEP when the call was not asynchronous (there is no event)."""
        assert self.event is not None, "this call was not asynchronous: there is no event to wait on"
        self.event.current_stream_wait()
        hook, self.hook_after_wait = self.hook_after_wait, None
        result = hook() if hook is not None else None
        if release_handle:
            self.event = None
        return result

    def wait(self) -> Any:
        return self.current_stream_wait()

    def register_hook_after_wait(self, hook: Callable[[], Any]) -> None:
        assert self.hook_after_wait is None, "a hook is already registered on this EventOverlap"
        self.hook_after_wait = hook

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        self._release_on_exit = release_handle
        return self

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_on_exit)
        self._release_on_exit = False


# --- the handle ----------------------------------------------------------------------------


class EPHandle:
    """What ``dispatch`` returns for ``combine``; DeepEP's attribute names and meanings.

    * ``psum_num_recv_tokens_per_scaleup_rank``: int32 ``[R]``, inclusive prefix sum of the
      tokens received from each rank (a token counts once per rank however many of its experts
      live there).
    * ``psum_num_recv_tokens_per_expert``: int32 ``[E_local]``, ``align(psum[e-1], A) + count_e``.
    * ``num_unaligned_recv_tokens_per_expert``: int32 ``[E_local]``, ``count_e``.
    * ``num_recv_tokens_per_expert_list``: the aligned counts (``do_cpu_sync``) or ``[]``.
    * ``num_recv_tokens`` / ``num_expanded_tokens``: exact with ``do_cpu_sync``, else the
      capacity (``R * T_max`` and the ``recv_x`` row count).
    * ``recv_src_metadata``: int32 ``[num_recv_tokens, K + 2]``: source
      ``rank * T_max + token``, ``source rank * K + first local lane``, then each lane's row in
      ``recv_x`` (-1 where the lane's expert is elsewhere).
    * ``dst_buffer_slot_idx``: int32 ``[T, K]``, the receive slot (``rank * T_max + slot``) for
      the first lane of each destination rank, -1 on the other lanes.
    * ``topk_idx``: the caller's ``[T, K]`` tensor, held by reference; reading it after an
      in-place change fails (inference-mode tensors cannot be checked).
    """

    def __init__(
        self,
        do_expand: bool,
        num_experts: int,
        expert_alignment: int,
        num_max_tokens_per_rank: int,
        num_sms: int,
        topk_idx: torch.Tensor,
        num_recv_tokens: int,
        num_expanded_tokens: int,
        num_recv_tokens_per_expert_list: list[int],
        psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
        psum_num_recv_tokens_per_expert: torch.Tensor,
        num_unaligned_recv_tokens_per_expert: torch.Tensor,
        recv_src_metadata: torch.Tensor,
        dst_buffer_slot_idx: torch.Tensor,
        token_metadata_at_forward: torch.Tensor | None,
        channel_linked_list: torch.Tensor | None,
    ) -> None:
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.cached_recv_src_metadata_before_sort = None
        self._topk_idx = topk_idx
        self._topk_idx_version = None if topk_idx.is_inference() else topk_idx._version

    @property
    def topk_idx(self) -> torch.Tensor:
        assert self._topk_idx_version is None or self._topk_idx._version == self._topk_idx_version, (
            "`topk_idx` must not be modified while the EP handle is in use"
        )
        return self._topk_idx


# --- buffer sizes (single NVLink domain) -----------------------------------------------------


def _token_bytes(hidden_bytes: int, sf_bytes: int, num_topk: int, with_metadata: bool) -> int:
    """Bytes of one token slot in DeepEP's symmetric buffer (layout/ep/token.cuh TokenLayout)."""
    _host_check(
        hidden_bytes % TMA_ALIGNMENT_BYTES == 0,
        f"a token row of {hidden_bytes} bytes is not a multiple of {TMA_ALIGNMENT_BYTES}",
        "layout/ep/token.cuh:29",
    )
    # top-k ids (int32) and weights (float32), plus the source index and top-k slots
    metadata = num_topk * 8 + ((1 + num_topk) * 4 if with_metadata else 0)
    data = (
        _align(hidden_bytes, TMA_ALIGNMENT_BYTES)
        + _align(sf_bytes, TMA_ALIGNMENT_BYTES)
        + _align(metadata, TMA_ALIGNMENT_BYTES)
    )
    return _align(data, RDMA_ALIGNMENT_BYTES)


def _dispatch_bytes(num_ranks: int, max_tokens: int, hidden_bytes: int, num_sf_packs: int, num_topk: int) -> int:
    # NVLink peers write straight into each other's receive slots: no send buffer
    return num_ranks * max_tokens * _token_bytes(hidden_bytes, num_sf_packs * 4, num_topk, True)


def _combine_bytes(num_ranks: int, max_tokens: int, hidden: int, num_topk: int) -> int:
    # one partial sum per (source token, expert rank), at most min(ranks, top-k) of them
    return min(num_ranks, num_topk) * max_tokens * _token_bytes(hidden * 2, 0, num_topk, False)


# --- the buffer ------------------------------------------------------------------------------


class EPBuffer:
    """DeepEP 2.5's ``EPBuffer`` on CPU tensors over ``group`` (see the module docstring).

    Construction is collective (every rank of ``group``, the same ``num_bytes``). Give
    ``num_bytes`` (a positive multiple of 2 MiB), or the MoE sizes to derive it as
    :meth:`get_buffer_size_hint` does.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_bytes: int | None = None,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        lb_allocation_plan_or_num_bytes: Any = 0,
        deterministic: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
        prefer_overlap_with_compute: bool = True,
        sl_idx: int | None = None,
        num_allocated_qps: int = 0,
        num_cpu_timeout_secs: int = 300,
        num_gpu_timeout_secs: int = 100,
        explicitly_destroy: bool = False,
    ) -> None:
        if not allow_multiple_reduction:
            raise NotImplementedError("the CPU stand-in models allow_multiple_reduction=True only")
        if lb_allocation_plan_or_num_bytes != 0:
            raise NotImplementedError("the CPU stand-in has no load-balancing region")
        self.group = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        error = None
        try:
            if num_bytes is None:
                num_bytes = EPBuffer.get_buffer_size_hint(
                    group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, allow_hybrid_mode
                )
            _host_check(
                num_bytes > 0 and num_bytes % ALLOCATION_ALIGNMENT_BYTES == 0,
                f"num_bytes={num_bytes} must be a positive multiple of {ALLOCATION_ALIGNMENT_BYTES}",
                "csrc/buffers/ep.hpp:66",
            )
        except Exception as exc:  # shared below, so that no rank waits alone
            error = exc
        self.num_bytes = num_bytes
        self.num_lb_bytes = 0
        # the default for dispatch; 0 when built from num_bytes alone, as in DeepEP
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        # DeepEP: 129 QPs in hybrid mode without fast RDMA atomics (no ibstat here), else 17
        self.num_allocated_qps = num_allocated_qps or (129 if allow_hybrid_mode else 17)
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx, self.scaleup_rank_idx = 0, self.rank_idx
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        self.explicitly_destroy = explicitly_destroy
        seed = int(os.environ.get(SEED_ENV, "0"))
        self._generator = torch.Generator().manual_seed(seed * 1_000_003 + self.rank_idx)
        self.runtime: object | None = object()  # None once destroyed, as DeepEP's
        # the buffer is symmetric memory: every rank registers the same window size
        self._agree("EPBuffer()", error, {"num_bytes": num_bytes})

    # --- sizing and tuning ---------------------------------------------------------------

    @staticmethod
    def get_buffer_size_hint(
        group: dist.ProcessGroup,
        num_max_tokens_per_rank: int,
        hidden: int,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
    ) -> int:
        """Bytes a buffer needs for these sizes, a multiple of 2 MiB (``num_topk=0`` sizes for
        the largest top-k, 32). fp8 assumes the worst-case scales, one 4-byte pack per 32
        values."""
        if not allow_multiple_reduction:
            raise NotImplementedError("the CPU stand-in models allow_multiple_reduction=True only")
        _host_check(
            num_max_tokens_per_rank > 0 and hidden > 0,
            "num_max_tokens_per_rank and hidden must be positive",
            "csrc/buffers/ep.hpp:254",
        )
        num_topk = num_topk or MAX_TOPK
        num_ranks = group.size()
        num_sf_packs = math.ceil(hidden / 32) if use_fp8_dispatch else 0
        elem = 1 if use_fp8_dispatch else 2
        need = max(
            _dispatch_bytes(num_ranks, num_max_tokens_per_rank, hidden * elem, num_sf_packs, num_topk),
            _combine_bytes(num_ranks, num_max_tokens_per_rank, hidden, num_topk),
        )
        return _align(need, ALLOCATION_ALIGNMENT_BYTES)

    def get_theoretical_num_sms(
        self,
        num_experts: int,
        num_topk: int,
        num_scaleout_topk: int = 0,
        rdma_gbs: float = 0,
        nvlink_gbs: float = 0,
        sm_read_gbs: float = 0,
        sm_write_gbs: float = 0,
    ) -> int:
        """DeepEP's SM estimate for one NVLink domain and balanced routing: even, at least 4;
        4 when the NVLink bandwidth is unknown (``get_nvlink_gbs() == 0``)."""
        assert num_scaleout_topk == 0
        sm_read_gbs = sm_read_gbs or SM_READ_GBS
        sm_write_gbs = sm_write_gbs or SM_WRITE_GBS
        nvlink_gbs = nvlink_gbs or get_nvlink_gbs()
        assert num_experts % self.num_ranks == 0
        # expected number of distinct ranks a token's top-k experts land on
        spread = self.num_ranks * (
            1 - math.comb(num_experts - num_experts // self.num_ranks, num_topk) / math.comb(num_experts, num_topk)
        )
        read = 1 / spread  # each source token is read once per destination rank
        write = 1.0  # every received row is written over NVLink
        traffic = 1 - 1 / self.num_ranks  # the share that leaves the GPU
        sms = float(NUM_DEVICE_SMS)
        if traffic > 0:
            per_traffic = nvlink_gbs / traffic
            sms = max(
                per_traffic * read / sm_read_gbs,
                per_traffic * write / sm_write_gbs,
                per_traffic * (write - traffic) / sm_read_gbs,
                per_traffic * (read + traffic) / sm_write_gbs,
            )
        sms = _align(max(4, math.ceil(sms * 1.3)), 4)
        if not self.prefer_overlap_with_compute:
            sms = max(sms, 64)
        return min(sms, NUM_DEVICE_SMS // 2 * 2)

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """RDMA QPs for ``num_sms`` (unused on one NVLink domain; kept for DeepEP's assertion)."""
        num_qps = num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 9)
        return min(num_qps, self.num_allocated_qps)

    @staticmethod
    def capture() -> EventHandle:
        """An event on the current stream, for ``previous_event``."""
        return EventHandle()

    def destroy(self) -> None:
        """Release the buffer; collective (a barrier of the group, as DeepEP's GPU barrier).
        Needs ``explicitly_destroy=True``; a second call does nothing."""
        assert self.explicitly_destroy, "destroy() needs EPBuffer(..., explicitly_destroy=True)"
        if self.runtime is not None:
            dist.barrier(group=self.group)
            self.runtime = None

    # --- dispatch ------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        num_experts: int | None = None,
        num_max_tokens_per_rank: int | None = None,
        expert_alignment: int | None = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: EventHandle | None = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        handle: EPHandle | None = None,
        do_handle_copy: bool = False,
        do_cpu_sync: bool | None = None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
        use_tma_aligned_col_major_sf: bool = False,
        defer_epilogue: bool = False,
    ) -> tuple[Any, None, torch.Tensor | None, EPHandle, EventOverlap] | EventOverlap:
        """Send each token ``x [T, H]`` (bf16, or ``(float8_e4m3fn [T, H], scales [T, P])``) to
        the ranks owning its experts ``topk_idx [T, K]`` (``topk_idx_t``; -1 = none), with
        ``topk_weights [T, K]`` float32, into the expanded layout (see the module docstring).

        Collective. Returns ``(recv_x, None, recv_topk_weights [rows] float32 or None, handle,
        event)``, or only the ``EventOverlap`` with ``defer_epilogue`` (its wait returns the
        first four). ``cumulative_local_expert_recv_stats`` (int32 ``[E_local]``) is increased
        by the true per-expert counts.
        """
        assert not do_handle_copy, "`do_handle_copy` must be False"
        error, plan = None, None
        try:
            plan = self._check_dispatch(
                x,
                topk_idx,
                topk_weights,
                cumulative_local_expert_recv_stats,
                num_experts,
                num_max_tokens_per_rank,
                expert_alignment,
                num_sms,
                num_qps,
                previous_event,
                async_with_compute_stream,
                allocate_on_comm_stream,
                handle,
                do_cpu_sync,
                do_expand,
                do_zero_padding,
                defer_epilogue,
            )
        except Exception as exc:  # any failure is shared, so that no rank waits alone
            error = exc
        self._agree("dispatch", error, plan["wire"] if plan else {})
        assert plan is not None
        result = self._dispatch(plan, use_tma_aligned_col_major_sf, cumulative_local_expert_recv_stats)
        return self._deliver(result, async_with_compute_stream, defer_epilogue)

    def _check_dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        stats: torch.Tensor | None,
        num_experts: int | None,
        num_max_tokens_per_rank: int | None,
        expert_alignment: int | None,
        num_sms: int,
        num_qps: int,
        previous_event: EventHandle | None,
        async_with_compute_stream: bool,
        allocate_on_comm_stream: bool,
        handle: EPHandle | None,
        do_cpu_sync: bool | None,
        do_expand: bool,
        do_zero_padding: bool,
        defer_epilogue: bool,
    ) -> dict[str, Any]:
        """Every check DeepEP makes on the host, then those it does not (stricter); returns the
        settled arguments, with ``wire``: what every rank must agree on."""
        _check_torch_deterministic()
        if self.runtime is None:
            raise UncheckedByDeepEPError("dispatch on a destroyed EPBuffer (DeepEP fails on its None runtime)")
        if handle is not None:
            raise NotImplementedError("the CPU stand-in has no cached dispatch (handle=)")
        if not do_expand:
            raise NotImplementedError("the CPU stand-in implements the expanded layout (do_expand=True) only")
        if not isinstance(topk_idx, torch.Tensor):
            raise TypeError("dispatch needs topk_idx (cached dispatch is not modelled)")
        if not isinstance(num_experts, int):
            raise TypeError(f"num_experts must be an int, got {num_experts!r}")
        num_topk = topk_idx.shape[1] if topk_idx.dim() == 2 else 0
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else _align(num_sms, 2)
        num_qps = num_qps or self.get_theoretical_num_qps(num_sms)
        assert num_qps <= self.num_allocated_qps, "Allocated QPs are not enough"
        x, sf = x if isinstance(x, tuple) else (x, None)
        max_tokens = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
        alignment = 1 if expert_alignment is None else expert_alignment
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync

        _host_check(0 < num_sms <= NUM_DEVICE_SMS, f"num_sms={num_sms} not in [1, {NUM_DEVICE_SMS}]", "ep.hpp:312")
        _host_check(not do_zero_padding or do_expand, "do_zero_padding needs do_expand", "ep.hpp:317")
        _host_check(x.dim() == 2, f"x must be [num_tokens, hidden], got {list(x.shape)}", "ep.hpp:339")
        _host_check(
            x.device.type == "cpu" and x.is_contiguous(), "x must be a contiguous (CPU, here) tensor", "ep.hpp:342"
        )
        num_tokens, hidden = x.shape
        row_bytes = hidden * x.element_size()
        _host_check(row_bytes % 16 == 0, f"a row of x is {row_bytes} bytes, not a multiple of 16", "ep.hpp:343")
        _host_check(
            num_tokens <= max_tokens,
            f"x has {num_tokens} tokens, more than num_max_tokens_per_rank={max_tokens}",
            "ep.hpp:344",
        )
        num_sf_packs = 0
        if sf is not None:
            _host_check(sf.dim() == 2 and sf.shape[0] == num_tokens, "scales must be [num_tokens, packs]", "ep.hpp:353")
            _host_check(sf.device.type == "cpu", "scales must be on the CPU, here", "ep.hpp:354")
            _host_check(sf.element_size() == 4, f"scales must have 4-byte elements, got {sf.dtype}", "ep.hpp:355")
            num_sf_packs = sf.shape[1]
        _host_check(
            topk_idx.dim() == 2 and topk_idx.shape[0] == num_tokens, "topk_idx must be [num_tokens, K]", "ep.hpp:364"
        )
        _host_check(
            topk_idx.dtype == topk_idx_t,
            f"topk_idx must have dtype deep_ep.topk_idx_t ({topk_idx_t}), got {topk_idx.dtype}",
            "ep.hpp:365",
        )
        _host_check(
            topk_idx.device.type == "cpu" and topk_idx.is_contiguous(), "topk_idx must be contiguous", "ep.hpp:366"
        )
        if topk_weights is not None:
            _host_check(
                topk_weights.dim() == 2 and topk_weights.shape[0] == num_tokens,
                "topk_weights must be [num_tokens, K]",
                "ep.hpp:371",
            )
            _host_check(topk_weights.is_contiguous(), "topk_weights must be contiguous", "ep.hpp:373")
            _host_check(
                topk_weights.dtype == torch.float32,
                f"topk_weights must be float32, got {topk_weights.dtype}",
                "ep.hpp:374 data_ptr<float>()",
            )
        num_local_experts = num_experts // self.num_ranks
        if stats is not None:
            _host_check(
                stats.shape == (num_local_experts,) and stats.is_contiguous(),
                "cumulative_local_expert_recv_stats must be [num_local_experts]",
                "ep.hpp:380",
            )
            _host_check(stats.dtype == torch.int32, "cumulative_local_expert_recv_stats must be int32", "ep.hpp:384")
        _host_check(
            previous_event is None or allocate_on_comm_stream,
            "previous_event needs allocate_on_comm_stream",
            "ep.hpp:142",
        )
        _host_check(not defer_epilogue or async_with_compute_stream, "defer_epilogue needs async", "ep.hpp:773")
        _host_check(self.num_ranks <= MAX_RANKS, f"at most {MAX_RANKS} ranks", "layout/ep/workspace.cuh:44")
        _host_check(num_experts % self.num_ranks == 0, "num_experts must divide by the ranks", "ep.hpp:394")
        _host_check(num_experts <= MAX_EXPERTS, f"at most {MAX_EXPERTS} experts", "layout/ep/workspace.cuh:45")
        _host_check(
            num_local_experts <= MAX_EXPERTS_PER_RANK,
            f"at most {MAX_EXPERTS_PER_RANK} experts per rank",
            "layout/ep/workspace.cuh:46",
        )
        _host_check(
            num_topk <= MAX_TOPK, f"top-k {num_topk} > {MAX_TOPK} (a JIT compile error there)", "dispatch.cuh:92"
        )
        need = _dispatch_bytes(self.num_ranks, max_tokens, row_bytes, num_sf_packs, num_topk)
        _host_check(
            need <= self.num_bytes, f"dispatch needs {need} bytes, the buffer has {self.num_bytes}", "ep.hpp:544"
        )

        # --- what DeepEP leaves unchecked ---
        _strict_check(max_tokens >= 1, f"num_max_tokens_per_rank={max_tokens}", "kernels built for zero slots")
        _strict_check(alignment >= 1, f"expert_alignment={alignment}", "a division by zero in the kernels")
        _strict_check(num_topk >= 1, "topk_idx has no columns", "an empty top-k")
        expected = torch.float8_e4m3fn if sf is not None else torch.bfloat16
        _strict_check(
            x.dtype == expected,
            f"x is {x.dtype}; dispatch takes bf16, or float8_e4m3fn with scales",
            "it copies bytes of any 1- or 2-byte dtype, and combine then refuses the result",
        )
        if topk_weights is not None:
            _strict_check(
                topk_weights.shape[1] == num_topk,
                f"topk_weights has {topk_weights.shape[1]} columns, topk_idx {num_topk}",
                "weights are read with topk_idx's stride",
            )
        if num_tokens:
            bad = (topk_idx < -1) | (topk_idx >= num_experts)
            _strict_check(
                not bool(bad.any()),
                f"expert ids must lie in [-1, {num_experts}), found {topk_idx[bad][:4].tolist()}",
                "ids >= num_experts write out of bounds; other negative ids count as -1",
            )
            ordered = topk_idx.sort(dim=1).values
            dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
            _strict_check(
                not bool(dup.any()),
                f"tokens {dup.any(dim=1).nonzero().flatten()[:4].tolist()} name the same expert twice",
                "a device assertion traps the receiving GPU (dispatch_copy_epilogue.cuh:108)",
            )
        return {
            "x": x,
            "sf": sf,
            "topk_idx": topk_idx,
            "topk_weights": topk_weights,
            "num_experts": num_experts,
            "num_local_experts": num_local_experts,
            "max_tokens": max_tokens,
            "alignment": alignment,
            "num_sms": num_sms,
            "do_cpu_sync": do_cpu_sync,
            "do_zero_padding": do_zero_padding,
            "wire": {
                "num_experts": num_experts,
                "num_max_tokens_per_rank": max_tokens,
                "top-k": num_topk,
                "hidden": hidden,
                "x dtype": str(x.dtype),
                "scale packs": num_sf_packs,
                "scale dtype": str(sf.dtype) if sf is not None else "none",
                "topk_weights given": topk_weights is not None,
            },
        }

    def _dispatch(
        self, plan: dict[str, Any], col_major_sf: bool, stats: torch.Tensor | None
    ) -> tuple[Any, None, torch.Tensor | None, EPHandle]:
        """Exchange the tokens and build this rank's expanded layout (see :meth:`dispatch`).
        Each (token, destination rank) travels as one packed uint8 row: the ``x`` row, its
        scales, its ids (int64 ``[K]``), weights (float32 ``[K]``) and token index (int64)."""
        x: torch.Tensor = plan["x"]
        sf: torch.Tensor | None = plan["sf"]
        topk_idx: torch.Tensor = plan["topk_idx"]
        weights: torch.Tensor | None = plan["topk_weights"]
        world, rank = self.num_ranks, self.rank_idx
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        num_local, max_tokens, alignment = plan["num_local_experts"], plan["max_tokens"], plan["alignment"]

        # --- send: one row per (token, destination rank), in token order ---
        dst_rank = torch.where(topk_idx >= 0, topk_idx // num_local, torch.full_like(topk_idx, -1))  # [T, K]
        sent_weights = weights if weights is not None else torch.zeros(num_tokens, num_topk)
        payload = [
            x.view(torch.uint8),
            (sf.contiguous().view(torch.uint8) if sf is not None else torch.empty(num_tokens, 0, dtype=torch.uint8)),
            topk_idx.view(torch.uint8),
            sent_weights.view(torch.uint8),
            torch.arange(num_tokens, dtype=torch.int64).view(-1, 1).view(torch.uint8),
        ]
        widths = [p.shape[1] for p in payload]
        rows = torch.cat(payload, dim=1)  # uint8 [T, row bytes]
        dst_buffer_slot_idx = torch.full((num_tokens, num_topk), -1, dtype=torch.int32)
        send = []
        for d in range(world):
            goes = (dst_rank == d).any(dim=1)
            tokens = goes.nonzero().flatten()
            first_lane = (dst_rank[tokens] == d).int().argmax(dim=1)
            # slots follow token order (DeepEP hands them out with an atomic counter)
            dst_buffer_slot_idx[tokens, first_lane] = (rank * max_tokens + torch.arange(len(tokens))).to(torch.int32)
            send.append(rows[tokens])
        received = self._all_to_all(send, rows.shape[1])

        # --- receive: tokens ordered by source rank, then source token ---
        per_source = [len(r) for r in received]
        recv = torch.cat(received)
        x_bytes, sf_bytes, idx_bytes, w_bytes, tok_bytes = recv.split(widths, dim=1)
        recv_tokens = _reinterpret(tok_bytes, torch.int64).flatten()
        recv_ids = _reinterpret(idx_bytes, torch.int64)  # [N, K]
        recv_w = _reinterpret(w_bytes, torch.float32)  # [N, K]
        src_rank = torch.repeat_interleave(torch.arange(world), torch.tensor(per_source, dtype=torch.int64))
        local = recv_ids - rank * num_local
        mine = (local >= 0) & (local < num_local)  # [N, K]
        token_of, lane_of = mine.nonzero(as_tuple=True)  # by token, then lane
        expert_of = local[token_of, lane_of]
        num_entries = len(expert_of)

        counts = torch.bincount(expert_of, minlength=num_local)
        aligned = (counts + alignment - 1) // alignment * alignment
        starts = torch.cumsum(aligned, 0) - aligned
        # group entries by expert; inside an expert by source (deterministic) or shuffled,
        # because DeepEP's row order there is whatever its atomics produced
        tiebreak = (
            torch.arange(num_entries) if self.deterministic else torch.randperm(num_entries, generator=self._generator)
        )
        order = torch.argsort(expert_of * max(num_entries, 1) + tiebreak)
        first_entry = torch.cumsum(counts, 0) - counts
        row_of = torch.empty(num_entries, dtype=torch.int64)
        sorted_experts = expert_of[order]
        row_of[order] = starts[sorted_experts] + torch.arange(num_entries) - first_entry[sorted_experts]

        num_valid_rows = int(aligned.sum())
        if plan["do_cpu_sync"]:
            num_rows, num_recv_tokens = num_valid_rows, len(recv_tokens)
            per_expert_list = aligned.tolist()
        else:
            # sized for the worst case, like DeepEP without a host sync
            worst = world * max_tokens * min(num_topk, num_local) + (alignment - 1) * num_local
            num_rows, num_recv_tokens = _align(worst, alignment), world * max_tokens
            per_expert_list = []

        recv_x = torch.full((num_rows, hidden), float("nan"), dtype=x.dtype)
        # rows move as bytes: indexing float8 tensors is not supported everywhere
        recv_x.view(torch.uint8)[row_of] = x_bytes[token_of]
        recv_weights = None
        if weights is not None:
            recv_weights = torch.full((num_rows,), float("nan"), dtype=torch.float32)
            recv_weights[row_of] = recv_w[token_of, lane_of]
        recv_sf = None
        if sf is not None:
            packs = sf.shape[1]
            strides = (1, _align(num_rows, 4)) if col_major_sf else (packs, 1)
            recv_sf = torch.empty_strided((num_rows, packs), strides, dtype=sf.dtype)
            # NaN scales, or int32 packs of 0xFF bytes (UE8M0's NaN)
            recv_sf.fill_(float("nan") if sf.dtype.is_floating_point else -1)
            recv_sf[row_of] = _reinterpret(sf_bytes, sf.dtype)[token_of]
        if plan["do_zero_padding"]:
            gap = torch.ones(num_valid_rows, dtype=torch.bool)
            gap[row_of] = False
            recv_x.view(torch.uint8)[:num_valid_rows][gap] = 0  # +0.0 in bf16 and fp8 alike
            if recv_weights is not None:
                recv_weights[:num_valid_rows][gap] = 0
            if recv_sf is not None:
                recv_sf[:num_valid_rows][gap] = 0
        if stats is not None:
            stats += counts.to(torch.int32)

        slots = torch.full(mine.shape, -1, dtype=torch.int64)
        slots[token_of, lane_of] = row_of
        metadata = torch.full((num_recv_tokens, num_topk + 2), -1, dtype=torch.int32)
        received_count = len(recv_tokens)
        metadata[:received_count, 0] = (src_rank * max_tokens + recv_tokens).to(torch.int32)
        metadata[:received_count, 1] = (src_rank * num_topk + mine.int().argmax(dim=1)).to(torch.int32)
        metadata[:received_count, 2:] = slots.to(torch.int32)
        handle = EPHandle(
            do_expand=True,
            num_experts=plan["num_experts"],
            expert_alignment=alignment,
            num_max_tokens_per_rank=max_tokens,
            num_sms=plan["num_sms"],
            topk_idx=topk_idx,
            num_recv_tokens=num_recv_tokens,
            num_expanded_tokens=num_rows,
            num_recv_tokens_per_expert_list=per_expert_list,
            psum_num_recv_tokens_per_scaleup_rank=torch.cumsum(torch.tensor(per_source), 0).to(torch.int32),
            psum_num_recv_tokens_per_expert=(starts + counts).to(torch.int32),
            num_unaligned_recv_tokens_per_expert=counts.to(torch.int32),
            recv_src_metadata=metadata,
            dst_buffer_slot_idx=dst_buffer_slot_idx,
            token_metadata_at_forward=None,
            channel_linked_list=None,
        )
        out_x = (recv_x, recv_sf) if recv_sf is not None else recv_x
        return out_x, None, recv_weights, handle

    # --- combine -------------------------------------------------------------------------

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: EventHandle | None = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        defer_epilogue: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap] | EventOverlap:
        """Sum each source token's rows of ``x [rows, H]`` bf16 (the dispatched layout, already
        weighted by the caller: no weights are applied) back on its source rank, plus
        ``bias`` (one or two ``[T, H]`` bf16). ``topk_weights [rows]`` float32 is gathered back
        per lane. Collective. Returns ``(combined_x [T, H] bf16, combined_topk_weights [T, K]
        float32 or None, event)``, or only the ``EventOverlap`` with ``defer_epilogue``.
        """
        error, plan = None, None
        try:
            plan = self._check_combine(
                x,
                handle,
                topk_weights,
                bias,
                num_sms,
                num_qps,
                previous_event,
                async_with_compute_stream,
                allocate_on_comm_stream,
                defer_epilogue,
            )
        except Exception as exc:  # any failure is shared, so that no rank waits alone
            error = exc
        self._agree("combine", error, plan["wire"] if plan else {})
        assert plan is not None
        return self._deliver(self._combine(plan), async_with_compute_stream, defer_epilogue)

    def _check_combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        num_sms: int,
        num_qps: int,
        previous_event: EventHandle | None,
        async_with_compute_stream: bool,
        allocate_on_comm_stream: bool,
        defer_epilogue: bool,
    ) -> dict[str, Any]:
        _check_torch_deterministic()
        if self.runtime is None:
            raise UncheckedByDeepEPError("combine on a destroyed EPBuffer (DeepEP fails on its None runtime)")
        if not isinstance(handle, EPHandle):
            raise TypeError(f"combine needs the EPHandle of a dispatch, got {type(handle).__name__}")
        num_sms = handle.num_sms if num_sms == 0 else _align(num_sms, 2)
        num_qps = num_qps or self.get_theoretical_num_qps(num_sms)
        assert num_qps <= self.num_allocated_qps, "Allocated QPs are not enough"
        topk_idx = handle.topk_idx  # fails if the caller changed it in place
        num_tokens, num_topk = topk_idx.shape
        biases = [b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None]

        _host_check(0 < num_sms <= NUM_DEVICE_SMS, f"num_sms={num_sms} not in [1, {NUM_DEVICE_SMS}]", "ep.hpp:808")
        _host_check(not defer_epilogue or async_with_compute_stream, "defer_epilogue needs async", "ep.hpp:811")
        _host_check(x.dim() == 2, f"x must be [rows, hidden], got {list(x.shape)}", "ep.hpp:814")
        _host_check(x.device.type == "cpu" and x.is_contiguous(), "x must be contiguous (CPU, here)", "ep.hpp:815")
        _host_check(x.dtype == torch.bfloat16, f"combine takes bf16, got {x.dtype}", "ep.hpp:816")
        hidden = x.shape[1]
        _host_check(
            hidden % COMBINE_HIDDEN_MULTIPLE == 0,
            f"hidden={hidden} is not a multiple of {COMBINE_HIDDEN_MULTIPLE} (a JIT compile error there)",
            "impls/ep/combine.cuh:110",
        )
        _host_check(num_tokens <= handle.num_max_tokens_per_rank, "more tokens than slots", "ep.hpp:827")
        if topk_weights is not None:
            _host_check(
                topk_weights.dim() == 1 and topk_weights.shape[0] == x.shape[0],
                "expanded topk_weights must be [rows] like x",
                "ep.hpp:840",
            )
            _host_check(topk_weights.is_contiguous(), "topk_weights must be contiguous", "ep.hpp:846")
            _host_check(topk_weights.dtype == torch.float32, "topk_weights must be float32", "ep.hpp:847")
        _host_check(len(biases) <= 2, "at most two biases", "ep.py _unpack_bias")
        for b in biases:
            _host_check(b.dim() == 2 and b.is_contiguous(), "a bias must be a contiguous 2-D tensor", "ep.hpp:854")
            _host_check(b.dtype == x.dtype, "a bias must have x's dtype", "ep.hpp:855")
            _host_check(
                tuple(b.shape) == (num_tokens, hidden), f"a bias must be [{num_tokens}, {hidden}]", "ep.hpp:856"
            )
        _host_check(
            previous_event is None or allocate_on_comm_stream,
            "previous_event needs allocate_on_comm_stream",
            "ep.hpp:142",
        )
        need = _combine_bytes(self.num_ranks, handle.num_max_tokens_per_rank, hidden, num_topk)
        _host_check(
            need <= self.num_bytes, f"combine needs {need} bytes, the buffer has {self.num_bytes}", "ep.hpp:866"
        )

        # --- what DeepEP leaves unchecked ---
        _strict_check(
            x.shape[0] == handle.num_expanded_tokens,
            f"x has {x.shape[0]} rows, the dispatch produced {handle.num_expanded_tokens}",
            "rows are read at the dispatched positions, out of bounds when x is shorter",
        )
        return {
            "x": x,
            "handle": handle,
            "topk_weights": topk_weights,
            "biases": biases,
            "wire": {
                "num_experts": handle.num_experts,
                "num_max_tokens_per_rank": handle.num_max_tokens_per_rank,
                "top-k": num_topk,
                "hidden": hidden,
                "topk_weights given": topk_weights is not None,
            },
        }

    def _combine(self, plan: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DeepEP's two reduction stages for ``x [rows, H]`` bf16; returns ``(combined_x [T, H]
        bf16, combined_topk_weights [T, K] float32 or None)``."""
        x: torch.Tensor = plan["x"]
        handle: EPHandle = plan["handle"]
        weights: torch.Tensor | None = plan["topk_weights"]
        world, hidden = self.num_ranks, x.shape[1]
        topk_idx = handle.topk_idx
        num_tokens, num_topk = topk_idx.shape
        max_tokens = handle.num_max_tokens_per_rank

        # --- on the expert rank: one partial sum per received token (DeepEP's first stage) ---
        # the received count as DeepEP reads it on the GPU, valid with or without a host sync
        received = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        metadata = handle.recv_src_metadata[:received].to(torch.int64)
        source = metadata[:, 1] // num_topk
        token = metadata[:, 0] % max_tokens
        slots = metadata[:, 2:]
        values = x.float()
        partial = torch.zeros(received, hidden)
        for lane in range(num_topk):  # lane order, as DeepEP accumulates
            here = slots[:, lane] >= 0
            partial[here] += values[slots[here, lane]]
        lane_weights = torch.zeros(received, num_topk)
        if weights is not None:
            lane_weights = torch.where(slots >= 0, weights[slots.clamp(min=0)], lane_weights)
        payload = torch.cat(
            [
                token.view(-1, 1).view(torch.uint8),
                partial.to(torch.bfloat16).view(torch.uint8),
                lane_weights.view(torch.uint8),
            ],
            dim=1,
        )
        send = [payload[source == s] for s in range(world)]
        back = self._all_to_all(send, payload.shape[1])

        # --- on the source rank: bias, then the ranks' partial sums in first-lane order ---
        partials = torch.zeros(world, num_tokens, hidden)
        gathered_weights = torch.zeros(world, num_tokens, num_topk)
        for d, rows in enumerate(back):
            tok_bytes, part_bytes, w_bytes = rows.split([8, hidden * 2, num_topk * 4], dim=1)
            tokens = _reinterpret(tok_bytes, torch.int64).flatten()
            partials[d, tokens] = _reinterpret(part_bytes, torch.bfloat16).float()
            gathered_weights[d, tokens] = _reinterpret(w_bytes, torch.float32)
        num_local = handle.num_experts // world
        dst = torch.where(topk_idx >= 0, topk_idx // num_local, torch.full_like(topk_idx, -1))  # [T, K]
        out = torch.zeros(num_tokens, hidden)
        for b in plan["biases"]:
            out += b.float()
        seen = torch.zeros(num_tokens, world, dtype=torch.bool)
        all_tokens = torch.arange(num_tokens)
        for lane in range(num_topk):
            d = dst[:, lane]
            first = (d >= 0) & ~seen[all_tokens, d.clamp(min=0)]
            out[first] += partials[d[first], all_tokens[first]]
            seen[all_tokens[first], d[first]] = True
        combined_weights = None
        if weights is not None:
            combined_weights = torch.where(
                dst >= 0,
                gathered_weights[dst.clamp(min=0), all_tokens.view(-1, 1), torch.arange(num_topk)],
                torch.zeros(num_tokens, num_topk),
            )
        return out.to(torch.bfloat16), combined_weights

    # --- shared --------------------------------------------------------------------------

    def _all_to_all(self, send: list[torch.Tensor], row_bytes: int) -> list[torch.Tensor]:
        """Exchange ``send[d]`` (uint8 ``[n_d, row_bytes]``) with every rank ``d``; returns the
        rows received from each rank, in rank order."""
        counts = torch.tensor([len(s) for s in send], dtype=torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        out = torch.empty(int(recv_counts.sum()), row_bytes, dtype=torch.uint8)
        dist.all_to_all_single(out, torch.cat(send), recv_counts.tolist(), counts.tolist(), group=self.group)
        return list(out.split(recv_counts.tolist()))

    def _agree(self, op: str, error: BaseException | None, wire: dict[str, Any]) -> None:
        """Share every rank's check result and wire format (one ``all_gather_object``); raise
        on every rank when a rank failed, called another operation, or disagrees."""
        mine = (op, None if error is None else f"{type(error).__name__}: {error}", wire)
        everyone: list[Any] = [None] * self.num_ranks
        dist.all_gather_object(everyone, mine, group=self.group)
        if error is not None:
            raise error
        failed = [(r, msg) for r, (_, msg, _) in enumerate(everyone) if msg is not None]
        if failed:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
            raise UncheckedByDeepEPError(
                f"{op}: another rank failed its checks ({detail}); on GPUs this rank would wait in the "
                "kernel until DeepEP's GPU timeout traps"
            )
        ops = sorted({o for o, _, _ in everyone})
        if len(ops) > 1:
            raise UncheckedByDeepEPError(f"the ranks called different operations at once: {ops}")
        problems = []
        for field in wire:
            held: dict[str, list[int]] = {}
            for r, (_, _, theirs) in enumerate(everyone):
                held.setdefault(repr(theirs.get(field)), []).append(r)
            if len(held) > 1:
                problems.append(f"{field}: " + "; ".join(f"{v} on ranks {rs}" for v, rs in held.items()))
        if problems:
            raise UncheckedByDeepEPError(
                f"{op}: the ranks disagree ({' | '.join(problems)}); DeepEP compiles these into its kernels "
                "and the buffer layout, so a mismatch corrupts data or hangs"
            )

    @staticmethod
    def _deliver(result: tuple, async_with_compute_stream: bool, defer_epilogue: bool) -> Any:
        """DeepEP's return conventions for events (see the module docstring)."""
        if defer_epilogue:
            overlap = EventOverlap(EventHandle())
            overlap.register_hook_after_wait(lambda: result)
            return overlap
        return (*result, EventOverlap(EventHandle() if async_with_compute_stream else None))
