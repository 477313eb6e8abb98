"""Layer configuration: MoE shape, parallelism and quantization (pydantic v2, strict).

A YAML file in ``configs/`` holds one :class:`LayerConfig`::

    moe: {num_experts: 256, top_k: 8, hidden_size: 7168, intermediate_size: 2048, ...}
    parallel: {ep_size: 8}
    quant: {scheme: fp8_w8a8_block}

Every model is strict: no coercion between types (``top_k: true`` or ``hidden_size: '64'`` are
errors, not 1 and 64), no infinities or NaNs, no unknown keys. :func:`load_config` turns a
validation failure into one :class:`ConfigError` line naming the file and each bad field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from moe_kernels.mlp import fp8
from moe_kernels.mlp.activations import KINDS as ACTIVATIONS
from moe_kernels.mlp.activations import SILU, Activation
from moe_kernels.mlp.schemes import SCHEMES
from moe_kernels.mlp.shard import IntermediateShard
from moe_kernels.mlp.spec import ExpertMLP

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def _to_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError("must be one of bfloat16, float16, float32")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"must be a torch.dtype or one of {sorted(_DTYPES)}")


def _to_pair(value: Any) -> Any:
    # YAML has no tuples: accept a two-element list, keep everything else for the strict check
    return tuple(value) if isinstance(value, list) else value


def _to_activation(value: Any) -> Activation:
    if isinstance(value, Activation):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ValueError(f"must be an activation name or a mapping with 'kind', got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(Activation)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown activation fields {unknown}; known: {sorted(known)}")
    if value.get("kind", "silu") not in ACTIVATIONS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, ACTIVATIONS))}")
    return Activation(**value)


def _dump_activation(activation: Activation) -> str | dict[str, Any]:
    params = {f.name: getattr(activation, f.name) for f in dataclasses.fields(Activation)}
    defaults = {f.name: f.default for f in dataclasses.fields(Activation)}
    changed = {k: v for k, v in params.items() if v != defaults[k] or k == "kind"}
    return activation.kind if len(changed) == 1 else changed


ActivationField = Annotated[
    Activation,
    BeforeValidator(_to_activation),
    PlainSerializer(_dump_activation),
]

TorchDtype = Annotated[
    torch.dtype,
    BeforeValidator(_to_dtype),
    PlainSerializer(lambda d: str(d).removeprefix("torch."), return_type=str),
]
IntPair = Annotated[tuple[int, int], BeforeValidator(_to_pair)]


class ConfigError(ValueError):
    """A configuration that does not validate: one line naming the source and each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, arbitrary_types_allowed=True
    )


class MoEConfig(_Strict):
    """The shape of one MoE layer (global, before expert parallelism)."""

    num_experts: int = Field(gt=0, description="routed experts in the whole model layer")
    top_k: int = Field(gt=0, description="experts each token is routed to")
    hidden_size: int = Field(gt=0, description="H: model width; a multiple of 8")
    intermediate_size: int = Field(gt=0, description="I: each routed expert's MLP width")
    dtype: TorchDtype = torch.bfloat16
    activation: ActivationField = Field(
        default=SILU,
        description="the expert MLP's activation: a kind of mlp.activations.KINDS, or a mapping with its parameters",
    )
    renormalize: bool = True
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    num_expert_group: int | None = Field(default=None, gt=0)
    topk_group: int | None = Field(default=None, gt=0)
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    correction_bias: bool = Field(
        default=False, description="the router has a per-expert e_score_correction_bias (DeepSeek-V3 noaux_tc)"
    )
    # -- router variants read from Hugging Face checkpoints (model/hf_config.py); the defaults are
    # -- the routing above, unchanged
    router_dtype: TorchDtype | None = Field(
        default=None,
        description="dtype of the gate weight and of its GEMM's output (None: dtype); float32 for the "
        "DeepSeek family, whose gate is kept and computed in fp32. Scores are fp32 either way",
    )
    router_bias: bool = Field(default=False, description="the gate has a linear bias [E]: logits = x W^T + b (gpt-oss)")
    router_input_norm: bool = Field(
        default=False,
        description="the gate reads RMSNorm(x) * scale [H] * H^-1/2 instead of x, with a learned scale "
        "(Gemma-4); router_norm_eps is the norm's epsilon",
    )
    router_norm_eps: float = Field(default=1e-6, gt=0, description="epsilon of router_input_norm's RMSNorm")
    logit_scale: float = Field(default=1.0, gt=0, description="multiplies the logits before scoring")
    logit_softcap: float | None = Field(
        default=None, gt=0, description="caps the logits as c * tanh(logits / c) before scoring (Laguna)"
    )
    per_expert_score: Literal["sigmoid", "sqrtsoftplus"] = Field(
        default="sigmoid",
        description="with scoring sigmoid (an independent score per expert): sigmoid, or sqrt(softplus) (DeepSeek-V4)",
    )
    choose_on: Literal["scores", "logits"] = Field(
        default="scores",
        description="what the top-k (and the correction bias) is taken over: the scores, or the logits "
        "(Granite, gpt-oss: softmax over the chosen k, = renormalized softmax; Kolibri: logits + bias); "
        "the weights are the chosen experts' scores either way",
    )
    group_score: Literal["max", "top2_sum"] | None = Field(
        default=None,
        description="a group's score: its best expert, or the sum of its two best (None: top2_sum with a "
        "correction bias, max without, as DeepSeek-V3 and V2 do)",
    )
    group_fill: Literal["-inf", "zero"] = Field(
        default="-inf",
        description="what experts outside the kept groups score when experts are chosen: -inf, or 0 (A.X-K2, "
        "Mistral-4), which lets them win over kept experts whose biased score is negative",
    )
    renormalize_p: float = Field(
        default=1.0,
        gt=0,
        description="with renormalize, divide the chosen weights by their p-norm (1: their sum; DBRX's "
        "moe_normalize_expert_weights)",
    )
    expert_weight_scale: bool = Field(
        default=False, description="each expert has a learned scale [E] multiplying its final weight (Gemma-4)"
    )
    hash_routing: bool = Field(
        default=False,
        description="experts come from a table tid2eid [vocab, K] indexed by the token id (DeepSeek-V4's first "
        "layers); the weights are still the scores of those experts",
    )
    sparsemixer_eps: float | None = Field(
        default=None,
        gt=0,
        description="route by Phi-3.5-MoE's sparsemixer (two experts, each weighted by a softmax over the experts "
        "within 2 eps of it) with this eps",
    )
    num_shared_experts: int = Field(default=0, ge=0, description="experts every token passes through")
    shared_intermediate_size: int | None = Field(
        default=None, gt=0, description="each shared expert's MLP width (they run as one MLP of the summed width)"
    )
    shared_expert_gate: bool = Field(
        default=False, description="the shared output is scaled by sigmoid(x @ gate) (Qwen1.5/2-MoE)"
    )
    expert_bias: bool = Field(
        default=False,
        description="each routed expert adds a bias after each GEMM: w2 @ act(w13 @ x + b13) + b2 (gpt-oss)",
    )
    identity_experts: int = Field(
        default=0,
        ge=0,
        description="zero-compute experts after the routed ones: the router scores num_experts + identity_experts "
        "experts, and a token routed to one of these gets weight * x (LongCat-Flash's zero experts)",
    )
    weight_on_input: bool = Field(
        default=False,
        description="the router weight scales the expert's input, x * w, and not its output (Llama-4); top_k 1",
    )
    input_norm_eps: float | None = Field(
        default=None,
        gt=0,
        description="an RMSNorm (learned weight [H]) on the routed experts' input, which the router and the "
        "shared experts do not see, with this epsilon (Gemma-4's pre_feedforward_layernorm_2)",
    )
    output_norm_eps: float | None = Field(
        default=None,
        gt=0,
        description="an RMSNorm (learned weight [H]) on the MoE output, routed and shared experts together, "
        "with this epsilon (A.X-K1's post_mlp_layernorm)",
    )
    output_bias: bool = Field(default=False, description="a learned bias [H] added to the MoE output (JetMoE)")
    shared_scale: float = Field(
        default=1.0,
        gt=0,
        description="multiplies the shared experts' output (Cohere2's average combination: 0.5, with "
        "routed_scaling_factor 0.5)",
    )
    shared_activation: ActivationField | None = Field(
        default=None,
        description="the shared experts' activation when it differs from the routed experts' (HY-V4: plain SwiGLU "
        "beside clamped experts; Ling: its own clamp); None: the same as activation",
    )
    max_tokens_per_chunk: int | None = Field(
        default=None, gt=0, description="split larger batches into chunks to bound workspace memory"
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        for name in ("hidden_size", "intermediate_size", "shared_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"{name} must be a multiple of 8 (16-byte rows); got {value}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("num_expert_group and topk_group must be given together")
        if self.num_expert_group is not None:
            assert self.topk_group is not None
            if self.num_experts % self.num_expert_group:
                raise ValueError(
                    f"num_experts ({self.num_experts}) must be divisible by num_expert_group ({self.num_expert_group})"
                )
            if self.topk_group > self.num_expert_group:
                raise ValueError(
                    f"topk_group ({self.topk_group}) must be <= num_expert_group ({self.num_expert_group})"
                )
            per_group = self.num_experts // self.num_expert_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the experts in topk_group groups ({self.topk_group} x {per_group})"
                )
        if (self.num_shared_experts > 0) != (self.shared_intermediate_size is not None):
            raise ValueError("num_shared_experts > 0 and shared_intermediate_size must be given together")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate needs num_shared_experts > 0")
        if self.weight_on_input and self.top_k != 1:
            raise ValueError(f"weight_on_input needs top_k 1 (the expert's input is x * w), got top_k {self.top_k}")
        if (self.shared_activation is not None or self.shared_scale != 1.0) and not self.num_shared_experts:
            raise ValueError("shared_activation and shared_scale need num_shared_experts > 0")
        self._check_router()
        return self

    def _check_router(self) -> None:
        """Refuse router settings that contradict each other (each message names the fields)."""
        grouped = self.num_expert_group is not None
        if (self.group_score is not None or self.group_fill != "-inf") and not grouped:
            raise ValueError("group_score and group_fill need grouped routing (num_expert_group, topk_group)")
        if self.per_expert_score != "sigmoid" and self.scoring != "sigmoid":
            raise ValueError(f"per_expert_score {self.per_expert_score} needs scoring sigmoid")
        if self.renormalize_p != 1.0 and not self.renormalize:
            raise ValueError(f"renormalize_p ({self.renormalize_p}) needs renormalize true")
        if self.choose_on == "logits" and self.scoring == "softmax" and not self.renormalize:
            # the top-k logits softmaxed among themselves are the renormalized softmax scores
            raise ValueError(
                "choose_on logits with scoring softmax weights the k chosen among themselves: renormalize must be true"
            )
        if self.sparsemixer_eps is not None:
            conflicts = [
                f"{name}={value}"
                for name, value, ok in (
                    ("scoring", self.scoring, self.scoring == "softmax"),
                    ("top_k", self.top_k, self.top_k == 2),
                    ("renormalize", self.renormalize, not self.renormalize),
                    ("correction_bias", self.correction_bias, not self.correction_bias),
                    ("num_expert_group", self.num_expert_group, not grouped),
                    ("choose_on", self.choose_on, self.choose_on == "scores"),
                )
                if not ok
            ]
            if conflicts:
                raise ValueError(
                    "sparsemixer routing takes scoring softmax, top_k 2, renormalize false, no correction bias "
                    f"and no groups; got {', '.join(conflicts)}"
                )
        if self.hash_routing and (grouped or self.correction_bias or self.sparsemixer_eps is not None):
            raise ValueError(
                "hash_routing takes experts from a table: num_expert_group, correction_bias and sparsemixer_eps "
                "cannot apply"
            )

    @property
    def router_width(self) -> int:
        """The experts the router scores: the routed ones, then the identity experts."""
        return self.num_experts + self.identity_experts

    @property
    def shared_act(self) -> Activation:
        """The shared experts' activation (``shared_activation``, else ``activation``)."""
        return self.shared_activation or self.activation

    @property
    def shared_width(self) -> int:
        """The shared MLP's intermediate width (``num_shared_experts x shared_intermediate_size``)."""
        return self.num_shared_experts * (self.shared_intermediate_size or 0)


class ParallelConfig(_Strict):
    """Expert parallelism and the limits every kernel is sized for when it is built."""

    ep_size: int = Field(default=1, gt=0)
    ep_rank: int = Field(default=0, ge=0)
    max_tokens_per_rank: int = Field(
        default=8192, gt=0, description="the most tokens one call may pass on any rank; workspaces are sized for it"
    )
    cuda_graphs: bool = Field(default=False, description="the layer will be captured in CUDA graphs")
    two_batch_overlap: bool = Field(
        default=False, description="split each call in two micro-batches so one computes while the other communicates"
    )
    tp_size: int = Field(
        default=1, gt=0, description="ranks each expert's intermediate dimension is split over (tensor parallelism)"
    )
    tp_rank: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.ep_rank >= self.ep_size:
            raise ValueError(f"ep_rank ({self.ep_rank}) must be < ep_size ({self.ep_size})")
        if self.tp_rank >= self.tp_size:
            raise ValueError(f"tp_rank ({self.tp_rank}) must be < tp_size ({self.tp_size})")
        return self


class QuantConfig(_Strict):
    """Quantization of the expert weights and activations: a ``scheme`` of
    :data:`moe_kernels.mlp.schemes.SCHEMES` and the parameters that scheme reads.

    ``none``: weights and activations in ``moe.dtype``. ``fp8_w8a8_block``: weights in
    float8_e4m3fn with one float32 scale per ``weight_block`` (N x K) block, activations
    quantized to float8_e4m3fn with one float32 scale per ``act_group`` columns of a row; GEMMs
    accumulate in fp32 and write ``moe.dtype``. A parameter the scheme does not read must not be
    given (it would be ignored).
    """

    scheme: str = "none"
    weight_block: IntPair = (fp8.SCALE_BLOCK, fp8.SCALE_BLOCK)
    act_group: int = Field(default=fp8.SCALE_BLOCK, gt=0)
    # int4_w4a16: columns per scale, and whether the checkpoint stores zero points
    group_size: int = Field(default=128, gt=0)
    symmetric: bool = True

    @model_validator(mode="after")
    def _check(self) -> QuantConfig:
        scheme = SCHEMES.get(self.scheme)
        if scheme is None:
            raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))}; got {self.scheme!r}")
        defaults = QuantConfig.model_fields
        ignored = [
            name
            for name in type(self).model_fields
            if name not in ("scheme", *scheme.params) and getattr(self, name) != defaults[name].default
        ]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not a parameter of scheme {self.scheme} (it would be ignored)")
        scheme.check_params(self.params)
        return self

    @property
    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SCHEMES[self.scheme].params}


class LayerConfig(_Strict):
    """Everything that decides which kernels may run a layer."""

    name: str | None = Field(default=None, description="a label, e.g. the model's name")
    moe: MoEConfig
    parallel: ParallelConfig = ParallelConfig()
    quant: QuantConfig = QuantConfig()

    @model_validator(mode="after")
    def _check(self) -> LayerConfig:
        if self.moe.num_experts % self.parallel.ep_size:
            raise ValueError(
                f"num_experts ({self.moe.num_experts}) must be divisible by ep_size ({self.parallel.ep_size})"
            )
        moe, quant = self.moe, self.quant
        shard = self.intermediate_shard
        if shard.width % 8:
            raise ValueError(
                f"intermediate_size ({shard.total}) / tp_size ({shard.size}) = {shard.width} must be a multiple of 8 "
                "(16-byte rows)"
            )
        shard.check_format(SCHEMES[quant.scheme].build(quant.params, moe.dtype)[0])
        if moe.shared_width % shard.size:  # the shared MLP is split over the same ranks
            raise ValueError(
                f"the shared experts' width (num_shared_experts x shared_intermediate_size = {moe.shared_width}) "
                f"must be divisible by tp_size ({shard.size})"
            )
        SCHEMES[quant.scheme].check_layer(quant.params, moe.dtype, moe.hidden_size, shard.width)
        return self

    @property
    def intermediate_shard(self) -> IntermediateShard:
        """The slice of each routed expert's intermediate dimension this rank holds (all of it
        without tensor parallelism)."""
        par = self.parallel
        return IntermediateShard(self.moe.intermediate_size, par.tp_size, par.tp_rank)

    @property
    def mlp(self) -> ExpertMLP:
        """What each local expert's MLP is on this rank (sizes -- ``inter`` is the rank's shard of
        the intermediate dimension --, dtype, weight format, activation quantization, activation
        function): the one description kernels, loaders and tests read."""
        moe, quant = self.moe, self.quant
        weights, act_quant = SCHEMES[quant.scheme].build(quant.params, moe.dtype)
        inter = self.intermediate_shard.width
        return ExpertMLP(moe.hidden_size, inter, moe.dtype, weights, act_quant, moe.activation, moe.expert_bias)

    @property
    def num_local_experts(self) -> int:
        return self.moe.num_experts // self.parallel.ep_size

    @property
    def max_tokens_per_call(self) -> int:
        """The most tokens one pass through the kernel handles: the chunk size when the layer
        chunks, else ``parallel.max_tokens_per_rank``. Workspaces are sized for it."""
        chunk = self.moe.max_tokens_per_chunk
        limit = self.parallel.max_tokens_per_rank
        return min(chunk, limit) if chunk is not None else limit


def describe_validation_error(error: ValidationError) -> str:
    """Every failure of ``error`` on one line: ``moe.top_k: Input should be a valid integer (got True)``."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r}: {type(got).__name__})"
        parts.append(f"{where}: {message}{shown}")
    return "; ".join(parts)


def load_config(path: str | Path, **overrides: Any) -> LayerConfig:
    """Read a :class:`LayerConfig` from YAML; ``overrides`` replace top-level sections
    (e.g. ``parallel=ParallelConfig(ep_size=8)``).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: the YAML does not parse or does not validate (one line naming the file
            and every bad field).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"config file not found: {source}")
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'moe', 'parallel', 'quant'; got {type(data).__name__}")
    data.update(overrides)
    try:
        return LayerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_validation_error(e)}") from None
