"""Read one MoE layer's weights from a Hugging Face style safetensors checkpoint.

A checkpoint is one ``*.safetensors`` file, or shards listed by ``model.safetensors.index.json``
(its ``weight_map`` maps each tensor key to a shard file). Where a family keeps each tensor is
data: :data:`moe_kernels.model.naming.NAMINGS` (one per-expert ``experts.E.gate_proj.weight``
naming, Mixtral's ``w1/w3/w2``, stacked 3-D ``experts.gate_up_proj`` in either orientation,
DBRX's ``[E*I, H]``, gpt-oss's interleaved gate/up, ...), under any layer prefix
(``model.layers.N.``, ``model.language_model.layers.N.``, ``backbone.layers.N.``,
``transformer.blocks.N.``, ...), which is found from the keys.

Whatever the stored form, a layer is returned in our canonical layout: per expert ``gate [I, H]``,
``up [I, H]``, ``down [H, I]`` (``nn.Linear`` layout), router ``[E, H]``, correction bias ``[E]``.
FP8 checkpoints (DeepSeek-V3) store an expert weight ``[N, K]`` as float8_e4m3fn next to
``<key>_scale_inv [ceil(N/128), ceil(K/128)]`` float32 (:func:`dequantize_block_fp8`).

Reading is lazy: shapes and dtypes come from ``safe_open(...).get_slice(key)`` without reading data,
and an expert-parallel rank reads only its own experts, for a stacked tensor only its rows
(``get_slice(key)[e]``). Nothing is dropped silently: a key the naming expects but the file lacks,
a tensor of the wrong shape, and any tensor under the layer's MoE block that we would not load
(an expert bias, a router bias, a norm) is an error naming the key.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch
from safetensors import safe_open

from moe_kernels.model.naming import NAMINGS, Fused, LayerNaming, PerExpert, SharedNaming, Stacked

__all__ = [
    "NAMINGS",
    "CheckpointReader",
    "Cut",
    "MoELayer",
    "MoELayerInfo",
    "naming_fits",
    "MoELayerTensors",
    "SharedExpert",
    "TensorInfo",
    "dequantize_block_fp8",
    "describe_moe_layer",
    "detect_naming",
    "read_moe_layer",
    "slice_intermediate",
]

INDEX_NAME = "model.safetensors.index.json"
FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_EXPERT_DTYPES = (*_FLOATS, torch.float8_e4m3fn)
_INTS = (torch.int64, torch.int32)

# the layer root of a key: whatever precedes "layers.N." or "blocks.N." (the first such pair)
_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|blocks)\.)(\d+)\.")

_ROLES = ("gate_proj", "up_proj", "down_proj")


#: which rows of a fused gate|up tensor a projection takes: ``first``/``second`` half
#: (concatenated) or the ``even``/``odd`` rows (interleaved)
Half = Literal["first", "second", "even", "odd"]


def _gate_up_halves(interleaved: bool) -> tuple[Half, Half]:
    """The gate's and the up projection's rows of a fused gate|up tensor."""
    return ("even", "odd") if interleaved else ("first", "second")


@dataclass(frozen=True)
class Cut:
    """How to get a canonical tensor out of a stored one, applied in this order: keep rows
    ``rows`` of the first axis (``squeeze``: a single index of a 3-D stack, dropped), ``transpose``
    the 2-D result, keep one ``half`` of its rows (``first``/``second``: concatenated gate|up,
    ``even``/``odd``: interleaved), ``flatten`` to 1-D. The default reads the whole tensor as stored."""

    rows: tuple[int, int] | None = None
    squeeze: bool = False
    #: keep columns ``[a, b)`` of a 2-D stored tensor (a tensor-parallel slice), read from disk
    cols: tuple[int, int] | None = None
    transpose: bool = False
    half: Half | None = None
    flatten: bool = False


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as it will be read: its stored ``key`` and ``file``, the ``cut`` taken from it, and
    the ``shape`` and ``dtype`` of the result. Read from the file's header, without its data."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    cut: Cut = Cut()


V = TypeVar("V")


@dataclass(frozen=True)
class SharedExpert(Generic[V]):
    """A layer's shared expert(s) as one MLP, run on every token; ``V`` is a tensor or its :class:`TensorInfo`.

    ``gate_proj``/``up_proj [S, H]``, ``down_proj [H, S]`` (DeepSeek concatenates its shared experts
    into one of width ``S``; a fused ``gate_up [2S, H]`` is split). The ``*_scale`` entries are the FP8
    block scales ``[ceil(N/128), ceil(K/128)]`` float32, present exactly when the weights are
    float8_e4m3fn. ``expert_gate [1, H]`` is Qwen2-MoE's sigmoid gate on the shared output, else ``None``.
    """

    gate_proj: V | None  # None: a non-gated MLP (Nemotron-H's relu2), whose GEMM1 is up_proj alone
    up_proj: V
    down_proj: V
    gate_proj_scale: V | None = None
    up_proj_scale: V | None = None
    down_proj_scale: V | None = None
    expert_gate: V | None = None


@dataclass(frozen=True)
class MoELayer(Generic[V]):
    """One MoE layer's weights in the canonical layout; ``V`` is a tensor (:class:`MoELayerTensors`) or
    its :class:`TensorInfo` (:class:`MoELayerInfo`).

    ``gate_proj``/``up_proj`` map each requested global expert id to ``[I, H]``, ``down_proj`` to
    ``[H, I]``, in the checkpoint's dtype (bfloat16, float16, float32, or float8_e4m3fn). The
    ``*_scale`` maps are the FP8 block scales ``[ceil(N/128), ceil(K/128)]`` (``None`` unless FP8).
    ``router_weight [E, H]``; ``e_score_correction_bias [E]`` float when the checkpoint has one.
    ``router_extras``: the router's other tensors, keyed by :class:`~moe_kernels.model.router.Router`
    parameter name (``bias [E]``, ``tid2eid [V, K]``), read only when asked for; ``layer_extras`` the
    layer's (``output_norm [H]``, ``output_bias [H]``), likewise. ``gate_proj_bias``/
    ``up_proj_bias [I]`` and ``down_proj_bias [H]`` per expert, only when asked for. ``shared`` when
    asked for; ``has_shared`` says whether the checkpoint has shared experts, asked for or not.
    """

    layer: int
    naming: str
    gate_proj: dict[int, V]
    up_proj: dict[int, V]
    down_proj: dict[int, V]
    router_weight: V
    gate_proj_scale: dict[int, V] | None = None
    up_proj_scale: dict[int, V] | None = None
    down_proj_scale: dict[int, V] | None = None
    e_score_correction_bias: V | None = None
    shared: SharedExpert[V] | None = None
    has_shared: bool = False
    router_extras: dict[str, V] = field(default_factory=dict)
    layer_extras: dict[str, V] = field(default_factory=dict)
    gate_proj_bias: dict[int, V] | None = None
    up_proj_bias: dict[int, V] | None = None
    down_proj_bias: dict[int, V] | None = None

    @property
    def experts(self) -> tuple[int, ...]:
        """The global expert ids held, in the order they were asked for."""
        return tuple(self.up_proj)

    @property
    def is_fp8(self) -> bool:
        """Whether the routed experts are float8_e4m3fn with block scales."""
        return self.up_proj_scale is not None


@dataclass(frozen=True)
class MoELayerTensors(MoELayer[torch.Tensor]):
    """One MoE layer's tensors (see :class:`MoELayer` for the fields' shapes and dtypes)."""


@dataclass(frozen=True)
class MoELayerInfo(MoELayer[TensorInfo]):
    """Shapes, dtypes, files and cuts of one MoE layer's tensors, from the headers alone."""


def _format_ids(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2, 5, 7..8"``."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _open(file: Path) -> object:
    """``safe_open`` on ``file``; a file that is not safetensors is a ``ValueError`` naming it."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{file} is not a safetensors file ({' '.join(str(exc).split())})") from None


def _stored_dtype(view: object, key: str, file: Path) -> torch.dtype:
    # An empty slice carries the stored dtype and reads no data (a 0-d tensor is read whole: one
    # element); safetensors maps its dtype names to torch itself.
    try:
        shape = view.get_shape()  # type: ignore[attr-defined]
        return (view[0:0] if shape else view[...]).dtype  # type: ignore[index]
    except Exception as exc:
        raise TypeError(f"{file}: tensor '{key}' has a dtype torch cannot hold ({exc})") from None


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor in ``file``, from its header (no tensor data is read)."""
    with _open(file) as f:  # type: ignore[attr-defined]
        out = {}
        for key in f.keys():
            view = f.get_slice(key)
            out[key] = TensorInfo(key, file, tuple(view.get_shape()), _stored_dtype(view, key, file))
        return out


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint.

    ``path`` is a directory holding ``model.safetensors.index.json`` (or another single
    ``*.safetensors.index.json``) or exactly one ``*.safetensors`` file, an index file, or one
    ``*.safetensors`` file. Nothing but the index (or the single file's key list) is read here.
    One reader can serve many layers; it caches the tensor headers it has read.
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
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
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
            if self._weight_map is None:
                with _open(self.path) as f:  # type: ignore[attr-defined]
                    self._keys = frozenset(f.keys())
            else:
                self._keys = frozenset(self._weight_map)
        return self._keys

    def layers(self) -> list[int]:
        """The layer indices that appear as ``...layers.N.`` or ``...blocks.N.`` in the keys, ascending."""
        return sorted(self._layer_index())

    def layer_keys(self, layer: int) -> list[str]:
        """The keys of layer ``layer`` under any prefix, sorted; empty when the layer is absent."""
        return self._layer_index().get(layer, [])

    def _layer_index(self) -> dict[int, list[str]]:
        if self._by_layer is None:
            self._by_layer = _group_by_layer(self.keys)
        return self._by_layer

    def file_of(self, key: str) -> Path:
        """The shard that holds ``key``; a missing shard is a ``FileNotFoundError`` here."""
        if self._weight_map is None:
            if key not in self.keys:
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

    def info(self, key: str) -> TensorInfo:
        """Stored shape and dtype of ``key``; reads no tensor data."""
        return self.infos([key])[key]

    def infos(self, keys: Iterable[str]) -> dict[str, TensorInfo]:
        """Stored shapes and dtypes of ``keys``; each shard's header is read once, when one of its
        tensors is first described."""
        out = {}
        for key in dict.fromkeys(keys):
            file = self.file_of(key)
            header = self._headers.get(file)
            if header is None:
                header = self._headers[file] = _read_header(file)
            if key not in header:
                raise ValueError(f"{self._index_file} maps '{key}' to {file.name}, but that file has no such tensor")
            out[key] = header[key]
        return out

    def read(
        self, infos: Iterable[TensorInfo], device: torch.device | str | int | None = None
    ) -> dict[TensorInfo, torch.Tensor]:
        """Read exactly the cuts ``infos`` describe, opening each shard once; only the rows a cut keeps
        are read from disk. Tensors keep their stored dtype and land on ``device`` (CPU when ``None``)."""
        by_file: dict[Path, list[TensorInfo]] = {}
        for info in dict.fromkeys(infos):
            by_file.setdefault(info.file, []).append(info)
        target = torch.device("cpu") if device is None else torch.device(device)
        out: dict[TensorInfo, torch.Tensor] = {}
        for file, file_infos in by_file.items():
            # Read on the CPU, then move: one code path for any torch device.
            with _open(file) as f:  # type: ignore[attr-defined]
                base: dict[tuple[str, tuple[int, int] | None, tuple[int, int] | None], torch.Tensor] = {}
                for info in file_infos:
                    span = (info.key, info.cut.rows, info.cut.cols)
                    if span not in base:
                        base[span] = _read_span(f, info)
                    out[info] = _apply_cut(base[span], info.cut).to(target)
        return out


def _read_span(f: object, info: TensorInfo) -> torch.Tensor:
    """The rows (and columns) of ``info``'s stored tensor its cut keeps, and nothing else, from disk."""
    rows, cols = info.cut.rows, info.cut.cols
    if rows is None and cols is None:
        return f.get_tensor(info.key)  # type: ignore[attr-defined]
    view = f.get_slice(info.key)  # type: ignore[attr-defined]
    kept = slice(*rows) if rows is not None else slice(None)
    return view[kept, slice(*cols)] if cols is not None else view[kept]


def _apply_cut(t: torch.Tensor, cut: Cut) -> torch.Tensor:
    if cut.squeeze:
        t = t[0]
    if cut.transpose:
        t = t.T
    if cut.half is not None:
        n = t.shape[0] // 2
        t = {"first": t[:n], "second": t[n:], "even": t[0::2], "odd": t[1::2]}[cut.half]
    if cut.flatten:
        t = t.reshape(-1)
    return t.contiguous()


def _group_by_layer(keys: Iterable[str]) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for key in keys:
        m = _LAYER_RE.match(key)
        if m is not None:
            by_layer.setdefault(int(m.group(2)), []).append(key)
    for layer_keys in by_layer.values():
        layer_keys.sort()
    return by_layer


def _check_layer(layer: object) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return layer


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


def _evidence(naming: LayerNaming) -> str:
    """The key (relative to the layer root, ``{e}`` cut off) whose presence marks a naming's experts."""
    ex = naming.experts
    if isinstance(ex, PerExpert):
        return ex.up.split("{e}")[0]
    return (ex.gate_up or ex.gate).key  # type: ignore[union-attr]  # Fused checks one of them is set


def _matches(keys: frozenset[str], layer_keys: Sequence[str], root: str, naming: LayerNaming) -> bool:
    if not any(root + r in keys for r in naming.router):
        return False
    evidence = root + _evidence(naming)
    if isinstance(naming.experts, PerExpert):  # "<...>experts.<id>.", not a stacked "<...>experts.gate_up_proj"
        return any(k.startswith(evidence) and k[len(evidence) :].split(".", 1)[0].isdigit() for k in layer_keys)
    return evidence in keys


def _roots(layer_keys: Iterable[str], layer: int) -> list[str]:
    """The distinct ``<prefix><layer>.`` roots the layer's keys live under."""
    roots = set()
    for key in layer_keys:
        m = _LAYER_RE.match(key)
        if m is not None and int(m.group(2)) == layer:
            roots.add(f"{m.group(1)}{layer}.")
    return sorted(roots)


def _candidates(keys: frozenset[str], layer_keys: Sequence[str], layer: int, naming: str) -> list[tuple[str, str]]:
    names = [name for name, spec in NAMINGS.items() if spec.auto] if naming == "auto" else [naming]
    return [
        (root, name)
        for root in _roots(layer_keys, layer)
        for name in names
        if _matches(keys, layer_keys, root, NAMINGS[name])
    ]


def _check_naming_arg(naming: object) -> str:
    if not isinstance(naming, str):
        raise TypeError(f"naming must be a str, got {type(naming).__name__}")
    if naming != "auto" and naming not in NAMINGS:
        raise ValueError(f"naming must be one of 'auto', {', '.join(repr(n) for n in NAMINGS)}; got {naming!r}")
    return naming


def _no_match(
    keys: frozenset[str], layer_keys: Sequence[str], layers: Iterable[int], layer: int, naming: str, where: str
) -> ValueError:
    if not layer_keys:
        present = sorted(layers)
        if present:
            return ValueError(f"layer {layer} not found in {where}; the checkpoint has layers {_format_ids(present)}")
        return ValueError(f"layer {layer} not found in {where}; it has no '...layers.N.' or '...blocks.N.' keys")
    seen = ", ".join(layer_keys[:6]) + (", ..." if len(layer_keys) > 6 else "")
    if naming == "auto":
        return ValueError(
            f"layer {layer} of {where} matches no MoE naming (tried {', '.join(NAMINGS)}: a router and experts under"
            f" one layer root); its keys include {seen}"
        )
    found = _candidates(keys, layer_keys, layer, "auto")
    hint = f"; naming='auto' would pick {found[0][1]!r}" if len(found) == 1 else ""
    spec = NAMINGS[naming]
    return ValueError(
        f"layer {layer} of {where} has no router '{spec.router[0]}' and experts '{_evidence(spec)}*' under any layer"
        f" root for naming {naming!r}; its keys include {seen}{hint}"
    )


def detect_naming(keys: Iterable[str], layer: int, naming: str = "auto") -> str:
    """The naming (a key of :data:`NAMINGS`) under which ``layer``'s router and experts appear in ``keys``.

    With ``naming="auto"`` it is found from the keys; an explicit naming is checked against them. Two
    namings that differ only in how a stacked tensor is oriented match the same keys: this function
    then raises, and :func:`describe_moe_layer` decides from the shapes. A ``ValueError`` says which
    namings were tried and shows some keys of the layer, or which layers exist when ``layer`` does not.
    """
    layer = _check_layer(layer)
    naming = _check_naming_arg(naming)
    key_set = frozenset(keys)
    by_layer = _group_by_layer(key_set)
    layer_keys = by_layer.get(layer, [])
    found = _candidates(key_set, layer_keys, layer, naming)
    if not found:
        raise _no_match(key_set, layer_keys, by_layer, layer, naming, "the keys given")
    if len(found) > 1:
        raise ValueError(f"layer {layer} matches several namings ({_describe_found(found)}); pass one")
    return found[0][1]


def _describe_found(found: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{name!r} under '{root}'" for root, name in found)


def _check_dtype(info: TensorInfo, allowed: tuple[torch.dtype, ...], what: str) -> None:
    if info.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        dtype = str(info.dtype).removeprefix("torch.")
        raise TypeError(f"{info.file}: tensor '{info.key}' ({what}) has dtype {dtype}; expected one of {names}")


def _check_shape(info: TensorInfo, expected: tuple[int, ...], what: str) -> None:
    if info.shape != expected:
        stored = "" if info.cut == Cut() else " after normalising its stored layout"
        raise ValueError(
            f"{info.file}: tensor '{info.key}' ({what}) must have shape {list(expected)}{stored},"
            f" got {list(info.shape)}"
        )


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


def _cut_info(stored: TensorInfo, cut: Cut) -> TensorInfo:
    """``stored`` with ``cut`` applied to its shape."""
    shape = list(stored.shape)
    if cut.rows is not None:
        shape[0] = cut.rows[1] - cut.rows[0]
    if cut.cols is not None:
        shape[1] = cut.cols[1] - cut.cols[0]
    if cut.squeeze:
        shape = shape[1:]
    if cut.transpose:
        shape = shape[::-1]
    if cut.half is not None:
        shape[0] //= 2
    if cut.flatten:
        shape = [math.prod(shape)]
    return replace(stored, shape=tuple(shape), cut=cut)


class _Layer:
    """One layer of one checkpoint under one naming and root: the lookups ``describe_moe_layer`` needs."""

    def __init__(self, reader: CheckpointReader, layer: int, root: str, name: str) -> None:
        self.reader, self.layer, self.root, self.name = reader, layer, root, name
        self.naming = NAMINGS[name]
        self.where = str(reader.path)

    def key(self, template: str, e: int | None = None) -> str:
        return self.root + (template if e is None else template.format(e=e))

    def has(self, template: str) -> bool:
        return self.key(template) in self.reader.keys

    def first_present(self, templates: Sequence[str], what: str) -> str | None:
        present = [t for t in templates if self.has(t)]
        if len(present) > 1:
            raise ValueError(
                f"layer {self.layer} of {self.where} has several {what}s: "
                + ", ".join(f"'{self.key(t)}'" for t in present)
            )
        return self.key(present[0]) if present else None

    def stored(self, key: str) -> TensorInfo:
        if key not in self.reader.keys:
            raise ValueError(f"layer {self.layer} of {self.where} has no key '{key}' (naming {self.name!r})")
        return self.reader.info(key)


def _stacked_cut(stack: Stacked, e: int, rows_per_expert: int) -> Cut:
    if stack.layout.startswith("flat"):
        return Cut(rows=(e * rows_per_expert, (e + 1) * rows_per_expert), transpose=stack.layout == "flat_in_out")
    return Cut(rows=(e, e + 1), squeeze=True, transpose=stack.layout == "in_out")


def _stacked_dims(stored: TensorInfo, stack: Stacked, num_experts: int, hidden: int) -> tuple[int, int]:
    """``(out, in)`` of one expert's matrix in ``stored``; checks the expert count and that one side is H."""
    shape = stored.shape
    flat = stack.layout.startswith("flat")
    if len(shape) != (2 if flat else 3):
        raise ValueError(
            f"{stored.file}: tensor '{stored.key}' must be {'2' if flat else '3'}-D ({stack.layout} experts),"
            f" got shape {list(shape)}"
        )
    if flat:
        if shape[0] % num_experts or shape[1] != hidden:
            raise ValueError(
                f"{stored.file}: tensor '{stored.key}' must have shape [{num_experts} x rows, {hidden}]"
                f" ({num_experts} experts from the router), got {list(shape)}"
            )
        rows = shape[0] // num_experts
        return (rows, hidden) if stack.layout == "flat_out_in" else (hidden, rows)
    if shape[0] != num_experts:
        raise ValueError(
            f"{stored.file}: tensor '{stored.key}' must hold {num_experts} experts (the router's rows) in its first"
            f" dimension, got shape {list(shape)}"
        )
    return (shape[1], shape[2]) if stack.layout == "out_in" else (shape[2], shape[1])


def _describe_fused(
    lay: _Layer, ex: Fused, ids: tuple[int, ...], num_experts: int, hidden: int, expert_biases: bool
) -> tuple[dict[str, dict[int, TensorInfo]], dict[str, dict[int, TensorInfo]] | None]:
    """The routed experts of a stacked naming, cut per expert; and their biases when asked for."""
    for e in ids:
        if e >= num_experts:
            raise ValueError(
                f"expert {e} of layer {lay.layer} is missing from {lay.where}: the router has {num_experts} experts"
            )
    down_stored = lay.stored(lay.key(ex.down.key))
    d_out, d_in = _stacked_dims(down_stored, ex.down, num_experts, hidden)
    if d_out != hidden:
        raise ValueError(
            f"{down_stored.file}: tensor '{down_stored.key}' ({ex.down.layout} down projection) must map to the"
            f" hidden size {hidden}, got shape {list(down_stored.shape)}"
        )
    inter = d_in
    parts: dict[str, tuple[Stacked, Half | None]] = {"down_proj": (ex.down, None)}
    if ex.gate_up is not None:
        gate_half, up_half = _gate_up_halves(ex.interleaved)
        parts["gate_proj"] = (ex.gate_up, gate_half)
        parts["up_proj"] = (ex.gate_up, up_half)
        expected = {ex.gate_up.key: (2 * inter, hidden)}
    else:
        assert ex.gate is not None and ex.up is not None
        parts["gate_proj"] = (ex.gate, None)
        parts["up_proj"] = (ex.up, None)
        expected = {ex.gate.key: (inter, hidden), ex.up.key: (inter, hidden)}
    for key, dims in expected.items():
        stack = next(s for s, _ in parts.values() if s.key == key)
        stored = lay.stored(lay.key(key))
        got = _stacked_dims(stored, stack, num_experts, hidden)
        if got != dims:
            raise ValueError(
                f"{stored.file}: tensor '{stored.key}' ({stack.layout}) holds [{got[0]}, {got[1]}] per expert;"
                f" expected [{dims[0]}, {dims[1]}] (I = {inter} from '{down_stored.key}', H = {hidden} from the router)"
            )
        if stored.dtype == torch.float8_e4m3fn:
            raise TypeError(
                f"{stored.file}: tensor '{stored.key}' is float8_e4m3fn; stacked FP8 experts are not supported"
            )
        _check_dtype(stored, _FLOATS, "expert weight")
    weights: dict[str, dict[int, TensorInfo]] = {}
    for role, (stack, half) in parts.items():
        stored = lay.stored(lay.key(stack.key))
        rows = stored.shape[0] // num_experts
        weights[role] = {e: _cut_info(stored, replace(_stacked_cut(stack, e, rows), half=half)) for e in ids}
    biases = _describe_expert_biases(lay, ex, ids, num_experts, inter, hidden) if expert_biases else None
    return weights, biases


def _describe_expert_biases(
    lay: _Layer, ex: Fused, ids: tuple[int, ...], num_experts: int, inter: int, hidden: int
) -> dict[str, dict[int, TensorInfo]] | None:
    if ex.gate_up_bias is None or ex.down_bias is None or not lay.has(ex.gate_up_bias):
        return None
    gate_up = lay.stored(lay.key(ex.gate_up_bias))
    down = lay.stored(lay.key(ex.down_bias))
    _check_shape(gate_up, (num_experts, 2 * inter), "expert gate/up biases")
    _check_shape(down, (num_experts, hidden), "expert down biases")
    gate_half, up_half = _gate_up_halves(ex.interleaved)

    def per_expert(stored: TensorInfo, half: Half | None) -> dict[int, TensorInfo]:
        return {e: _cut_info(stored, Cut(rows=(e, e + 1), squeeze=True, half=half)) for e in ids}

    return {
        "gate_proj": per_expert(gate_up, gate_half),
        "up_proj": per_expert(gate_up, up_half),
        "down_proj": per_expert(down, None),
    }


def _describe_per_expert(
    lay: _Layer, ex: PerExpert, ids: tuple[int, ...], hidden: int
) -> tuple[dict[str, dict[int, TensorInfo]], dict[str, dict[int, TensorInfo]] | None]:
    """One tensor per expert and projection, with FP8 block scales for all of them or none."""
    templates = {"gate_proj": ex.gate, "up_proj": ex.up, "down_proj": ex.down}
    roles = tuple(role for role in _ROLES if templates[role] is not None)
    keys = lay.reader.keys
    weight_keys: dict[str, dict[int, str]] = {role: {} for role in roles}
    for e in ids:
        for role in roles:
            key = lay.key(templates[role], e)  # type: ignore[arg-type]  # roles holds the set templates
            if key not in keys:
                prefix = lay.root + ex.up.split("{e}")[0]
                present = {
                    int(h)
                    for k in lay.reader.layer_keys(lay.layer)
                    if k.startswith(prefix) and (h := k[len(prefix) :].split(".", 1)[0]).isdigit()
                }
                has = f"; layer {lay.layer} has experts {_format_ids(present)}" if present else ""
                raise ValueError(f"expert {e} of layer {lay.layer} is missing from {lay.where}: no key '{key}'{has}")
            weight_keys[role][e] = key
    scaled = {(role, e): k + SCALE_SUFFIX in keys for role in roles for e, k in weight_keys[role].items()}
    if any(scaled.values()) and not all(scaled.values()):
        with_scale = {e for (_, e), s in scaled.items() if s}
        role, e = next(role_expert for role_expert, s in scaled.items() if not s)
        raise ValueError(
            f"layer {lay.layer} of {lay.where}: {SCALE_SUFFIX} scales are present for experts {_format_ids(with_scale)}"
            f" but not for all requested experts; no key '{weight_keys[role][e]}{SCALE_SUFFIX}' (expert {e})"
        )
    fp8 = any(scaled.values())
    all_keys = [k for role in roles for k in weight_keys[role].values()]
    infos = lay.reader.infos(all_keys + ([k + SCALE_SUFFIX for k in all_keys] if fp8 else []))
    weights = {role: {e: infos[k] for e, k in weight_keys[role].items()} for role in roles}
    scales = (
        {role: {e: infos[k + SCALE_SUFFIX] for e, k in weight_keys[role].items()} for role in roles} if fp8 else None
    )
    inter = weights["up_proj"][ids[0]].shape[0] if weights["up_proj"][ids[0]].shape else 0
    for role in roles:
        expected = (hidden, inter) if role == "down_proj" else (inter, hidden)
        for e in ids:
            _check_weight_and_scale(weights[role][e], None if scales is None else scales[role][e])
            _check_shape(weights[role][e], expected, f"expert {e} {role}")
    return weights, scales


def _describe_shared(lay: _Layer, variant: SharedNaming, hidden: int) -> SharedExpert[TensorInfo]:
    """The shared expert of the variant the checkpoint has, normalised to gate/up/down (and its gate)."""
    gate: TensorInfo | None
    if variant.gate_up is not None:
        fused = lay.stored(lay.key(variant.gate_up))
        if fused.dtype == torch.float8_e4m3fn:
            raise TypeError(f"{fused.file}: tensor '{fused.key}' is a float8_e4m3fn fused gate_up; not supported")
        gate, up = _cut_info(fused, Cut(half="first")), _cut_info(fused, Cut(half="second"))
        down = lay.stored(lay.key(variant.down))
        scales: list[TensorInfo | None] = [None, None, None]
    else:
        assert variant.up is not None
        weight_keys = [lay.key(t) for t in (variant.gate, variant.up, variant.down) if t is not None]
        missing = [k for k in weight_keys if k not in lay.reader.keys]
        if missing:
            raise ValueError(f"layer {lay.layer} of {lay.where} has a partial shared expert: no key '{missing[0]}'")
        has_scale = [k + SCALE_SUFFIX in lay.reader.keys for k in weight_keys]
        if any(has_scale) and not all(has_scale):
            absent = next(k for k, s in zip(weight_keys, has_scale, strict=True) if not s)
            raise ValueError(
                f"layer {lay.layer} of {lay.where}: the shared expert has {SCALE_SUFFIX} scales for some projections"
                f" but not others; no key '{absent}{SCALE_SUFFIX}'"
            )
        stored: list[TensorInfo | None] = [lay.stored(k) for k in weight_keys]
        scales = [lay.stored(k + SCALE_SUFFIX) if s else None for k, s in zip(weight_keys, has_scale, strict=True)]
        if variant.gate is None:  # not gated: no gate projection
            stored, scales = [None, *stored], [None, *scales]
        gate, up_or_none, down_or_none = stored
        assert up_or_none is not None and down_or_none is not None
        up, down = up_or_none, down_or_none
    for w, s in zip((gate, up, down), scales, strict=True):
        if w is not None:
            _check_weight_and_scale(w, s)
    width = up.shape[0] if up.shape else 0
    if gate is not None:
        _check_shape(gate, (width, hidden), "shared expert gate_proj")
    _check_shape(up, (width, hidden), "shared expert up_proj")
    _check_shape(down, (hidden, width), "shared expert down_proj")
    expert_gate = None
    if variant.expert_gate is not None and lay.has(variant.expert_gate):
        expert_gate = lay.stored(lay.key(variant.expert_gate))
        _check_dtype(expert_gate, _FLOATS, "shared expert gate")
        _check_shape(expert_gate, (1, hidden), "shared expert gate")
    return SharedExpert(gate, up, down, *scales, expert_gate=expert_gate)


def _shared_keys(lay: _Layer) -> set[str]:
    """Every key any shared-expert variant of the naming may use (weights, scales, gates)."""
    out = set()
    for v in lay.naming.shared:
        for t in (v.gate, v.up, v.down, v.gate_up, v.expert_gate):
            if t is not None:
                out |= {lay.key(t), lay.key(t) + SCALE_SUFFIX}
    return out


def _expert_keys(lay: _Layer, num_experts: int) -> set[str]:
    ex = lay.naming.experts
    if isinstance(ex, PerExpert):
        templates = [t for t in (ex.gate, ex.up, ex.down) if t is not None]
        return {lay.key(t, e) + s for t in templates for e in range(num_experts) for s in ("", SCALE_SUFFIX)}
    stacks = [s for s in (ex.gate_up, ex.gate, ex.up, ex.down) if s is not None]
    return {lay.key(s.key) for s in stacks} | {lay.key(b) for b in (ex.gate_up_bias, ex.down_bias) if b is not None}


def _refuse_unloaded(lay: _Layer, accounted: set[str]) -> None:
    """Every key under the MoE block must be something we load: anything else would be dropped silently."""
    if lay.naming.block is None:
        return
    block = lay.key(lay.naming.block) + "."
    extra = [k for k in lay.reader.layer_keys(lay.layer) if k.startswith(block) and k not in accounted]
    if extra:
        shown = ", ".join(f"'{k}'" for k in extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise ValueError(
            f"layer {lay.layer} of {lay.where} has {shown} in its MoE block '{block}', which moe_kernels does not"
            f" load (naming {lay.name!r}): the layer would compute something else without it"
        )


def _as_reader(path: str | os.PathLike[str] | CheckpointReader) -> CheckpointReader:
    return path if isinstance(path, CheckpointReader) else CheckpointReader(path)


def _locate(reader: CheckpointReader, layer: int, naming: str) -> _Layer:
    """The layer root and naming of ``layer``; stacked namings that match the same keys are told apart
    by which one's shapes fit the router's hidden size."""
    layer_keys = reader.layer_keys(layer)
    found = _candidates(reader.keys, layer_keys, layer, naming)
    if not found:
        raise _no_match(reader.keys, layer_keys, reader.layers(), layer, naming, str(reader.path))
    if len(found) > 1:
        fitting = [(root, name) for root, name in found if _fits(_Layer(reader, layer, root, name))]
        if len(fitting) != 1:
            raise ValueError(
                f"layer {layer} of {reader.path} matches several namings ({_describe_found(found)})"
                f"{'' if fitting else ' and none fits its shapes'}; pass naming="
            )
        found = fitting
    root, name = found[0]
    return _Layer(reader, layer, root, name)


def naming_fits(path: str | os.PathLike[str] | CheckpointReader, layer: int, naming: str) -> bool:
    """Whether ``layer``'s keys match ``naming`` (one layer root) and its stacked tensors' shapes fit it."""
    reader = _as_reader(path)
    found = _candidates(reader.keys, reader.layer_keys(layer), layer, _check_naming_arg(naming))
    return len(found) == 1 and _fits(_Layer(reader, layer, *found[0]))


def _fits(lay: _Layer) -> bool:
    """Whether a stacked naming's down projection is [E, H, I] the way it says (H from the router)."""
    ex = lay.naming.experts
    if not isinstance(ex, Fused):
        return True
    router = lay.stored(next(lay.key(r) for r in lay.naming.router if lay.has(r)))
    if len(router.shape) != 2:
        return False
    try:
        d_out, _ = _stacked_dims(lay.stored(lay.key(ex.down.key)), ex.down, *router.shape)
    except ValueError:
        return False
    return d_out == router.shape[1]


def _describe_extras(
    lay: _Layer, templates: Mapping[str, str], wanted: bool, flag: str, owner: str
) -> dict[str, TensorInfo]:
    """The extra tensors of the naming (``{parameter name: key template}``) this layer has; one that is
    there but not ``wanted`` is refused: dropping it would compute another function."""
    extras: dict[str, TensorInfo] = {}
    for name, template in templates.items():
        if not lay.has(template):
            continue
        if not wanted:
            raise ValueError(
                f"layer {lay.layer} of {lay.where} has a {owner} {name} '{lay.key(template)}' that this load would"
                f" drop; read it with {flag}=True and load it into the {owner}"
            )
        extras[name] = lay.stored(lay.key(template))
        _check_dtype(extras[name], _INTS if name == "tid2eid" else _FLOATS, f"{owner} {name}")
    return extras


def _describe_router(lay: _Layer) -> TensorInfo:
    """The router weight ``[E, H]`` (floating)."""
    router_key = lay.first_present(lay.naming.router, "router weight")
    assert router_key is not None  # _locate matched a router
    router = lay.stored(router_key)
    _check_dtype(router, _FLOATS, "router weight")
    if len(router.shape) != 2:
        raise ValueError(
            f"{router.file}: tensor '{router.key}' (router weight) must be 2-D [E, H], got {list(router.shape)}"
        )
    return router


def _describe_correction_bias(lay: _Layer, router_rows: int) -> TensorInfo | None:
    """The correction bias ``[E]`` (stored ``[E]`` or ``[1, E]``), when the layer has one."""
    bias_key = lay.first_present(lay.naming.correction_bias, "correction bias")
    if bias_key is None:
        return None
    stored = lay.stored(bias_key)
    _check_dtype(stored, _FLOATS, "correction bias")
    if stored.shape not in ((router_rows,), (1, router_rows)):
        raise ValueError(
            f"{stored.file}: tensor '{bias_key}' (correction bias) must have shape [{router_rows}] or"
            f" [1, {router_rows}], got {list(stored.shape)}"
        )
    return _cut_info(stored, Cut(flatten=len(stored.shape) == 2))


def _shared_variant(lay: _Layer) -> SharedNaming | None:
    """The shared-expert naming the layer's keys show: the variant whose GEMM1 keys are there too
    (HY-V4's gate is linear_gate beside the same down_proj), else any whose down projection is."""
    variants = lay.naming.shared
    complete = (v for v in variants if all(lay.has(t) for t in (v.gate, v.up, v.gate_up, v.down) if t))
    return next(complete, None) or next((v for v in variants if lay.has(v.down)), None)


_Described = dict[str, dict[int, TensorInfo]]


def _describe_experts(
    lay: _Layer, ids: tuple[int, ...], num_experts: int, hidden: int, expert_biases: bool
) -> tuple[_Described, _Described | None, _Described | None]:
    """``(weights, scales, biases)`` per projection name and expert id, per-expert or fused naming."""
    ex = lay.naming.experts
    if isinstance(ex, PerExpert):
        weights, scales = _describe_per_expert(lay, ex, ids, hidden)
        return weights, scales, None
    if not expert_biases and ex.gate_up_bias is not None and lay.has(ex.gate_up_bias):
        raise ValueError(
            f"layer {lay.layer} of {lay.where} has expert biases ('{lay.key(ex.gate_up_bias)}'), which moe_kernels'"
            " expert MLPs do not implement yet; read them with expert_biases=True only to load them elsewhere"
        )
    weights, biases = _describe_fused(lay, ex, ids, num_experts, hidden, expert_biases)
    return weights, None, biases


def _accounted_keys(lay: _Layer, num_experts: int) -> set[str]:
    """Every key of the layer's MoE block that the naming reads (the rest must not exist)."""
    spec = lay.naming
    accounted = _expert_keys(lay, num_experts) | _shared_keys(lay) | {lay.key(r) for r in spec.router}
    accounted |= {lay.key(b) for b in spec.correction_bias} | {lay.key(t) for t in spec.router_extras.values()}
    return accounted | {lay.key(t) for t in spec.layer_extras.values()}


def _per_projection(described: _Described | None, suffix: str) -> dict[str, dict[int, TensorInfo] | None]:
    """``{"gate_proj<suffix>": ..., "up_proj<suffix>": ..., "down_proj<suffix>": ...}``, all ``None``
    without ``described`` (a gate absent from it, as in a non-gated MLP, is empty)."""
    names = ("gate_proj", "up_proj", "down_proj")
    if described is None:
        return {n + suffix: None for n in names}
    return {n + suffix: described.get(n, {}) for n in names}


def describe_moe_layer(
    path: str | os.PathLike[str] | CheckpointReader,
    layer: int,
    experts: Sequence[int],
    *,
    naming: str = "auto",
    shared: bool = False,
    router_extras: bool = False,
    expert_biases: bool = False,
    layer_extras: bool = False,
    identity_experts: int = 0,
) -> MoELayerInfo:
    """Shapes, dtypes, files and cuts of what :func:`read_moe_layer` would read, from headers only.

    Runs every check :func:`read_moe_layer` runs (layer and experts present, shapes consistent with
    the router ``[E, H]``, scales for all experts or none, dtypes we can take, nothing in the MoE
    block left unread) and reads no tensor data. ``identity_experts``: the router's last rows (and its
    correction bias's last entries) score zero-compute experts that have no weights (LongCat-Flash).
    """
    reader = _as_reader(path)
    layer = _check_layer(layer)
    ids = _check_experts(experts)
    lay = _locate(reader, layer, _check_naming_arg(naming))
    spec = lay.naming

    router = _describe_router(lay)
    router_rows, hidden = router.shape
    num_experts = router_rows - identity_experts

    weights, scales, biases = _describe_experts(lay, ids, num_experts, hidden, expert_biases)

    bias = _describe_correction_bias(lay, router_rows)
    extras = _describe_extras(lay, spec.router_extras, router_extras, "router_extras", "router")
    outputs = _describe_extras(lay, spec.layer_extras, layer_extras, "layer_extras", "layer")

    variant = _shared_variant(lay)
    shared_info = None
    if shared:
        if variant is None:
            tried = " or ".join(f"'{lay.key(v.down)}'" for v in spec.shared) or "(the naming has none)"
            raise ValueError(f"layer {layer} of {lay.where} has no shared expert: no key {tried}")
        shared_info = _describe_shared(lay, variant, hidden)

    _refuse_unloaded(lay, _accounted_keys(lay, num_experts))

    return MoELayerInfo(
        layer=layer,
        naming=lay.name,
        gate_proj=weights.get("gate_proj", {}),
        up_proj=weights["up_proj"],
        down_proj=weights["down_proj"],
        router_weight=router,
        **_per_projection(scales, "_scale"),
        e_score_correction_bias=bias,
        shared=shared_info,
        has_shared=variant is not None,
        router_extras=extras,
        layer_extras=outputs,
        **_per_projection(biases, "_bias"),
    )


def read_moe_layer(
    path: str | os.PathLike[str] | CheckpointReader,
    layer: int,
    experts: Sequence[int],
    *,
    naming: str = "auto",
    shared: bool = False,
    router_extras: bool = False,
    expert_biases: bool = False,
    layer_extras: bool = False,
    identity_experts: int = 0,
    device: torch.device | str | int | None = None,
    tensor_parallel: tuple[int, int] | None = None,
) -> MoELayerTensors:
    """Read ``layer``'s router and the routed experts ``experts`` (global ids) from a checkpoint.

    Only the requested experts' tensors are read (an expert-parallel rank passes its own experts; of a
    stacked tensor only their rows), plus the router, its correction bias when present, the shared
    expert when ``shared``, the router's other tensors (a linear bias, a hash table) when
    ``router_extras``, expert biases when ``expert_biases``, and the layer's tensors around the experts
    (an output norm or bias) when ``layer_extras``; without those flags a layer that has such tensors
    is refused, since dropping them would compute another function. Tensors keep the
    stored dtype (FP8 weights stay float8_e4m3fn, with their ``*_scale`` block scales) and land on
    ``device`` (CPU when ``None``). Checks and errors are those of :func:`describe_moe_layer`, all
    raised before any data is read. ``tensor_parallel=(tp_size, tp_rank)`` reads only that rank's
    slice of each projection's intermediate dimension where the stored form allows
    (:func:`slice_intermediate`); the rest is read whole.
    """
    reader = _as_reader(path)
    info = describe_moe_layer(
        reader, layer, experts, naming=naming, shared=shared, router_extras=router_extras, expert_biases=expert_biases,
        layer_extras=layer_extras, identity_experts=identity_experts,
    )  # fmt: skip
    if tensor_parallel is not None:
        info = slice_intermediate(info, *tensor_parallel)
    return _tensors_of(info, reader.read(_infos(info), device=device))


def _tensors_of(info: MoELayerInfo, got: Mapping[TensorInfo, torch.Tensor]) -> MoELayerTensors:
    """The described layer with each :class:`TensorInfo` replaced by the tensor read for it."""

    def one(t: TensorInfo | None) -> torch.Tensor | None:
        return None if t is None else got[t]

    def each(d: Mapping[int, TensorInfo] | None) -> dict[int, torch.Tensor] | None:
        return None if d is None else {e: got[t] for e, t in d.items()}

    sh = info.shared
    return MoELayerTensors(
        layer=info.layer,
        naming=info.naming,
        gate_proj=each(info.gate_proj) or {},
        up_proj=each(info.up_proj) or {},
        down_proj=each(info.down_proj) or {},
        router_weight=got[info.router_weight],
        gate_proj_scale=each(info.gate_proj_scale),
        up_proj_scale=each(info.up_proj_scale),
        down_proj_scale=each(info.down_proj_scale),
        e_score_correction_bias=one(info.e_score_correction_bias),
        shared=None
        if sh is None
        else SharedExpert(
            one(sh.gate_proj),
            got[sh.up_proj],
            got[sh.down_proj],
            one(sh.gate_proj_scale),
            one(sh.up_proj_scale),
            one(sh.down_proj_scale),
            one(sh.expert_gate),
        ),
        has_shared=info.has_shared,
        router_extras={name: got[t] for name, t in info.router_extras.items()},
        layer_extras={name: got[t] for name, t in info.layer_extras.items()},
        gate_proj_bias=each(info.gate_proj_bias),
        up_proj_bias=each(info.up_proj_bias),
        down_proj_bias=each(info.down_proj_bias),
    )


def _narrow(
    weight: TensorInfo, scale: TensorInfo | None, axis: int, tp_size: int, tp_rank: int
) -> tuple[TensorInfo, TensorInfo | None]:
    """``weight`` (and its block ``scale``) cut to rank ``tp_rank``'s slice of axis ``axis`` (the
    intermediate dimension), when both are 2-D tensors read as stored and the slice falls on
    whole blocks; else unchanged."""
    if weight.cut != Cut() or len(weight.shape) != 2 or (scale is not None and scale.cut != Cut()):
        return weight, scale
    total = weight.shape[axis]
    width = total // tp_size
    start, stop = tp_rank * width, (tp_rank + 1) * width
    if total % tp_size or (scale is not None and (start % FP8_BLOCK or width % FP8_BLOCK)):
        return weight, scale

    def cut(span: tuple[int, int]) -> Cut:
        return Cut(rows=span) if axis == 0 else Cut(cols=span)

    sliced = _cut_info(weight, cut((start, stop)))
    if scale is None:
        return sliced, None
    return sliced, _cut_info(scale, cut((start // FP8_BLOCK, -(-stop // FP8_BLOCK))))


def slice_intermediate(info: MoELayerInfo, tp_size: int, tp_rank: int) -> MoELayerInfo:
    """``info`` reading, of each routed and shared projection, only tensor-parallel rank
    ``tp_rank``'s slice of its intermediate dimension (rows of gate/up, columns of down, block
    scales with their blocks) where :func:`_narrow` can; other tensors stay whole."""
    changes: dict[str, Any] = {}
    for role in _ROLES:
        axis = 1 if role == "down_proj" else 0
        weights, scales = getattr(info, role), getattr(info, f"{role}_scale")
        pairs = {
            e: _narrow(w, None if scales is None else scales[e], axis, tp_size, tp_rank) for e, w in weights.items()
        }
        changes[role] = {e: w for e, (w, _) in pairs.items()}
        if scales is not None:
            changes[f"{role}_scale"] = {e: s for e, (_, s) in pairs.items()}
    sh = info.shared
    if sh is not None:
        shared: dict[str, Any] = {}
        for role in _ROLES:
            if getattr(sh, role) is None:  # a non-gated shared expert has no gate projection
                continue
            axis = 1 if role == "down_proj" else 0
            w, s = _narrow(getattr(sh, role), getattr(sh, f"{role}_scale"), axis, tp_size, tp_rank)
            shared[role], shared[f"{role}_scale"] = w, s
        changes["shared"] = replace(sh, **shared)
    return replace(info, **changes)


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
        info.gate_proj_bias,
        info.up_proj_bias,
        info.down_proj_bias,
    ):
        if d is not None:
            out.extend(d.values())
    out.append(info.router_weight)
    out.extend(info.router_extras.values())
    out.extend(info.layer_extras.values())
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
