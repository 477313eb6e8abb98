"""Layer configs: every shipped YAML loads with the real model shapes; bad values are refused
with a message that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from moe_kernels.config import ConfigError, LayerConfig, MoEConfig, ParallelConfig, QuantConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_configs_folder_has_the_models() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {
        "deepseek-v3.yaml",
        "qwen3-30b-a3b.yaml",
        "qwen3-235b-a22b.yaml",
        "mixtral-8x7b.yaml",
        "tiny-test.yaml",
    } <= names


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name, f"{path.name} needs a name:"
    assert cfg.moe.dtype == torch.bfloat16
    # a round trip through plain data gives the same config (what the CLI does for --dtype)
    assert LayerConfig.model_validate(cfg.model_dump()) == cfg


# (file, E, top_k, H, I, scoring, groups, topk_group, scale) from each model's config.json
REAL_SHAPES = [
    ("deepseek-v3.yaml", 256, 8, 7168, 2048, "sigmoid", 8, 4, 2.5),
    ("qwen3-30b-a3b.yaml", 128, 8, 2048, 768, "softmax", None, None, 1.0),
    ("qwen3-235b-a22b.yaml", 128, 8, 4096, 1536, "softmax", None, None, 1.0),
    ("mixtral-8x7b.yaml", 8, 2, 4096, 14336, "softmax", None, None, 1.0),
]


@pytest.mark.parametrize(("file", "e", "k", "h", "i", "scoring", "groups", "topk_group", "scale"), REAL_SHAPES)
def test_real_model_shapes(
    file: str, e: int, k: int, h: int, i: int, scoring: str, groups: int | None, topk_group: int | None, scale: float
) -> None:
    m = load_config(CONFIGS / file).moe
    got = (m.num_experts, m.top_k, m.hidden_size, m.intermediate_size, m.scoring)
    assert got == (e, k, h, i, scoring)
    assert (m.num_expert_group, m.topk_group, m.routed_scaling_factor) == (groups, topk_group, scale)
    assert m.renormalize


@pytest.mark.parametrize("name", ["bfloat16", "bf16", "torch.bfloat16", torch.bfloat16])
def test_dtype_by_name_or_torch_dtype(name: object) -> None:
    m = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=16, dtype=name)
    assert m.dtype is torch.bfloat16


def _moe(**changes: object) -> dict:
    base = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=16)
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        (dict(top_k=0), "top_k", "greater than 0"),
        (dict(top_k=9), "", "top_k (9) must be <= num_experts (8)"),
        (dict(hidden_size=12), "", "hidden_size must be a multiple of 8"),
        (dict(intermediate_size=20), "", "intermediate_size must be a multiple of 8"),
        (dict(dtype="int8"), "dtype", "must be a torch.dtype or one of"),
        (dict(dtype=torch.int8), "dtype", "must be one of"),
        (dict(scoring="relu"), "scoring", "'softmax' or 'sigmoid'"),
        (dict(num_expert_group=2), "", "num_expert_group and topk_group must be given together"),
        (dict(num_expert_group=3, topk_group=1), "", "divisible by num_expert_group"),
        (dict(num_expert_group=2, topk_group=3), "", "topk_group (3) must be <= num_expert_group (2)"),
        (dict(routed_scaling_factor=0), "routed_scaling_factor", "greater than 0"),
        (dict(activation="swish"), "activation", "'silu'"),
        (dict(num_expert=8), "num_expert", "Extra inputs are not permitted"),
        # strict: no coercion between types, no infinities
        (dict(top_k=True), "top_k", "valid integer"),
        (dict(hidden_size="16"), "hidden_size", "valid integer"),
        (dict(hidden_size=16.0), "hidden_size", "valid integer"),
        (dict(renormalize=1), "renormalize", "valid boolean"),
        (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor", "finite number"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor", "finite number"),
        (dict(num_shared_experts=1), "", "num_shared_experts > 0 and shared_intermediate_size must be given together"),
        (dict(shared_expert_gate=True), "", "shared_expert_gate needs num_shared_experts > 0"),
    ],
)
def test_bad_moe_values_name_the_field(changes: dict, field: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        MoEConfig.model_validate(_moe(**changes))
    text = str(info.value)
    assert message in text
    if field:
        assert any(field in err["loc"] for err in info.value.errors()), text


def test_parallel_values() -> None:
    with pytest.raises(ValidationError, match=r"ep_rank \(2\) must be < ep_size \(2\)"):
        ParallelConfig(ep_size=2, ep_rank=2)
    with pytest.raises(ValidationError, match=r"num_experts \(8\) must be divisible by ep_size \(3\)"):
        LayerConfig(moe=MoEConfig(**_moe()), parallel=ParallelConfig(ep_size=3))
    assert LayerConfig(moe=MoEConfig(**_moe()), parallel=ParallelConfig(ep_size=4)).num_local_experts == 2


def test_load_config_errors_name_the_file_or_section(tmp_path: Path) -> None:
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(not_mapping)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("moe: {num_experts: 8, top_k: 2, hidden_size: 16, intermediate_size: 16}\nrouter: {}\n")
    with pytest.raises(ConfigError, match="unknown.yaml: router: Extra inputs are not permitted"):
        load_config(unknown)

    missing = tmp_path / "missing.yaml"
    missing.write_text("name: x\n")
    with pytest.raises(ConfigError, match="missing.yaml: moe: Field required"):
        load_config(missing)

    broken = tmp_path / "broken.yaml"
    broken.write_text("moe: {num_experts: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)

    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


YAML_BASE = "moe: {num_experts: 8, top_k: 2, hidden_size: 16, intermediate_size: 16, %s}\n"


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        ("routed_scaling_factor: .inf", "moe.routed_scaling_factor: Input should be a finite number (got inf: float)"),
        ("renormalize: 1", "moe.renormalize: Input should be a valid boolean (got 1: int)"),
        ("scoring: 1", "moe.scoring: Input should be 'softmax' or 'sigmoid' (got 1: int)"),
        ("dtype: 16", "moe.dtype: must be a torch.dtype or one of"),
    ],
)
def test_yaml_values_are_strict_and_errors_are_one_line(tmp_path: Path, fragment: str, message: str) -> None:
    path = tmp_path / "layer.yaml"
    path.write_text(YAML_BASE % fragment)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_yaml_top_k_true_and_string_sizes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "layer.yaml"
    path.write_text("moe: {num_experts: 8, top_k: true, hidden_size: '64', intermediate_size: 16}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "moe.top_k: Input should be a valid integer (got True: bool)" in text
    assert "moe.hidden_size: Input should be a valid integer (got '64': str)" in text


def test_quant_config_is_strict() -> None:
    assert QuantConfig().scheme == "none"
    fp8 = QuantConfig.model_validate({"scheme": "fp8_w8a8_block", "weight_block": [128, 128]})
    assert fp8.scheme == "fp8_w8a8_block" and fp8.weight_block == (128, 128) and fp8.act_group == 128
    with pytest.raises(ValidationError, match="one of 'none', 'fp8_w8a8_block', .*'int4_w4a16', 'mxfp4'; got 'int4'"):
        QuantConfig.model_validate({"scheme": "int4"})
    with pytest.raises(ValidationError, match=r"weight_block must be \[128, 128\] and act_group 128"):
        QuantConfig.model_validate({"scheme": "fp8_w8a8_block", "weight_block": [64, 64]})
    with pytest.raises(ValidationError, match="fp8_w8a8_block computes in bfloat16"):
        LayerConfig(moe=MoEConfig(**_moe(dtype="float16", hidden_size=128, intermediate_size=128)), quant=fp8)
    with pytest.raises(ValidationError, match="multiples of 128; got hidden_size=16"):
        LayerConfig(moe=MoEConfig(**_moe(intermediate_size=128)), quant=fp8)


def test_load_config_overrides_a_section(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny-test.yaml", parallel=ParallelConfig(ep_size=2, ep_rank=1))
    assert cfg.parallel.ep_rank == 1 and cfg.num_local_experts == 4
