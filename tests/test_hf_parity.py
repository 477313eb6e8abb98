"""Every MoE family of ``transformers`` against ``transformers`` itself.

For each family of :data:`tests.hf_families.CASES`: a tiny random model built from the family's own
config class (3 layers, layer 1 an MoE layer, fixed seed), saved with ``save_pretrained`` (so the
checkpoint has the hub's key names), read back through ``layer_config_from_hf`` and
``FusedMoE.load_checkpoint`` into a CPU layer, and compared with the family's own MoE block on the
same hidden states: fp32 within 1e-5 and the same top-k expert set for every token; bf16 (the
model reloaded by ``transformers`` in bf16 and saved again) within 3e-2, tokens whose experts
depend on how ``torch.topk`` breaks ties excluded. A family that needs a feature moe_kernels lacks
must be refused when loaded, with the feature named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from hf_families import CASES, Case, H
from torch import nn

from moe_kernels.model.hf_config import hf_naming, layer_config_from_hf
from moe_kernels.model.layer import FusedMoE
from moe_kernels.model.router import route

LAYER = 1
TOKENS = 32
#: token ids for the families that route by them (every family's tiny vocabulary holds 128)
INPUT_IDS = torch.randint(0, 128, (TOKENS,), generator=torch.Generator().manual_seed(3))


def _randomize(block: nn.Module, seed: int) -> None:
    """Random values for every float tensor of the MoE block: transformers initializes some routers
    and correction biases to zero, which would hide a bias or a router read from the wrong key.
    (Families that keep the bias as a parameter get the smaller spread.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in block.parameters():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
        for t in block.buffers():
            # correction biases of +-1 alternating between neighbours: each expert group then has a
            # member whose biased score is below 0, where masking the other groups with 0 instead
            # of -inf changes the choice
            if t.is_floating_point():
                sign = 1 - 2 * (torch.arange(t.shape[-1]) % 2)
                t.copy_(sign + 0.3 * torch.randn(t.shape, generator=g))
        for name, t in block.named_buffers():
            if name.endswith("tid2eid"):  # a hash table of distinct experts per token id
                experts = int(block.get_submodule(name.rsplit(".", 1)[0]).num_experts)
                t.copy_(torch.stack([torch.randperm(experts, generator=g)[: t.shape[1]] for _ in range(t.shape[0])]))


def _moe_block(decoder: nn.Module) -> nn.Module | None:
    """The child of a decoder layer that holds the experts."""
    for child in decoder.children():
        if any(name.rsplit(".", 1)[-1] == "experts" for name, _ in child.named_modules()):
            return child
    return None


def _decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    """Layer ``layer`` of the model's stack of decoder layers (the one whose layers hold experts: a
    vision tower's ``blocks`` do not)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("layers", "blocks") and isinstance(module, nn.ModuleList):
            if len(module) > layer and (_moe_block(module[layer]) is not None or hasattr(module[layer], "experts")):
                return module[layer]
    raise AssertionError(f"{type(model).__name__} has no decoder layer {layer} with experts")


def _block(model: nn.Module, case: Case) -> nn.Module:
    decoder = _decoder_layer(model, LAYER)
    block = decoder.get_submodule(case.block) if case.block is not None else _moe_block(decoder)
    assert block is not None
    return block


def _build(case: Case, directory: Path) -> nn.Module:
    """The tiny fp32 model, its MoE block randomized, saved to ``directory``."""
    config = case.config()
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError:  # a text config without a causal-LM head of its own
        model = transformers.AutoModel.from_config(config, dtype=torch.float32)
    for path, value in case.patch.items():  # from_config copies the config
        owner, _, attr = path.rpartition(".")
        setattr(getattr(model.config, owner), attr, value)
    _randomize(_block(model, case), seed=1)
    model.eval().save_pretrained(directory)
    return model


def _reference(model: nn.Module, case: Case, top_k: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x [T, H]`` -> (the family's MoE output ``[T, H]``, the expert ids it routed to ``[T, K]``)."""
    decoder = _decoder_layer(model, LAYER)
    block = _block(model, case)
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[1] if len(args) > 1 else next(iter(kwargs.values())))

    source = case.logits_from or case.ids_from

    def output_hook(module: nn.Module, args: tuple, output: tuple) -> None:
        assert source is not None
        captured.append(output[source[1]])

    def attach() -> torch.utils.hooks.RemovableHandle:
        if source is None:
            return block.get_submodule("experts").register_forward_pre_hook(hook, with_kwargs=True)
        return block.get_submodule(source[0]).register_forward_hook(output_hook)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured.clear()
        handle = attach()
        try:
            with torch.no_grad():
                x3 = x.reshape(2, -1, H)
                if case.moe_of is not None:
                    out = case.moe_of(decoder, x3)
                else:
                    out = block(x3, input_ids=INPUT_IDS.reshape(2, -1)) if case.hashed else block(x3)
                out = out[0] if isinstance(out, tuple) else out
                for name in case.also:
                    out = out + decoder.get_submodule(name)(x3)
        finally:
            handle.remove()
        assert captured, "the family's experts module was not called with routing ids"
        if case.logits_from is not None:  # the ids are the top-k of the logits
            return out.reshape(-1, H), captured[0].reshape(x.shape[0], -1).float().topk(top_k, dim=1).indices
        return out.reshape(-1, H), captured[0].reshape(x.shape[0], -1)

    return run


def _ours(directory: Path, dtype: torch.dtype) -> FusedMoE:
    # config.json through layer_config_from_hf, the family's naming (or the one the keys show), the
    # layer prefix found from the keys
    return FusedMoE.from_pretrained(directory, layer=LAYER, dtype=dtype, device="cpu")


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token, whether the two id rows hold the same set of experts."""
    return (a.sort(dim=1).values == b.sort(dim=1).values).all(dim=1)


def _tied(layer: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """Tokens whose experts depend on the order ``torch.topk`` breaks ties in, which differs between
    devices: an exact tie among the top k+1 router logits, or -- with experts outside the kept groups
    scored 0 (A.X-K2, Mistral-4) -- the top k reaching into those zeros. Found as the tokens whose
    expert set changes when the experts are listed in reverse order (groups stay groups)."""
    k = layer.cfg.moe.top_k
    logits = layer.router.logits(x).float()
    e = logits.shape[1]  # identity experts (LongCat) are routed beside the E experts
    top = logits.topk(min(k + 1, e), dim=1).values
    bias = layer.router.e_score_correction_bias
    _, ids = route(logits, k, layer.router.routing, correction_bias=bias)
    flipped = bias.flip(0) if bias is not None else None
    _, ids_reversed = route(logits.flip(1), k, layer.router.routing, correction_bias=flipped)
    order_dependent = ~_same_sets(ids.long(), e - 1 - ids_reversed.long())
    return (top[:, 1:] == top[:, :-1]).any(dim=1) | order_dependent


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


PARITY = sorted(n for n, c in CASES.items() if c.refused is None)
REFUSED = sorted(n for n, c in CASES.items() if c.refused is not None)


@pytest.mark.parametrize("family", PARITY)
def test_family_matches_transformers(family: str, tmp_path: Path) -> None:
    case = CASES[family]
    model = _build(case, tmp_path / "fp32")
    x = torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(2))

    layer = _ours(tmp_path / "fp32", torch.float32)
    ref, ref_ids = _reference(model, case, layer.cfg.moe.top_k)(x)
    ids_in = INPUT_IDS if case.hashed else None
    _, ids = layer.router(x, ids_in)
    same = _same_sets(ids.long(), ref_ids.long())
    assert same.all(), f"{family}: tokens {(~same).nonzero().flatten().tolist()} routed differently"
    assert _rel_err(layer(x, ids_in), ref) < 1e-5

    bf16 = transformers.AutoModelForCausalLM if hasattr(model, "lm_head") else transformers.AutoModel
    model16 = bf16.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    model16.save_pretrained(tmp_path / "bf16")
    x16 = x.bfloat16()
    layer16 = _ours(tmp_path / "bf16", torch.bfloat16)
    ref16, ref_ids16 = _reference(model16, case, layer16.cfg.moe.top_k)(x16)
    _, ids16 = layer16.router(x16, ids_in)
    keep = ~_tied(layer16, x16) if not case.hashed else torch.ones(TOKENS, dtype=torch.bool)
    assert keep.sum() >= TOKENS // 4, f"{family}: {int((~keep).sum())} of {TOKENS} tokens tie"
    same16 = _same_sets(ids16.long(), ref_ids16.long())
    assert same16[keep].all(), (
        f"{family} bf16: tokens {(keep & ~same16).nonzero().flatten().tolist()} routed differently"
    )
    assert _rel_err(layer16(x16, ids_in)[keep], ref16[keep]) < 3e-2


@pytest.mark.parametrize("family", REFUSED)
def test_family_is_refused_naming_the_missing_feature(family: str, tmp_path: Path) -> None:
    case = CASES[family]
    case.config().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        _ours(tmp_path, torch.float32)
    assert case.refused in str(err.value)


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """The table this module tests, printed with the run (``parity`` or the missing feature)."""
    with capsys.disabled():
        print(f"\nHF MoE families: {len(PARITY)} at parity with transformers, {len(REFUSED)} refused")
        for name in REFUSED:
            print(f"  refused {name}: {CASES[name].refused}")
    assert PARITY and set(PARITY).isdisjoint(REFUSED)


# ---- layer_config_from_hf on hand-written config.json dicts -----------------------------------

_DS = dict(
    model_type="deepseek_v3",
    num_hidden_layers=4,
    first_k_dense_replace=1,
    moe_layer_freq=2,
    n_routed_experts=16,
    num_experts_per_tok=4,
    hidden_size=64,
    moe_intermediate_size=32,
    n_shared_experts=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    hidden_act="silu",
    topk_method="noaux_tc",
    torch_dtype="bfloat16",
)


def test_deepseek_v3_fields_and_its_moe_layers() -> None:
    moe = layer_config_from_hf(_DS, 2).moe
    assert (moe.num_experts, moe.top_k, moe.hidden_size, moe.intermediate_size) == (16, 4, 64, 32)
    assert (moe.scoring, moe.correction_bias, moe.num_expert_group, moe.topk_group) == ("sigmoid", True, 4, 2)
    assert (moe.num_shared_experts, moe.shared_intermediate_size, moe.routed_scaling_factor) == (2, 32, 2.5)
    assert moe.dtype == torch.bfloat16 and moe.router_dtype == torch.float32
    # layers >= first_k_dense_replace that are multiples of moe_layer_freq
    for dense in (0, 1, 3):
        with pytest.raises(ValueError, match=rf"layer {dense} is a dense MLP layer .*its MoE layers are \[2\]"):
            layer_config_from_hf(_DS, dense)


def test_vision_language_wrapper_reads_its_text_config() -> None:
    wrapped = {
        "model_type": "kimi_k25",
        "dtype": "float16",
        "text_config": {k: v for k, v in _DS.items() if k != "torch_dtype"},
    }
    moe = layer_config_from_hf(wrapped, 2).moe
    assert moe.num_experts == 16 and moe.dtype == torch.float16


def test_per_layer_lists_are_indexed_by_the_layer() -> None:
    cfg = dict(
        model_type="hunyuan_v1_moe",
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=32,
        num_experts=[8, 16, 16],
        moe_topk=[1, 2, 4],
        hidden_act="silu",
    )
    assert (layer_config_from_hf(cfg, 2).moe.num_experts, layer_config_from_hf(cfg, 2).moe.top_k) == (16, 4)
    assert layer_config_from_hf(cfg, 0).moe.top_k == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act: 'gelu_pytorch_tanh' needs non-SiLU experts"),
        (dict(topk_method="greedy"), "topk_method: 'greedy' needs top-k methods other than noaux_tc"),
        (dict(model_type="deepseek_v9"), "model_type 'deepseek_v9' is not an MoE family moe_kernels knows"),
        (dict(num_experts=8), "num_experts=8 and n_routed_experts=16 disagree"),
        (
            dict(quantization_config={"quant_method": "bitsandbytes"}),
            "quantization_config: quant_method 'bitsandbytes'",
        ),
        (dict(torch_dtype="float64"), "dtype: 'float64' is not one of bfloat16, float16, float32"),
    ],
)
def test_what_cannot_be_computed_is_refused_by_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        layer_config_from_hf({**_DS, **changes}, 2)


def test_fp8_block_quantization_is_read() -> None:
    q = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    cfg = {**_DS, "hidden_size": 256, "moe_intermediate_size": 128, "quantization_config": q}
    assert layer_config_from_hf(cfg, 2).quant.scheme == "fp8_w8a8_block"


def test_config_json_path_and_naming(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                **_DS,
                "model_type": "qwen3_vl_moe",
                "text_config": {
                    "model_type": "qwen3_vl_moe_text",
                    "num_hidden_layers": 2,
                    "num_experts": 8,
                    "num_experts_per_tok": 2,
                    "hidden_size": 64,
                    "moe_intermediate_size": 32,
                    "hidden_act": "silu",
                },
            }
        )
    )
    assert layer_config_from_hf(tmp_path, 1, dtype=torch.float32).moe.dtype == torch.float32
    assert hf_naming(tmp_path) == "fused-t"
    with pytest.raises(FileNotFoundError, match="config file not found"):
        layer_config_from_hf(tmp_path / "nope", 0)


def test_llama4_moe_layers_from_the_interleave_step() -> None:
    cfg = dict(
        model_type="llama4_text",
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        hidden_act="silu",
    )
    assert layer_config_from_hf(cfg, 3).moe.weight_on_input
    with pytest.raises(ValueError, match=r"its MoE layers are \[1, 3\]"):
        layer_config_from_hf(cfg, 2)


def test_deepseek_v4_hash_layers_without_mlp_layer_types() -> None:
    """A hub config.json with num_hash_layers (or neither field: 3) and no mlp_layer_types routes its
    first layers by token id, as transformers builds it."""
    cfg = dict(
        model_type="deepseek_v4",
        num_hidden_layers=5,
        hidden_size=64,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        hidden_act="silu",
        swiglu_limit=10.0,
        num_hash_layers=2,
    )
    hashed = [layer_config_from_hf(cfg, i).moe.hash_routing for i in range(5)]
    assert hashed == [True, True, False, False, False]
    default = {k: v for k, v in cfg.items() if k != "num_hash_layers"}
    assert [layer_config_from_hf(default, i).moe.hash_routing for i in range(5)] == [True] * 3 + [False] * 2
    moe = layer_config_from_hf(cfg, 4).moe
    assert (moe.per_expert_score, moe.correction_bias, moe.activation.limit) == ("sqrtsoftplus", True, 10.0)
