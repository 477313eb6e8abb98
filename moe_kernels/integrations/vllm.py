"""vLLM (0.33) adapter: our parts inside vLLM's modular kernel, and vLLM's ``fused_experts`` call
backed by our selection. Mapping table and steps: docs/integration.md.

* :func:`experts_class` turns one of our experts classes into a vLLM ``FusedMoEExpertsModular``
  subclass; :class:`` VllmPrepareAndFinalize`` (from :func:`prepare_finalize`) wraps one of our
  local prepare/finalize parts as a ``FusedMoEPrepareAndFinalizeModular``. ``FusedMoEKernel(pf,
  experts)`` then runs them. Our STANDARD layout is vLLM's ``Standard`` format, our MASKED is
  vLLM's ``BatchedExperts``; EXPANDED has no vLLM format (its experts take DeepEP's expanded,
  expert-grouped rows, which vLLM's modular interface never hands out) and is refused.
* Both wrapped parts see the *local* layer: ``E_local`` experts, no expert parallelism. vLLM's
  ``expert_map`` (global id -> local id or -1) is applied at the boundary, so a rank of vLLM's
  EP-within-TP computes its share and vLLM adds the ranks (``output_is_reduced() == False``).
* :func:`fused_experts` has the signature of ``vllm...fused_moe.fused_experts`` and runs the
  kernel our :func:`~moe_kernels.selection.select.select` picks; it needs no vLLM.

vLLM is imported only by :func:`experts_class` and :func:`prepare_finalize` (optional extra
``vllm``; set ``VLLM_TARGET_DEVICE`` before the first import on a machine without a GPU).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
from moe_kernels.core.compose import IncompatibleKernelsError, Kernel, WorkspaceCache, layer_context, require_part
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    Layout,
    MaskedTokens,
    PermuteExpertsUnpermute,
    PrepareAndFinalize,
    StandardTokens,
    TokenFormat,
    expected_rows_per_expert,
)
from moe_kernels.core.placement import map_expert_ids
from moe_kernels.mlp.activations import Activation
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.ops import call_kernel, register_kernel
from moe_kernels.selection.select import select

#: vLLM ``MoEActivation`` values -> our activation names (the others are refused)
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu2_no_mul": "relu2"}

#: our layouts -> vLLM ``FusedMoEActivationFormat`` member names (EXPANDED has none)
FORMATS = {Layout.STANDARD: "Standard", Layout.MASKED: "BatchedExperts"}


def _modular_kernel() -> Any:
    try:
        import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    except ImportError as e:
        raise ImportError(
            f"the vLLM adapter needs vllm (pip install 'moe-kernels[vllm]'; on a CPU-only machine see "
            f"docs/integration.md): {e}"
        ) from e
    return mk


def _activation_name(activation: object) -> str:
    """A vLLM ``MoEActivation`` (or its value) -> our activation name; ``ValueError`` if unmapped."""
    value = getattr(activation, "value", activation)
    if value not in ACTIVATIONS:
        raise ValueError(f"activation: vLLM's {value!r} has no counterpart here (mapped: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[value]


def quant_config_of(quant_config: Any) -> QuantConfig:
    """vLLM's ``FusedMoEQuantConfig`` -> our ``quant`` section: unquantized, or fp8 e4m3 weights
    with 128 x 128 block scales and activations quantized per token and 128 columns (DeepSeek-V3's
    ``fp8_w8a8_block``); anything else is a ``ValueError``."""
    if quant_config is None or (quant_config.quant_dtype is None and quant_config.w1_scale is None):
        return QuantConfig()
    block = list(quant_config.block_shape or [])
    if quant_config.quant_dtype == torch.float8_e4m3fn and block == [128, 128] and not quant_config.per_act_token_quant:
        return QuantConfig(scheme="fp8_w8a8_block")
    raise ValueError(
        f"quant_config: quant_dtype={quant_config.quant_dtype}, block_shape={quant_config.block_shape}, "
        f"per_act_token_quant={quant_config.per_act_token_quant} has no counterpart here (mapped: unquantized, "
        "fp8 e4m3 with block_shape=[128, 128])"
    )


def _weight_scales(quant_config: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(w13_scale, w2_scale)`` of a vLLM quant config (vLLM's ``w1_scale``, ``w2_scale``)."""
    return (None, None) if quant_config is None else (quant_config.w1_scale, quant_config.w2_scale)


def local_layer_config(moe_config: Any, quant_config: Any = None, *, max_tokens: int | None = None) -> LayerConfig:
    """vLLM's ``FusedMoEConfig`` -> the LayerConfig of one rank's local experts (``E_local``
    experts, ``intermediate_size_per_partition`` wide, no EP: vLLM's ``expert_map`` is applied at
    the adapter's boundary). Unmapped activations and quantization raise ``ValueError``."""
    moe = MoEConfig(
        num_experts=moe_config.num_local_experts,
        top_k=moe_config.experts_per_token,
        hidden_size=moe_config.hidden_dim,
        intermediate_size=moe_config.intermediate_size_per_partition,
        dtype=moe_config.in_dtype,
        activation=Activation(_activation_name(moe_config.activation)),
    )
    parallel = ParallelConfig(max_tokens_per_rank=max_tokens or moe_config.max_num_tokens)
    return LayerConfig(moe=moe, parallel=parallel, quant=quant_config_of(quant_config))


def _failures(checks: list[Check]) -> str:
    return "; ".join(f"{c.name}: {c.reason}" for c in checks if not c.ok)


def _bound_context(moe_config: Any, quant_config: Any, part: Any, max_tokens: int | None) -> LayerContext:
    """The local LayerContext of ``moe_config``, checked against ``part``; ``ValueError`` naming
    every failed check."""
    ctx = layer_context(local_layer_config(moe_config, quant_config, max_tokens=max_tokens), device=moe_config.device)
    require_part(part, ctx)
    return ctx


@functools.cache
def experts_class(part_type: type[PermuteExpertsUnpermute]) -> type:
    """A vLLM ``FusedMoEExpertsModular`` subclass running ``part_type`` (one of our experts
    classes). Instances: ``cls(moe_config, quant_config, max_num_tokens=None, num_dispatchers=None,
    part=None)``; ``part`` is an instance of ``part_type`` (default: built with no arguments)."""
    mk = _modular_kernel()
    layout = part_type.input_layout
    if layout not in FORMATS:
        raise ValueError(
            f"{part_type.__name__} takes {layout.value} tokens, which no vLLM activation format carries "
            "(vLLM's modular kernel hands experts [T, H] or [E, M, H], never expert-grouped expanded rows)"
        )
    vllm_format = getattr(mk.FusedMoEActivationFormat, FORMATS[layout])
    return type(
        f"Vllm{part_type.__name__}",
        (_ExpertsAdapter, mk.FusedMoEExpertsModular),
        {"part_type": part_type, "activation_format": staticmethod(lambda: vllm_format)},
    )


class _ExpertsAdapter:
    """The body of every :func:`experts_class` class (vLLM's base comes second in the MRO)."""

    part_type: type[PermuteExpertsUnpermute]

    def __init__(
        self,
        moe_config: Any,
        quant_config: Any,
        max_num_tokens: int | None = None,
        num_dispatchers: int | None = None,
        *,
        part: PermuteExpertsUnpermute | None = None,
    ) -> None:
        batched = self.part_type.input_layout is Layout.MASKED
        if batched and max_num_tokens is None:
            max_num_tokens, num_dispatchers = moe_config.max_num_tokens, num_dispatchers or 1
        super().__init__(moe_config, quant_config, max_num_tokens, num_dispatchers)  # type: ignore[call-arg]
        self.part = part if part is not None else self.part_type()
        self.ctx = _bound_context(moe_config, quant_config, self.part, max_num_tokens)
        self.part.bind(self.ctx)
        self.workspaces = WorkspaceCache()

    # --- what vLLM's selection asks (its is_supported_config calls these on the class) ----

    @staticmethod
    def _supports_current_device() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cuda() or current_platform.is_cpu()

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return True  # relu2 (not gated) maps; the other *_no_mul are refused by _supports_activation

    @staticmethod
    def _supports_quant_scheme(weight_key: Any, activation_key: Any) -> bool:
        from vllm.model_executor.layers.quantization.utils import quant_utils as qu

        mapped = ((None, None), (qu.kFp8Static128BlockSym, qu.kFp8Dynamic128Sym))
        return (weight_key, activation_key) in mapped

    @staticmethod
    def _supports_activation(activation: Any) -> bool:
        return getattr(activation, "value", activation) in ACTIVATIONS

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: Any) -> bool:
        # our parts move no tokens between vLLM's DP/EP ranks (vLLM's all2all P/Fs do)
        return not moe_parallel_config.use_all2all_kernels

    @staticmethod
    def is_supported_config(
        cls: type, moe_config: Any, weight_key: Any, activation_key: Any, activation_format: Any
    ) -> tuple[bool, str | None]:
        """vLLM's checks, then ours on the local layer (each failure with our reason)."""
        base = _modular_kernel().FusedMoEExperts
        ok, reason = base.is_supported_config(cls, moe_config, weight_key, activation_key, activation_format)
        if not ok:
            return ok, reason
        try:
            local = local_layer_config(moe_config)
            # vLLM's quant check passed: a weight key here is fp8 with 128 x 128 blocks
            quant = QuantConfig(scheme="fp8_w8a8_block") if weight_key is not None else QuantConfig()
            cfg = LayerConfig(moe=local.moe, parallel=local.parallel, quant=quant)
            ctx = layer_context(cfg, device=moe_config.device)
        except ValueError as e:
            return False, str(e)
        part_type = cls.part_type  # type: ignore[attr-defined]  # set by experts_class through type()
        failed = _failures(part_type().checks(ctx))
        return (False, f"{part_type.__name__}: {failed}") if failed else (True, None)

    # --- the call --------------------------------------------------------------------------

    def workspace_shapes(
        self, M: int, N: int, K: int, topk: int, global_num_experts: int, local_num_experts: int, *args: Any
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """No vLLM workspaces (our parts take named, typed scratch from their own cache); the
        output is ``[T, H]`` reduced (STANDARD) or ``[E_local, M, H]`` raw rows (MASKED)."""
        out = (M, K) if self.part.input_layout is Layout.STANDARD else (local_num_experts, M, K)
        return (0,), (0,), out

    def finalize_weight_and_reduce_impl(self) -> Any:
        from vllm.model_executor.layers.fused_moe import topk_weight_and_reduce as twr

        # STANDARD experts weight and sum over top-k themselves; MASKED rows are the P/F's to reduce
        standard = self.part.input_layout is Layout.STANDARD
        return twr.TopKWeightAndReduceNoOP() if standard else twr.TopKWeightAndReduceDelegate()

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: Any,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        a1q_scale: torch.Tensor | None,
        a2_scale: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        expert_tokens_meta: Any,
        apply_router_weight_on_input: bool,
    ) -> None:
        """vLLM's ``apply``: ``w1 [E_local, 2I, H]`` (gate rows first), ``w2 [E_local, H, I]``
        as ours; global ``topk_ids`` mapped by ``expert_map``; weights of 1 when vLLM's prepare
        already applied them to the input."""
        if _activation_name(activation) != self.ctx.mlp.activation.kind:
            raise ValueError(f"activation: called with {activation}, built for {self.ctx.mlp.activation.kind}")
        if self.part.input_layout is Layout.STANDARD:
            routed = torch.ones_like(topk_weights) if apply_router_weight_on_input else topk_weights
            tokens: StandardTokens | MaskedTokens = StandardTokens(
                hidden_states, map_expert_ids(topk_ids, expert_map), routed.float(), x_scale=a1q_scale
            )
        else:
            e, capacity, _ = hidden_states.shape
            expected = expected_rows_per_expert(topk_ids.shape[0], topk_ids.shape[1], e, capacity)
            # vLLM's naive batched P/F sizes its counts by the global expert count: the first E_local are ours
            counts = expert_tokens_meta.expert_num_tokens[:e].to(torch.int32)
            tokens = MaskedTokens(hidden_states, counts, expected, a1q_scale)
        specs = self.part.workspace_specs(self.ctx, tokens.num_rows)
        workspace = self.workspaces.get(specs, hidden_states.device)
        weights = ExpertWeights(w1, w2, *_weight_scales(self.quant_config), format=self.ctx.mlp.weights)  # type: ignore[attr-defined]  # quant_config: vLLM's base sets it
        self.part.apply(tokens, weights, output, workspace)


def prepare_finalize(part: PrepareAndFinalize, moe_config: Any) -> Any:
    """One of our local prepare/finalize parts as a vLLM ``FusedMoEPrepareAndFinalizeModular``
    for the layer ``moe_config`` describes (bound when vLLM's ``FusedMoEKernel`` pairs it)."""
    if part.output_layout not in FORMATS:
        raise ValueError(f"{part.name} hands out {part.output_layout.value} tokens, which vLLM has no format for")
    vllm_format = getattr(_modular_kernel().FusedMoEActivationFormat, FORMATS[part.output_layout])
    return _prepare_finalize_class()(part, moe_config, vllm_format)


@functools.cache
def _prepare_finalize_class() -> type:
    mk = _modular_kernel()
    return type("VllmPrepareAndFinalize", (_PrepareFinalizeAdapter, mk.FusedMoEPrepareAndFinalizeModular), {})


class _PrepareFinalizeAdapter:
    """The body of :func:`prepare_finalize`'s class. One call in flight at a time (the prepared
    tokens wait here for finalize): no async/DBO."""

    def __init__(self, part: PrepareAndFinalize, moe_config: Any, vllm_format: Any) -> None:
        self.part, self.moe_config, self._format = part, moe_config, vllm_format
        self.workspaces = WorkspaceCache()
        self._prepared: Any = None

    @property
    def activation_format(self) -> Any:
        return self._format

    def post_init_setup(self, fused_experts: Any) -> None:
        """Bind to the experts' token format when they are ours, else to the plain layout."""
        ours = getattr(fused_experts, "part", None)
        max_tokens = fused_experts.max_num_tokens
        self.ctx = _bound_context(self.moe_config, fused_experts.quant_config, self.part, max_tokens)
        fmt = ours.input_format(self.ctx) if ours is not None else TokenFormat(self.part.output_layout)
        verdict = self.part.check_format(self.ctx, fmt)
        if not verdict.ok:
            raise IncompatibleKernelsError(self.part.name, [verdict])
        self.part.bind(self.ctx, fmt)
        self._specs = self.part.workspace_specs(self.ctx, fmt)
        self.workspaces.reserve(self._specs, self.ctx.device)

    def topk_indices_dtype(self) -> torch.dtype | None:
        return None

    def max_num_tokens_per_rank(self) -> int | None:
        return self.ctx.max_tokens if self.part.output_layout is Layout.MASKED else None

    def num_dispatchers(self) -> int:
        return 1

    def output_is_reduced(self) -> bool:
        return False  # a rank's EP share, or a TP partial sum: the caller's all-reduce adds them

    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: Any,
        defer_input_quant: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any, None, None]:
        """Our ``prepare`` on the local view (ids mapped by ``expert_map``); STANDARD hands the
        global ids on to the experts as vLLM does (they map them), MASKED hands the counts."""
        if apply_router_weight_on_input:
            if topk_ids.shape[1] != 1:
                raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got {topk_ids.shape[1]}")
            a1 = (a1.float() * topk_weights).to(a1.dtype)
            topk_weights = torch.ones_like(topk_weights)
        workspace = self.workspaces.get(self._specs, a1.device)
        local_ids = map_expert_ids(topk_ids, expert_map)
        self._prepared = self.part.prepare(a1, topk_weights.float(), local_ids, workspace)
        tokens = self._prepared.tokens
        meta = None
        if isinstance(tokens, MaskedTokens):
            meta = _modular_kernel().ExpertTokensMetadata(expert_num_tokens=tokens.counts, expert_num_tokens_cpu=None)
        return tokens.x, tokens.x_scale, meta, None, None

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: Any,
    ) -> None:
        """Our ``finalize``; for STANDARD experts that left the top-k reduction to the P/F (vLLM's
        own, e.g. ``TopKWeightAndReduceContiguous``), their reduce instead."""
        from vllm.model_executor.layers.fused_moe import topk_weight_and_reduce as twr

        prepared, self._prepared = self._prepared, None
        if prepared is None:
            raise RuntimeError("finalize without a prepare")
        delegated = isinstance(weight_and_reduce_impl, (twr.TopKWeightAndReduceDelegate, twr.TopKWeightAndReduceNoOP))
        if self.part.output_layout is Layout.STANDARD and not delegated:
            weight_and_reduce_impl.apply(
                output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input
            )
            return
        self.part.finalize(output, fused_expert_output, prepared)


# --- vLLM's functional call, backed by our selection ------------------------------------------


_selected: dict[tuple[str, str], tuple[Kernel, str]] = {}


def _kernel_for(cfg: LayerConfig, device: torch.device) -> str:
    """The registered key of the kernel :func:`select` picks for ``cfg`` on ``device`` (cached)."""
    cache_key = (cfg.model_dump_json(), str(device))
    if cache_key not in _selected:
        kernel = select(cfg, device=device).kernel
        _selected[cache_key] = (kernel, register_kernel(kernel))
    return _selected[cache_key][1]


def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Any = "silu",
    apply_router_weight_on_input: bool = False,
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
    quant_config: Any = None,
) -> torch.Tensor:
    """vLLM's ``fused_experts`` signature, run by the kernel :func:`select` picks for the shapes.

    ``hidden_states [T, H]``, ``w1 [E_local, 2I, H]`` (gate rows first; ``[E_local, I, H]`` for
    relu2), ``w2 [E_local, H, I]``, ``topk_weights [T, K]``, ``topk_ids [T, K]`` global ids,
    mapped by ``expert_map [E]`` (global -> local or -1) when given -> ``[T, H]``. Kernels are
    built per shape, with room for T rounded up to a power of two, and called through the
    ``moe_kernels::moe_kernel`` op (``torch.compile`` sees one node)."""
    quant = quant_config_of(quant_config)
    e_local, rows, h = w1.shape
    name = _activation_name(activation)
    t, k = topk_ids.shape
    moe = MoEConfig(
        num_experts=e_local,
        top_k=k,
        hidden_size=h,
        intermediate_size=rows // 2 if name != "relu2" else rows,
        dtype=hidden_states.dtype,
        activation=Activation(name),
    )
    max_tokens = 1 << max(t - 1, 0).bit_length()
    cfg = LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=max_tokens), quant=quant)
    key = _kernel_for(cfg, hidden_states.device)
    ids = map_expert_ids(topk_ids, expert_map)
    return call_kernel(
        key,
        hidden_states,
        ExpertWeights(w1, w2, *_weight_scales(quant_config)),
        topk_weights.float(),
        ids,
        apply_router_weight_on_input=apply_router_weight_on_input,
    )
