"""Layer configs: every shipped YAML loads with the real model shapes; bad values are refused
with a message that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, load_config

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
        (dict(dtype="int8"), "dtype", "dtype must be"),
        (dict(dtype=torch.int8), "dtype", "dtype must be one of"),
        (dict(scoring="relu"), "scoring", "'softmax' or 'sigmoid'"),
        (dict(num_expert_group=2), "", "num_expert_group and topk_group must be given together"),
        (dict(num_expert_group=3, topk_group=1), "", "divisible by num_expert_group"),
        (dict(num_expert_group=2, topk_group=3), "", "topk_group (3) must be <= num_expert_group (2)"),
        (dict(routed_scaling_factor=0), "routed_scaling_factor", "greater than 0"),
        (dict(activation="gelu"), "activation", "'silu'"),
        (dict(num_expert=8), "num_expert", "Extra inputs are not permitted"),
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
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        load_config(not_mapping)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("moe: {num_experts: 8, top_k: 2, hidden_size: 16, intermediate_size: 16}\nrouter: {}\n")
    with pytest.raises(ValidationError, match="router"):
        load_config(unknown)

    missing = tmp_path / "missing.yaml"
    missing.write_text("name: x\n")
    with pytest.raises(ValidationError, match="moe"):
        load_config(missing)


def test_load_config_overrides_a_section(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny-test.yaml", parallel=ParallelConfig(ep_size=2, ep_rank=1))
    assert cfg.parallel.ep_rank == 1 and cfg.num_local_experts == 4
