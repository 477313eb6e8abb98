"""One MoE layer's :class:`~moe_kernels.config.LayerConfig` from a Hugging Face ``config.json``.

``layer_config_from_hf(config, layer=N)`` reads the ``config.json`` of any MoE family that
``transformers`` ships (vision-language wrappers through their text sub-config) and returns layer
``N``'s config. How each ``model_type`` maps onto our fields is a table (:data:`FAMILIES`), not code
per family. Nothing is ignored: a layer that is dense is an error, and so is a family, or a field
value, that needs something moe_kernels does not implement (product-key experts, a latent projection
around the experts, ...): the error names the field and the missing feature. The expert MLP's
activation (SwiGLU and its clamped or soft-capped variants, GELU-tanh, relu^2), expert and router
biases and the tensors around the experts (norms, an output bias, identity experts) are read as data.
Per-layer values (lists of top-k or expert counts, dense first layers, ``mlp_layer_types``,
``mlp_only_layers``, ``moe_layer_freq``, ...) are resolved for layer ``N``.

Routing is computed as ``transformers`` computes it: the DeepSeek family (and others that do)
compute the gate GEMM in fp32 (``moe.router_dtype``), the others in the model dtype, and scores
are fp32 everywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from moe_kernels.config import LayerConfig, MoEConfig, QuantConfig
from moe_kernels.mlp.activations import Activation

__all__ = [
    "Act",
    "FAMILIES",
    "Family",
    "HFConfigError",
    "Key",
    "Refuse",
    "Shared",
    "hf_naming",
    "layer_config_from_hf",
    "moe_layers",
]


class HFConfigError(ValueError):
    """A ``config.json`` that does not describe an MoE layer moe_kernels computes: one line naming the field."""


@dataclass(frozen=True)
class Key:
    """A ``config.json`` field read under any of ``names`` (a hub file and ``transformers`` may spell it
    differently; two spellings with different values are an error), ``default`` when absent."""

    names: tuple[str, ...]
    default: Any = None


@dataclass(frozen=True)
class Shared:
    """Shared experts: ``count`` experts of width ``width`` (``None``: the routed experts' width), run as
    one MLP; ``gated``: scaled by ``sigmoid(x @ gate)`` (Qwen2-MoE). ``count`` or ``width`` 0: none."""

    count: Key | int
    width: Key | None = None
    gated: bool = False


#: ``transformers`` activation names (``ACT2FN`` keys) -> ours (:data:`moe_kernels.mlp.activations.KINDS`)
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
    "relu2": "relu2",
}


@dataclass(frozen=True)
class Act:
    """The experts' activation (:class:`~moe_kernels.mlp.activations.Activation`) as a family's config
    states it: the function named by ``name`` (``transformers``' names; ``kinds``: those this family's
    experts apply, others are refused), and SwiGLU parameters read from keys. A ``limit`` of 0 or
    ``None`` clamps nothing (Ling's per-layer lists)."""

    name: Key = Key(("hidden_act", "activation_function"), "silu")
    kinds: tuple[str, ...] = ("silu",)
    limit: Key | None = None
    clamp: Literal["input", "output"] = "input"
    alpha: Key | None = None
    up_offset: float = 0.0
    gate_softcap: Key | None = None
    up_softcap: Key | None = None


@dataclass(frozen=True)
class Refuse:
    """A feature moe_kernels lacks: refused when ``key`` is set to something outside ``allowed`` (with no
    ``key``, always). ``feature`` names what is missing."""

    feature: str
    key: Key | None = None
    allowed: tuple[Any, ...] = ()


#: a scoring: softmax over the experts, or an independent score per expert (sigmoid, DeepSeek-V4's sqrtsoftplus)
_Scoring = Literal["softmax", "sigmoid", "sqrtsoftplus"]


@dataclass(frozen=True)
class Family:
    """How one ``model_type``'s ``config.json`` maps onto :class:`~moe_kernels.config.MoEConfig`.

    ``naming`` is the checkpoint naming (:data:`moe_kernels.model.naming.NAMINGS`) its hub files use.
    Fixed values apply to every checkpoint of the family; :class:`Key` values are read from the file.
    ``scoring`` maps a ``scoring_func``-like field's values to ours. ``router_fp32``: ``transformers``
    computes the gate GEMM in fp32.
    """

    naming: str
    width: Key = Key(("moe_intermediate_size",))
    experts: Key = Key(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))
    top_k: Key = Key(
        ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k", "top_k_experts")
    )
    scoring: Literal["softmax", "sigmoid"] | Key = "softmax"
    scoring_values: Mapping[str, _Scoring] = field(default_factory=dict)
    choose_on: Literal["scores", "logits"] = "scores"
    renormalize: bool | Key = True
    grouped: bool = False
    group_fill: Literal["-inf", "zero"] = "-inf"
    group_score: Literal["max", "top2_sum"] | None = None
    correction_bias: bool = False
    scale: Key | None = Key(("routed_scaling_factor",), 1.0)
    shared: Shared | None = None
    router_fp32: bool = False
    logit_softcap: Key | None = None
    sparsemixer: bool = False
    refuse: tuple[Refuse, ...] = ()
    activation: Act = Act()
    #: the gate has a linear bias; each expert adds a bias after each GEMM (gpt-oss)
    router_bias: bool = False
    expert_bias: bool = False
    #: zero-compute experts after the routed ones (LongCat-Flash)
    identity_experts: Key | None = None
    #: the router weight scales the expert's input (Llama-4)
    weight_on_input: bool = False
    #: the router reads RMSNorm(x) (with this epsilon) times a learned scale; each expert's weight has
    #: a learned scale (Gemma-4)
    router_input_norm: Key | None = None
    expert_weight_scale: bool = False
    #: an RMSNorm on the routed experts' input with this epsilon (Gemma-4)
    input_norm_eps: Key | None = None
    #: an RMSNorm on the MoE output with this epsilon (A.X-K1); a bias on it (JetMoE)
    output_norm_eps: Key | None = None
    output_bias: bool = False
    #: the shared experts' activation when it is not the routed experts' (``None``: the same)
    shared_activation: Act | None = None
    #: the p of the p-norm the chosen weights are divided by (DBRX); unset in the file: no renormalization
    renormalize_p: Key | None = None
    #: the ``mlp_layer_types`` value of layers routed by token id (DeepSeek-V4's ``hash_moe``)
    hash_layer_type: str | None = None
    #: without ``mlp_layer_types``: how many first layers are routed by token id
    hash_layers: Key | None = None


#: what every family is checked for
_COMMON = (Refuse("expert biases", Key(("mlp_bias",), False), (False,)),)
_RENORM = Key(("norm_topk_prob", "moe_renormalize"), False)
_RENORM_ON = Key(("norm_topk_prob", "moe_renormalize"), True)
_GROUPS = Key(("n_group", "num_expert_group"))
_SHARED_N = Key(("n_shared_experts", "num_shared_experts"), 0)


def _qwen(**kw: Any) -> Family:
    """Qwen-MoE style: softmax, top-k, optional renormalization, experts under ``mlp.experts.E``."""
    return Family(**{"naming": "mlp-experts", "renormalize": _RENORM, "scale": None, **kw})


def _mixtral(**kw: Any) -> Family:
    """Mixtral style: softmax, top-k, always renormalized, experts of ``intermediate_size``."""
    return Family(**{"naming": "mixtral", "width": Key(("intermediate_size",)), "scale": None, **kw})


def _deepseek_v3(**kw: Any) -> Family:
    """DeepSeek-V3 style: fp32 gate, sigmoid scores, correction bias, groups, scaling, shared experts."""
    fields: dict[str, Any] = {
        "naming": "mlp-experts",
        "scoring": "sigmoid",
        "renormalize": _RENORM_ON,
        "grouped": True,
        "correction_bias": True,
        "shared": Shared(_SHARED_N),
        "router_fp32": True,
    }
    return Family(**{**fields, **kw})


_V2 = Family(
    naming="mlp-experts",
    renormalize=False,  # transformers' DeepSeek-V2 ignores norm_topk_prob
    grouped=True,
    group_fill="zero",
    group_score="max",
    shared=Shared(_SHARED_N),
    router_fp32=True,
    refuse=(
        Refuse(
            "top-k methods other than greedy/group_limited_greedy",
            Key(("topk_method",), "greedy"),
            ("greedy", "group_limited_greedy"),
        ),
    ),
)
_GRANITE = Family(
    naming="granite",
    width=Key(("intermediate_size",)),
    choose_on="logits",
    scale=None,
    shared=Shared(1, Key(("shared_intermediate_size",), 0)),
)
#: SwiGLU with the gate clamped from above and up to +-swiglu_limit before the activation
_CLAMPED = Act(limit=Key(("swiglu_limit",)))
#: gpt-oss and MiniMax-M3: the same clamps, then gate * sigmoid(alpha * gate) * (up + 1)
_ALPHA_CLAMPED = Act(limit=Key(("swiglu_limit",)), alpha=Key(("swiglu_alpha",), 1.702), up_offset=1.0)
#: Ling and Step-3.7: silu(gate) clamped from above and up to +-limit after the activation, per layer
_LING = Act(limit=Key(("expert_swiglu_limit_list", "swiglu_limits"), 0), clamp="output")
_LING_SHARED = Act(limit=Key(("share_expert_swiglu_limit_list", "swiglu_limits_shared"), 0), clamp="output")
_SCORING_FUNC = Key(("scoring_func",), "sigmoid")
_RMS_EPS = Key(("rms_norm_eps",), 1e-6)
#: Diffusion-Gemma: Gemma-4's MoE layers, in an encoder and a decoder stack of one checkpoint
_TWO_STACKS = Refuse("a layer index that names two MoE layers (an encoder and a decoder stack)")
#: Gemma-4: a normed, scaled router input, per-expert weight scales, GELU-tanh experts between norms of
#: their own (the router reads the un-normed input); the dense MLP beside them is not part of the layer
_GEMMA4 = Family(
    naming="gemma4",
    scale=None,
    router_input_norm=_RMS_EPS,
    expert_weight_scale=True,
    input_norm_eps=_RMS_EPS,
    output_norm_eps=_RMS_EPS,
    activation=Act(name=Key(("hidden_activation", "hidden_act"), "gelu_pytorch_tanh"), kinds=("gelu_tanh", "gelu")),
    refuse=(Refuse("a model without MoE layers (enable_moe_block false)", Key(("enable_moe_block",)), (True,)),),
)
#: gpt-oss: top-k of the biased logits, softmax over those k, alpha-clamped SwiGLU with expert biases
_GPT_OSS = Family(
    naming="gpt-oss",
    width=Key(("intermediate_size",)),
    choose_on="logits",
    scale=None,
    router_bias=True,
    expert_bias=True,
    activation=_ALPHA_CLAMPED,
)
_PER_EXPERT: dict[str, _Scoring] = {"sigmoid": "sigmoid", "sqrtsoftplus": "sqrtsoftplus"}


def _inkling2() -> Family:
    """Inkling-2: fp32 sigmoid router with a correction bias, soft-capped SwiGLU, no shared experts."""
    return Family(
        naming="inkling2",
        scoring=_SCORING_FUNC,
        scoring_values=_PER_EXPERT,
        correction_bias=True,
        router_fp32=True,
        scale=Key(("route_scale", "routed_scaling_factor"), 1.0),
        activation=Act(gate_softcap=Key(("mlp_gate_softcap",)), up_softcap=Key(("mlp_up_softcap",))),
    )


_KOLIBRI = _qwen(
    scoring="sigmoid",
    choose_on="logits",
    correction_bias=True,
    router_fp32=True,
    shared=Shared(1, Key(("shared_expert_intermediate_size",), 0)),
)


#: every ``model_type`` (text configs of vision-language wrappers included) and how it maps
FAMILIES: dict[str, Family] = {
    "mixtral": _mixtral(),
    "minimax": _mixtral(),
    "minimax_m2": _mixtral(scoring="sigmoid", correction_bias=True),
    "phimoe": _mixtral(sparsemixer=True, renormalize=False),
    "qwen2_moe": _qwen(shared=Shared(1, Key(("shared_expert_intermediate_size",), 0), gated=True)),
    "qwen3_moe": _qwen(),
    "qwen3_next": _qwen(shared=Shared(1, Key(("shared_expert_intermediate_size",), 0), gated=True)),
    "qwen3_5_moe_text": _qwen(
        renormalize=True, shared=Shared(1, Key(("shared_expert_intermediate_size",), 0), gated=True)
    ),
    "qwen4_exp_text": _qwen(shared=Shared(1, Key(("shared_expert_intermediate_size",), 0), gated=True)),
    "qwen3_vl_moe_text": _qwen(naming="fused-t", renormalize=True),
    "qwen3_omni_moe_text": _qwen(renormalize=True),
    "olmoe": _qwen(width=Key(("intermediate_size",))),
    "flex_olmo": _qwen(width=Key(("intermediate_size",))),
    "mellum": _qwen(),
    "lara_mini": _qwen(
        naming="fused", router_fp32=True, shared=Shared(1, Key(("shared_expert_intermediate_size",), 0))
    ),
    "flint": _qwen(scoring="sigmoid", router_fp32=True, shared=Shared(1, Key(("shared_expert_intermediate_size",), 0))),
    "kolibri1": _KOLIBRI,
    "kolibri1_1": _KOLIBRI,  # the same MoE block
    "jamba": _qwen(naming="jamba", width=Key(("intermediate_size",)), renormalize=False),
    "hunyuan_v1_moe": _qwen(
        width=Key(("intermediate_size",)),
        renormalize=True,
        router_fp32=True,
        shared=Shared(1, Key(("intermediate_size",))),
    ),
    "ernie4_5_moe": _qwen(
        renormalize=True,
        correction_bias=True,
        router_fp32=True,
        shared=Shared(Key(("moe_num_shared_experts",), 0)),
        refuse=(Refuse("expert biases", Key(("use_bias",), False), (False,)),),
    ),
    "cohere2_moe": Family(
        naming="mlp-experts",
        width=Key(("intermediate_size",)),
        scoring=Key(("expert_selection_fn",), "softmax"),
        scoring_values={"softmax": "softmax", "sigmoid": "sigmoid"},
        choose_on="logits",
        renormalize=Key(("norm_topk_prob",), True),
        scale=None,
        shared=Shared(Key(("num_shared_experts",), 0), Key(("intermediate_size",))),
    ),
    "jetmoe": Family(
        naming="jetmoe",
        width=Key(("intermediate_size",)),
        choose_on="logits",
        scale=None,
        output_bias=True,
    ),
    "granitemoe": _GRANITE,
    "granitemoeshared": _GRANITE,
    "granitemoehybrid": _GRANITE,
    "granitemoe_swa": replace(_GRANITE, naming="granite-experts"),
    "aria_text": Family(
        naming="aria",
        width=Key(("intermediate_size",)),
        choose_on="logits",
        scale=None,
        shared=Shared(Key(("moe_num_shared_experts",), 0), Key(("intermediate_size",))),
    ),
    "dbrx": Family(
        naming="dbrx",
        width=Key(("ffn_hidden_size",)),
        experts=Key(("moe_num_experts",)),
        top_k=Key(("moe_top_k",)),
        renormalize=True,
        renormalize_p=Key(("moe_normalize_expert_weights",)),
        scale=None,
    ),
    "deepseek_v2": _V2,
    "deepseek_ocr2_text": _V2,
    "unlimited_ocr_text": _V2,
    "deepseek_v3": _deepseek_v3(
        refuse=(Refuse("top-k methods other than noaux_tc", Key(("topk_method",), "noaux_tc"), ("noaux_tc",)),)
    ),
    "deepseek_v32": _deepseek_v3(),
    "kimi_k25_text": _deepseek_v3(),
    "glm4_moe": _deepseek_v3(),
    "glm4_moe_lite": _deepseek_v3(),
    "glm4v_moe_text": _deepseek_v3(),
    "glm_moe_dsa": _deepseek_v3(),
    "solar_open": _deepseek_v3(),
    "dots1": _deepseek_v3(),
    "dots3_note_text": _deepseek_v3(shared=Shared(_SHARED_N, Key(("shared_experts_intermediate_size",)))),
    "minicpm5_moe": _deepseek_v3(),
    "mimo_v2_flash": _deepseek_v3(shared=None),
    "sarvam_mla": _deepseek_v3(),
    "param2moe": _deepseek_v3(),
    "sarvam_moe": _deepseek_v3(),
    "exaone_moe": _deepseek_v3(),
    "axk2": _deepseek_v3(group_fill="zero"),
    "kimi_linear": _deepseek_v3(naming="mixtral"),
    "beam": _deepseek_v3(shared=None),
    # softmax over the routed and the zero-compute experts, a correction bias, no renormalization;
    # transformers' LongCat drops the router's linear bias, which is refused rather than dropped here
    "longcat_flash": Family(
        naming="mlp-experts",
        width=Key(("expert_ffn_hidden_size", "moe_intermediate_size")),
        renormalize=False,
        correction_bias=True,
        router_fp32=True,
        identity_experts=Key(("zero_expert_num",), 0),
        refuse=(Refuse("a router bias (transformers' LongCat drops it)", Key(("router_bias",), False), (False,)),),
    ),
    "axk1": _deepseek_v3(naming="axk1", output_norm_eps=_RMS_EPS),
    "bailing_hybrid": _deepseek_v3(activation=_LING, shared_activation=_LING_SHARED),
    "mistral4": _deepseek_v3(
        naming="fused",
        scoring="softmax",
        correction_bias=False,
        group_score="top2_sum",
        group_fill="zero",
        router_fp32=False,
    ),
    "mistral_large4_text": _deepseek_v3(
        naming="mistral-large4",
        scoring="softmax",
        correction_bias=False,
        renormalize=True,
        group_score="top2_sum",
        group_fill="zero",
    ),
    "afmoe": _qwen(
        scoring="sigmoid",
        renormalize=True,
        correction_bias=True,
        scale=Key(("route_scale",), 1.0),
        shared=Shared(Key(("num_shared_experts",), 0)),
        refuse=(Refuse("muP-scaled MoE inputs", Key(("mup_enabled",), False), (False,)),),
    ),
    "hy_v3": _qwen(
        scoring="sigmoid",
        renormalize=True,
        correction_bias=True,
        router_fp32=True,
        scale=Key(("router_scaling_factor",), 1.0),
        shared=Shared(Key(("num_shared_experts",), 0)),
    ),
    "laguna": _qwen(
        scoring="sigmoid",
        renormalize=True,
        correction_bias=True,
        scale=Key(("moe_routed_scaling_factor",), 1.0),
        logit_softcap=Key(("moe_router_logit_softcapping",), 0.0),
        shared=Shared(1, Key(("shared_expert_intermediate_size",), 0)),
        refuse=(
            Refuse(
                "router weights applied to the expert input",
                Key(("moe_apply_router_weight_on_input",), False),
                (False,),
            ),
        ),
    ),
    "lfm2_moe": _qwen(
        naming="lfm2",
        scoring="sigmoid",
        renormalize=_RENORM_ON,
        correction_bias=True,
        scale=Key(("routed_scaling_factor",), 1.0),
    ),
    "step3p5": _qwen(
        scoring="sigmoid",
        renormalize=True,
        correction_bias=True,
        scale=Key(("moe_router_scaling_factor",), 1.0),
        shared=Shared(1, Key(("share_expert_dim", "share_expert_dims"), 0)),
        activation=Act(limit=Key(("swiglu_limits",), 0), clamp="output"),
        shared_activation=Act(limit=Key(("swiglu_limits_shared",), 0), clamp="output"),
    ),
    "minimax_m3_vl_text": Family(
        naming="fused",
        width=Key(("intermediate_size",)),
        scoring="sigmoid",
        correction_bias=True,
        shared=Shared(1, Key(("shared_intermediate_size",), 0)),
        activation=_ALPHA_CLAMPED,
    ),
    "deepseek_v4": Family(
        naming="deepseek-v4",
        scoring=Key(("scoring_func",), "sqrtsoftplus"),
        scoring_values=_PER_EXPERT,
        correction_bias=True,
        shared=Shared(1),
        activation=_CLAMPED,
        hash_layer_type="hash_moe",
        hash_layers=Key(("num_hash_layers",), 3),
    ),
    "glm5_next_text": _deepseek_v3(activation=_CLAMPED),
    "hy_v4": _deepseek_v3(naming="fused", activation=_CLAMPED, shared_activation=Act()),
    "hy_v4_vl_text": _deepseek_v3(naming="fused", activation=_CLAMPED, shared_activation=Act()),
    "inkling2_text": _inkling2(),
    "inkling2_loop_text": _inkling2(),
    "nemotron_h": _deepseek_v3(
        naming="nemotron-h",
        shared=Shared(_SHARED_N, Key(("moe_shared_expert_intermediate_size",))),
        activation=Act(name=Key(("mlp_hidden_act",), "relu2"), kinds=("relu2",)),
        refuse=(Refuse("a latent projection around the experts", Key(("moe_latent_size",)), (None,)),),
    ),
    # families that need an expert-MLP or block feature moe_kernels does not have yet
    "gpt_oss": _GPT_OSS,
    # gpt-oss with an fp32 router, weights / k and the output x k (which cancel), gate/up concatenated
    "openai_privacy_filter": replace(_GPT_OSS, naming="gpt-oss-concat", router_fp32=True),
    "llama4_text": Family(
        naming="llama4",
        width=Key(("intermediate_size",)),
        scoring="sigmoid",
        choose_on="logits",
        renormalize=False,
        scale=None,
        shared=Shared(1, Key(("intermediate_size",))),
        weight_on_input=True,
    ),
    "ergo": Family(naming="fused", refuse=(Refuse("an RMSNorm on each expert's output"),)),
    "muse_spark_text": Family(naming="fused", refuse=(Refuse("projections and norms around the experts"),)),
    "inkling_text": Family(naming="fused", refuse=(Refuse("shared experts weighted by the router"),)),
    "gemma4_text": _GEMMA4,
    "diffusion_gemma_text": replace(_GEMMA4, refuse=(_TWO_STACKS,)),
    "ernie4_5_vl_moe_text": Family(naming="mlp-experts", refuse=(Refuse("a second expert set for image tokens"),)),
    "zaya": Family(naming="fused", refuse=(Refuse("an MLP router with cross-layer state and a skip expert"),)),
    "doge": Family(naming="mlp-experts", refuse=(Refuse("product-key experts"),)),
    "switch_transformers": Family(
        naming="mlp-experts", refuse=(Refuse("expert capacity (dropped tokens), encoder-decoder"),)
    ),
    "nllb-moe": Family(naming="mlp-experts", refuse=(Refuse("expert capacity (dropped tokens), encoder-decoder"),)),
}

#: where vision-language wrappers keep their text model's config
_TEXT_CONFIGS = (("text_config",), ("thinker_config", "text_config"), ("llm_config",), ("language_config",))
#: wrappers whose text sub-config does not say its model_type
_WRAPPED_TEXT = {
    "qwen3_vl_moe": "qwen3_vl_moe_text",
    "qwen3_omni_moe": "qwen3_omni_moe_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen4_exp": "qwen4_exp_text",
    "glm4v_moe": "glm4v_moe_text",
    "glm5_next": "glm5_next_text",
    "kimi_k25": "deepseek_v3",
    "deepseek_ocr2": "deepseek_ocr2_text",
    "unlimited_ocr": "unlimited_ocr_text",
    "dots3_note": "dots3_note_text",
    "ernie4_5_vl_moe": "ernie4_5_vl_moe_text",
    "hy_v4_vl": "hy_v4_vl_text",
    "minimax_m3_vl": "minimax_m3_vl_text",
    "mistral_large4": "mistral_large4_text",
    "muse_spark": "muse_spark_text",
    "inkling_mm_model": "inkling_text",
    "inkling2": "inkling2_text",
    "inkling2_loop": "inkling2_loop_text",
    "gemma4": "gemma4_text",
    "diffusion_gemma": "diffusion_gemma_text",
    "llama4": "llama4_text",
    "aria": "aria_text",
    "step3p7": "step3p5",
}
#: Cohere2's shared_expert_combination_strategy: the factor on (routed + shared)
_COMBINATIONS = {"sum": 1.0, "average": 0.5}
_LAYER_COUNT = Key(("num_hidden_layers", "num_layers", "n_layers"))
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MOE_LAYER_TYPES = ("sparse", "moe", "hash_moe")


def _text_config(cfg: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(model_type, the text model's fields)``; a wrapper's own ``dtype`` and ``quantization_config``
    apply to its text model unless that says otherwise."""
    model_type = cfg.get("model_type")
    for path in _TEXT_CONFIGS:
        sub: Any = cfg
        for part in path:
            sub = sub.get(part) if isinstance(sub, Mapping) else None
        if isinstance(sub, Mapping):
            inherited = {k: cfg[k] for k in ("dtype", "torch_dtype", "quantization_config") if k in cfg}
            text_type = sub.get("model_type") or _WRAPPED_TEXT.get(str(model_type))
            if text_type is None:
                raise HFConfigError(f"model_type {model_type!r}: its {'.'.join(path)} has no model_type")
            return str(text_type), {**inherited, **sub}
    if not isinstance(model_type, str):
        raise HFConfigError("config has no model_type (is it a transformers config.json?)")
    if model_type == "dbrx":  # DBRX nests its MoE fields in ffn_config
        return model_type, {**cfg, **cfg.get("ffn_config", {})}
    return model_type, cfg


def _get(cfg: Mapping[str, Any], key: Key, layer: int | None = None) -> Any:
    """The value of ``key``; a per-layer list is indexed by ``layer``."""
    present = {n: cfg[n] for n in key.names if n in cfg and cfg[n] is not None}
    values = list(present.values())
    if any(v != values[0] for v in values[1:]):
        raise HFConfigError(f"{' and '.join(f'{n}={v!r}' for n, v in present.items())} disagree")
    value = values[0] if values else key.default
    if layer is not None and isinstance(value, list) and key.names[0] not in ("mlp_layer_types",):
        if layer >= len(value):
            raise HFConfigError(f"{next(iter(present))} has {len(value)} per-layer values; layer {layer} has none")
        value = value[layer]
    return value


def _require(cfg: Mapping[str, Any], key: Key, layer: int, what: str) -> Any:
    value = _get(cfg, key, layer)
    if value is None:
        raise HFConfigError(f"no {what}: none of {', '.join(key.names)} is set")
    return value


def _num_layers(cfg: Mapping[str, Any]) -> int:
    if isinstance(cfg.get("layers_block_type"), list) and _get(cfg, _LAYER_COUNT) is None:
        return len(cfg["layers_block_type"])  # Nemotron-H: one entry per layer, no count
    return int(_require(cfg, _LAYER_COUNT, 0, "layer count"))


def moe_layers(cfg: Mapping[str, Any]) -> tuple[list[int], str]:
    """The MoE layers of a text config, and the field that decides them (as the family's ``transformers``
    code decides: ``mlp_layer_types``, ``mlp_only_layers`` + ``decoder_sparse_step``,
    ``first_k_dense_replace`` + ``moe_layer_freq``, ``moe_layers``, ...)."""
    n = _num_layers(cfg)
    if isinstance(cfg.get("mlp_layer_types"), list):
        types = cfg["mlp_layer_types"]
        return [i for i in range(n) if i < len(types) and types[i] in _MOE_LAYER_TYPES], "mlp_layer_types"
    if isinstance(cfg.get("layers_block_type"), list):
        types = cfg["layers_block_type"]
        return [i for i in range(n) if i < len(types) and types[i] == "moe"], "layers_block_type"
    if isinstance(cfg.get("moe_layers"), list):
        return [i for i in cfg["moe_layers"] if 0 <= i < n], "moe_layers"
    if "mlp_only_layers" in cfg or "decoder_sparse_step" in cfg:
        only = set(cfg.get("mlp_only_layers") or ())
        step = int(cfg.get("decoder_sparse_step") or 1)
        return [i for i in range(n) if i not in only and (i + 1) % step == 0], "mlp_only_layers/decoder_sparse_step"
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        first, freq = int(cfg.get("first_k_dense_replace") or 0), int(cfg.get("moe_layer_freq") or 1)
        return [i for i in range(n) if i >= first and i % freq == 0], "first_k_dense_replace/moe_layer_freq"
    if "expert_layer_period" in cfg:
        period, offset = int(cfg["expert_layer_period"]), int(cfg.get("expert_layer_offset") or 0)
        return [i for i in range(n) if i % period == offset], "expert_layer_period/expert_layer_offset"
    if "moe_layer_start_index" in cfg:
        start, interval = int(cfg["moe_layer_start_index"]), int(cfg.get("moe_layer_interval") or 1)
        end = cfg.get("moe_layer_end_index", -1)
        end = n - 1 if end in (-1, None) else int(end)
        return [i for i in range(n) if start <= i <= end and (i + 1) % interval == 0], "moe_layer_start_index/interval"
    if "interleave_moe_layer_step" in cfg:  # Llama-4 without moe_layers
        step = int(cfg["interleave_moe_layer_step"] or 1)
        return list(range(step - 1, n, step)), "interleave_moe_layer_step"
    if "num_dense_layers" in cfg:
        return list(range(int(cfg["num_dense_layers"]), n)), "num_dense_layers"
    return list(range(n)), "(every layer)"


def _refusals(refusals: tuple[Refuse, ...], cfg: Mapping[str, Any], layer: int, model_type: str) -> None:
    for r in refusals:
        if r.key is None:
            raise HFConfigError(
                f"model_type {model_type!r} needs {r.feature}, which moe_kernels does not implement yet"
            )
        value = _get(cfg, r.key, layer)
        if value not in r.allowed:
            name = next((n for n in r.key.names if n in cfg), r.key.names[0])
            raise HFConfigError(f"{name}: {value!r} needs {r.feature}, which moe_kernels does not implement yet")


def _scoring(family: Family, cfg: Mapping[str, Any]) -> _Scoring:
    if not isinstance(family.scoring, Key):
        return family.scoring
    value = _get(cfg, family.scoring)
    if value not in family.scoring_values:
        raise HFConfigError(f"{family.scoring.names[0]}: {value!r} is not a scoring moe_kernels implements")
    return family.scoring_values[value]


def _shared_fields(family: Family, cfg: Mapping[str, Any], layer: int, width: int) -> dict[str, Any]:
    sh = family.shared
    if sh is None:
        return {}
    count = sh.count if isinstance(sh.count, int) else int(_get(cfg, sh.count, layer) or 0)
    each = width if sh.width is None else int(_get(cfg, sh.width, layer) or 0)
    if not count or not each:
        return {}
    strategy = cfg.get("shared_expert_combination_strategy", "sum")
    if strategy not in _COMBINATIONS:
        raise HFConfigError(
            f"shared_expert_combination_strategy: {strategy!r} needs a shared-expert combination other than"
            f" {' or '.join(_COMBINATIONS)}, which moe_kernels does not implement yet"
        )
    fields: dict[str, Any] = {
        "num_shared_experts": count,
        "shared_intermediate_size": each,
        "shared_expert_gate": sh.gated,
    }
    if _COMBINATIONS[strategy] != 1.0:  # (routed + shared) * c: both sums scaled (the routed by its weights)
        fields["shared_scale"] = _COMBINATIONS[strategy]
    if family.shared_activation is not None:
        fields["shared_activation"] = _activation(family.shared_activation, cfg, layer)
    return fields


def _quant(cfg: Mapping[str, Any]) -> QuantConfig:
    q = cfg.get("quantization_config")
    if not q:
        return QuantConfig()
    method, fmt, block = q.get("quant_method"), q.get("fmt", "e4m3"), q.get("weight_block_size")
    if method == "fp8" and fmt == "e4m3" and list(block or ()) == [128, 128]:
        return QuantConfig(scheme="fp8_w8a8_block")
    if method != "fp8":
        from moe_kernels.model.published import quant_from_hf

        try:
            return quant_from_hf(q)
        except ValueError as err:
            raise HFConfigError(f"quantization_config: {err}") from None
    raise HFConfigError(
        f"quantization_config: quant_method {method!r} (fmt {fmt!r}, weight_block_size {block!r}) is not a scheme"
        " moe_kernels implements (fp8 e4m3 with 128x128 blocks is)"
    )


def _load(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(config, Mapping):
        return config, "config"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, str(path)


def layer_config_from_hf(
    config: str | os.PathLike[str] | Mapping[str, Any],
    layer: int,
    *,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> LayerConfig:
    """Layer ``layer``'s :class:`~moe_kernels.config.LayerConfig` from a ``config.json`` (a path, the
    directory holding it, or its parsed dict).

    ``dtype`` overrides the file's ``dtype``/``torch_dtype`` (bfloat16 when it has neither). The
    family's checkpoint naming is :func:`hf_naming`.

    Raises:
        FileNotFoundError: no such file.
        HFConfigError: an unknown ``model_type``, a dense layer, a field that disagrees with another,
            or a family or field value that needs a feature moe_kernels lacks (one line naming it).
    """
    raw, where = _load(config)
    try:
        return _layer_config(raw, layer, dtype, name)
    except HFConfigError as exc:
        raise HFConfigError(f"{where}: {exc}") from None


def hf_naming(config: str | os.PathLike[str] | Mapping[str, Any]) -> str:
    """The checkpoint naming (a key of :data:`moe_kernels.model.naming.NAMINGS`) of a config's family."""
    raw, where = _load(config)
    model_type, _ = _text_config(raw)
    return _family(model_type, where).naming


def _family(model_type: str, where: str = "config") -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise HFConfigError(f"{where}: model_type {model_type!r} is not an MoE family moe_kernels knows")
    return family


def _activation(act: Act, cfg: Mapping[str, Any], layer: int) -> Activation:
    """The :class:`~moe_kernels.mlp.activations.Activation` that ``act`` reads from ``cfg`` for ``layer``."""
    value = _get(cfg, act.name, layer)
    kind = _HF_ACTIVATIONS.get(str(value))
    if kind not in act.kinds:
        field_name = next((n for n in act.name.names if n in cfg), act.name.names[0])
        feature = "non-SiLU experts" if act.kinds == ("silu",) else f"{value} experts"
        raise HFConfigError(f"{field_name}: {value!r} needs {feature}, which moe_kernels does not implement yet")

    def number(key: Key | None) -> float | None:
        value = _get(cfg, key, layer) if key is not None else None
        return float(value) if value else None  # 0 and None: the parameter is off

    limit = number(act.limit)
    try:
        return Activation(
            kind,
            alpha=number(act.alpha) or 1.0,
            limit=limit,
            clamp=act.clamp,
            up_offset=act.up_offset,
            gate_softcap=number(act.gate_softcap),
            up_softcap=number(act.up_softcap),
        )
    except ValueError as exc:
        raise HFConfigError(str(exc)) from None


def _scoring_fields(family: Family, cfg: Mapping[str, Any], layer: int) -> dict[str, Any]:
    """Scoring, top-k method and grouping: the router fields that are not plain numbers."""
    scoring = _scoring(family, cfg)
    fields: dict[str, Any] = {"scoring": scoring, "choose_on": family.choose_on}
    if scoring == "sqrtsoftplus":  # an independent score per expert, as sigmoid is
        fields |= {"scoring": "sigmoid", "per_expert_score": "sqrtsoftplus"}
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list):
        hashed = family.hash_layer_type is not None and types[layer] == family.hash_layer_type
    else:
        hashed = family.hash_layers is not None and layer < int(_get(cfg, family.hash_layers) or 0)
    fields |= {"correction_bias": family.correction_bias and not hashed, "hash_routing": hashed}
    if family.grouped and (n_group := _get(cfg, _GROUPS)) is not None and int(n_group) > 1:
        fields |= {
            "num_expert_group": int(n_group),
            "topk_group": int(_require(cfg, Key(("topk_group",)), layer, "topk_group")),
            "group_fill": family.group_fill,
            "group_score": family.group_score,
        }
    if family.sparsemixer:
        fields["sparsemixer_eps"] = float(_require(cfg, Key(("router_jitter_noise",)), layer, "sparsemixer epsilon"))
    return fields


def _router_fields(family: Family, cfg: Mapping[str, Any], layer: int) -> dict[str, Any]:
    """Every router field of :class:`~moe_kernels.config.MoEConfig` for ``layer``."""
    scale = 1.0 if family.scale is None else float(_get(cfg, family.scale, layer) or 1.0)
    renormalize = family.renormalize if isinstance(family.renormalize, bool) else bool(_get(cfg, family.renormalize))
    softcap = _get(cfg, family.logit_softcap) if family.logit_softcap is not None else None
    fields = {
        "renormalize": renormalize,
        "routed_scaling_factor": scale,
        "router_dtype": torch.float32 if family.router_fp32 else None,
        "router_bias": family.router_bias,
        "expert_weight_scale": family.expert_weight_scale,
        "logit_softcap": float(softcap) if softcap else None,
        **_scoring_fields(family, cfg, layer),
    }
    if family.router_input_norm is not None:
        eps = float(_require(cfg, family.router_input_norm, layer, "router norm epsilon"))
        fields |= {"router_input_norm": True, "router_norm_eps": eps}
    if family.renormalize_p is not None:  # divide by the weights' p-norm, no renormalization when unset
        p = _get(cfg, family.renormalize_p)
        fields |= {"renormalize": p is not None, "renormalize_p": float(p) if p is not None else 1.0}
    return fields


def _layer_config(raw: Mapping[str, Any], layer: int, dtype: torch.dtype | None, name: str | None) -> LayerConfig:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise HFConfigError(f"layer must be an int >= 0, got {layer!r}")
    model_type, cfg = _text_config(raw)
    family = _family(model_type)
    _refusals(family.refuse + _COMMON, cfg, layer, model_type)
    n = _num_layers(cfg)
    if layer >= n:
        raise HFConfigError(f"layer {layer}: the model has {n} layers")
    moe, decided_by = moe_layers(cfg)
    if layer not in moe:
        raise HFConfigError(f"layer {layer} is a dense MLP layer (by {decided_by}); its MoE layers are {moe}")
    width = int(_require(cfg, family.width, layer, "expert width"))
    if dtype is None:
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        if dtype_name not in _DTYPES:
            raise HFConfigError(f"dtype: {dtype_name!r} is not one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype_name]
    fields: dict[str, Any] = {
        "num_experts": int(_require(cfg, family.experts, layer, "expert count")),
        "top_k": int(_require(cfg, family.top_k, layer, "top-k")),
        "hidden_size": int(_require(cfg, Key(("hidden_size", "d_model")), layer, "hidden size")),
        "intermediate_size": width,
        "dtype": dtype,
        "activation": _activation(family.activation, cfg, layer),
        "expert_bias": family.expert_bias,
        **_router_fields(family, cfg, layer),
        **_shared_fields(family, cfg, layer, width),
        "output_bias": family.output_bias,
        "weight_on_input": family.weight_on_input,
        "identity_experts": int(_get(cfg, family.identity_experts, layer) or 0) if family.identity_experts else 0,
    }
    fields["routed_scaling_factor"] *= fields.get("shared_scale", 1.0)
    for name, key in (("input_norm_eps", family.input_norm_eps), ("output_norm_eps", family.output_norm_eps)):
        if key is not None:
            fields[name] = float(_require(cfg, key, layer, name))
    try:
        moe_cfg = MoEConfig(**fields)
    except ValueError as exc:
        raise HFConfigError(f"model_type {model_type!r} layer {layer}: {' '.join(str(exc).split())}") from None
    return LayerConfig(name=name or f"{model_type} layer {layer}", moe=moe_cfg, quant=_quant(cfg))
