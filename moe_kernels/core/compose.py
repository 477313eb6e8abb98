"""The composer: checks a (PrepareAndFinalize, experts) pair against a layer, binds and chains it.

``compose(pf, experts, cfg, placement=..., group=..., device=...)`` -> :class:`ModularKernel`.
Building a kernel is where everything that sizes memory or needs the other ranks happens: the
two parts agree on a :class:`~moe_kernels.core.contract.TokenFormat`, each part is bound (rank
agreement, buffers), and the workspaces are reserved for the largest call the configuration
allows. A call then allocates no scratch and runs no collective beyond the data exchange.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist

from moe_kernels.config import LayerConfig, MoEConfig
from moe_kernels.core import tuning
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Pending,
    PermuteExpertsUnpermute,
    PrepareAndFinalize,
    Residual,
    StandardTokens,
    TokenFormat,
    WorkspaceSpec,
    workspace_bytes,
)
from moe_kernels.core.distributed import check_agreement
from moe_kernels.core.placement import ExpertPlacement
from moe_kernels.core.validate import check_call
from moe_kernels.mlp.weights import ExpertWeights

log = logging.getLogger("moe_kernels")


class IncompatibleKernelsError(ValueError):
    """A pair cannot run a layer; ``failures`` holds every failed check."""

    def __init__(self, pair: str, failures: list[Check]) -> None:
        self.failures = failures
        lines = "\n".join(f"  - {c.name}: {c.reason}" for c in failures)
        super().__init__(f"{pair} cannot run this layer:\n{lines}")


class WorkspaceError(RuntimeError):
    """A workspace would have to grow where growing is unsafe (during or after a CUDA-graph capture)."""


def pair_name(prepare_finalize: PrepareAndFinalize, experts: PermuteExpertsUnpermute) -> str:
    """The pair's name: what explanations show and tuning tables key its times by."""
    return tuning.pair_key(prepare_finalize.name, experts.name)


# --- where a layer runs --------------------------------------------------------------------


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> the current CUDA device if any, else the CPU; a CUDA device that this
    machine lacks, or any other device type, is a ``ValueError``."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {dev} was asked for, but CUDA is not available on this machine")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {dev} was asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ValueError(f"device: MoE kernels run on 'cpu' or 'cuda[:N]', got {dev}")
    return dev


def layer_context(
    cfg: LayerConfig,
    *,
    placement: ExpertPlacement | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> LayerContext:
    """Check the arguments every builder (compose, select, FusedMoE) takes and bundle them."""
    if isinstance(cfg, MoEConfig):
        raise TypeError("cfg: expected a LayerConfig, got a MoEConfig (wrap it: LayerConfig(moe=...))")
    if not isinstance(cfg, LayerConfig):
        raise TypeError(f"cfg: expected a LayerConfig, got {type(cfg).__name__}")
    par = cfg.parallel
    if placement is None:
        placement = ExpertPlacement.contiguous(cfg.moe.num_experts, par.ep_size, par.ep_rank)
    elif not isinstance(placement, ExpertPlacement):
        raise TypeError(f"placement: expected an ExpertPlacement, got {type(placement).__name__}")
    have = (placement.num_experts, placement.ep_size, placement.ep_rank)
    want = (cfg.moe.num_experts, par.ep_size, par.ep_rank)
    if have != want:
        raise ValueError(
            f"placement: places {have[0]} experts over {have[1]} ranks as rank {have[2]}; the config says "
            f"num_experts={want[0]}, ep_size={want[1]}, ep_rank={want[2]}"
        )
    _check_tp_group(cfg, tp_group)
    dev = resolve_device(device)
    load = None
    if placement.num_redundant_experts:
        load = torch.zeros(placement.num_physical_experts, dtype=torch.int32, device=dev)
    return LayerContext(cfg, dev, placement, group, tp_group, load)


def _check_tp_group(cfg: LayerConfig, tp_group: dist.ProcessGroup | None) -> None:
    """A tensor-parallel layer needs its group (the agreement check and the reduction run over
    it), of ``tp_size`` ranks with this one at ``tp_rank``."""
    par = cfg.parallel
    if tp_group is None:
        if par.tp_size > 1:
            raise ValueError(
                f"tp_group: tp_size is {par.tp_size}: pass the tensor-parallel process group (the ranks holding the "
                "other slices of these experts)"
            )
        return
    size, rank = tp_group.size(), tp_group.rank()
    if (size, rank) != (par.tp_size, par.tp_rank):
        raise ValueError(
            f"tp_group has size {size}, rank {rank}; the config says tp_size={par.tp_size}, tp_rank={par.tp_rank}"
        )


def check_tp_agreement(ctx: LayerContext) -> None:
    """Raise the same ``ValueError`` on every rank of ``ctx.tp_group`` unless they build the same
    layer with the same placement, each with its own slice (one small all_gather). Builders call
    it once per layer (:func:`compose`, :func:`~moe_kernels.selection.select.select`), not per
    kernel: ranks may plan different token ranges, and every rank must join each collective."""
    if ctx.tp_group is None:
        return
    cfg = ctx.cfg
    moe, par = cfg.moe, cfg.parallel
    fields: dict[str, int | bool | torch.dtype] = {
        "hidden_size": moe.hidden_size,
        "intermediate_size": moe.intermediate_size,
        "intermediate shard width": cfg.mlp.inter,
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "dtype": moe.dtype,
        "tp_size": par.tp_size,
        "ep_rank": par.ep_rank,
        "expert placement (fingerprint)": ctx.placement.fingerprint(),
    }
    check_agreement(ctx.tp_group, "tensor-parallel experts", fields)


def require_part(part: PrepareAndFinalize | PermuteExpertsUnpermute, ctx: LayerContext) -> None:
    """:class:`IncompatibleKernelsError` listing every check ``part`` fails on ``ctx`` (one part
    on its own, as an engine adapter runs it)."""
    failed = [c for c in part.checks(ctx) if not c.ok]
    if failed:
        raise IncompatibleKernelsError(part.name, failed)


def check_pair(
    prepare_finalize: PrepareAndFinalize, experts: PermuteExpertsUnpermute, ctx: LayerContext
) -> list[Check]:
    """Every check of the pair, the token format first (``layout`` when the halves' layouts
    differ, ``format`` for its parameters), each other check prefixed with its side."""
    fmt = experts.input_format(ctx)
    if prepare_finalize.output_layout is not fmt.layout:
        format_check = Check.failed(
            "layout",
            f"{prepare_finalize.name} hands out {prepare_finalize.output_layout.value} tokens, "
            f"{experts.name} takes {fmt.layout.value}",
        )
    else:
        verdict = prepare_finalize.check_format(ctx, fmt)
        reason = verdict.reason if verdict.ok else f"{experts.name} needs {fmt.describe()}; {verdict.reason}"
        format_check = Check("format", verdict.ok, reason)
    prefixed = [c._replace(name=f"prepare_finalize.{c.name}") for c in prepare_finalize.checks(ctx)]
    prefixed += [c._replace(name=f"experts.{c.name}") for c in experts.checks(ctx)]
    return [format_check, *prefixed]


# --- workspaces ------------------------------------------------------------------------------


class WorkspaceCache:
    """Scratch memory shared by every kernel that uses the cache (all layers of a model).

    One flat byte buffer per name and device. Kernels reserve their largest need when they are
    built, so calls never allocate. A buffer that a CUDA-graph capture used is never replaced:
    the graph keeps writing to its address, so growing it (which would hand the old memory back
    to the allocator) raises :class:`WorkspaceError` instead. Views of one name must not be alive
    in two calls at once: calls on one stream are sequential, so layers can share; concurrent
    micro-batches use distinct ``tag``s.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._captured: set[tuple[str, torch.device]] = set()

    def reserve(self, specs: dict[str, WorkspaceSpec], device: torch.device, tag: str = "") -> None:
        """Grow each named buffer to at least its spec now (outside capture)."""
        for name, spec in specs.items():
            self._buffer(f"{tag}{name}", spec.nbytes, device)

    def get(self, specs: dict[str, WorkspaceSpec], device: torch.device, tag: str = "") -> dict[str, torch.Tensor]:
        """Views shaped as ``specs``."""
        return {name: self.view(name, spec, device, tag) for name, spec in specs.items()}

    def view(self, name: str, spec: WorkspaceSpec, device: torch.device, tag: str = "") -> torch.Tensor:
        buf = self._buffer(f"{tag}{name}", spec.nbytes, device)
        return buf[: spec.nbytes].view(spec.dtype).view(spec.shape)

    def _buffer(self, name: str, nbytes: int, device: torch.device) -> torch.Tensor:
        key = (name, device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            have = 0 if buf is None else buf.numel()
            if capturing:
                raise WorkspaceError(
                    f"workspace {name!r} would have to grow from {_mib(have)} to {_mib(nbytes)} during CUDA-graph "
                    "capture: kernels reserve their largest call when built, so this call exceeds the configured "
                    "maxima (parallel.max_tokens_per_rank)"
                )
            if key in self._captured:
                raise WorkspaceError(
                    f"workspace {name!r} ({_mib(have)}) is used by a captured CUDA graph and cannot grow to "
                    f"{_mib(nbytes)} (that would free memory the graph still writes): build every layer before "
                    "capturing any graph, or give later kernels their own WorkspaceCache"
                )
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buffers[key] = buf
        if capturing:
            self._captured.add(key)
        return buf

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer no captured graph uses (captured ones stay alive)."""
        self._buffers = {k: b for k, b in self._buffers.items() if k in self._captured}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


#: the cache layers share unless given their own
default_workspace_cache = WorkspaceCache()


# --- the chain -------------------------------------------------------------------------------


#: the workspace tags of the two micro-batches of a two-batch-overlapped call
MICRO_BATCH_TAGS = ("mb0.", "mb1.")


@contextlib.contextmanager
def _logged_first_call(name: str, tokens: int) -> Iterator[None]:
    """Log the host time of a kernel's first call: Triton and DeepGEMM compile their kernels
    for the layer's shapes then (seconds), which a user would otherwise take for a hang."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    log.info("%s: first call (T=%d) took %.2f s on the host, JIT compiles included", name, tokens, seconds)


class ModularKernel:
    """A checked, bound prepare -> experts -> finalize chain for one layer.

    Call it as ``kernel(x, weights, topk_weights, topk_ids)`` -> ``[T, H]``. Build it with
    :func:`compose` (which checks the pair first); constructing it directly binds the parts
    without checking them (tests of parts on stand-ins do that).

    With ``parallel.two_batch_overlap`` every call is split in two micro-batches: the second
    one's dispatch runs while the first computes, and the first one's combine while the second
    computes (``prepare_async``/``finalize_async``). Each micro-batch has its own workspaces.
    """

    def __init__(
        self,
        prepare_finalize: PrepareAndFinalize,
        experts: PermuteExpertsUnpermute,
        ctx: LayerContext,
        workspace_cache: WorkspaceCache | None = None,
        *,
        workspace_tag: str = "",
    ) -> None:
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.ctx = ctx
        self.format: TokenFormat = experts.input_format(ctx)
        self.workspaces = workspace_cache or default_workspace_cache
        self.workspace_tag = workspace_tag
        chunk = ctx.cfg.moe.max_tokens_per_chunk
        can_chunk = prepare_finalize.supports_chunking and experts.supports_chunking
        self.chunk_size: int | None = chunk if can_chunk else None
        self.overlapped = ctx.cfg.parallel.two_batch_overlap
        self._first_call = True  # logged: it JIT-compiles
        prepare_finalize.bind(ctx, self.format)
        try:
            experts.bind(ctx)
            self._pf_specs = prepare_finalize.workspace_specs(ctx, self.format)
            max_rows = prepare_finalize.max_expert_rows(ctx, self.format)
            self._max_expert_specs = experts.max_workspace_specs(ctx, max_rows)
            for tag in self._tags():
                self.workspaces.reserve(self._pf_specs, ctx.device, tag)
                self.workspaces.reserve(self._max_expert_specs, ctx.device, tag)
        except Exception:
            # nothing will own this kernel: give back what the parts acquired when bound
            self.release()
            raise

    def rebind_placement(self, placement: ExpertPlacement) -> None:
        """Route by ``placement`` from the next call on (EPLB): same ranks, experts per rank and
        redundancy as now, so no buffer or workspace changes; the caller has moved the weights."""
        self.ctx.placement.check_same_shape(placement)
        self.ctx = dataclasses.replace(self.ctx, placement=placement)
        self.prepare_finalize.bind_placement(self.ctx)
        self.experts.bind(self.ctx)

    def receive_slots(self) -> None:
        """From the next call on, ``topk_ids`` are physical slots: the caller chooses each token's
        replica by the placement's :meth:`~moe_kernels.core.placement.ExpertPlacement.slot_map`
        and counts it in ``ctx.expert_load`` (:class:`~moe_kernels.model.layer.FusedMoE` does,
        in its routing kernel's launch, which saves the choice a launch of its own)."""
        self.ctx = dataclasses.replace(self.ctx, ids_are_slots=True)
        self.prepare_finalize.bind_placement(self.ctx)

    def _tags(self) -> tuple[str, ...]:
        return tuple(self.workspace_tag + t for t in MICRO_BATCH_TAGS) if self.overlapped else (self.workspace_tag,)

    @property
    def name(self) -> str:
        return pair_name(self.prepare_finalize, self.experts)

    @property
    def cfg(self) -> LayerConfig:
        return self.ctx.cfg

    @property
    def max_tokens(self) -> int | None:
        """The most tokens one call may pass, ``None`` when the kernel chunks any batch."""
        return None if self.chunk_size else self.ctx.max_tokens

    def workspace_bytes(self) -> int:
        """Scratch bytes this kernel reserved at its largest call."""
        return len(self._tags()) * (workspace_bytes(self._pf_specs) + workspace_bytes(self._max_expert_specs))

    def __repr__(self) -> str:
        return f"ModularKernel({self.name})"

    def release(self) -> None:
        """Release what the parts acquired at bind (e.g. DeepEP buffers)."""
        self.prepare_finalize.release()
        self.experts.release()

    def __call__(
        self,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        residual: torch.Tensor | Residual | None = None,
        apply_router_weight_on_input: bool = False,
        check_values: bool = True,
        reduce_results: bool = True,
    ) -> torch.Tensor:
        """``x [T, H]`` (moe.dtype), ``weights`` the local experts', ``topk_weights [T, K]``
        float32, ``topk_ids [T, K]`` int32/int64 global ids (``-1`` = none) -> ``[T, H]``.
        ``residual [T, H]`` (e.g. the shared experts' output) is added in the final write.
        ``check_values`` checks the ids' range and distinctness (one host sync; skipped during
        graph capture). Under tensor parallelism the output is this rank's partial sum (the
        residual included), summed over ``tp_group`` when ``reduce_results``; an engine that
        defers the reduction passes ``False`` and all-reduces once after adding its own partials."""
        ctx = self.ctx
        capturing = ctx.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        check_call(
            ctx.cfg,
            ctx.device,
            x,
            topk_weights,
            topk_ids,
            max_tokens=self.max_tokens,
            check_values=check_values and not capturing,
            num_ids=ctx.placement.num_physical_experts if ctx.ids_are_slots else None,
        )
        if not isinstance(weights, ExpertWeights):
            raise TypeError(f"weights: expected ExpertWeights, got {type(weights).__name__}")
        weights.check(ctx.mlp, ctx.placement.num_local_experts, ctx.device)
        residual = self._check_residual(residual, x)
        if apply_router_weight_on_input:
            if ctx.cfg.moe.top_k != 1:
                raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got top_k={ctx.cfg.moe.top_k}")
            x = (x.float() * topk_weights).to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)

        out = torch.empty_like(x)
        t = x.shape[0]
        first = self._first_call and ctx.device.type == "cuda" and not capturing
        self._first_call &= not first
        with _logged_first_call(self.name, t) if first else contextlib.nullcontext():
            if self.overlapped:
                self._run_two_batches(out, x, weights, topk_weights, topk_ids, residual)
            else:
                step = self.chunk_size or max(t, 1)
                # an empty batch still runs once: EP ranks must join every collective
                for start in range(0, max(t, 1), step):
                    end = min(start + step, t)
                    rows = residual.rows(start, end) if residual is not None else None
                    self._run(out[start:end], x[start:end], weights, topk_weights[start:end], topk_ids[start:end], rows)
        if residual is not None:
            residual.wait()  # join the residual's stream on every path (a CUDA-graph capture needs it)
        if reduce_results and ctx.tp_group is not None and ctx.cfg.parallel.tp_size > 1:
            dist.all_reduce(out, group=ctx.tp_group)
        return out

    def _check_residual(self, residual: torch.Tensor | Residual | None, x: torch.Tensor) -> Residual | None:
        if residual is None or isinstance(residual, Residual):
            tensor = residual.tensor if residual is not None else None
        else:
            tensor, residual = residual, Residual(residual)
        if tensor is not None:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"residual: expected a torch.Tensor [T, H], got {type(tensor).__name__}")
            if tensor.shape != x.shape or tensor.dtype != x.dtype or tensor.device != x.device:
                raise ValueError(
                    f"residual must match x ({list(x.shape)} {x.dtype} on {x.device}), got "
                    f"{list(tensor.shape)} {tensor.dtype} on {tensor.device}"
                )
        return residual

    def _start(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, tag: str) -> Pending:
        specs = self.workspaces.get(self._pf_specs, self.ctx.device, tag)
        return self.prepare_finalize.prepare_async(x, topk_weights, topk_ids, specs)

    def _compute(
        self,
        out: torch.Tensor,
        pending: Pending,
        weights: ExpertWeights,
        residual: Residual | None,
        tag: str,
    ) -> Pending:
        """Wait for the dispatch, run the experts, start the combine."""
        pf, device = self.prepare_finalize, self.ctx.device
        prepared = pending.wait()
        tokens = prepared.tokens
        expert_out = pf.expert_output(prepared, out)
        writes_out = expert_out is out
        if expert_out is None:
            spec = WorkspaceSpec(tuple(tokens.x.shape), out.dtype)
            expert_out = self.workspaces.view("expert_output", spec, device, tag)
        if writes_out and residual is not None and isinstance(tokens, StandardTokens):
            # the experts write the layer output themselves: their final write adds it
            tokens = dataclasses.replace(tokens, residual=residual)
            residual = None
        if tokens.num_rows:
            # an empty call still runs prepare/finalize (EP ranks must join every collective),
            # but the experts have nothing to compute
            workspace = self.workspaces.get(self.experts.workspace_specs(self.ctx, tokens.num_rows), device, tag)
            self.experts.apply(tokens, weights, expert_out, workspace)
        return pf.finalize_async(out, expert_out, prepared, residual)

    def _run(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        residual: Residual | None,
    ) -> None:
        tag = self.workspace_tag
        self._compute(out, self._start(x, topk_weights, topk_ids, tag), weights, residual, tag).wait()

    def _run_two_batches(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        residual: Residual | None,
    ) -> None:
        """Two micro-batches (``[0, h)`` and ``[h, T)``, either may be empty: every rank runs
        both, so the collectives stay matched): dispatch both, then compute each while the
        other's exchange runs."""
        t = x.shape[0]
        h = (t + 1) // 2
        spans = ((0, h), (h, t))
        tags = self._tags()
        started = [
            self._start(x[a:b], topk_weights[a:b], topk_ids[a:b], tag) for (a, b), tag in zip(spans, tags, strict=True)
        ]
        combines = []
        for (a, b), pending, tag in zip(spans, started, tags, strict=True):
            rows = residual.rows(a, b) if residual is not None else None
            combines.append(self._compute(out[a:b], pending, weights, rows, tag))
        for combine in combines:
            combine.wait()


class TokenRangeKernel:
    """One :class:`ModularKernel` per range of token counts: a call with T tokens runs the
    first kernel whose ``max_tokens`` bound holds T (the last takes the rest). The choice is a
    host int, so a CUDA graph captured at one T replays one path. For layers without expert
    parallelism only (ranks would otherwise pick different collectives)."""

    def __init__(self, ranges: list[tuple[int, ModularKernel]]) -> None:
        if not ranges:
            raise ValueError("ranges: expected at least one (max_tokens, kernel)")
        bounds = [m for m, _ in ranges]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"ranges: bounds must increase strictly, got {bounds}")
        if any(k.ctx.placement.ep_size > 1 for _, k in ranges):
            raise ValueError("ranges: a token-count switch is only for layers without expert parallelism")
        self.ranges = ranges

    @property
    def ctx(self) -> LayerContext:
        return self.ranges[-1][1].ctx

    @property
    def cfg(self) -> LayerConfig:
        return self.ctx.cfg

    @property
    def name(self) -> str:
        parts, low = [], 1
        for i, (bound, kernel) in enumerate(self.ranges):
            span = f"T>={low}" if i == len(self.ranges) - 1 else f"T<={bound}" if low == 1 else f"T={low}..{bound}"
            parts.append(f"{span}: {kernel.name}")
            low = bound + 1
        return " | ".join(parts)

    def kernel_for(self, num_tokens: int) -> ModularKernel:
        for bound, kernel in self.ranges:
            if num_tokens <= bound:
                return kernel
        return self.ranges[-1][1]

    def workspace_bytes(self) -> int:
        return max(k.workspace_bytes() for _, k in self.ranges)

    def rebind_placement(self, placement: ExpertPlacement) -> None:
        """:meth:`ModularKernel.rebind_placement` on every member."""
        for _, kernel in self.ranges:
            kernel.rebind_placement(placement)

    def receive_slots(self) -> None:
        """:meth:`ModularKernel.receive_slots` on every member."""
        for _, kernel in self.ranges:
            kernel.receive_slots()

    def release(self) -> None:
        for _, kernel in self.ranges:
            kernel.release()

    def __repr__(self) -> str:
        return f"TokenRangeKernel({self.name})"

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """As :meth:`ModularKernel.__call__` (same arguments), on the member for ``x``'s token count."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [T, H], got {type(x).__name__}")
        return self.kernel_for(x.shape[0])(x, *args, **kwargs)


class Kernel(Protocol):
    """What a layer calls: a :class:`ModularKernel` or a :class:`TokenRangeKernel`."""

    @property
    def ctx(self) -> LayerContext: ...

    @property
    def cfg(self) -> LayerConfig: ...

    @property
    def name(self) -> str: ...

    def __call__(
        self,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        residual: torch.Tensor | Residual | None = None,
        apply_router_weight_on_input: bool = False,
        check_values: bool = True,
        reduce_results: bool = True,
    ) -> torch.Tensor:
        """``x [T, H]``, the local experts' weights, ``topk_weights [T, K]`` float32,
        ``topk_ids [T, K]`` global ids -> ``[T, H]`` (summed over the tensor-parallel group
        when ``reduce_results``)."""
        ...

    def workspace_bytes(self) -> int: ...

    def rebind_placement(self, placement: ExpertPlacement) -> None: ...

    def receive_slots(self) -> None: ...

    def release(self) -> None: ...


def compose(
    prepare_finalize: PrepareAndFinalize,
    experts: PermuteExpertsUnpermute,
    cfg: LayerConfig,
    *,
    placement: ExpertPlacement | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    workspace_cache: WorkspaceCache | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> ModularKernel:
    """Check the pair against ``cfg`` on ``device`` (default: the current CUDA device if any,
    else CPU), bind it and chain it. ``placement`` defaults to contiguous ownership; ``group``
    is the expert-parallel process group (EP > 1), ``tp_group`` the tensor-parallel one
    (``parallel.tp_size > 1``). Raises :class:`IncompatibleKernelsError` listing every failure."""
    if not isinstance(prepare_finalize, PrepareAndFinalize):
        raise TypeError(f"prepare_finalize: expected a PrepareAndFinalize, got {type(prepare_finalize).__name__}")
    if not isinstance(experts, PermuteExpertsUnpermute):
        raise TypeError(f"experts: expected a PermuteExpertsUnpermute, got {type(experts).__name__}")
    ctx = layer_context(cfg, placement=placement, group=group, device=device, tp_group=tp_group)
    check_tp_agreement(ctx)
    failures = [c for c in check_pair(prepare_finalize, experts, ctx) if not c.ok]
    if failures:
        raise IncompatibleKernelsError(pair_name(prepare_finalize, experts), failures)
    return ModularKernel(prepare_finalize, experts, ctx, workspace_cache)
