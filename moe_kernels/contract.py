"""The contract between the two halves of an MoE kernel.

One MoE layer call is a chain; data travels once, front to back::

    x [T, H], topk_ids [T, K], topk_weights [T, K]      (from the router)
      -> PrepareAndFinalize.prepare      move tokens to the ranks that own their experts,
                                         lay them out in its ActivationFormat
      -> PermuteExpertsUnpermute.apply   GEMM1 -> SiLU-and-mul -> GEMM2 on that layout,
                                         output in the same layout (tokens.x.shape)
      -> PrepareAndFinalize.finalize     bring rows home, weight and reduce over top-k
      -> out [T, H]

Each part declares its format and its capabilities as ``(ok, reason)`` checks; only the
composer (:mod:`moe_kernels.compose`) looks at both sides.

Who applies the router weights and sums over top-k follows from the format
(:attr:`ActivationFormat.weight_and_reduce`): STANDARD experts return ``[T, H]`` already
reduced; EXPANDED experts scale each row by its weight and finalize sums (DeepEP's combine
does not weight); BATCHED experts return raw rows and finalize weights and sums.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from moe_kernels.config import LayerConfig, QuantScheme


class WeightAndReduce(enum.Enum):
    """Who multiplies by the router weights and sums a token's top-k rows."""

    BY_EXPERTS = "the experts weight and sum over top-k; their output is already [T, H]"
    WEIGHT_BY_EXPERTS = "the experts scale each row by its router weight; finalize sums a token's rows"
    BY_FINALIZE = "the experts return raw rows; finalize weights and sums them"


class ActivationFormat(enum.Enum):
    """How tokens are laid out between prepare and finalize."""

    STANDARD = "standard"
    """``[T, H]`` one row per token with its ``[T, K]`` local ids/weights; experts permute."""
    BATCHED = "batched"
    """``[E_local, M, H]`` with ``[E_local]`` valid-row counts (masked; CUDA-graph friendly)."""
    EXPANDED = "expanded"
    """``[R, H]`` one row per (token, local expert), grouped by expert, each segment aligned
    (DeepEP's expanded dispatch == DeepGEMM's psum layout); no permute needed."""

    @property
    def weight_and_reduce(self) -> WeightAndReduce:
        return _REDUCTION[self]


_REDUCTION = {
    ActivationFormat.STANDARD: WeightAndReduce.BY_EXPERTS,
    ActivationFormat.BATCHED: WeightAndReduce.BY_FINALIZE,
    ActivationFormat.EXPANDED: WeightAndReduce.WEIGHT_BY_EXPERTS,
}


# --- tokens handed from prepare to the experts -------------------------------------------


@dataclass(frozen=True)
class StandardTokens:
    """``x [T, H]``; ``topk_ids [T, K]`` int32/int64 local expert ids, ``-1`` = not on this
    rank; ``topk_weights [T, K]`` float32."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_local_experts: int
    format: ClassVar[ActivationFormat] = ActivationFormat.STANDARD


@dataclass(frozen=True)
class BatchedTokens:
    """``x [E_local, M, H]``: rows ``[0, expert_num_tokens[e])`` of expert e are valid, the
    rest are padding (any value). ``expected_m`` is a host-side estimate of the valid rows per
    expert (DeepGEMM's masked GEMM tunes for it); it is never read from the GPU."""

    x: torch.Tensor
    expert_num_tokens: torch.Tensor
    expected_m: int
    format: ClassVar[ActivationFormat] = ActivationFormat.BATCHED

    @property
    def num_local_experts(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class ExpandedTokens:
    """``x [R, H]``: local expert e owns rows ``[align_up(expert_ends[e-1], alignment),
    expert_ends[e])`` (``expert_ends [E_local]`` int32, inclusive prefix sums of the counts,
    DeepEP's ``psum_num_recv_tokens_per_expert``); rows outside every segment are padding and
    must not reach the output. ``row_weights [R]`` float32 is each row's router weight."""

    x: torch.Tensor
    expert_ends: torch.Tensor
    row_weights: torch.Tensor
    alignment: int
    expected_m: int
    format: ClassVar[ActivationFormat] = ActivationFormat.EXPANDED

    @property
    def num_local_experts(self) -> int:
        return self.expert_ends.shape[0]


ExpertTokens = StandardTokens | BatchedTokens | ExpandedTokens


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` returns: the tokens for the experts and a handle that only the same
    PrepareAndFinalize reads back in ``finalize``."""

    tokens: ExpertTokens
    handle: Any = None


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
    """A scratch tensor an experts implementation needs for one call."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _Part:
    """Shared by both halves: a name and capability checks derived from class data."""

    #: device types the part runs on
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    #: activation/weight dtypes it accepts (unquantized scheme)
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
    #: quantization schemes it implements
    quant_schemes: ClassVar[tuple[QuantScheme, ...]] = (QuantScheme.NONE,)
    #: may be captured in a CUDA graph (no host sync, fixed shapes)
    supports_cuda_graphs: ClassVar[bool] = False
    #: the layer may be split into token chunks around this part
    supports_chunking: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_device(self, device: torch.device) -> Check:
        return check_device_type("device", device, self.devices)

    def check_quant(self, cfg: LayerConfig) -> Check:
        scheme, dtype = cfg.quant.scheme, cfg.moe.dtype
        if scheme not in self.quant_schemes:
            return Check.failed("quant", f"implements {[s.value for s in self.quant_schemes]}, not {scheme.value}")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return Check.failed("quant", f"needs dtype in ({names}), got {str(dtype).removeprefix('torch.')}")
        return Check.passed("quant", f"{scheme.value} {str(dtype).removeprefix('torch.')}")

    def check_parallel(self, cfg: LayerConfig) -> Check:
        if cfg.parallel.cuda_graphs and not self.supports_cuda_graphs:
            return Check.failed("cuda_graphs", "cannot be captured in a CUDA graph (it syncs with the host)")
        return Check.passed("parallel", f"ep_size={cfg.parallel.ep_size}")

    def checks(self, cfg: LayerConfig, device: torch.device) -> list[Check]:
        """Every capability predicate of this part for a layer on ``device``."""
        return [self.check_device(device), self.check_quant(cfg), self.check_parallel(cfg)]

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        """How this part ranks among valid ones for the layer (lower is better; an estimate of
        relative cost from measurements) and why. Only called when every check passed."""
        return 100.0, "no measured preference"


class PrepareAndFinalize(_Part, ABC):
    """Moves tokens to the experts that own them (``prepare``) and back (``finalize``)."""

    #: the layout ``prepare`` hands to the experts
    output_format: ActivationFormat
    supports_chunking = False

    @abstractmethod
    def num_dispatchers(self) -> int:
        """Ranks whose tokens may arrive here (1 without expert parallelism)."""

    @abstractmethod
    def max_num_tokens_per_rank(self) -> int | None:
        """The most tokens one call may pass on one rank, ``None`` when unbounded."""

    @abstractmethod
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
        """Dispatch ``x [T, H]`` with ``topk_ids [T, K]`` (global ids, ``-1`` = none) and
        ``topk_weights [T, K]`` float32 to the ``num_local_experts`` experts of each rank.
        ``expert_map [num_experts]`` int32 maps a global id to this rank's local id or ``-1``."""

    def expert_output(self, prepared: PrepareResult, out: torch.Tensor) -> torch.Tensor | None:
        """A buffer of shape ``prepared.tokens.x.shape`` for the experts to write into, or
        ``None`` to let the composer take one from its workspace cache. Returning ``out``
        itself saves a copy when finalize would only copy."""
        return None

    @abstractmethod
    def finalize(self, out: torch.Tensor, expert_output: torch.Tensor, prepared: PrepareResult) -> None:
        """Write the layer output ``out [T, H]`` from the experts' output (same layout as
        ``prepared.tokens.x``, reduced as ``output_format.weight_and_reduce`` says)."""

    @property
    def output_is_reduced(self) -> bool:
        """True when the experts' output needs no further weighting or summing on this rank."""
        return self.output_format.weight_and_reduce is WeightAndReduce.BY_EXPERTS


class PermuteExpertsUnpermute(_Part, ABC):
    """Computes ``w2[e] @ silu_and_mul(w13[e] @ x)`` for every routed row of a layout.

    Weights: ``w13 [E_local, 2I, H]`` (gate rows, then up rows; SiLU on the gate half),
    ``w2 [E_local, H, I]``, both in the activation dtype.
    """

    input_format: ActivationFormat
    activations: ClassVar[tuple[str, ...]] = ("silu",)
    #: handles local ids with ``-1`` for experts on other ranks (expert map / EP)
    supports_expert_map: ClassVar[bool] = True

    @property
    def weight_and_reduce(self) -> WeightAndReduce:
        return self.input_format.weight_and_reduce

    def check_activation(self, cfg: LayerConfig) -> Check:
        if cfg.moe.activation in self.activations:
            return Check.passed("activation", cfg.moe.activation)
        return Check.failed("activation", f"implements {list(self.activations)}, not {cfg.moe.activation}")

    def check_expert_map(self, cfg: LayerConfig) -> Check:
        if cfg.parallel.ep_size > 1 and not self.supports_expert_map:
            return Check.failed("expert_map", "cannot skip experts of other ranks (-1 local ids)")
        return Check.passed("expert_map", "handles -1 local ids")

    def checks(self, cfg: LayerConfig, device: torch.device) -> list[Check]:
        return [*super().checks(cfg, device), self.check_activation(cfg), self.check_expert_map(cfg)]

    def workspace_shapes(self, tokens: ExpertTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        """Scratch tensors for one call on ``tokens``, sized without reading GPU values.
        The composer allocates them from a cache shared across layers and calls."""
        return {}

    @abstractmethod
    def apply(
        self,
        tokens: ExpertTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        """Write the expert MLP of ``tokens`` into ``out`` (``tokens.x.shape``, activation
        dtype), weighted/reduced as ``self.weight_and_reduce`` says."""
