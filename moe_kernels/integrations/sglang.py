"""SGLang (0.5.23) adapter: one of our experts parts as an SGLang MoE runner backend. Mapping
table and usage: docs/integration.md.

SGLang splits a MoE layer into a token dispatcher and a ``MoeRunner``. Since 0.5.23 an extension
may register a runner-core factory under a new backend name
(``sglang.srt.layers.moe.moe_runner.register_moe_runner_core``); ``MoeRunner(backend, config)``
then builds the core from the layer's ``MoeRunnerConfig`` and hands it the dispatcher's output.

* :func:`register_runner_backend` registers such a name, backed by one of our experts classes.
  The factory maps ``MoeRunnerConfig`` to our local :class:`~moe_kernels.config.LayerConfig`
  (:func:`local_layer_config`) and runs our part's checks; what we cannot run is refused there,
  when SGLang builds the layer's runner, never at the first token.
* The core takes SGLang's ``STANDARD`` dispatch output (``[T, H]`` tokens, ``[T, K]`` local ids,
  ``-1`` for another rank's experts) into a STANDARD part, and ``DEEPEP_LL`` (``[E_local, M, H]``
  rows with ``masked_m``) into a MASKED part; other formats are refused per call.
* Weights come from the runner's ``quant_info``, read by SGLang's own field names for
  unquantized experts (its ``TritonMoeQuantInfo``): ``w13_weight [E_local, 2I, H]`` (gate rows
  first) and ``w2_weight [E_local, H, I]``, our layout. Quantized, biased or interleaved weights
  are refused.

SGLang is imported only when a backend is registered or a core is built (optional extra
``sglang``; on a CPU-only machine see requirements/sglang-cpu.txt).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.core.compose import WorkspaceCache, layer_context, require_part
from moe_kernels.core.contract import LayerContext, Layout, MaskedTokens, PermuteExpertsUnpermute, StandardTokens
from moe_kernels.mlp.activations import Activation
from moe_kernels.mlp.weights import ExpertWeights

#: SGLang ``(activation, is_gated)`` -> our activation kind (the others are refused)
ACTIVATIONS = {
    ("silu", True): "silu",
    ("gelu", True): "gelu",
    ("gelu_tanh", True): "gelu_tanh",
    ("relu2", False): "relu2",
}

#: SGLang dispatch formats (``DispatchOutputFormat`` values) -> the layout of the part that takes them
FORMATS = {"standard": Layout.STANDARD, "deepep_ll": Layout.MASKED}

#: ``MoeRunnerConfig`` fields we have no counterpart for, with the only value accepted: a layer
#: that sets one (gpt-oss's swiglu alpha/limit, per-slot outputs, Ascend's all-gather) is refused
UNMAPPED_FIELDS: dict[str, object] = {
    "no_combine": False,
    "no_combine_keep_router_weight": False,
    "gemm1_alpha": None,
    "gemm1_beta": None,
    "gemm1_clamp_limit": None,
    "swiglu_limit": None,
    "use_tp_all_gather_activation": False,
    "silu_mul_keep_fp32": False,
}

#: ``quant_info`` fields (SGLang's ``TritonMoeQuantInfo``) that only quantized, biased or
#: interleaved weights set (``fuse_swiglu_interleaved``: gate and up rows alternate in ``w13``)
UNMAPPED_WEIGHT_FIELDS = (
    "fuse_swiglu_interleaved",
    "b13",
    "b2",
    "use_mxfp8",
    "use_fp8_w8a8",
    "use_int8_w8a8",
    "use_int8_w8a16",
    "use_int4_w4a16",
    "per_channel_quant",
    "w13_scale",
    "w2_scale",
    "w13_zp",
    "w2_zp",
    "a13_scale",
    "a2_scale",
    "block_shape",
)

#: backend names registered by this process: name -> (experts class, max_tokens, device)
_registered: dict[str, tuple[type[PermuteExpertsUnpermute], int, str]] = {}


def _sglang_moe_runner() -> Any:
    try:
        import sglang.srt.layers.moe.moe_runner as moe_runner
    except ImportError as e:
        raise ImportError(
            f"the SGLang adapter needs sglang (pip install 'moe-kernels[sglang]'; on a CPU-only machine see "
            f"docs/integration.md): {e}"
        ) from e
    return moe_runner


def _activation(config: Any) -> Activation:
    """SGLang's ``activation`` and ``is_gated`` -> our activation; ``ValueError`` if unmapped."""
    key = (config.activation, bool(config.is_gated))
    if key not in ACTIVATIONS:
        mapped = ", ".join(f"{a} (is_gated={g})" for a, g in ACTIVATIONS)
        raise ValueError(
            f"activation: SGLang's {key[0]!r} with is_gated={key[1]} has no counterpart here (mapped: {mapped})"
        )
    return Activation(ACTIVATIONS[key])


def _refuse_unmapped(config: Any) -> None:
    """``ValueError`` naming every ``MoeRunnerConfig`` field set to a value we cannot honour."""
    problems = [
        f"{name}={getattr(config, name, default)!r} (only {default!r} is supported)"
        for name, default in UNMAPPED_FIELDS.items()
        if getattr(config, name, default) != default
    ]
    missing = ("num_local_experts", "hidden_size", "intermediate_size_per_partition", "top_k", "params_dtype")
    problems += [f"{name} is not set" for name in missing if getattr(config, name) is None]
    if config.apply_router_weight_on_input and config.top_k != 1:
        # the weight scales the token before GEMM1: one weight per token, as in our layer
        problems.append(f"apply_router_weight_on_input needs top_k == 1, got top_k={config.top_k}")
    if problems:
        raise ValueError("MoeRunnerConfig: " + "; ".join(problems))


def local_layer_config(config: Any, *, max_tokens: int = 8192) -> LayerConfig:
    """SGLang's ``MoeRunnerConfig`` -> the LayerConfig of one rank's local experts.

    ``num_local_experts`` experts (fused shared experts included: SGLang routes to them as to
    any local expert), ``intermediate_size_per_partition`` wide (a TP rank's slice; SGLang's
    all-reduce adds the ranks), ``top_k``, ``params_dtype``, the activation, and
    ``routed_scaling_factor`` (the core scales the routing weights by it). No expert
    parallelism of ours: SGLang's dispatcher hands local ids. ``max_tokens`` sizes the parts'
    workspaces. Fields with no counterpart raise ``ValueError`` naming them."""
    _refuse_unmapped(config)
    moe = MoEConfig(
        num_experts=config.num_local_experts,
        top_k=config.top_k,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size_per_partition,
        dtype=config.params_dtype,
        activation=_activation(config),
        routed_scaling_factor=config.routed_scaling_factor or 1.0,
    )
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=max_tokens))


def _bound_part(
    part_type: type[PermuteExpertsUnpermute], config: Any, max_tokens: int, device: torch.device | str | None
) -> tuple[PermuteExpertsUnpermute, LayerContext]:
    """``part_type()`` checked on the local layer of ``config`` and bound; our checks' failures
    raise :class:`IncompatibleKernelsError` (a ``ValueError``) with every reason."""
    ctx = layer_context(local_layer_config(config, max_tokens=max_tokens), device=device)
    if part_type.input_layout is Layout.MASKED:
        # DeepEP's low-latency combine weights and sums the rows outside the runner
        unmapped = {"routed_scaling_factor": (None, 1.0), "apply_router_weight_on_input": (False,)}
        set_fields = [f"{n}={getattr(config, n)!r}" for n, ok in unmapped.items() if getattr(config, n) not in ok]
        if set_fields:
            raise ValueError(f"MoeRunnerConfig: {', '.join(set_fields)}: DeepEP's combine applies the routing weights")
    part = part_type()
    require_part(part, ctx)
    part.bind(ctx)
    return part, ctx


def register_runner_backend(
    name: str,
    experts: type[PermuteExpertsUnpermute],
    *,
    max_tokens: int = 8192,
    device: torch.device | str | None = None,
    add_to_server_choices: bool = True,
) -> Any:
    """Register ``name`` as an SGLang MoE runner backend run by our ``experts`` class; return
    SGLang's backend identifier (``resolve_moe_runner_backend(name)``) for
    ``MoeRunner(backend, config)`` and ``MoeRunnerConfig.runner_backend``.

    Each ``MoeRunner`` built with it gets its own ``experts()`` instance, checked and bound on
    the layer's :func:`local_layer_config` (``max_tokens`` sizes its workspaces; ``device``
    defaults to the current CUDA device, else the CPU). A STANDARD part serves SGLang's
    ``STANDARD`` dispatch, a MASKED part ``DEEPEP_LL``. Registering the same name with the same
    arguments again returns the same backend; with other arguments, or a name some other code
    registered, it is a ``ValueError`` (SGLang keeps one factory per name per process).
    ``add_to_server_choices`` adds the name to ``--moe-runner-backend``'s choices."""
    if experts.input_layout not in FORMATS.values():
        raise ValueError(
            f"{experts.__name__} takes {experts.input_layout.value} tokens, which no SGLang dispatcher hands a "
            "runner (mapped: standard <- STANDARD, masked <- DEEPEP_LL)"
        )
    moe_runner = _sglang_moe_runner()
    from sglang.srt.layers.moe.utils import MoeRunnerBackend, resolve_moe_runner_backend

    if name in {b.value for b in MoeRunnerBackend}:
        # SGLang would let the factory replace its own runner for every layer that picks it,
        # quantized ones included, which our parts would then refuse only at their first call
        raise ValueError(f"SGLang runner backend {name!r} is already built in: choose a new name")

    wanted = (experts, max_tokens, str(device))
    if name in _registered:
        if _registered[name] != wanted:
            have = _registered[name]
            raise ValueError(
                f"SGLang runner backend {name!r} is already registered for {have[0].__name__} "
                f"(max_tokens={have[1]}, device={have[2]}); SGLang keeps one factory per name"
            )
        return resolve_moe_runner_backend(name)
    core_type = _core_class()
    # SGLang raises ValueError itself for a name registered elsewhere or built in
    moe_runner.register_moe_runner_core(name, lambda config: core_type(config, name, experts, max_tokens, device))
    _registered[name] = wanted
    if add_to_server_choices:
        from sglang.srt.arg_groups.choices import add_moe_runner_backend_choices

        add_moe_runner_backend_choices([name])
    return resolve_moe_runner_backend(name)


def expert_weights(quant_info: Any) -> ExpertWeights:
    """SGLang's unquantized ``quant_info`` -> our weights: ``w13_weight [E_local, 2I, H]`` (gate
    rows first; ``[E_local, I, H]`` not gated) and ``w2_weight [E_local, H, I]``, the activation
    dtype. ``ValueError`` naming the fields of quantized, biased or interleaved weights."""
    set_fields = [f for f in UNMAPPED_WEIGHT_FIELDS if getattr(quant_info, f, None) not in (None, False)]
    if set_fields:
        raise ValueError(
            f"quant_info: {', '.join(set_fields)} set: the SGLang adapter runs unquantized experts without "
            "biases, gate rows then up rows"
        )
    missing = [f for f in ("w13_weight", "w2_weight") if not hasattr(quant_info, f)]
    if missing:
        raise ValueError(f"quant_info: {type(quant_info).__name__} has no {', '.join(missing)}")
    return ExpertWeights(quant_info.w13_weight, quant_info.w2_weight)


@functools.cache
def _core_class() -> type:
    """Our core as a subclass of SGLang's ``DispatchMoeRunnerCore`` (built on first use)."""
    from sglang.srt.layers.moe.moe_runner.base import DispatchMoeRunnerCore

    return type("MoeKernelsRunnerCore", (_RunnerCore, DispatchMoeRunnerCore), {})


class _RunnerCore:
    """The body of :func:`_core_class`'s class: one bound part of ours, run per dispatch output."""

    def __init__(
        self,
        config: Any,
        name: str,
        experts: type[PermuteExpertsUnpermute],
        max_tokens: int,
        device: torch.device | str | None,
    ) -> None:
        super().__init__(config)  # type: ignore[call-arg]  # SGLang's DispatchMoeRunnerCore keeps it
        self.name = name
        self.part, self.ctx = _bound_part(experts, config, max_tokens, device)
        self.workspaces = WorkspaceCache()

    @property
    def runner_backend(self) -> Any:
        from sglang.srt.layers.moe.utils import resolve_moe_runner_backend

        return resolve_moe_runner_backend(self.name)

    def run_from_dispatch(self, dispatch_output: Any, quant_info: Any, runner_config: Any, hooks: Any = None) -> Any:
        """SGLang's dispatch output -> its combine input, computed by our part."""
        if hooks is not None:
            raise ValueError("hooks: LoRA hooks are not supported by the moe_kernels runner")
        fmt = dispatch_output.format.value
        if FORMATS.get(fmt) is not self.part.input_layout:
            raise ValueError(
                f"dispatch format {fmt!r}: {self.part.name} takes {self.part.input_layout.value} tokens "
                "(mapped: standard -> a STANDARD part, deepep_ll -> a MASKED part)"
            )
        if dispatch_output.hidden_states_scale is not None:
            raise ValueError("hidden_states_scale: the dispatcher quantized the tokens; this runner takes unquantized")
        weights = expert_weights(quant_info)
        if fmt == "standard":
            return self._run_standard(dispatch_output, weights)
        return self._run_masked(dispatch_output, weights)

    def _routing_weights(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """float32 ``[T, K]``, scaled by ``routed_scaling_factor`` (linear: the same as scaling
        the sum, which is where SGLang's own runners apply it)."""
        factor = self.config.routed_scaling_factor  # type: ignore[attr-defined]  # set by SGLang's base
        w = topk_weights.float()
        return w * factor if factor not in (None, 1.0) else w

    def _run_standard(self, d: Any, weights: ExpertWeights) -> Any:
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        x, ids = d.hidden_states, d.topk_output.topk_ids
        routing = self._routing_weights(d.topk_output.topk_weights)
        if ids.shape[1] != self.ctx.cfg.moe.top_k:
            raise ValueError(
                f"topk_ids: {ids.shape[1]} slots per token, the layer was built for {self.ctx.cfg.moe.top_k}"
            )
        if self.config.apply_router_weight_on_input:  # type: ignore[attr-defined]
            # top_k == 1 (checked when built): scale the token, then weight its one slot by 1
            x = (x.float() * routing).to(x.dtype)
            routing = torch.ones_like(routing)
        out = torch.empty_like(x)
        if x.shape[0] > 0:  # our parts are never called with no rows
            tokens = StandardTokens(x, ids, routing)
            workspace = self.workspaces.get(self.part.workspace_specs(self.ctx, tokens.num_rows), x.device)
            self.part.apply(tokens, weights, out, workspace)
        return StandardCombineInput(hidden_states=out)

    def _run_masked(self, d: Any, weights: ExpertWeights) -> Any:
        """DeepEP low-latency rows ``[E_local, M, H]``, ``masked_m [E_local]`` valid rows each ->
        the raw expert rows (DeepEP's combine weights and sums them)."""
        from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLCombineInput

        x = d.hidden_states
        out = torch.empty_like(x)
        tokens = MaskedTokens(x, d.masked_m.to(torch.int32), max(1, int(d.expected_m)))
        workspace = self.workspaces.get(self.part.workspace_specs(self.ctx, tokens.num_rows), x.device)
        self.part.apply(tokens, weights, out, workspace)
        return DeepEPLLCombineInput(hidden_states=out, topk_ids=d.topk_ids, topk_weights=d.topk_weights)
