"""Read one MoE layer's weights from a Hugging Face style safetensors checkpoint.

A checkpoint is one ``*.safetensors`` file, or shards listed by ``model.safetensors.index.json``
(its ``weight_map`` maps each tensor key to a shard file). Two key namings are supported
(``L`` = layer index, ``E`` = global expert id):

``"mlp-experts"`` (DeepSeek-V2/V3, Qwen2/3-MoE)
    ``model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight``, router
    ``model.layers.L.mlp.gate.weight`` and, for DeepSeek-V3, the router bias
    ``model.layers.L.mlp.gate.e_score_correction_bias``. Shared experts are
    ``model.layers.L.mlp.shared_experts.*`` (DeepSeek) or ``model.layers.L.mlp.shared_expert.*``
    with the sigmoid gate ``model.layers.L.mlp.shared_expert_gate.weight`` (Qwen1.5/2-MoE).
``"mixtral"``
    ``model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (gate, up, down) and router
    ``model.layers.L.block_sparse_moe.gate.weight``.

FP8 checkpoints (DeepSeek-V3) store an expert weight ``[N, K]`` as float8_e4m3fn next to
``<key>_scale_inv [ceil(N/128), ceil(K/128)]`` float32; the real weight is the FP8 value times
the scale of its 128x128 block (:func:`dequantize_block_fp8`).

Reading is lazy: the index (or a single file's header) is parsed once, a shard's header is read
only when one of its tensors is described, and a shard is opened with ``safe_open`` only when
one of its tensors is read. An expert-parallel rank that asks for its own experts touches only
the shards that hold them. Checking shapes against a model config is the layer's job; this
module only checks that the checkpoint is consistent with itself.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar, cast

import torch
from safetensors import safe_open

__all__ = [
    "NAMINGS",
    "CheckpointReader",
    "MoELayer",
    "MoELayerInfo",
    "MoELayerTensors",
    "Naming",
    "SharedExpert",
    "TensorInfo",
    "dequantize_block_fp8",
    "describe_moe_layer",
    "detect_naming",
    "read_moe_layer",
]

Naming = Literal["mlp-experts", "mixtral"]
NAMINGS: tuple[Naming, ...] = ("mlp-experts", "mixtral")

INDEX_NAME = "model.safetensors.index.json"
FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"

# safetensors header dtype names -> torch dtypes. A name missing here is refused with its name.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_EXPERT_DTYPES = (*_FLOATS, torch.float8_e4m3fn)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class _NamingSpec:
    """Key templates of one naming; ``{layer}``, ``{expert}`` and ``{proj}`` are filled in."""

    experts_prefix: str
    expert_weight: str
    projections: tuple[str, str, str]  # the checkpoint's names for gate, up, down
    router: str
    router_bias: str | None
    # (weight template, sigmoid-gate key or None), tried in order
    shared: tuple[tuple[str, str | None], ...]


_SPECS: dict[str, _NamingSpec] = {
    "mlp-experts": _NamingSpec(
        experts_prefix="model.layers.{layer}.mlp.experts.",
        expert_weight="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        projections=("gate_proj", "up_proj", "down_proj"),
        router="model.layers.{layer}.mlp.gate.weight",
        router_bias="model.layers.{layer}.mlp.gate.e_score_correction_bias",
        shared=(
            ("model.layers.{layer}.mlp.shared_experts.{proj}.weight", None),
            (
                "model.layers.{layer}.mlp.shared_expert.{proj}.weight",
                "model.layers.{layer}.mlp.shared_expert_gate.weight",
            ),
        ),
    ),
    "mixtral": _NamingSpec(
        experts_prefix="model.layers.{layer}.block_sparse_moe.experts.",
        expert_weight="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
        projections=("w1", "w3", "w2"),
        router="model.layers.{layer}.block_sparse_moe.gate.weight",
        router_bias=None,
        shared=(),
    ),
}

_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor, read without its data.

    ``shape`` is the stored shape, ``dtype`` the stored torch dtype, ``file`` the shard holding it.
    """

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


V = TypeVar("V")


@dataclass(frozen=True)
class SharedExpert(Generic[V]):
    """A layer's shared expert(s), run on every token; ``V`` is a tensor or its :class:`TensorInfo`.

    ``gate_proj``/``up_proj [I_s, H]``, ``down_proj [H, I_s]`` (DeepSeek concatenates its shared
    experts into one of width ``I_s``). The ``*_scale`` entries are the FP8 block scales
    ``[ceil(N/128), ceil(K/128)]`` float32, present exactly when the weights are float8_e4m3fn.
    ``expert_gate [1, H]`` is Qwen1.5/2-MoE's sigmoid gate on the shared output, else ``None``.
    """

    gate_proj: V
    up_proj: V
    down_proj: V
    gate_proj_scale: V | None = None
    up_proj_scale: V | None = None
    down_proj_scale: V | None = None
    expert_gate: V | None = None


@dataclass(frozen=True)
class MoELayer(Generic[V]):
    """One MoE layer's weights as stored; ``V`` is a tensor (:class:`MoELayerTensors`) or its
    :class:`TensorInfo` (:class:`MoELayerInfo`).

    ``gate_proj``/``up_proj`` map each requested global expert id to ``[I, H]``, ``down_proj`` to
    ``[H, I]``, in the checkpoint's dtype (bfloat16, float16, float32, or float8_e4m3fn). The
    ``*_scale`` maps are the FP8 block scales ``[ceil(N/128), ceil(K/128)]`` (``None`` for a
    non-FP8 checkpoint). ``router_weight [E_total, H]``; ``e_score_correction_bias [E_total]``
    (DeepSeek-V3, else ``None``); ``shared`` when asked for.
    """

    layer: int
    naming: Naming
    gate_proj: dict[int, V]
    up_proj: dict[int, V]
    down_proj: dict[int, V]
    router_weight: V
    gate_proj_scale: dict[int, V] | None = None
    up_proj_scale: dict[int, V] | None = None
    down_proj_scale: dict[int, V] | None = None
    e_score_correction_bias: V | None = None
    shared: SharedExpert[V] | None = None

    @property
    def experts(self) -> tuple[int, ...]:
        """The global expert ids held, in the order they were asked for."""
        return tuple(self.gate_proj)

    @property
    def is_fp8(self) -> bool:
        """Whether the routed experts are float8_e4m3fn with block scales."""
        return self.gate_proj_scale is not None


@dataclass(frozen=True)
class MoELayerTensors(MoELayer[torch.Tensor]):
    """One MoE layer's tensors (see :class:`MoELayer` for the fields' shapes and dtypes)."""


@dataclass(frozen=True)
class MoELayerInfo(MoELayer[TensorInfo]):
    """Shapes, dtypes and files of one MoE layer's tensors, from the headers alone."""


def _read_header(file: Path) -> dict[str, dict[str, object]]:
    """The tensor entries of a safetensors header: ``key -> {"dtype", "shape", "data_offsets"}``."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"{file} is not a safetensors file: it has {size} bytes, fewer than the 8-byte header length"
            )
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise ValueError(
                f"{file} is not a safetensors file: its header length {length} exceeds the {size - 8} bytes after it"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not a safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file: its header is a {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    return header


def _format_ids(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2, 5, 7..8"``."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint.

    ``path`` is a directory holding ``model.safetensors.index.json`` (or another single
    ``*.safetensors.index.json``) or exactly one ``*.safetensors`` file, an index file, or one
    ``*.safetensors`` file. Nothing but the index (or the single file's header) is read here.
    One reader can serve many layers; it caches the shard headers it has read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint path {p} does not exist")
        if p.is_dir():
            indexes = sorted(p.glob("*.safetensors.index.json"))
            if (p / INDEX_NAME).is_file():
                indexes = [p / INDEX_NAME]
            files = sorted(p.glob("*.safetensors"))
            if len(indexes) > 1:
                names = ", ".join(i.name for i in indexes)
                raise ValueError(f"{p} holds several index files ({names}) and none is named {INDEX_NAME}; pass one")
            if indexes:
                index_file: Path | None = indexes[0]
            elif len(files) == 1:
                index_file = None
                p = files[0]
            elif not files:
                raise FileNotFoundError(f"{p} holds no *.safetensors file and no {INDEX_NAME}")
            else:
                raise ValueError(
                    f"{p} holds {len(files)} *.safetensors files but no {INDEX_NAME} saying which holds which tensor"
                )
        else:
            index_file = p if p.name.endswith(".index.json") else None
        self.path: Path = p
        self._index_file = index_file
        self._weight_map: dict[str, str] | None = None
        self._headers: dict[Path, dict[str, dict[str, object]]] = {}
        self._keys: frozenset[str] | None = None
        self._by_layer: dict[int, list[str]] | None = None
        if index_file is not None:
            self._weight_map = self._load_index(index_file)

    @staticmethod
    def _load_index(index_file: Path) -> dict[str, str]:
        try:
            data = json.loads(index_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{index_file} is not valid JSON ({exc})") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_file} must hold a 'weight_map' object mapping tensor keys to shard file names")
        return weight_map

    @property
    def keys(self) -> frozenset[str]:
        """Every tensor key in the checkpoint (from the index, or the single file's header)."""
        if self._keys is None:
            self._keys = frozenset(self._header(self.path) if self._weight_map is None else self._weight_map)
        return self._keys

    def layers(self) -> list[int]:
        """The layer indices that appear as ``model.layers.N.`` in the keys, ascending."""
        return sorted(self._layer_index())

    def layer_keys(self, layer: int) -> list[str]:
        """The keys under ``model.layers.{layer}.``, sorted; empty when the layer is absent."""
        return self._layer_index().get(layer, [])

    def _layer_index(self) -> dict[int, list[str]]:
        if self._by_layer is None:
            self._by_layer = _group_by_layer(self.keys)
        return self._by_layer

    def file_of(self, key: str) -> Path:
        """The shard that holds ``key``; a missing shard is a ``FileNotFoundError`` here."""
        if self._weight_map is None:
            if key not in self._header(self.path):
                raise ValueError(f"{self.path} has no tensor '{key}'")
            return self.path
        assert self._index_file is not None
        shard = self._weight_map.get(key)
        if shard is None:
            raise ValueError(f"{self._index_file} lists no tensor '{key}'")
        file = self._index_file.parent / shard
        if not file.is_file():
            raise FileNotFoundError(
                f"{self._index_file} maps '{key}' to shard '{shard}', which does not exist in {self._index_file.parent}"
            )
        return file

    def _header(self, file: Path) -> dict[str, dict[str, object]]:
        header = self._headers.get(file)
        if header is None:
            header = self._headers[file] = _read_header(file)
        return header

    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of ``key`` from its shard's header; reads no tensor data."""
        file = self.file_of(key)
        entry = self._header(file).get(key)
        if entry is None:
            raise ValueError(f"{self._index_file} maps '{key}' to {file.name}, but that file has no such tensor")
        name = entry.get("dtype")
        dtype = _ST_DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise TypeError(f"{file}: tensor '{key}' has dtype {name!r}, which moe_kernels cannot take")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{file}: tensor '{key}' has a malformed shape {shape!r} in its header")
        return TensorInfo(key=key, file=file, shape=tuple(shape), dtype=dtype)

    def read(self, keys: Iterable[str], device: torch.device | str | int | None = None) -> dict[str, torch.Tensor]:
        """Read exactly ``keys``, opening each shard that holds one of them once.

        Tensors keep their stored shape and dtype and land on ``device`` (CPU when ``None``).
        """
        by_file: dict[Path, list[str]] = {}
        for key in dict.fromkeys(keys):
            by_file.setdefault(self.file_of(key), []).append(key)
        target = torch.device("cpu") if device is None else torch.device(device)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            # Read on the CPU, then move: one code path for any torch device.
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in file_keys:
                    out[key] = f.get_tensor(key).to(target)
        return out


def _group_by_layer(keys: Iterable[str]) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for key in keys:
        m = _LAYER_RE.match(key)
        if m is not None:
            by_layer.setdefault(int(m.group(1)), []).append(key)
    for layer_keys in by_layer.values():
        layer_keys.sort()
    return by_layer


def _check_layer(layer: object) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return layer


def _detect(layer_keys: Sequence[str], layers: Iterable[int], layer: int, naming: str, where: str) -> Naming:
    """The naming of ``layer`` given its keys; the shared body of :func:`detect_naming`."""
    if not isinstance(naming, str):
        raise TypeError(f"naming must be a str, got {type(naming).__name__}")
    if naming != "auto" and naming not in _SPECS:
        raise ValueError(f"naming must be one of 'auto', {', '.join(repr(n) for n in NAMINGS)}; got {naming!r}")
    if not layer_keys:
        present = sorted(layers)
        if present:
            raise ValueError(f"layer {layer} not found in {where}; the checkpoint has layers {_format_ids(present)}")
        raise ValueError(f"layer {layer} not found in {where}; it has no 'model.layers.N.' keys")
    matches = [
        n for n in NAMINGS if any(k.startswith(_SPECS[n].experts_prefix.format(layer=layer)) for k in layer_keys)
    ]
    seen = ", ".join(layer_keys[:6]) + (", ..." if len(layer_keys) > 6 else "")
    if naming == "auto":
        if len(matches) == 1:
            return matches[0]
        if not matches:
            tried = "; ".join(f"{n} ('{_SPECS[n].experts_prefix.format(layer=layer)}*')" for n in NAMINGS)
            raise ValueError(f"layer {layer} of {where} matches no MoE naming; tried {tried}; its keys include {seen}")
        raise ValueError(f"layer {layer} of {where} has experts under several namings ({', '.join(matches)}); pass one")
    if naming not in matches:
        prefix = _SPECS[naming].experts_prefix.format(layer=layer)
        hint = f"; naming='auto' would pick {matches[0]!r}" if len(matches) == 1 else ""
        raise ValueError(
            f"layer {layer} of {where} has no '{prefix}*' keys for naming {naming!r}; its keys include {seen}{hint}"
        )
    return cast(Naming, naming)  # one of NAMINGS: checked above


def detect_naming(keys: Iterable[str], layer: int, naming: str = "auto") -> Naming:
    """The naming (one of :data:`NAMINGS`) under which ``layer``'s experts appear in ``keys``.

    With ``naming="auto"`` it is found from the keys; an explicit naming is checked against them.
    A ``ValueError`` says which namings were tried and shows some keys under the layer, or which
    layers exist when ``layer`` does not.
    """
    layer = _check_layer(layer)
    by_layer = _group_by_layer(keys)
    return _detect(by_layer.get(layer, []), by_layer, layer, naming, "the keys given")


def _check_experts(experts: Sequence[int]) -> tuple[int, ...]:
    ids = tuple(experts)
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, int):
            raise TypeError(f"experts must be ints, got {type(e).__name__} ({e!r})")
        if e < 0:
            raise ValueError(f"experts must be >= 0, got {e}")
    if not ids:
        raise ValueError("experts must name at least one expert, got none")
    if len(set(ids)) != len(ids):
        twice = [e for e, n in Counter(ids).items() if n > 1]
        raise ValueError(f"experts must be distinct, got {_format_ids(twice)} more than once")
    return ids


def _expert_ids(layer_keys: Iterable[str], prefix: str) -> set[int]:
    """The expert ids that appear as ``{prefix}E.`` in ``layer_keys``."""
    ids: set[int] = set()
    for key in layer_keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                ids.add(int(head))
    return ids


def _check_dtype(info: TensorInfo, allowed: tuple[torch.dtype, ...], what: str) -> None:
    if info.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        dtype = str(info.dtype).removeprefix("torch.")
        raise TypeError(f"{info.file}: tensor '{info.key}' ({what}) has dtype {dtype}; expected one of {names}")


def _check_weight_and_scale(weight: TensorInfo, scale: TensorInfo | None) -> None:
    """An expert weight is a float, or float8_e4m3fn with block scales that cover it exactly."""
    _check_dtype(weight, _EXPERT_DTYPES, "expert weight")
    fp8 = weight.dtype == torch.float8_e4m3fn
    if scale is None:
        if fp8:
            raise TypeError(
                f"{weight.file}: tensor '{weight.key}' is float8_e4m3fn but '{weight.key}{SCALE_SUFFIX}' is absent;"
                f" FP8 expert weights need their {FP8_BLOCK}x{FP8_BLOCK} block scales"
            )
        return
    if not fp8:
        dtype = str(weight.dtype).removeprefix("torch.")
        raise TypeError(
            f"{scale.file}: '{scale.key}' is present but '{weight.key}' is {dtype};"
            " block scales go with float8_e4m3fn weights"
        )
    _check_dtype(scale, _FLOATS, "FP8 block scale")
    if len(weight.shape) != 2:
        raise ValueError(f"{weight.file}: FP8 tensor '{weight.key}' must be 2-D, got shape {list(weight.shape)}")
    expected = tuple(math.ceil(d / FP8_BLOCK) for d in weight.shape)
    if scale.shape != expected:
        raise ValueError(
            f"{scale.file}: '{scale.key}' must have shape {list(expected)} (one scale per {FP8_BLOCK}x{FP8_BLOCK}"
            f" block of {list(weight.shape)}), got {list(scale.shape)}"
        )


def _describe_shared(reader: CheckpointReader, spec: _NamingSpec, naming: str, layer: int) -> SharedExpert[TensorInfo]:
    keys = reader.keys
    if not spec.shared:
        raise ValueError(f"naming {naming!r} has no shared experts; {reader.path} layer {layer} cannot have them")
    for template, gate_key in spec.shared:
        weight_keys = [template.format(layer=layer, proj=p) for p in spec.projections]
        if not any(k in keys for k in weight_keys):
            continue
        for k in weight_keys:
            if k not in keys:
                raise ValueError(f"layer {layer} of {reader.path} has a partial shared expert: no key '{k}'")
        infos = [reader.info(k) for k in weight_keys]
        has_scale = [k + SCALE_SUFFIX in keys for k in weight_keys]
        scales = [reader.info(k + SCALE_SUFFIX) if s else None for k, s in zip(weight_keys, has_scale, strict=True)]
        if any(has_scale) and not all(has_scale):
            missing = next(k for k, s in zip(weight_keys, has_scale, strict=True) if not s)
            raise ValueError(
                f"layer {layer} of {reader.path}: the shared expert has {SCALE_SUFFIX} scales for some projections"
                f" but not others; no key '{missing}{SCALE_SUFFIX}'"
            )
        for w, s in zip(infos, scales, strict=True):
            _check_weight_and_scale(w, s)
        expert_gate = None
        if gate_key is not None:
            gk = gate_key.format(layer=layer)
            if gk not in keys:
                raise ValueError(f"layer {layer} of {reader.path} has a shared expert but no sigmoid gate '{gk}'")
            expert_gate = reader.info(gk)
            _check_dtype(expert_gate, _FLOATS, "shared expert gate")
        return SharedExpert(*infos, *scales, expert_gate=expert_gate)
    tried = " or ".join(f"'{t.format(layer=layer, proj=spec.projections[0])}'" for t, _ in spec.shared)
    raise ValueError(f"layer {layer} of {reader.path} has no shared expert: no key {tried}")


def _as_reader(path: str | os.PathLike[str] | CheckpointReader) -> CheckpointReader:
    return path if isinstance(path, CheckpointReader) else CheckpointReader(path)


def describe_moe_layer(
    path: str | os.PathLike[str] | CheckpointReader,
    layer: int,
    experts: Sequence[int],
    *,
    naming: str = "auto",
    shared: bool = False,
) -> MoELayerInfo:
    """Shapes, dtypes and files of what :func:`read_moe_layer` would read, from headers only.

    Runs every check :func:`read_moe_layer` runs (layer and experts present, scales for all
    experts or none, dtypes we can take) and reads no tensor data.
    """
    reader = _as_reader(path)
    layer = _check_layer(layer)
    ids = _check_experts(experts)
    where = str(reader.path)
    name = _detect(reader.layer_keys(layer), reader.layers(), layer, naming, where)
    spec = _SPECS[name]
    keys = reader.keys

    weight_keys: dict[str, dict[int, str]] = {role: {} for role in _ROLES}
    for e in ids:
        for role, proj in zip(_ROLES, spec.projections, strict=True):
            key = spec.expert_weight.format(layer=layer, expert=e, proj=proj)
            if key not in keys:
                present = _expert_ids(reader.layer_keys(layer), spec.experts_prefix.format(layer=layer))
                has = f"; layer {layer} has experts {_format_ids(present)}" if present else ""
                raise ValueError(f"expert {e} of layer {layer} is missing from {where}: no key '{key}'{has}")
            weight_keys[role][e] = key

    scaled = {(role, e): k + SCALE_SUFFIX in keys for role in _ROLES for e, k in weight_keys[role].items()}
    if any(scaled.values()) and not all(scaled.values()):
        with_scale = {e for (_, e), s in scaled.items() if s}
        role, e = next(role_expert for role_expert, s in scaled.items() if not s)
        raise ValueError(
            f"layer {layer} of {where}: {SCALE_SUFFIX} scales are present for experts {_format_ids(with_scale)} but"
            f" not for all requested experts; no key '{weight_keys[role][e]}{SCALE_SUFFIX}' (expert {e})"
        )
    fp8 = any(scaled.values())
    weights = {role: {e: reader.info(k) for e, k in weight_keys[role].items()} for role in _ROLES}
    scales = (
        {role: {e: reader.info(k + SCALE_SUFFIX) for e, k in weight_keys[role].items()} for role in _ROLES}
        if fp8
        else None
    )
    for role in _ROLES:
        for e in ids:
            _check_weight_and_scale(weights[role][e], None if scales is None else scales[role][e])

    router_key = spec.router.format(layer=layer)
    if router_key not in keys:
        raise ValueError(f"layer {layer} of {where} has experts but no router weight '{router_key}'")
    router = reader.info(router_key)
    _check_dtype(router, _FLOATS, "router weight")

    bias = None
    if spec.router_bias is not None and (bias_key := spec.router_bias.format(layer=layer)) in keys:
        bias = reader.info(bias_key)
        _check_dtype(bias, _FLOATS, "router bias")

    return MoELayerInfo(
        layer=layer,
        naming=name,
        gate_proj=weights["gate_proj"],
        up_proj=weights["up_proj"],
        down_proj=weights["down_proj"],
        router_weight=router,
        gate_proj_scale=None if scales is None else scales["gate_proj"],
        up_proj_scale=None if scales is None else scales["up_proj"],
        down_proj_scale=None if scales is None else scales["down_proj"],
        e_score_correction_bias=bias,
        shared=_describe_shared(reader, spec, name, layer) if shared else None,
    )


def read_moe_layer(
    path: str | os.PathLike[str] | CheckpointReader,
    layer: int,
    experts: Sequence[int],
    *,
    naming: str = "auto",
    shared: bool = False,
    device: torch.device | str | int | None = None,
) -> MoELayerTensors:
    """Read ``layer``'s router and the routed experts ``experts`` (global ids) from a checkpoint.

    Only the requested experts' tensors are read (an expert-parallel rank passes its own
    experts), plus the router, the DeepSeek-V3 router bias when present, and the shared expert
    when ``shared``. Tensors keep the stored dtype (FP8 weights stay float8_e4m3fn, with their
    ``*_scale`` block scales) and land on ``device`` (CPU when ``None``). Checks and errors are
    those of :func:`describe_moe_layer`, all raised before any data is read.
    """
    reader = _as_reader(path)
    info = describe_moe_layer(reader, layer, experts, naming=naming, shared=shared)
    got = reader.read([t.key for t in _infos(info)], device=device)

    def one(t: TensorInfo | None) -> torch.Tensor | None:
        return None if t is None else got[t.key]

    def each(d: Mapping[int, TensorInfo]) -> dict[int, torch.Tensor]:
        return {e: got[t.key] for e, t in d.items()}

    def each_or_none(d: Mapping[int, TensorInfo] | None) -> dict[int, torch.Tensor] | None:
        return None if d is None else each(d)

    sh = info.shared
    return MoELayerTensors(
        layer=info.layer,
        naming=info.naming,
        gate_proj=each(info.gate_proj),
        up_proj=each(info.up_proj),
        down_proj=each(info.down_proj),
        router_weight=got[info.router_weight.key],
        gate_proj_scale=each_or_none(info.gate_proj_scale),
        up_proj_scale=each_or_none(info.up_proj_scale),
        down_proj_scale=each_or_none(info.down_proj_scale),
        e_score_correction_bias=one(info.e_score_correction_bias),
        shared=None
        if sh is None
        else SharedExpert(
            got[sh.gate_proj.key],
            got[sh.up_proj.key],
            got[sh.down_proj.key],
            one(sh.gate_proj_scale),
            one(sh.up_proj_scale),
            one(sh.down_proj_scale),
            one(sh.expert_gate),
        ),
    )


def _infos(info: MoELayerInfo) -> list[TensorInfo]:
    """Every tensor of a described layer, routed experts first (grouped by shard on reading)."""
    out: list[TensorInfo] = []
    for d in (
        info.gate_proj,
        info.up_proj,
        info.down_proj,
        info.gate_proj_scale,
        info.up_proj_scale,
        info.down_proj_scale,
    ):
        if d is not None:
            out.extend(d.values())
    out.append(info.router_weight)
    if info.e_score_correction_bias is not None:
        out.append(info.e_score_correction_bias)
    if info.shared is not None:
        sh = info.shared
        parts = (sh.gate_proj, sh.up_proj, sh.down_proj, sh.gate_proj_scale, sh.up_proj_scale, sh.down_proj_scale)
        out.extend(t for t in (*parts, sh.expert_gate) if t is not None)
    return out


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Undo DeepSeek-V3's block quantization: ``weight [N, K]`` float8_e4m3fn times the scale of
    its 128x128 block, ``scale_inv [ceil(N/128), ceil(K/128)]`` (float32), computed in float32 and
    returned as ``[N, K]`` ``dtype``."""
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    n, k = weight.shape
    expected = [math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)]
    if list(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv must have shape {expected} for weight {[n, k]}, got {list(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    return (weight.float() * scale).to(dtype)
