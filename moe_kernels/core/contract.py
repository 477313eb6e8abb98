"""The contract between the two halves of an MoE kernel.

One MoE layer call is a chain; data travels once, front to back::

    x [T, H], topk_ids [T, K] global ids, topk_weights [T, K] fp32       (from the router)
      -> PrepareAndFinalize.prepare      move tokens to the ranks that own their experts
                                         (by the ExpertPlacement fixed at bind), lay them
                                         out in its Layout, quantize if the format says so
      -> PermuteExpertsUnpermute.apply   GEMM1 -> SiLU-and-mul -> GEMM2 on that layout,
                                         output in the same layout (tokens.x.shape rows)
      -> PrepareAndFinalize.finalize     bring rows home, weight and reduce over top-k
      -> out [T, H]

Each part declares what it can do as ``(ok, reason)`` checks and the token format it hands
out or takes (:class:`TokenFormat`: a layout and its parameters); only the composer
(:mod:`moe_kernels.core.compose`) looks at both sides. Lifecycle: ``bind`` once when composed
(agreement between ranks, buffers sized from the declared maxima), then any number of calls
with no first-call state, then ``release``.

Who applies the router weights and sums over top-k follows from the layout:

============  ============================================  ===================================
layout        the experts write                             finalize
============  ============================================  ===================================
STANDARD      ``[T, H]`` weighted and summed over top-k     nothing locally (EP: adds ranks'
                                                            partial sums)
MASKED        ``[E, M, H]`` raw rows                        weights and sums each token's rows
EXPANDED      ``[R, H]`` rows scaled by their weight        sums each token's rows (DeepEP's
                                                            combine does not weight)
============  ============================================  ===================================
"""

from __future__ import annotations

import enum
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from moe_kernels.config import LayerConfig
from moe_kernels.core.placement import ExpertPlacement
from moe_kernels.mlp.act_quant import ActQuant
from moe_kernels.mlp.formats import Dense, WeightFormat
from moe_kernels.mlp.spec import ExpertMLP
from moe_kernels.mlp.weights import ExpertWeights


class Layout(enum.Enum):
    """How tokens are laid out between prepare and finalize (see the module docstring)."""

    STANDARD = "standard"
    """``[T, H]`` one row per token with its ``[T, K]`` local ids and weights; experts permute."""
    MASKED = "masked"
    """``[E_local, M, H]`` with ``[E_local]`` valid-row counts (DeepGEMM's masked layout; vLLM
    calls it batched). Fixed shapes: CUDA-graph friendly."""
    EXPANDED = "expanded"
    """``[R, H]`` one row per (token, local expert), grouped by expert, each segment aligned
    (DeepEP's expanded dispatch == DeepGEMM's psum layout); no permute needed."""


@dataclass(frozen=True)
class TokenFormat:
    """A layout with the parameters both sides must agree on.

    ``alignment``: EXPANDED -- every expert segment starts on a multiple of it; MASKED -- the
    rows per expert ``M`` are a multiple of it; STANDARD -- 1. ``act_quant``: activations arrive
    quantized as it says (e.g. float8_e4m3fn with float32 scales per 128 columns) where the
    prepare/finalize moves or lays them out; a prepare/finalize that hands ``x`` through
    unchanged may leave them in the activation dtype (the experts quantize on their own way in).
    """

    layout: Layout
    alignment: int = 1
    act_quant: ActQuant | None = None

    def describe(self) -> str:
        parts = [self.layout.value]
        if self.alignment > 1:
            parts.append(f"aligned to {self.alignment} rows")
        if self.act_quant is not None:
            parts.append(self.act_quant.describe())
        return ", ".join(parts)


# --- what is added to the output ---------------------------------------------------------


@dataclass(frozen=True)
class Residual:
    """``tensor [T, H]`` (activation dtype) added to the layer output in its final write -- the
    shared experts' output -- so it costs no pass of its own over ``[T, H]``. ``ready`` is an
    event recorded on the stream that computes it (a side stream running beside dispatch and the
    routed experts); whoever reads ``tensor`` calls :meth:`wait` first."""

    tensor: torch.Tensor
    ready: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream(self.tensor.device).wait_event(self.ready)

    def rows(self, start: int, end: int) -> Residual:
        return Residual(self.tensor[start:end], self.ready)


# --- tokens handed from prepare to the experts -------------------------------------------


@dataclass(frozen=True)
class StandardTokens:
    """``x [T, H]`` (activation dtype, or float8_e4m3fn with ``x_scale [T, ceil(H/128)]``
    float32); ``topk_ids [T, K]`` int32/int64 local expert ids, ``-1`` = not on this rank;
    ``topk_weights [T, K]`` float32. ``residual``: added to ``out`` by the experts' final write
    when they write the layer output directly (the local path)."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    x_scale: torch.Tensor | None = None
    residual: Residual | None = None
    layout: ClassVar[Layout] = Layout.STANDARD

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class MaskedTokens:
    """``x [E_local, M, H]``: rows ``[0, counts[e])`` of expert e are valid, the rest are padding
    (any value). ``counts [E_local]`` int32. ``expected_m`` is a host-side estimate of the
    valid rows per expert (DeepGEMM's masked GEMM tunes for it); never read from the GPU. fp8:
    ``x`` float8_e4m3fn with ``x_scale [E_local, M, ceil(H/128)]`` float32."""

    x: torch.Tensor
    counts: torch.Tensor
    expected_m: int
    x_scale: torch.Tensor | None = None
    layout: ClassVar[Layout] = Layout.MASKED

    @property
    def num_rows(self) -> int:
        """Rows per expert (``M``)."""
        return self.x.shape[1]


@dataclass(frozen=True)
class ExpandedTokens:
    """``x [R, H]``: local expert e owns rows ``[align_up(expert_ends[e-1], alignment),
    expert_ends[e])`` (``expert_ends [E_local]`` int32, ``expert_ends[e] = align_up(expert_ends[e-1],
    alignment) + count_e``: DeepEP's ``psum_num_recv_tokens_per_expert``, DeepGEMM's psum layout);
    rows outside every segment are padding and
    must not reach the output. ``row_weights [R]`` float32 is each row's router weight. fp8:
    ``x`` float8_e4m3fn with ``x_scale [R, ceil(H/128)]`` float32."""

    x: torch.Tensor
    expert_ends: torch.Tensor
    row_weights: torch.Tensor
    alignment: int
    expected_m: int
    x_scale: torch.Tensor | None = None
    layout: ClassVar[Layout] = Layout.EXPANDED

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]


ExpertTokens = StandardTokens | MaskedTokens | ExpandedTokens


def expected_rows_per_expert(num_tokens: int, top_k: int, num_experts: int, capacity: int) -> int:
    """:attr:`MaskedTokens.expected_m` for ``num_tokens`` routed ``top_k`` ways over
    ``num_experts`` local experts of ``capacity`` rows each: the even share, at least 1."""
    return max(1, min(capacity, -(-num_tokens * top_k // num_experts)))


H = TypeVar("H")

#: a GEMM operand as DeepGEMM takes it: ``(values, scale)``, the scale ``None`` when unquantized
Operand = tuple[torch.Tensor, torch.Tensor | None]

#: a part's scratch buffers for one call, by the names its ``workspace_specs`` gave them
Workspace = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PrepareResult(Generic[H]):
    """What ``prepare`` returns: the tokens for the experts and a handle of the part's own type
    (``H``: a frozen dataclass each prepare/finalize defines) that only it reads back in
    ``finalize``."""

    tokens: ExpertTokens
    handle: H


R = TypeVar("R")


class Pending(Generic[R]):
    """Work that may still be in flight (a dispatch or a combine). ``wait()`` orders the current
    stream after it -- blocking the host only where the backend must -- and returns its result;
    a second ``wait()`` returns the same result. The synchronous calls are ``..._async().wait()``."""

    def __init__(self, finish: Callable[[], R]) -> None:
        self._finish: Callable[[], R] | None = finish
        self._result: R | None = None

    @classmethod
    def done(cls, result: R) -> Pending[R]:
        return cls(lambda: result)

    def wait(self) -> R:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result  # type: ignore[return-value]


# --- where a layer runs --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerContext:
    """Everything a part's checks and ``bind`` read: the layer, its device, the expert
    placement, the expert-parallel process group (``None`` without EP) and the tensor-parallel
    one (``None`` without TP: the ranks that hold the other slices of this rank's experts)."""

    cfg: LayerConfig
    device: torch.device
    placement: ExpertPlacement
    group: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    #: ``[P]`` int32 on ``device``: tokens this rank routed to each physical expert since the
    #: caller last zeroed it (layers with redundant experts; ``None`` otherwise)
    expert_load: torch.Tensor | None = None
    #: ``topk_ids`` reach prepare as physical slots: the caller chose each token's replica by
    #: :meth:`ExpertPlacement.slot_map` and counted it in ``expert_load`` (FusedMoE does, in its
    #: routing kernel's launch: :meth:`ModularKernel.receive_slots`); else prepare does both
    ids_are_slots: bool = False

    @property
    def max_tokens(self) -> int:
        """The most tokens one pass through prepare -> experts -> finalize carries."""
        return self.cfg.max_tokens_per_call

    @functools.cached_property  # read several times per call; cfg is frozen
    def mlp(self) -> ExpertMLP:
        """What each local expert's MLP is (:attr:`moe_kernels.config.LayerConfig.mlp`)."""
        return self.cfg.mlp


# --- capabilities ------------------------------------------------------------------------


class Check(NamedTuple):
    """One capability predicate's verdict. ``reason`` says what was required and what was found."""

    name: str
    ok: bool
    reason: str

    @classmethod
    def passed(cls, name: str, reason: str = "ok") -> Check:
        return cls(name, True, reason)

    @classmethod
    def failed(cls, name: str, reason: str) -> Check:
        return cls(name, False, reason)


def check_device_type(name: str, device: torch.device, allowed: Sequence[str]) -> Check:
    if device.type in allowed:
        return Check.passed(name, f"runs on {device.type}")
    return Check.failed(name, f"runs on {'/'.join(allowed)}, not on {device.type}")


@dataclass(frozen=True)
class WorkspaceSpec:
    """A scratch tensor a part needs for one call."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def align_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


def workspace_bytes(specs: dict[str, WorkspaceSpec]) -> int:
    return sum(s.nbytes for s in specs.values())


def largest_specs(candidates: Iterable[dict[str, WorkspaceSpec]]) -> dict[str, WorkspaceSpec]:
    """Per name, the candidate spec of the most bytes: the workspace cache keeps one flat buffer
    per name, so a part whose path changes with the rows reserves each name's peak."""
    merged: dict[str, WorkspaceSpec] = {}
    for specs in candidates:
        for name, spec in specs.items():
            if name not in merged or spec.nbytes > merged[name].nbytes:
                merged[name] = spec
    return merged


class Part:
    """Shared by both halves: a name, capability checks derived from class data, a lifecycle."""

    #: device types the part runs on
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    #: activation dtypes it accepts (``moe.dtype``)
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
    #: may be captured in a CUDA graph (no host sync, fixed shapes)
    supports_cuda_graphs: ClassVar[bool] = False
    #: the layer may be split into token chunks around this part
    supports_chunking: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_device(self, ctx: LayerContext) -> Check:
        return check_device_type("device", ctx.device, self.devices)

    def check_mlp(self, ctx: LayerContext) -> Check:
        """Whether the part computes (or carries the tokens of) this expert MLP; the default
        checks the activation dtype only."""
        dtype = ctx.cfg.moe.dtype
        if dtype not in self.dtypes:
            names = ", ".join(_dt(d) for d in self.dtypes)
            return Check.failed("mlp", f"needs dtype in ({names}), got {_dt(dtype)}")
        return Check.passed("mlp", ctx.mlp.describe())

    def check_parallel(self, ctx: LayerContext) -> Check:
        if ctx.cfg.parallel.cuda_graphs and not self.supports_cuda_graphs:
            return Check.failed("cuda_graphs", "cannot be captured in a CUDA graph (it syncs with the host)")
        return Check.passed("parallel", f"ep_size={ctx.placement.ep_size}")

    def checks(self, ctx: LayerContext) -> list[Check]:
        """Every capability predicate of this part for the layer in ``ctx``."""
        return [self.check_device(ctx), self.check_mlp(ctx), self.check_parallel(ctx)]

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        """Heuristic rank among valid parts when no measurement covers the layer (lower is
        better) and why. Measured tables (:mod:`moe_kernels.core.tuning`) take precedence."""
        return 100.0, "no heuristic preference"

    def release(self) -> None:
        """Free what ``bind`` acquired (buffers, communicators). Idempotent."""


class PrepareAndFinalize(Part, ABC, Generic[H]):
    """Moves tokens to the experts that own them (``prepare``) and back (``finalize``). ``H`` is
    the type of the handle ``prepare`` hands to ``finalize``."""

    #: the layout ``prepare`` hands to the experts
    output_layout: ClassVar[Layout]
    supports_chunking = False

    def check_format(self, ctx: LayerContext, fmt: TokenFormat) -> Check:
        """Whether this part can hand out ``fmt`` (the experts' input format). The default
        produces exactly its layout at alignment 1, in the activation dtype."""
        if fmt.alignment != 1:
            return Check.failed("format", f"{self.name} aligns nothing; the experts need {fmt.describe()}")
        return Check.passed("format", fmt.describe())

    def max_expert_rows(self, ctx: LayerContext, fmt: TokenFormat) -> int:
        """The largest ``tokens.num_rows`` one call hands the experts (host-side bound from the
        configured maxima): workspaces are sized for it when the kernel is built."""
        return ctx.max_tokens

    def workspace_specs(self, ctx: LayerContext, fmt: TokenFormat) -> dict[str, WorkspaceSpec]:
        """Buffers this part takes from the workspace cache at its largest call."""
        return {}

    def bind(self, ctx: LayerContext, fmt: TokenFormat) -> None:
        """Called once by the composer before the first call (collectives allowed here, never
        in ``prepare``/``finalize`` beyond the data exchange itself)."""
        self.ctx, self.format = ctx, fmt
        self.bind_placement(ctx)

    def bind_placement(self, ctx: LayerContext) -> None:
        """Take ``ctx``'s expert placement: at ``bind``, and again when a layer moves to a new
        placement of the same shape (EPLB), with no buffer reallocated. Parts that derive tables
        from the placement override it (and call this one)."""
        self.ctx = ctx

    @abstractmethod
    def prepare(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace) -> PrepareResult[H]:
        """Dispatch ``x [T, H]`` with ``topk_weights [T, K]`` float32 and ``topk_ids [T, K]``
        (global ids, or physical slots under ``ctx.ids_are_slots``; ``-1`` = none) to the ranks
        owning the experts (by the bound placement)."""

    def prepare_async(
        self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, workspace: Workspace
    ) -> Pending[PrepareResult[H]]:
        """``prepare`` that may return while the exchange is still running, so the caller can
        compute meanwhile (the other micro-batch, the shared experts). The default is done at once."""
        return Pending.done(self.prepare(x, topk_weights, topk_ids, workspace))

    def expert_output(self, prepared: PrepareResult[H], out: torch.Tensor) -> torch.Tensor | None:
        """A buffer of shape ``prepared.tokens.x.shape`` (activation dtype) for the experts to
        write into, or ``None`` to let the composer take one from its workspace cache.
        Returning ``out`` itself saves a copy when finalize would only copy."""
        return None

    @abstractmethod
    def finalize(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[H], residual: Residual | None = None
    ) -> None:
        """Write the layer output ``out [T, H]`` from the experts' output (rows as
        ``prepared.tokens``, reduced as the layout says: see the module docstring), plus
        ``residual`` when given (wait for it before reading it)."""

    def finalize_async(
        self, out: Tensor, expert_output: Tensor, prepared: PrepareResult[H], residual: Residual | None = None
    ) -> Pending[None]:
        """``finalize`` that may return while the combine is still running; ``out`` is complete
        once the result is waited on. The default is done at once."""
        self.finalize(out, expert_output, prepared, residual)
        return Pending.done(None)


class PermuteExpertsUnpermute(Part, ABC):
    """Computes ``w2[e] @ act(w13[e] @ x)`` for every routed row of a layout."""

    #: the layout ``apply`` takes
    input_layout: ClassVar[Layout]
    #: the weight formats it computes with (:mod:`moe_kernels.mlp.formats`)
    weight_formats: ClassVar[tuple[type[WeightFormat], ...]] = (Dense,)
    #: whether its GEMMs add per-expert biases (an MLP with ``biases``: gpt-oss)
    expert_biases: ClassVar[bool] = False

    def check_mlp(self, ctx: LayerContext) -> Check:
        verdict = super().check_mlp(ctx)
        fmt = ctx.mlp.weights
        if verdict.ok and type(fmt) not in self.weight_formats:
            names = ", ".join(f.kind for f in self.weight_formats)
            return Check.failed("mlp", f"computes with {names} weights, not {fmt.describe()}")
        if verdict.ok and ctx.mlp.biases and not self.expert_biases:
            return Check.failed("mlp", "its GEMMs add no expert biases (gpt-oss's gate/up and down biases)")
        return verdict

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        """The format (layout + parameters) this part needs from prepare/finalize."""
        return TokenFormat(self.input_layout, act_quant=ctx.mlp.act_quant)

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        """Scratch for one call whose tokens have ``num_rows > 0`` rows (STANDARD: tokens T;
        MASKED: rows per expert M; EXPANDED: rows R), from host ints only."""
        return {}

    def max_workspace_specs(self, ctx: LayerContext, max_rows: int) -> dict[str, WorkspaceSpec]:
        """The largest scratch over every call with up to ``max_rows`` rows, per name. The
        default assumes the specs grow with the rows; parts whose path changes with the
        rows override it."""
        return self.workspace_specs(ctx, max_rows)

    def bind(self, ctx: LayerContext) -> None:
        """Called once by the composer before the first call."""
        self.ctx = ctx

    @abstractmethod
    def apply(
        self,
        tokens: ExpertTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        """Write the expert MLP of ``tokens`` into ``out`` (``tokens.x.shape`` rows, activation
        dtype), weighted/reduced as the layout says. The composer never calls it with
        ``tokens.num_rows == 0``."""


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")
