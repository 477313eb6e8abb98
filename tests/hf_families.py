"""The MoE families of ``transformers`` the parity test builds: one row each, with the tiny config
overrides that make a small 3-layer model whose layer 1 is an MoE layer, and what moe_kernels is
expected to do with it today: ``parity`` (the same routing and output as the family's own MoE block)
or ``refused: <feature>`` (loading stops with an error that names the missing feature).

Sizes are chosen so that no two of H, I, 2I and the shared width coincide: a stacked expert tensor's
orientation is then visible in its shape, and a mix-up cannot pass unnoticed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

H, I_MOE, I_DENSE, I_SHARED = 64, 48, 80, 40
EXPERTS, TOP_K = 8, 2

#: fields set wherever a config class has them (a config without the field is left alone)
TINY: dict[str, Any] = dict(
    hidden_size=H,
    d_model=H,
    intermediate_size=I_DENSE,
    moe_intermediate_size=I_MOE,
    num_hidden_layers=3,
    num_layers=3,
    n_layers=3,
    num_attention_heads=4,
    n_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    num_experts=EXPERTS,
    n_routed_experts=EXPERTS,
    num_local_experts=EXPERTS,
    moe_num_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    num_experts_per_token=TOP_K,
    moe_topk=TOP_K,
    moe_k=TOP_K,
    top_k_experts=TOP_K,
    shared_expert_intermediate_size=I_SHARED,
    shared_intermediate_size=I_SHARED,
    shared_experts_intermediate_size=I_SHARED,
    share_expert_dim=I_SHARED,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    index_head_dim=16,
    index_n_heads=2,
    index_topk=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_head_dim=16,
    linear_num_heads=2,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_d_state=8,
    mamba_n_groups=1,
)

DENSE_SPARSE = ["dense", "sparse", "sparse"]


def _gemma4_moe(decoder: Any, x: Any) -> Any:
    """Gemma-4's MoE half of its feed-forward: the router on the layer's input, the experts between
    their own norms (the dense MLP beside them is another layer's business)."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, ids = decoder.router(flat)
    out = decoder.experts(decoder.pre_feedforward_layernorm_2(flat), ids, weights)
    return decoder.post_feedforward_layernorm_2(out.reshape(x.shape))


@dataclass(frozen=True)
class Case:
    """One family: its config class, the overrides beyond :data:`TINY`, the expected status, and how
    to find its reference in the built model."""

    config_class: str
    overrides: dict[str, Any] = field(default_factory=dict)
    status: str = "parity"
    #: modules of the decoder layer whose output the layer's MoE output also includes (Granite's
    #: shared MLP sits beside the MoE block)
    also: tuple[str, ...] = ()
    #: a vision-language wrapper: the sub-config that :data:`TINY` and ``overrides`` go to (the
    #: wrapper's other sub-configs get ``wrapper``)
    text_config: str | None = None
    wrapper: dict[str, Any] = field(default_factory=dict)
    #: attributes set on the built config (``"attn_config.rope_theta"``): DBRX's attention reads a
    #: field its config class does not define
    patch: dict[str, Any] = field(default_factory=dict)
    #: the decoder layer's child that holds the MoE block, where another child also has experts
    #: (JetMoE's mixture-of-attention heads)
    block: str | None = None
    #: the family's MoE computation from its decoder layer and ``x [B, S, H]``, where no child module
    #: is it (Gemma-4's experts sit in the decoder layer between norms of their own)
    moe_of: Callable[[Any, Any], Any] | None = None
    #: where the expert ids come from when the family's experts module is not called with them:
    #: ``(submodule of the block, index in its output)`` of the router logits, whose top-k they are
    logits_from: tuple[str, int] | None = None
    #: the block routes by token id (DeepSeek-V4's hash layers): it and our layer get ``input_ids``
    hashed: bool = False
    #: or ``(submodule of the block, index in its output)`` of the chosen ids themselves (LongCat's
    #: experts are called with its zero-compute experts' slots moved to real experts of weight 0)
    ids_from: tuple[str, int] | None = None

    @property
    def refused(self) -> str | None:
        return self.status.removeprefix("refused: ") if self.status.startswith("refused: ") else None

    def config(self) -> Any:
        """The tiny config object."""
        module, name = self.config_class.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        defaults = cls().to_dict()
        if self.text_config is None:
            config = cls(**_tiny(defaults, self.overrides))
        else:
            text = _tiny(defaults[self.text_config], self.overrides)
            config = cls(**{self.text_config: text, **self.wrapper})
        for path, value in self.patch.items():
            owner, _, attr = path.rpartition(".")
            setattr(config.get_text_config() if not owner else getattr(config, owner), attr, value)
        return config


def _tiny(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """:data:`TINY` where the config has the field, per-layer lists cut to 3 layers, then ``overrides``."""
    kwargs = {k: v for k, v in TINY.items() if k in defaults}
    for k, v in defaults.items():
        if isinstance(v, list) and k not in kwargs and len(v) == defaults.get("num_hidden_layers", -1):
            kwargs[k] = v[:3]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(defaults.get(k), int):
            kwargs[k] = 0
    return {**kwargs, **overrides}


def _m(family: str, cls: str) -> str:
    return f"transformers.models.{family}.configuration_{family}.{cls}"


_V3 = dict(n_group=4, topk_group=2, mlp_layer_types=DENSE_SPARSE, first_k_dense_replace=1)
#: caps small enough that the random tiny model's gate and up values reach them
_INKLING2 = dict(mlp_gate_softcap=0.4, mlp_up_softcap=0.6, unpadded_vocab_size=128)

CASES: dict[str, Case] = {
    "mixtral": Case(_m("mixtral", "MixtralConfig")),
    "minimax": Case(_m("minimax", "MiniMaxConfig")),
    "minimax_m2": Case(_m("minimax_m2", "MiniMaxM2Config")),
    "phimoe": Case(_m("phimoe", "PhimoeConfig")),
    "qwen2_moe": Case(_m("qwen2_moe", "Qwen2MoeConfig"), dict(norm_topk_prob=True)),
    "qwen3_moe": Case(_m("qwen3_moe", "Qwen3MoeConfig")),
    "qwen3_next": Case(_m("qwen3_next", "Qwen3NextConfig")),
    "qwen3_5_moe": Case(_m("qwen3_5_moe", "Qwen3_5MoeTextConfig")),
    "qwen4_exp": Case(_m("qwen4_exp", "Qwen4ExpTextConfig")),
    "qwen3_vl_moe_text": Case(_m("qwen3_vl_moe", "Qwen3VLMoeTextConfig")),
    "qwen3_vl_moe": Case(
        _m("qwen3_vl_moe", "Qwen3VLMoeConfig"),
        text_config="text_config",
        wrapper=dict(
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=H,
                deepstack_visual_indexes=[0],
            )
        ),
    ),
    "olmoe": Case(_m("olmoe", "OlmoeConfig"), dict(norm_topk_prob=True)),
    "flex_olmo": Case(_m("flex_olmo", "FlexOlmoConfig")),
    "mellum": Case(_m("mellum", "MellumConfig"), dict(mlp_layer_types=DENSE_SPARSE)),
    "lara_mini": Case(_m("lara_mini", "LaraMiniConfig")),
    "flint": Case(_m("flint", "FlintConfig"), dict(mlp_only_layers=[0])),
    "kolibri1": Case(_m("kolibri1", "Kolibri1Config")),
    "jamba": Case(
        _m("jamba", "JambaConfig"),
        dict(
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            use_mamba_kernels=False,
        ),
    ),
    "hunyuan_v1_moe": Case(_m("hunyuan_v1_moe", "HunYuanMoEV1Config")),
    "ernie4_5_moe": Case(_m("ernie4_5_moe", "Ernie4_5_MoeConfig"), dict(moe_num_shared_experts=1)),
    "cohere2_moe": Case(
        _m("cohere2_moe", "Cohere2MoeConfig"),
        dict(num_shared_experts=1, shared_expert_combination_strategy="sum", mlp_layer_types=DENSE_SPARSE),
    ),
    "cohere2_moe_average": Case(
        _m("cohere2_moe", "Cohere2MoeConfig"),
        dict(num_shared_experts=1, mlp_layer_types=DENSE_SPARSE),
    ),
    "granitemoe": Case(_m("granitemoe", "GraniteMoeConfig")),
    "granitemoeshared": Case(_m("granitemoeshared", "GraniteMoeSharedConfig"), also=("shared_mlp",)),
    "granitemoe_swa": Case(_m("granitemoe_swa", "GraniteMoeSWAConfig"), also=("shared_mlp",)),
    "aria": Case(_m("aria", "AriaTextConfig")),
    "dbrx": Case(
        _m("dbrx", "DbrxConfig"),
        dict(ffn_config=dict(ffn_hidden_size=I_MOE, moe_num_experts=EXPERTS, moe_top_k=TOP_K)),
        patch={"attn_config.rope_theta": 10000.0},
    ),
    "deepseek_v2": Case(
        _m("deepseek_v2", "DeepseekV2Config"),
        dict(first_k_dense_replace=1, n_group=4, topk_group=2, topk_method="group_limited_greedy"),
    ),
    "deepseek_v3": Case(_m("deepseek_v3", "DeepseekV3Config"), _V3),
    "deepseek_v32": Case(_m("deepseek_v32", "DeepseekV32Config"), _V3),
    "glm4_moe": Case(_m("glm4_moe", "Glm4MoeConfig"), _V3),
    "glm4_moe_lite": Case(_m("glm4_moe_lite", "Glm4MoeLiteConfig"), _V3),
    "glm_moe_dsa": Case(_m("glm_moe_dsa", "GlmMoeDsaConfig"), _V3),
    "solar_open": Case(_m("solar_open", "SolarOpenConfig"), _V3),
    "minicpm5_moe": Case(_m("minicpm5_moe", "MiniCPM5MoeConfig"), _V3),
    "mimo_v2_flash": Case(_m("mimo_v2_flash", "MiMoV2FlashConfig"), _V3),
    "sarvam_mla": Case(_m("sarvam_mla", "SarvamMLAConfig"), _V3),
    "param2moe": Case(_m("param2moe", "Param2MoeConfig"), _V3),
    "sarvam_moe": Case(_m("sarvam_moe", "SarvamMoEConfig"), _V3),
    "exaone_moe": Case(_m("exaone_moe", "ExaoneMoeConfig"), _V3),
    # one kept group of two experts for top-2: a kept expert whose biased score is below 0 loses to the
    # zero-filled experts of the other groups
    "axk2": Case(_m("axk2", "AXK2Config"), {**_V3, "topk_group": 1}),
    "kimi_linear": Case(_m("kimi_linear", "KimiLinearConfig"), _V3),
    "beam": Case(_m("beam", "BeamConfig"), _V3),
    "mistral4": Case(_m("mistral4", "Mistral4Config"), _V3),
    "mistral_large4": Case(_m("mistral_large4", "MistralLarge4TextConfig"), _V3),
    "afmoe": Case(_m("afmoe", "AfmoeConfig"), dict(num_dense_layers=1)),
    "hy_v3": Case(_m("hy_v3", "HYV3Config"), dict(mlp_layer_types=DENSE_SPARSE)),
    "laguna": Case(_m("laguna", "LagunaConfig"), dict(mlp_layer_types=DENSE_SPARSE, moe_router_logit_softcapping=2.0)),
    "lfm2_moe": Case(
        _m("lfm2_moe", "Lfm2MoeConfig"), dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"])
    ),
    "granitemoehybrid": Case(
        _m("granitemoehybrid", "GraniteMoeHybridConfig"),
        dict(layer_types=["attention"] * 3, mamba_expand=2, mamba_d_head=32),
        also=("shared_mlp",),
    ),
    "kolibri1_1": Case(
        _m("kolibri1_1", "Kolibri1_1Config"), dict(mlp_only_layers=[0], index_layers=[], index_num_heads=1)
    ),
    "dots1": Case(_m("dots1", "Dots1Config"), dict(n_shared_experts=1, **_V3)),
    "dots3_note": Case(_m("dots3_note", "Dots3NoteTextConfig"), dict(num_key_value_heads=4, **_V3)),
    "bailing_hybrid": Case(_m("bailing_hybrid", "BailingHybridConfig"), _V3),
    "bailing_hybrid_clamped": Case(
        _m("bailing_hybrid", "BailingHybridConfig"),
        dict(_V3, expert_swiglu_limit_list=[0, 0.5, 0.5], share_expert_swiglu_limit_list=[0, 0.3, 0.3]),
    ),
    "glm4v_moe": Case(_m("glm4v_moe", "Glm4vMoeTextConfig"), _V3),
    "openai_privacy_filter": Case(_m("openai_privacy_filter", "OpenAIPrivacyFilterConfig"), dict(swiglu_limit=0.5)),
    "minimax_m3_vl": Case(_m("minimax_m3_vl", "MiniMaxM3VLTextConfig"), dict(swiglu_limit=0.5)),
    "glm5_next": Case(
        _m("glm5_next", "Glm5NextTextConfig"),
        dict(
            num_key_value_heads=4,
            index_kpool=4,
            qk_rope_head_dim=0,
            head_dim=0,
            mlp_layer_types=DENSE_SPARSE,
            swiglu_limit=0.5,
        ),
    ),
    "hy_v4": Case(_m("hy_v4", "HYV4Config"), dict(swiglu_limit=0.5)),
    "ergo": Case(_m("ergo", "ErgoConfig"), status="refused: an RMSNorm on each expert's output"),
    "muse_spark": Case(_m("muse_spark", "MuseSparkTextConfig"), status="refused: projections and norms around"),
    "inkling": Case(_m("inkling", "InklingTextConfig"), status="refused: shared experts weighted by the router"),
    "inkling2": Case(_m("inkling2", "Inkling2TextConfig"), _INKLING2),
    "inkling2_loop": Case(_m("inkling2_loop", "Inkling2LoopTextConfig"), _INKLING2),
    "diffusion_gemma": Case(
        _m("diffusion_gemma", "DiffusionGemmaTextConfig"), status="refused: a layer index that names two MoE layers"
    ),
    "ernie4_5_vl_moe": Case(
        _m("ernie4_5_vl_moe", "Ernie4_5_VLMoeTextConfig"),
        dict(moe_intermediate_size=[I_MOE, I_MOE]),
        status="refused: a second expert set for image tokens",
    ),
    "zaya": Case(_m("zaya", "ZayaConfig"), dict(num_experts_per_tok=1), status="refused: an MLP router"),
    "doge": Case(_m("doge", "DogeConfig"), status="refused: product-key experts"),
    "gpt_oss": Case(_m("gpt_oss", "GptOssConfig"), dict(swiglu_limit=0.5)),
    "llama4": Case(_m("llama4", "Llama4TextConfig"), dict(num_experts_per_tok=1), logits_from=("router", 1)),
    "deepseek_v4": Case(
        _m("deepseek_v4", "DeepseekV4Config"), dict(mlp_layer_types=["hash_moe", "moe", "moe"], swiglu_limit=0.5)
    ),
    "deepseek_v4_hash": Case(
        _m("deepseek_v4", "DeepseekV4Config"),
        dict(mlp_layer_types=["hash_moe", "hash_moe", "moe"], swiglu_limit=0.5),
        hashed=True,
    ),
    "axk1": Case(_m("axk1", "AXK1Config"), _V3),
    "jetmoe": Case(_m("jetmoe", "JetMoeConfig"), block="mlp", logits_from=("router", -1)),
    "longcat_flash": Case(
        _m("longcat_flash", "LongcatFlashConfig"),
        dict(expert_ffn_hidden_size=I_MOE, zero_expert_num=4, ffn_hidden_size=I_DENSE),
        ids_from=("router", 2),
    ),
    "nemotron_h": Case(_m("nemotron_h", "NemotronHConfig"), dict(moe_shared_expert_intermediate_size=I_SHARED)),
    "gemma4": Case(
        _m("gemma4", "Gemma4TextConfig"),
        dict(enable_moe_block=True, moe_intermediate_size=I_MOE),
        block="",
        moe_of=_gemma4_moe,
    ),
}
