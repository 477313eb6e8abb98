"""Checkpoint reading: small synthetic safetensors checkpoints in each naming, sharded and not;
the tensors read equal those written, only the requested experts are read, and every bad
checkpoint is refused with a message that names the file, the key and what was wrong."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_kernels.model import checkpoint as ckpt
from moe_kernels.model.checkpoint import (
    CheckpointReader,
    MoELayerInfo,
    MoELayerTensors,
    TensorInfo,
    dequantize_block_fp8,
    describe_moe_layer,
    detect_naming,
    read_moe_layer,
)

EXPERTS, HIDDEN, INTER = 8, 16, 12
# FP8 sizes that are not multiples of 128, so the scale grids have partial blocks
E_FP8, H_FP8, I_FP8 = 4, 200, 136
MOE_LAYERS = (1, 2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _fp8(g: torch.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(math.ceil(n / 128), math.ceil(k / 128), generator=g) + 0.5
    return w, scale


def _dense_layer(g: torch.Generator, tensors: dict[str, torch.Tensor], layer: int) -> None:
    tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = _rand(g, HIDDEN, HIDDEN)
    tensors[f"model.layers.{layer}.mlp.gate_proj.weight"] = _rand(g, INTER, HIDDEN)
    tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = _rand(g, INTER, HIDDEN)
    tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = _rand(g, HIDDEN, INTER)


def deepseek_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 in bf16: layer 0 dense, layers 1-2 MoE with router bias and shared experts."""
    g = _gen(seed)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _rand(g, 32, HIDDEN)}
    _dense_layer(g, t, 0)
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp"
        t[f"model.layers.{layer}.self_attn.q_proj.weight"] = _rand(g, HIDDEN, HIDDEN)
        t[f"{p}.gate.weight"] = _rand(g, EXPERTS, HIDDEN)
        t[f"{p}.gate.e_score_correction_bias"] = _rand(g, EXPERTS, dtype=torch.float32)
        for e in range(EXPERTS):
            t[f"{p}.experts.{e}.gate_proj.weight"] = _rand(g, INTER, HIDDEN)
            t[f"{p}.experts.{e}.up_proj.weight"] = _rand(g, INTER, HIDDEN)
            t[f"{p}.experts.{e}.down_proj.weight"] = _rand(g, HIDDEN, INTER)
        t[f"{p}.shared_experts.gate_proj.weight"] = _rand(g, 2 * INTER, HIDDEN)
        t[f"{p}.shared_experts.up_proj.weight"] = _rand(g, 2 * INTER, HIDDEN)
        t[f"{p}.shared_experts.down_proj.weight"] = _rand(g, HIDDEN, 2 * INTER)
    return t


def deepseek_fp8_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 FP8: float8_e4m3fn expert and shared weights with weight_scale_inv, layer 1."""
    g = _gen(seed)
    p = "model.layers.1.mlp"
    t: dict[str, torch.Tensor] = {
        f"{p}.gate.weight": _rand(g, E_FP8, H_FP8),
        f"{p}.gate.e_score_correction_bias": _rand(g, E_FP8, dtype=torch.float32),
    }
    for prefix in [f"{p}.experts.{e}" for e in range(E_FP8)] + [f"{p}.shared_experts"]:
        for proj, (n, k) in (("gate_proj", (I_FP8, H_FP8)), ("up_proj", (I_FP8, H_FP8)), ("down_proj", (H_FP8, I_FP8))):
            t[f"{prefix}.{proj}.weight"], t[f"{prefix}.{proj}.weight_scale_inv"] = _fp8(g, n, k)
    return t


def qwen2_tensors(seed: int = 2) -> dict[str, torch.Tensor]:
    """Qwen1.5/2-MoE: mlp.experts plus one shared_expert with its sigmoid shared_expert_gate."""
    g = _gen(seed)
    t: dict[str, torch.Tensor] = {}
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp"
        t[f"{p}.gate.weight"] = _rand(g, EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            t[f"{p}.experts.{e}.gate_proj.weight"] = _rand(g, INTER, HIDDEN)
            t[f"{p}.experts.{e}.up_proj.weight"] = _rand(g, INTER, HIDDEN)
            t[f"{p}.experts.{e}.down_proj.weight"] = _rand(g, HIDDEN, INTER)
        t[f"{p}.shared_expert.gate_proj.weight"] = _rand(g, 3 * INTER, HIDDEN)
        t[f"{p}.shared_expert.up_proj.weight"] = _rand(g, 3 * INTER, HIDDEN)
        t[f"{p}.shared_expert.down_proj.weight"] = _rand(g, HIDDEN, 3 * INTER)
        t[f"{p}.shared_expert_gate.weight"] = _rand(g, 1, HIDDEN)
    return t


def mixtral_tensors(seed: int = 3) -> dict[str, torch.Tensor]:
    """Mixtral: block_sparse_moe.experts.E.{w1,w3,w2} and block_sparse_moe.gate, float16."""
    g = _gen(seed)
    t: dict[str, torch.Tensor] = {}
    for layer in (0, 1, 2):
        p = f"model.layers.{layer}.block_sparse_moe"
        t[f"{p}.gate.weight"] = _rand(g, EXPERTS, HIDDEN, dtype=torch.float16)
        for e in range(EXPERTS):
            t[f"{p}.experts.{e}.w1.weight"] = _rand(g, INTER, HIDDEN, dtype=torch.float16)
            t[f"{p}.experts.{e}.w3.weight"] = _rand(g, INTER, HIDDEN, dtype=torch.float16)
            t[f"{p}.experts.{e}.w2.weight"] = _rand(g, HIDDEN, INTER, dtype=torch.float16)
    return t


def _expert_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], *, sharded: bool) -> Path:
    """Write ``tensors`` as one model.safetensors, or as shards with an index: shard 1 holds
    everything but routed experts, shard 2 the lower half of the experts, shard 3 the upper."""
    directory.mkdir(parents=True, exist_ok=True)
    if not sharded:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    n_experts = 1 + max(e for k in tensors if (e := _expert_of(k)) is not None)
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for key, value in tensors.items():
        e = _expert_of(key)
        shards[0 if e is None else 1 if e < n_experts // 2 else 2][key] = value
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update(dict.fromkeys(shard, name))
    (directory / ckpt.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float8 has no CPU equality kernel; compare the bits
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)


class Recorder:
    """Wraps ``safe_open`` in the checkpoint module and records each file opened and each read:
    ``read`` the keys whose data was read (whole or in part), ``rows`` the row ranges read of a key."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.read: list[str] = []
        self.rows: list[tuple[str, int, int]] = []
        real = ckpt.safe_open
        recorder = self

        class Handle:
            def __init__(self, file: Path, **kwargs: object) -> None:
                recorder.opened.append(Path(file).name)
                self._ctx = real(file, **kwargs)

            def __enter__(self) -> Handle:
                self._f = self._ctx.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self._ctx.__exit__(*exc)

            def keys(self) -> list[str]:
                return self._f.keys()

            def get_tensor(self, key: str) -> torch.Tensor:
                recorder.read.append(key)
                return self._f.get_tensor(key)

            def get_slice(self, key: str) -> Slice:
                return Slice(self._f.get_slice(key), key)

        class Slice:
            """Records a read of rows; shapes and the empty read that gives the dtype are not reads."""

            def __init__(self, view: object, key: str) -> None:
                self._view, self._key = view, key

            def get_shape(self) -> list[int]:
                return self._view.get_shape()  # type: ignore[attr-defined]

            def __getitem__(self, index: object) -> torch.Tensor:
                if isinstance(index, slice) and index.stop != index.start:
                    recorder.read.append(self._key)
                    recorder.rows.append((self._key, index.start, index.stop))
                return self._view[index]  # type: ignore[index]

        monkeypatch.setattr(ckpt, "safe_open", Handle)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    yield Recorder(monkeypatch)


# ---- reading what was written ----------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_deepseek_bf16_reads_what_was_written(tmp_path: Path, sharded: bool) -> None:
    t = deepseek_tensors()
    path = write_checkpoint(tmp_path / "ds", t, sharded=sharded)
    got = read_moe_layer(path, 2, [1, 6, 3], shared=True)
    p = "model.layers.2.mlp"
    assert isinstance(got, MoELayerTensors)
    assert (got.layer, got.naming, got.experts, got.is_fp8) == (2, "mlp-experts", (1, 6, 3), False)
    for e in (1, 6, 3):
        assert _same(got.gate_proj[e], t[f"{p}.experts.{e}.gate_proj.weight"])
        assert _same(got.up_proj[e], t[f"{p}.experts.{e}.up_proj.weight"])
        assert _same(got.down_proj[e], t[f"{p}.experts.{e}.down_proj.weight"])
    assert got.gate_proj_scale is None and got.up_proj_scale is None and got.down_proj_scale is None
    assert _same(got.router_weight, t[f"{p}.gate.weight"])
    assert got.e_score_correction_bias is not None
    assert _same(got.e_score_correction_bias, t[f"{p}.gate.e_score_correction_bias"])
    assert got.shared is not None and got.shared.expert_gate is None and got.shared.gate_proj_scale is None
    assert _same(got.shared.gate_proj, t[f"{p}.shared_experts.gate_proj.weight"])
    assert _same(got.shared.up_proj, t[f"{p}.shared_experts.up_proj.weight"])
    assert _same(got.shared.down_proj, t[f"{p}.shared_experts.down_proj.weight"])


def test_shared_expert_read_only_when_asked(tmp_path: Path, recorder: Recorder) -> None:
    path = write_checkpoint(tmp_path / "ds", deepseek_tensors(), sharded=False)
    got = read_moe_layer(path, 1, [0])
    assert got.shared is None and got.has_shared  # present, so a caller can refuse a config without them
    assert not any("shared" in k for k in recorder.read)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_deepseek_fp8_reads_weights_and_block_scales(tmp_path: Path, sharded: bool) -> None:
    t = deepseek_fp8_tensors()
    path = write_checkpoint(tmp_path / "fp8", t, sharded=sharded)
    got = read_moe_layer(path, 1, range(E_FP8), shared=True)
    p = "model.layers.1.mlp"
    assert got.is_fp8
    assert got.gate_proj_scale is not None and got.up_proj_scale is not None and got.down_proj_scale is not None
    for e in range(E_FP8):
        for proj, weights, scales in (
            ("gate_proj", got.gate_proj, got.gate_proj_scale),
            ("up_proj", got.up_proj, got.up_proj_scale),
            ("down_proj", got.down_proj, got.down_proj_scale),
        ):
            assert weights[e].dtype == torch.float8_e4m3fn
            assert _same(weights[e], t[f"{p}.experts.{e}.{proj}.weight"])
            assert _same(scales[e], t[f"{p}.experts.{e}.{proj}.weight_scale_inv"])
    assert got.gate_proj_scale[0].shape == (2, 2) and got.down_proj_scale[0].shape == (2, 2)
    sh = got.shared
    assert sh is not None and sh.down_proj_scale is not None
    assert _same(sh.down_proj, t[f"{p}.shared_experts.down_proj.weight"])
    assert _same(sh.down_proj_scale, t[f"{p}.shared_experts.down_proj.weight_scale_inv"])
    assert _same(got.router_weight, t[f"{p}.gate.weight"])


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_qwen2_shared_expert_and_its_gate(tmp_path: Path, sharded: bool) -> None:
    t = qwen2_tensors()
    path = write_checkpoint(tmp_path / "qwen2", t, sharded=sharded)
    got = read_moe_layer(path, 1, [7, 0], shared=True)
    p = "model.layers.1.mlp"
    assert got.naming == "mlp-experts" and got.e_score_correction_bias is None
    assert _same(got.gate_proj[7], t[f"{p}.experts.7.gate_proj.weight"])
    assert _same(got.down_proj[0], t[f"{p}.experts.0.down_proj.weight"])
    sh = got.shared
    assert sh is not None and sh.expert_gate is not None
    assert _same(sh.gate_proj, t[f"{p}.shared_expert.gate_proj.weight"])
    assert _same(sh.up_proj, t[f"{p}.shared_expert.up_proj.weight"])
    assert _same(sh.down_proj, t[f"{p}.shared_expert.down_proj.weight"])
    assert _same(sh.expert_gate, t[f"{p}.shared_expert_gate.weight"])


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_mixtral_maps_w1_w3_w2_to_gate_up_down(tmp_path: Path, sharded: bool) -> None:
    t = mixtral_tensors()
    path = write_checkpoint(tmp_path / "mixtral", t, sharded=sharded)
    got = read_moe_layer(path, 0, [2, 5])
    p = "model.layers.0.block_sparse_moe"
    assert got.naming == "mixtral" and got.e_score_correction_bias is None and got.shared is None
    for e in (2, 5):
        assert _same(got.gate_proj[e], t[f"{p}.experts.{e}.w1.weight"])
        assert _same(got.up_proj[e], t[f"{p}.experts.{e}.w3.weight"])
        assert _same(got.down_proj[e], t[f"{p}.experts.{e}.w2.weight"])
    assert _same(got.router_weight, t[f"{p}.gate.weight"])


def test_device_is_honoured(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "mixtral", mixtral_tensors(), sharded=False)
    got = read_moe_layer(path, 1, [0], device="meta")
    assert got.gate_proj[0].device.type == "meta" and got.router_weight.device.type == "meta"


@pytest.mark.parametrize("form", ["dir", "index file", "shard file", "single dir", "single file"])
def test_path_forms(tmp_path: Path, form: str) -> None:
    t = mixtral_tensors()
    sharded = form in ("dir", "index file", "shard file")
    root = write_checkpoint(tmp_path / "m", t, sharded=sharded)
    path = {
        "dir": root,
        "index file": root / ckpt.INDEX_NAME,
        # one shard alone is a checkpoint of the tensors it holds
        "shard file": root / "model-00003-of-00003.safetensors",
        "single dir": root,
        "single file": root / "model.safetensors",
    }[form]
    if form == "shard file":
        # the upper half of the experts, without the routers (which live in shard 1)
        with pytest.raises(ValueError, match="layer 1 of .* matches no MoE naming"):
            read_moe_layer(path, 1, [4, 7])
        return
    got = read_moe_layer(path, 1, [4])
    assert _same(got.down_proj[4], t["model.layers.1.block_sparse_moe.experts.4.w2.weight"])


def test_one_reader_serves_many_layers(tmp_path: Path) -> None:
    t = deepseek_tensors()
    reader = CheckpointReader(write_checkpoint(tmp_path / "ds", t, sharded=True))
    assert reader.layers() == [0, 1, 2]
    for layer in MOE_LAYERS:
        got = read_moe_layer(reader, layer, [0])
        assert _same(got.up_proj[0], t[f"model.layers.{layer}.mlp.experts.0.up_proj.weight"])


# ---- laziness: only this rank's experts ----------------------------------------------------


def test_a_rank_reads_only_its_experts(tmp_path: Path, recorder: Recorder) -> None:
    t = deepseek_tensors()
    path = write_checkpoint(tmp_path / "ds", t, sharded=True)
    # rank 1 of a 2-way expert-parallel run owns experts 4..7, all in shard 3: shard 2 (experts
    # 0..3) may be absent altogether, as for a rank that downloaded only its own shards
    (path / "model-00002-of-00003.safetensors").unlink()
    got = read_moe_layer(path, 1, range(4, 8))
    p = "model.layers.1.mlp"
    assert set(recorder.opened) == {"model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"}
    expected = {f"{p}.experts.{e}.{proj}.weight" for e in range(4, 8) for proj in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"{p}.gate.weight", f"{p}.gate.e_score_correction_bias"}
    assert sorted(recorder.read) == sorted(expected)  # each key once, nothing else
    assert _same(got.gate_proj[5], t[f"{p}.experts.5.gate_proj.weight"])


def test_each_shard_opened_once_for_headers_and_once_for_data(tmp_path: Path, recorder: Recorder) -> None:
    path = write_checkpoint(tmp_path / "ds", deepseek_tensors(), sharded=True)
    read_moe_layer(path, 2, range(EXPERTS), shared=True)
    assert sorted(recorder.opened) == sorted(2 * [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])


def test_describe_reads_headers_only(tmp_path: Path, recorder: Recorder) -> None:
    path = write_checkpoint(tmp_path / "fp8", deepseek_fp8_tensors(), sharded=True)
    info = describe_moe_layer(path, 1, [3], shared=True)
    assert recorder.read == []
    assert isinstance(info, MoELayerInfo) and info.is_fp8
    gate = info.gate_proj[3]
    assert isinstance(gate, TensorInfo)
    assert (gate.shape, gate.dtype, gate.file.name) == (
        (I_FP8, H_FP8),
        torch.float8_e4m3fn,
        "model-00003-of-00003.safetensors",
    )
    assert info.gate_proj_scale is not None
    assert (info.gate_proj_scale[3].shape, info.gate_proj_scale[3].dtype) == ((2, 2), torch.float32)
    assert info.down_proj[3].shape == (H_FP8, I_FP8)
    assert (info.router_weight.shape, info.router_weight.dtype) == ((E_FP8, H_FP8), torch.bfloat16)
    assert info.shared is not None and info.shared.up_proj.shape == (I_FP8, H_FP8)


# ---- naming detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "layer", "naming"),
    [(deepseek_tensors, 1, "mlp-experts"), (qwen2_tensors, 2, "mlp-experts"), (mixtral_tensors, 0, "mixtral")],
)
def test_detect_naming(tensors: object, layer: int, naming: str) -> None:
    keys = tensors().keys()  # type: ignore[operator]
    assert detect_naming(keys, layer) == naming
    assert detect_naming(keys, layer, naming) == naming


def test_detect_naming_dense_layer_lists_tried_and_seen() -> None:
    keys = deepseek_tensors().keys()
    with pytest.raises(ValueError) as err:
        detect_naming(keys, 0)
    msg = str(err.value)
    assert "layer 0 of the keys given matches no MoE naming (tried mlp-experts, mixtral, jamba," in msg
    assert "model.layers.0.mlp.gate_proj.weight" in msg


def test_explicit_naming_is_checked() -> None:
    keys = mixtral_tensors().keys()
    with pytest.raises(
        ValueError,
        match=r"no router 'mlp\.gate\.weight' and experts 'mlp\.experts\.\*' under any layer root for naming"
        r" 'mlp-experts'.*naming='auto' would pick 'mixtral'",
    ):
        detect_naming(keys, 1, "mlp-experts")
    with pytest.raises(ValueError, match=r"naming must be one of 'auto', 'mlp-experts', 'mixtral', .*; got 'deepseek'"):
        detect_naming(keys, 1, "deepseek")


def test_explicit_naming_in_read(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "mixtral", mixtral_tensors(), sharded=False)
    assert read_moe_layer(path, 2, [0], naming="mixtral").naming == "mixtral"
    with pytest.raises(ValueError, match=f"layer 2 of {path / 'model.safetensors'} has no .* for naming 'mlp-experts'"):
        read_moe_layer(path, 2, [0], naming="mlp-experts")


# ---- errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"checkpoint path {tmp_path / 'nope'} does not exist"):
        read_moe_layer(tmp_path / "nope", 0, [0])


def test_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no \\*.safetensors file and no {ckpt.INDEX_NAME}"):
        read_moe_layer(tmp_path, 0, [0])


def test_several_files_without_index(tmp_path: Path) -> None:
    root = write_checkpoint(tmp_path / "m", mixtral_tensors(), sharded=True)
    (root / ckpt.INDEX_NAME).unlink()
    with pytest.raises(ValueError, match=f"holds 3 \\*.safetensors files but no {ckpt.INDEX_NAME}"):
        CheckpointReader(root)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=f"{bad} is not a safetensors file \\("):
        read_moe_layer(bad, 0, [0])


def test_layer_absent_lists_layers(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ds", deepseek_tensors(), sharded=True)
    with pytest.raises(ValueError, match=r"layer 61 not found in .*; the checkpoint has layers 0\.\.2$"):
        read_moe_layer(path, 61, [0])


def test_missing_expert_names_it_and_its_key(tmp_path: Path) -> None:
    t = deepseek_tensors()
    del t["model.layers.1.mlp.experts.5.up_proj.weight"]
    path = write_checkpoint(tmp_path / "ds", t, sharded=True)
    with pytest.raises(ValueError) as err:
        read_moe_layer(path, 1, [4, 5])
    assert "expert 5 of layer 1 is missing" in str(err.value)
    assert "no key 'model.layers.1.mlp.experts.5.up_proj.weight'" in str(err.value)
    with pytest.raises(ValueError, match=r"expert 9 of layer 1 is missing.*; layer 1 has experts 0\.\.7"):
        read_moe_layer(path, 1, [9])


def test_scale_for_some_experts_only(tmp_path: Path) -> None:
    t = deepseek_fp8_tensors()
    del t["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"]
    path = write_checkpoint(tmp_path / "fp8", t, sharded=False)
    with pytest.raises(ValueError) as err:
        read_moe_layer(path, 1, range(E_FP8))
    msg = str(err.value)
    assert r"_scale_inv scales are present for experts 0..3 but not for all requested experts" in msg
    assert "no key 'model.layers.1.mlp.experts.2.down_proj.weight_scale_inv' (expert 2)" in msg
    # the experts that have all their scales still read
    assert read_moe_layer(path, 1, [0, 1, 3]).is_fp8


def test_fp8_weight_without_any_scale(tmp_path: Path) -> None:
    t = {k: v for k, v in deepseek_fp8_tensors().items() if "experts.0." not in k or "scale" not in k}
    path = write_checkpoint(tmp_path / "fp8", t, sharded=False)
    with pytest.raises(
        TypeError,
        match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' is float8_e4m3fn but"
        r" '.*weight_scale_inv' is absent",
    ):
        read_moe_layer(path, 1, [0])


def test_scale_next_to_a_bf16_weight(tmp_path: Path) -> None:
    t = deepseek_tensors()
    t["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"] = torch.ones(1, 1)
    t["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"] = torch.ones(1, 1)
    t["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"] = torch.ones(1, 1)
    path = write_checkpoint(tmp_path / "ds", t, sharded=False)
    with pytest.raises(
        TypeError, match=r"weight_scale_inv' is present but '.*experts\.0\.gate_proj\.weight' is bfloat16"
    ):
        read_moe_layer(path, 1, [0])


def test_scale_of_the_wrong_shape(tmp_path: Path) -> None:
    t = deepseek_fp8_tensors()
    t["model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"] = torch.ones(2, 3)
    path = write_checkpoint(tmp_path / "fp8", t, sharded=False)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.mlp\.experts\.1\.down_proj\.weight_scale_inv' must have"
        r" shape \[2, 2\] \(one scale per 128x128 block of \[200, 136\]\), got \[2, 3\]",
    ):
        read_moe_layer(path, 1, [1])


def test_integer_tensor_is_refused_by_name(tmp_path: Path) -> None:
    t = mixtral_tensors()
    t["model.layers.1.block_sparse_moe.experts.3.w3.weight"] = torch.ones(INTER, HIDDEN, dtype=torch.int32)
    path = write_checkpoint(tmp_path / "m", t, sharded=True)
    with pytest.raises(TypeError) as err:
        read_moe_layer(path, 1, [3])
    msg = str(err.value)
    assert "model-00002-of-00003.safetensors" in msg
    assert "tensor 'model.layers.1.block_sparse_moe.experts.3.w3.weight' (expert weight) has dtype int32" in msg
    assert "expected one of bfloat16, float16, float32, float8_e4m3fn" in msg


def test_integer_router_is_refused(tmp_path: Path) -> None:
    t = mixtral_tensors()
    t["model.layers.1.block_sparse_moe.gate.weight"] = torch.zeros(EXPERTS, HIDDEN, dtype=torch.int64)
    path = write_checkpoint(tmp_path / "m", t, sharded=False)
    with pytest.raises(
        TypeError,
        match=r"'model\.layers\.1\.block_sparse_moe\.gate\.weight' \(router weight\) has"
        r" dtype int64",
    ):
        read_moe_layer(path, 1, [0])


def test_index_pointing_at_a_missing_shard(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ds", deepseek_tensors(), sharded=True)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_moe_layer(path, 1, [0])
    msg = str(err.value)
    assert f"{path / ckpt.INDEX_NAME} maps 'model.layers.1.mlp.experts.0.gate_proj.weight'" in msg
    assert f"to shard 'model-00002-of-00003.safetensors', which does not exist in {path}" in msg


def test_shared_expert_errors(tmp_path: Path) -> None:
    mixtral = write_checkpoint(tmp_path / "m", mixtral_tensors(), sharded=False)
    with pytest.raises(
        ValueError, match="has no shared expert: no key 'model.layers.1.block_sparse_moe.shared_experts.down_proj"
    ):
        read_moe_layer(mixtral, 1, [0], shared=True)
    t = qwen2_tensors()
    del t["model.layers.1.mlp.shared_expert.up_proj.weight"]
    partial = write_checkpoint(tmp_path / "p", t, sharded=False)
    with pytest.raises(ValueError, match="partial shared expert: no key 'model.layers.1.mlp.shared_expert.up_proj"):
        read_moe_layer(partial, 1, [0], shared=True)
    t = {k: v for k, v in qwen2_tensors().items() if "shared" not in k}
    none = write_checkpoint(tmp_path / "n", t, sharded=False)
    with pytest.raises(
        ValueError,
        match="has no shared expert: no key 'model.layers.1.mlp.shared_experts.down_proj"
        ".weight' or 'model.layers.1.mlp.shared_expert.down_proj.weight'",
    ):
        read_moe_layer(none, 1, [0], shared=True)


def test_ungated_shared_expert(tmp_path: Path) -> None:
    """Lara-Mini and Flint keep an ungated shared expert under the name Qwen2-MoE gates."""
    t = qwen2_tensors()
    del t["model.layers.1.mlp.shared_expert_gate.weight"]
    got = read_moe_layer(write_checkpoint(tmp_path / "q", t, sharded=False), 1, [0], shared=True)
    assert got.shared is not None and got.shared.expert_gate is None
    assert _same(got.shared.up_proj, t["model.layers.1.mlp.shared_expert.up_proj.weight"])


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m", mixtral_tensors(), sharded=False)
    with pytest.raises(ValueError, match="experts must be distinct, got 3 more than once"):
        read_moe_layer(path, 1, [3, 1, 3])
    with pytest.raises(ValueError, match="experts must name at least one expert"):
        read_moe_layer(path, 1, [])
    with pytest.raises(TypeError, match="experts must be ints, got str"):
        read_moe_layer(path, 1, ["3"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="layer must be an int, got str"):
        read_moe_layer(path, "1", [0])  # type: ignore[arg-type]


# ---- FP8 dequantization -------------------------------------------------------------------


def test_dequantize_block_fp8_matches_a_plain_loop() -> None:
    w, s = _fp8(_gen(7), I_FP8, H_FP8)
    got = dequantize_block_fp8(w, s, dtype=torch.float32)
    wf = w.float()
    for n in range(I_FP8):
        for k in range(0, H_FP8, 37):
            assert got[n, k].item() == (wf[n, k] * s[n // 128, k // 128]).item()  # both float32
    assert dequantize_block_fp8(w, s).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"scale_inv must have shape \[2, 2\] for weight \[136, 200\], got \[1, 2\]"):
        dequantize_block_fp8(w, s[:1])
    with pytest.raises(TypeError, match="weight must be float8_e4m3fn, got torch.float32"):
        dequantize_block_fp8(wf, s)


# ---- stacked expert tensors, other prefixes, everything accounted for ------------------------


def _stacked(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert gate [E, I, H], up [E, I, H], down [E, H, I] to store in the various layouts."""
    return _rand(g, EXPERTS, INTER, HIDDEN), _rand(g, EXPERTS, INTER, HIDDEN), _rand(g, EXPERTS, HIDDEN, INTER)


LAYOUTS = {
    # transformers' own layout: [E, 2I, H] gate rows first, [E, H, I]
    "fused": lambda gate, up, down: {
        "mlp.experts.gate_up_proj": torch.cat([gate, up], 1),
        "mlp.experts.down_proj": down,
    },
    # Qwen3-VL-MoE: both transposed
    "fused-t": lambda gate, up, down: {
        "mlp.experts.gate_up_proj": torch.cat([gate, up], 1).transpose(1, 2).contiguous(),
        "mlp.experts.down_proj": down.transpose(1, 2).contiguous(),
    },
    # gpt-oss: transposed, gate and up columns alternating
    "gpt-oss": lambda gate, up, down: {
        "mlp.experts.gate_up_proj": torch.stack([gate, up], 2)
        .reshape(EXPERTS, 2 * INTER, HIDDEN)
        .transpose(1, 2)
        .contiguous(),
        "mlp.experts.down_proj": down.transpose(1, 2).contiguous(),
    },
    # DBRX: experts concatenated along the rows, w2 holding down transposed
    "dbrx": lambda gate, up, down: {
        "ffn.experts.mlp.w1": gate.reshape(EXPERTS * INTER, HIDDEN),
        "ffn.experts.mlp.v1": up.reshape(EXPERTS * INTER, HIDDEN),
        "ffn.experts.mlp.w2": down.transpose(1, 2).reshape(EXPERTS * INTER, HIDDEN),
    },
    "granite": lambda gate, up, down: {
        "block_sparse_moe.input_linear.weight": torch.cat([gate, up], 1),
        "block_sparse_moe.output_linear.weight": down,
    },
}
ROUTERS = {
    "fused": "mlp.gate.weight",
    "fused-t": "mlp.gate.weight",
    "gpt-oss": "mlp.router.weight",
    "dbrx": "ffn.router.layer.weight",
    "granite": "block_sparse_moe.router.layer.weight",
}
ROOTS = {
    "fused": "model.layers.1.",
    "fused-t": "model.language_model.layers.1.",
    "gpt-oss": "layers.1.",
    "dbrx": "transformer.blocks.1.",
    "granite": "model.layers.1.",
}


@pytest.mark.parametrize("naming", sorted(LAYOUTS))
def test_stacked_layouts_read_as_per_expert_weights(tmp_path: Path, naming: str, recorder: Recorder) -> None:
    g = _gen(5)
    gate, up, down = _stacked(g)
    root = ROOTS[naming]
    t = {root + k: v for k, v in LAYOUTS[naming](gate, up, down).items()}
    t[root + ROUTERS[naming]] = _rand(g, EXPERTS, HIDDEN)
    t[root + "self_attn.q_proj.weight"] = _rand(g, HIDDEN, HIDDEN)
    got = read_moe_layer(write_checkpoint(tmp_path / naming, t, sharded=False), 1, [6, 1])
    assert got.naming == naming and got.experts == (6, 1)
    for e in (6, 1):
        assert _same(got.gate_proj[e], gate[e]) and _same(got.up_proj[e], up[e]) and _same(got.down_proj[e], down[e])
    assert _same(got.router_weight, t[root + ROUTERS[naming]])
    # only the two experts' rows of each stacked tensor were read
    assert {(a, b) for _, a, b in recorder.rows} <= {(6, 7), (1, 2), (6 * INTER, 7 * INTER), (INTER, 2 * INTER)}


def test_orientation_told_apart_by_shape_and_refused_when_ambiguous(tmp_path: Path) -> None:
    g = _gen(6)
    gate, up, down = _stacked(g)
    t = {"model.layers.1." + k: v for k, v in LAYOUTS["fused-t"](gate, up, down).items()}
    t["model.layers.1.mlp.gate.weight"] = _rand(g, EXPERTS, HIDDEN)
    keys = t.keys()
    with pytest.raises(ValueError, match="matches several namings .*'fused' under 'model.layers.1.'"):
        detect_naming(keys, 1)
    assert read_moe_layer(write_checkpoint(tmp_path / "t", t, sharded=False), 1, [0]).naming == "fused-t"
    square = {
        "model.layers.1.mlp.experts.gate_up_proj": _rand(g, EXPERTS, 2 * HIDDEN, HIDDEN),
        "model.layers.1.mlp.experts.down_proj": _rand(g, EXPERTS, HIDDEN, HIDDEN),
        "model.layers.1.mlp.gate.weight": _rand(g, EXPERTS, HIDDEN),
    }
    path = write_checkpoint(tmp_path / "sq", square, sharded=False)
    with pytest.raises(ValueError, match="matches several namings .*; pass naming="):
        read_moe_layer(path, 1, [0])
    assert read_moe_layer(path, 1, [0], naming="fused").down_proj[0].shape == (HIDDEN, HIDDEN)


def test_stacked_tensor_of_the_wrong_shape_names_it(tmp_path: Path) -> None:
    g = _gen(7)
    gate, up, down = _stacked(g)
    t = {"model.layers.1." + k: v for k, v in LAYOUTS["granite"](gate, up, down).items()}
    t["model.layers.1.block_sparse_moe.input_linear.weight"] = _rand(g, EXPERTS, 2 * INTER + 2, HIDDEN)
    t["model.layers.1.block_sparse_moe.router.layer.weight"] = _rand(g, EXPERTS, HIDDEN)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.block_sparse_moe\.input_linear\.weight' \(out_in\) holds"
        r" \[26, 16\] per expert; expected \[24, 16\]",
    ):
        read_moe_layer(write_checkpoint(tmp_path / "g", t, sharded=False), 1, [0])


def test_per_expert_weight_of_the_wrong_shape_names_it(tmp_path: Path) -> None:
    t = mixtral_tensors()
    t["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = _rand(_gen(8), HIDDEN, INTER + 1, dtype=torch.float16)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight' \(expert 3"
        r" down_proj\) must have shape \[16, 12\], got \[16, 13\]",
    ):
        read_moe_layer(write_checkpoint(tmp_path / "m", t, sharded=False), 1, [3])


def test_expert_biases_refused_unless_asked_for(tmp_path: Path) -> None:
    g = _gen(9)
    gate, up, down = _stacked(g)
    t = {"layers.1." + k: v for k, v in LAYOUTS["gpt-oss"](gate, up, down).items()}
    t["layers.1.mlp.router.weight"] = _rand(g, EXPERTS, HIDDEN)
    bias_gate, bias_up = _rand(g, EXPERTS, INTER), _rand(g, EXPERTS, INTER)
    t["layers.1.mlp.experts.gate_up_proj_bias"] = torch.stack([bias_gate, bias_up], 2).reshape(EXPERTS, 2 * INTER)
    t["layers.1.mlp.experts.down_proj_bias"] = _rand(g, EXPERTS, HIDDEN)
    path = write_checkpoint(tmp_path / "o", t, sharded=False)
    with pytest.raises(ValueError, match="has expert biases \\('layers.1.mlp.experts.gate_up_proj_bias'\\)"):
        read_moe_layer(path, 1, [2])
    got = read_moe_layer(path, 1, [2], expert_biases=True)
    assert got.gate_proj_bias is not None and got.up_proj_bias is not None and got.down_proj_bias is not None
    assert _same(got.gate_proj_bias[2], bias_gate[2]) and _same(got.up_proj_bias[2], bias_up[2])
    assert _same(got.down_proj_bias[2], t["layers.1.mlp.experts.down_proj_bias"][2])


def test_router_extras_refused_unless_asked_for(tmp_path: Path) -> None:
    g = _gen(10)
    gate, up, down = _stacked(g)
    t = {"layers.1." + k: v for k, v in LAYOUTS["gpt-oss"](gate, up, down).items()}
    t["layers.1.mlp.router.weight"] = _rand(g, EXPERTS, HIDDEN)
    t["layers.1.mlp.router.bias"] = _rand(g, EXPERTS)
    path = write_checkpoint(tmp_path / "o", t, sharded=False)
    with pytest.raises(ValueError, match="has a router bias 'layers.1.mlp.router.bias' that this load would drop"):
        read_moe_layer(path, 1, [0])
    got = read_moe_layer(path, 1, [0], router_extras=True)
    assert set(got.router_extras) == {"bias"} and _same(got.router_extras["bias"], t["layers.1.mlp.router.bias"])


def test_anything_else_in_the_moe_block_is_refused_by_key(tmp_path: Path) -> None:
    """JetMoE's output bias, A.X-K1-like norms inside the block, another quantization's scales: a
    tensor we would not load must stop the load, not vanish."""
    t = deepseek_tensors()
    t["model.layers.1.mlp.experts.0.gate_proj.input_scale"] = torch.ones(1)
    path = write_checkpoint(tmp_path / "ds", t, sharded=False)
    with pytest.raises(
        ValueError,
        match="has 'model.layers.1.mlp.experts.0.gate_proj.input_scale' in its MoE block"
        " 'model.layers.1.mlp.', which moe_kernels does not load",
    ):
        read_moe_layer(path, 1, [3])
    assert read_moe_layer(path, 2, [3]).experts == (3,)  # layer 2 has nothing extra


@pytest.mark.parametrize(
    ("bias_key", "shape"),
    [
        ("model.layers.1.mlp.moe_statics.e_score_correction_bias", (1, EXPERTS)),  # Ernie 4.5
        ("model.layers.1.mlp.gate.expert_bias", (EXPERTS,)),  # Param2MoE, Sarvam
        ("model.layers.1.mlp.expert_bias", (EXPERTS,)),  # AFMoE, HY-V3
        ("model.layers.1.mlp.experts.e_score_correction_bias", (EXPERTS,)),  # Laguna
        ("model.layers.1.moe.router.expert_bias", (EXPERTS,)),  # Kolibri
    ],
)
def test_correction_bias_under_each_familys_key(tmp_path: Path, bias_key: str, shape: tuple[int, ...]) -> None:
    t = {k: v for k, v in qwen2_tensors().items() if ".1." in k and "shared" not in k}
    t[bias_key] = _rand(_gen(11), *shape, dtype=torch.float32)
    got = read_moe_layer(write_checkpoint(tmp_path / "b", t, sharded=False), 1, [0])
    assert got.e_score_correction_bias is not None
    assert _same(got.e_score_correction_bias, t[bias_key].reshape(EXPERTS))


def test_two_correction_biases_are_refused(tmp_path: Path) -> None:
    t = deepseek_tensors()
    t["model.layers.1.mlp.expert_bias"] = torch.zeros(EXPERTS)
    with pytest.raises(ValueError, match="has several correction biass|has several correction bias"):
        read_moe_layer(write_checkpoint(tmp_path / "b", t, sharded=False), 1, [0])


def test_granite_shared_mlp_beside_the_block_is_split(tmp_path: Path) -> None:
    g = _gen(12)
    gate, up, down = _stacked(g)
    t = {"model.layers.1." + k: v for k, v in LAYOUTS["granite"](gate, up, down).items()}
    t["model.layers.1.block_sparse_moe.router.layer.weight"] = _rand(g, EXPERTS, HIDDEN)
    t["model.layers.1.shared_mlp.input_linear.weight"] = _rand(g, 2 * 20, HIDDEN)
    t["model.layers.1.shared_mlp.output_linear.weight"] = _rand(g, HIDDEN, 20)
    got = read_moe_layer(write_checkpoint(tmp_path / "g", t, sharded=False), 1, [0], shared=True)
    sh = got.shared
    assert sh is not None and sh.expert_gate is None
    assert _same(sh.gate_proj, t["model.layers.1.shared_mlp.input_linear.weight"][:20])
    assert _same(sh.up_proj, t["model.layers.1.shared_mlp.input_linear.weight"][20:])
    assert _same(sh.down_proj, t["model.layers.1.shared_mlp.output_linear.weight"])
