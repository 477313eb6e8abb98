"""How checkpoints name one MoE layer's tensors: a table of namings (data), read by ``checkpoint.py``.

A key is ``<prefix><layer>.<rest>``. The prefix is whatever precedes ``layers.N.`` or
``blocks.N.`` (``model.layers.``, ``model.language_model.layers.``, ``backbone.layers.``,
``transformer.blocks.``, ``layers.``, ``model.llm.layers.``, ...): vision-language wrappers only
move the text model, so the loader finds the prefix from the keys and the naming says ``<rest>``.
Templates below are ``<rest>`` with ``{e}`` for the global expert id.

Every naming is normalised at load to our canonical layout, per expert ``gate [I, H]``,
``up [I, H]``, ``down [H, I]`` (``nn.Linear`` layout: rows are output features), whatever the
stored form: one tensor per expert and projection, or one stacked tensor for all experts
(:class:`Stacked`), concatenated or interleaved gate/up, transposed or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

#: how a stacked tensor holds each expert's ``[out, in]`` matrix:
#: ``out_in`` ``[E, out, in]``; ``in_out`` ``[E, in, out]`` (transposed); ``flat_out_in`` ``[E*out, in]``
#: and ``flat_in_out`` ``[E*in, out]`` (DBRX: experts concatenated along the rows)
StackLayout = Literal["out_in", "in_out", "flat_out_in", "flat_in_out"]


@dataclass(frozen=True)
class Stacked:
    """One tensor holding one projection of every expert."""

    key: str
    layout: StackLayout


@dataclass(frozen=True)
class PerExpert:
    """One 2-D ``nn.Linear`` weight per expert and projection: ``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``;
    ``gate`` ``None``: non-gated experts (Nemotron-H), whose GEMM1 is ``up`` alone."""

    gate: str | None
    up: str
    down: str


@dataclass(frozen=True)
class Fused:
    """Stacked experts. ``gate_up`` holds ``[gate; up]`` of width ``2I`` per expert (gate rows first, or
    alternating rows with ``interleaved``, as gpt-oss stores them); or ``gate`` and ``up`` are separate
    stacks. ``gate_up_bias [E, 2I]`` / ``down_bias [E, H]``: expert biases (gpt-oss)."""

    down: Stacked
    gate_up: Stacked | None = None
    gate: Stacked | None = None
    up: Stacked | None = None
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None

    def __post_init__(self) -> None:
        if (self.gate_up is None) == (self.gate is None or self.up is None):
            raise ValueError("Fused: give gate_up, or gate and up")


@dataclass(frozen=True)
class SharedNaming:
    """Shared expert(s) as one MLP: ``gate``/``up`` ``[S, H]`` and ``down [H, S]``, or ``gate_up [2S, H]``
    (gate rows first); ``expert_gate [1, H]`` is an optional sigmoid gate on their output (Qwen2-MoE)."""

    down: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    expert_gate: str | None = None


@dataclass(frozen=True)
class LayerNaming:
    """Where one layer's MoE tensors are, relative to the layer's root ``<prefix><layer>.``.

    ``router``, ``correction_bias`` and ``shared`` list candidates (the checkpoint has at most one of
    each). ``router_extras`` maps a :class:`~moe_kernels.model.router.Router` parameter name to its key
    (a linear bias, a hash table). ``block`` is the module every MoE tensor lives under: a key under it
    that the naming does not account for is refused, never skipped (``None``: the experts sit at the
    layer's root beside attention, so nothing can be checked that way).
    """

    experts: PerExpert | Fused
    router: tuple[str, ...]
    block: str | None
    correction_bias: tuple[str, ...] = ()
    router_extras: Mapping[str, str] = field(default_factory=dict)
    shared: tuple[SharedNaming, ...] = ()
    #: the layer's own tensors around the experts, by FusedMoE parameter name (an output norm or bias)
    layer_extras: Mapping[str, str] = field(default_factory=dict)
    #: found from the keys by ``naming="auto"``; a naming whose keys are another's (gpt-oss's without the
    #: interleaving, DeepSeek's with A.X-K1's output norm) is only taken when named (``from_pretrained``
    #: names the family's)
    auto: bool = True


def _per_expert(base: str, gate: str, up: str, down: str) -> PerExpert:
    return PerExpert(f"{base}.{{e}}.{gate}.weight", f"{base}.{{e}}.{up}.weight", f"{base}.{{e}}.{down}.weight")


def _shared(base: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> SharedNaming:
    return SharedNaming(gate=f"{base}.{gate}.weight", up=f"{base}.{up}.weight", down=f"{base}.{down}.weight")


_MLP_SHARED = (
    _shared("mlp.shared_experts"),
    SharedNaming(
        gate="mlp.shared_expert.gate_proj.weight",
        up="mlp.shared_expert.up_proj.weight",
        down="mlp.shared_expert.down_proj.weight",
        expert_gate="mlp.shared_expert_gate.weight",
    ),
    _shared("mlp.shared_mlp"),
    SharedNaming(gate_up="mlp.shared_experts.gate_up_proj.weight", down="mlp.shared_experts.down_proj.weight"),
    _shared("mlp.shared_experts", gate="linear_gate"),  # HY-V4
    SharedNaming(up="mlp.shared_experts.up_proj.weight", down="mlp.shared_experts.down_proj.weight"),  # not gated
)
_GRANITE_SHARED = (SharedNaming(gate_up="shared_mlp.input_linear.weight", down="shared_mlp.output_linear.weight"),)

NAMINGS: dict[str, LayerNaming] = {
    # DeepSeek-V2/V3, Qwen-MoE, GLM-4.5, Ernie, Hunyuan, HY-V3, AFMoE, Laguna, Kolibri, ... (one file per
    # expert and projection, the families differ in where the router and its correction bias live)
    "mlp-experts": LayerNaming(
        experts=_per_expert("mlp.experts", "gate_proj", "up_proj", "down_proj"),
        router=(
            "mlp.gate.weight",
            "mlp.gate.wg.weight",
            "mlp.router.gate.weight",
            "mlp.router.weight",
            "mlp.router.classifier.weight",  # LongCat-Flash
        ),
        block="mlp",
        correction_bias=(
            "mlp.gate.e_score_correction_bias",
            "mlp.e_score_correction_bias",
            "mlp.gate.expert_bias",
            "mlp.expert_bias",
            "mlp.experts.e_score_correction_bias",
            "mlp.moe_statics.e_score_correction_bias",
            "moe.router.expert_bias",
            "mlp.router.e_score_correction_bias",
        ),
        shared=_MLP_SHARED,
    ),
    # Mixtral, MiniMax, MiniMax-M2, Phi-3.5-MoE, Kimi-Linear, MiniMax-M3 hub checkpoints
    "mixtral": LayerNaming(
        experts=_per_expert("block_sparse_moe.experts", "w1", "w3", "w2"),
        router=("block_sparse_moe.gate.weight",),
        block="block_sparse_moe",
        correction_bias=("block_sparse_moe.e_score_correction_bias", "block_sparse_moe.gate.e_score_correction_bias"),
        shared=(_shared("block_sparse_moe.shared_experts"),),
    ),
    "jamba": LayerNaming(
        experts=_per_expert("feed_forward.experts", "gate_proj", "up_proj", "down_proj"),
        router=("feed_forward.router.weight",),
        block="feed_forward",
    ),
    "lfm2": LayerNaming(
        experts=_per_expert("feed_forward.experts", "w1", "w3", "w2"),
        router=("feed_forward.gate.weight",),
        block="feed_forward",
        correction_bias=("feed_forward.expert_bias",),
    ),
    # Nemotron-H: non-gated relu2 experts and shared expert under backbone.layers.N.mixer
    "nemotron-h": LayerNaming(
        experts=PerExpert(None, "mixer.experts.{e}.up_proj.weight", "mixer.experts.{e}.down_proj.weight"),
        router=("mixer.gate.weight",),
        block="mixer",
        correction_bias=("mixer.gate.e_score_correction_bias",),
        shared=(SharedNaming(up="mixer.shared_experts.up_proj.weight", down="mixer.shared_experts.down_proj.weight"),),
    ),
    "mistral-large4": LayerNaming(
        experts=_per_expert("experts", "w1", "w3", "w2"),
        router=("gate.weight",),
        block=None,
        shared=(_shared("shared_experts"),),
    ),
    "deepseek-v4": LayerNaming(
        experts=_per_expert("ffn.experts", "w1", "w3", "w2"),
        router=("ffn.gate.weight",),
        block="ffn",
        correction_bias=("ffn.gate.bias",),
        router_extras={"tid2eid": "ffn.gate.tid2eid"},
        shared=(_shared("ffn.shared_experts", "w1", "w3", "w2"),),
    ),
    # transformers' own stacked layout ([E, 2I, H], [E, H, I]): what it saves for Lara-Mini, Mistral-4,
    # MiniMax-M3, HY-V4, Muse-Spark, Inkling
    "fused": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.experts.gate_up_proj", "out_in"), down=Stacked("mlp.experts.down_proj", "out_in")
        ),
        router=("mlp.gate.weight",),
        block="mlp",
        correction_bias=("mlp.gate.e_score_correction_bias",),
        shared=_MLP_SHARED,
    ),
    # the same keys transposed ([E, H, 2I], [E, I, H]): Qwen3-VL-MoE and Qwen3-Omni-MoE checkpoints
    "fused-t": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.experts.gate_up_proj", "in_out"), down=Stacked("mlp.experts.down_proj", "in_out")
        ),
        router=("mlp.gate.weight",),
        block="mlp",
        shared=_MLP_SHARED,
    ),
    "granite": LayerNaming(
        experts=Fused(
            gate_up=Stacked("block_sparse_moe.input_linear.weight", "out_in"),
            down=Stacked("block_sparse_moe.output_linear.weight", "out_in"),
        ),
        router=("block_sparse_moe.router.layer.weight",),
        block="block_sparse_moe",
        shared=_GRANITE_SHARED,
    ),
    "granite-experts": LayerNaming(
        experts=Fused(
            gate_up=Stacked("block_sparse_moe.experts.gate_up_proj", "out_in"),
            down=Stacked("block_sparse_moe.experts.down_proj", "out_in"),
        ),
        router=("block_sparse_moe.router.weight",),
        block="block_sparse_moe",
        shared=_GRANITE_SHARED,
    ),
    "jetmoe": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.input_linear.weight", "out_in"), down=Stacked("mlp.output_linear.weight", "out_in")
        ),
        router=("mlp.router.layer.weight",),
        block="mlp",
        layer_extras={"output_bias": "mlp.bias"},
    ),
    "aria": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.experts.fc1.weight", "in_out"), down=Stacked("mlp.experts.fc2.weight", "in_out")
        ),
        router=("mlp.router.weight",),
        block="mlp",
        shared=_MLP_SHARED,
    ),
    "gpt-oss": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.experts.gate_up_proj", "in_out"),
            down=Stacked("mlp.experts.down_proj", "in_out"),
            interleaved=True,
            gate_up_bias="mlp.experts.gate_up_proj_bias",
            down_bias="mlp.experts.down_proj_bias",
        ),
        router=("mlp.router.weight",),
        block="mlp",
        router_extras={"bias": "mlp.router.bias"},
    ),
    # Inkling-2 hub checkpoints: gate/up rows interleaved, the correction bias as the gate's bias
    "inkling2": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.experts.w13_weight", "out_in"),
            down=Stacked("mlp.experts.w2_weight", "out_in"),
            interleaved=True,
        ),
        router=("mlp.gate.weight",),
        block="mlp",
        correction_bias=("mlp.gate.bias",),
    ),
    # OpenAI's privacy filter: gpt-oss's keys, gate and up rows concatenated (not interleaved)
    "gpt-oss-concat": LayerNaming(
        experts=Fused(
            gate_up=Stacked("mlp.experts.gate_up_proj", "in_out"),
            down=Stacked("mlp.experts.down_proj", "in_out"),
            gate_up_bias="mlp.experts.gate_up_proj_bias",
            down_bias="mlp.experts.down_proj_bias",
        ),
        router=("mlp.router.weight",),
        block="mlp",
        router_extras={"bias": "mlp.router.bias"},
        auto=False,
    ),
    # Gemma-4: experts and router at the decoder layer's root, between norms of their own
    "gemma4": LayerNaming(
        experts=Fused(gate_up=Stacked("experts.gate_up_proj", "out_in"), down=Stacked("experts.down_proj", "out_in")),
        router=("router.proj.weight",),
        block=None,
        router_extras={"input_scale": "router.scale", "expert_scale": "router.per_expert_scale"},
        layer_extras={
            "input_norm": "pre_feedforward_layernorm_2.weight",
            "output_norm": "post_feedforward_layernorm_2.weight",
        },
    ),
    "llama4": LayerNaming(
        experts=Fused(
            gate_up=Stacked("feed_forward.experts.gate_up_proj", "in_out"),
            down=Stacked("feed_forward.experts.down_proj", "in_out"),
        ),
        router=("feed_forward.router.weight",),
        block="feed_forward",
        shared=(_shared("feed_forward.shared_expert"),),
    ),
    "dbrx": LayerNaming(
        experts=Fused(
            gate=Stacked("ffn.experts.mlp.w1", "flat_out_in"),
            up=Stacked("ffn.experts.mlp.v1", "flat_out_in"),
            down=Stacked("ffn.experts.mlp.w2", "flat_in_out"),
        ),
        router=("ffn.router.layer.weight",),
        block="ffn",
    ),
}
#: A.X-K1: DeepSeek-V3's keys and the decoder layer's post_mlp_layernorm, a norm on the MoE output
#: (AFMoE has a norm of that name too, outside its MoE block: not part of its layer)
NAMINGS["axk1"] = replace(NAMINGS["mlp-experts"], layer_extras={"output_norm": "post_mlp_layernorm.weight"}, auto=False)


#: the tensors one quantized projection ``<module>.`` publishes, by checkpoint kind
#: (:mod:`moe_kernels.model.published` reads them): compressed-tensors / ModelOpt FP8, GPTQ, AWQ,
#: compressed-tensors ``pack-quantized``
PUBLISHED_PARTS: dict[str, tuple[str, ...]] = {
    "fp8": ("weight", "weight_scale"),
    "gptq": ("qweight", "qzeros", "scales"),
    "awq": ("qweight", "qzeros", "scales"),
    "pack-quantized": ("weight_packed", "weight_scale", "weight_shape"),
}
#: published tensors a kind may add and a loader may go without (GPTQ ``g_idx``; FP8's static
#: ``input_scale``, which our dynamic activation quantization does not need)
PUBLISHED_OPTIONAL: dict[str, tuple[str, ...]] = {"fp8": ("input_scale",), "gptq": ("g_idx",)}
#: gpt-oss's mxfp4 experts: ``<stack>_blocks`` and ``<stack>_scales`` beside the bf16 stack names
MXFP4_SUFFIXES = ("_blocks", "_scales")
