"""Measured tables: per GPU and layer shape, how long every valid pair takes at each token count,
and the tile configs of the Triton kernels.

``moe-kernels tune --config FILE`` writes them (:mod:`moe_kernels.selection.tuner`); selection and
the Triton experts read them. Nothing here is typed by hand: a number in a table is a
measurement with its source, and where no table covers a GPU or shape the parts' documented
heuristics decide (and ``explain()`` says so).

Where tables are looked for (:func:`table_dirs`): the directory named by the
``MOE_KERNELS_TABLES`` environment variable (your own tuning runs), the first-use cache (tuning
on first use, :mod:`moe_kernels.selection.autotune`), the tables shipped in
``moe_kernels/tables``. One GPU's files are read as one table, point by point, the first
directory winning where two measured the same point. A file is named after the GPU
(``nvidia-h100-80gb-hbm3.json``) and holds::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "source": "...", "copy_gbps": 2966.0,
     "shapes": {"E=32,K=8,H=7168,I=2048,bfloat16,none": {
         "pairs":   {"LocalPrepareAndFinalize + FusedTritonExperts": {"1": 97.1, "16": ...}, ...},
         "kernels": {"FusedTritonExperts": {"1": {"gemm1": {...}, "gemm2": {...}}, ...}}}}}
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from moe_kernels.config import LayerConfig

FORMAT = 1
ENV_DIR = "MOE_KERNELS_TABLES"
ENV_CACHE = "MOE_KERNELS_CACHE"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "tables"

X = TypeVar("X")


@dataclass(frozen=True)
class ShapeKey:
    """What a measurement depends on besides the GPU: the local layer shape and number format."""

    num_experts: int  # local experts
    top_k: int
    hidden: int
    inter: int
    dtype: str
    quant: str

    @classmethod
    def of(cls, cfg: LayerConfig) -> ShapeKey:
        moe = cfg.moe
        dtype = str(moe.dtype).removeprefix("torch.")
        inter = cfg.intermediate_shard.width
        return cls(cfg.num_local_experts, moe.top_k, moe.hidden_size, inter, dtype, cfg.quant.scheme)

    def __str__(self) -> str:
        return f"E={self.num_experts},K={self.top_k},H={self.hidden},I={self.inter},{self.dtype},{self.quant}"

    @classmethod
    def parse(cls, text: str) -> ShapeKey | None:
        """The key :meth:`__str__` wrote, or ``None`` for text in another form."""
        parts = text.split(",")
        try:
            e, k, h, i = (int(part.split("=", 1)[1]) for part in parts[:4])
            return cls(e, k, h, i, parts[4], parts[5])
        except (IndexError, ValueError):
            return None

    @property
    def rows_per_expert(self) -> float:
        """Rows each expert gets per token of a call (``K / E``, uniform routing)."""
        return self.top_k / self.num_experts


@dataclass
class GpuTable:
    """One GPU's measurements (see the module docstring for the file format)."""

    gpu: str
    source: str
    path: str
    copy_gbps: float | None = None
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def pair_times(self, key: ShapeKey) -> dict[str, dict[int, float]]:
        """``pair name -> {T: microseconds}`` for ``key`` (empty when not measured)."""
        pairs = self.shapes.get(str(key), {}).get("pairs", {})
        return {name: {int(t): float(us) for t, us in times.items()} for name, times in pairs.items()}

    def nearest_shape(self, key: ShapeKey) -> ShapeKey | None:
        """The measured shape of the same dtype and format most like ``key`` in its GEMM sizes (the
        least ``|log H/H'| + |log I/I'|``), ``None`` when there is none."""
        measured = [k for k in map(ShapeKey.parse, self.shapes) if k is not None and k != key and self.pair_times(k)]
        alike = [k for k in measured if (k.dtype, k.quant) == (key.dtype, key.quant)]
        return min(
            alike,
            key=lambda k: abs(math.log(k.hidden / key.hidden)) + abs(math.log(k.inter / key.inter)),
            default=None,
        )

    def estimated_pair_times(self, key: ShapeKey) -> tuple[ShapeKey | None, dict[str, dict[int, float]]]:
        """For a shape without measurements: the nearest measured shape and its pairs' times, each
        point moved to the ``T`` that gives ``key``'s experts as many rows (``T * K / E`` kept): a
        pair's rank there is what the estimate carries, not its microseconds."""
        source = self.nearest_shape(key)
        if source is None:
            return None, {}
        scale = source.rows_per_expert / key.rows_per_expert
        moved = {
            name: {max(1, round(t * scale)): us for t, us in times.items()}
            for name, times in self.pair_times(source).items()
        }
        return source, moved

    def experts_times(self, key: ShapeKey, experts: str) -> dict[int, float]:
        """``{T: microseconds}`` of the experts class named ``experts`` behind whichever
        prepare/finalize measured fastest at each T (empty when not measured)."""
        best: dict[int, float] = {}
        for name, times in self.pair_times(key).items():
            if split_pair(name)[1] != experts:
                continue
            for t, us in times.items():
                best[t] = min(us, best.get(t, us))
        return best

    def kernel_configs(self, key: ShapeKey, kernel: str) -> dict[int, dict[str, Any]]:
        """``{T: config}`` of a Triton kernel for ``key`` (empty when not tuned)."""
        configs = self.shapes.get(str(key), {}).get("kernels", {}).get(kernel, {})
        return {int(t): c for t, c in configs.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "gpu": self.gpu,
            "source": self.source,
            "copy_gbps": self.copy_gbps,
            "shapes": self.shapes,
        }


#: between the two parts' names in a pair's name (the key of its times in a table)
PAIR_SEPARATOR = " + "


def pair_key(prepare_finalize: str, experts: str) -> str:
    """The name of a (prepare/finalize, experts) pair, from the parts' names."""
    return f"{prepare_finalize}{PAIR_SEPARATOR}{experts}"


def split_pair(name: str) -> tuple[str, str]:
    """``pair_key``'s inverse: ``(prepare/finalize name, experts name)``."""
    pf, _, experts = name.partition(PAIR_SEPARATOR)
    return pf, experts


def slug(gpu: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: the table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def gpu_name(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def load_table(path: Path) -> GpuTable:
    """Read one table file; ``ValueError`` naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable tuning table ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a tuning table (a JSON {type(data).__name__}, not an object)")
    if data.get("format") != FORMAT or not isinstance(data.get("shapes"), dict):
        raise ValueError(f"{path}: not a tuning table of format {FORMAT} (keys: {sorted(data)[:6]})")
    return GpuTable(
        gpu=str(data.get("gpu", "")),
        source=str(data.get("source", "")),
        path=str(path),
        copy_gbps=data.get("copy_gbps"),
        shapes=data["shapes"],
    )


@functools.cache
def library_versions() -> str:
    """The versions a measurement depends on besides the GPU: this package and the kernel
    libraries it runs (read from the installed distributions, nothing imported; once per process:
    each read scans the installed packages' metadata, milliseconds)."""
    found = []
    for dist in ("moe-kernels", "torch", "triton", "deepinfer-gemm", "deepinfer-ep"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def cache_dir() -> Path:
    """Where tuning on first use writes: ``$MOE_KERNELS_CACHE`` (default ``~/.cache/moe_kernels``)
    ``/tables/<versions hash>``: measurements taken with other library versions are never read."""
    return _cache_dir(os.environ.get(ENV_CACHE), library_versions())


@functools.cache  # asked on every kernel call (parts look up their tiles per call)
def _cache_dir(env_cache: str | None, versions: str) -> Path:
    base = Path(env_cache or Path.home() / ".cache" / "moe_kernels")
    return base / "tables" / hashlib.blake2b(versions.encode(), digest_size=6).hexdigest()


def table_dirs() -> list[Path]:
    """Where tables are looked for, in order of precedence: ``$MOE_KERNELS_TABLES`` (your own
    tuning runs), the first-use cache (:func:`cache_dir`), the shipped tables."""
    dirs = [Path(os.environ[ENV_DIR])] if os.environ.get(ENV_DIR) else []
    return [*dirs, cache_dir(), SHIPPED_DIR]


def merge_tables(tables: Sequence[GpuTable]) -> GpuTable:
    """One GPU's tables read as one, point by point: a measurement (pair at T, kernel config at T)
    comes from the first table that has it, so a first-use cache that measured T = 1024 adds to
    the shipped table's T = 1 .. 4096 instead of hiding them."""
    first = tables[0]
    shapes: dict[str, dict[str, Any]] = {}
    for table in reversed(tables):  # earlier tables overwrite later ones
        for key, entry in table.shapes.items():
            merged = shapes.setdefault(key, {})
            for section in ("pairs", "kernels"):
                for name, points in entry.get(section, {}).items():
                    merged.setdefault(section, {}).setdefault(name, {}).update(points)
    return GpuTable(
        gpu=first.gpu,
        source="; ".join(t.source for t in tables),
        path=" + ".join(t.path for t in tables),
        copy_gbps=next((t.copy_gbps for t in tables if t.copy_gbps is not None), None),
        shapes=shapes,
    )


@functools.cache
def _table_for_gpu(gpu: str, dirs: tuple[Path, ...]) -> GpuTable | None:
    found = [load_table(d / f"{slug(gpu)}.json") for d in dirs if (d / f"{slug(gpu)}.json").is_file()]
    return merge_tables(found) if found else None


def table_for(device: torch.device) -> GpuTable | None:
    """The table of ``device``'s GPU, or ``None`` (CPU, or a GPU nobody tuned)."""
    gpu = gpu_name(device)
    return None if gpu is None else _table_for_gpu(gpu, tuple(table_dirs()))


def forget_tables() -> None:
    """Drop cached tables (after a tuning run wrote a new one)."""
    _table_for_gpu.cache_clear()


class TableMemo(Generic[X]):
    """What a part derives from this GPU's table for a layer shape (tiles, a crossover), worked
    out once per table: parts ask on every call, and a table is re-read only after
    :func:`forget_tables` (a tuning run), which gives :func:`table_for` a new object."""

    def __init__(self) -> None:
        self._entries: dict[ShapeKey, tuple[GpuTable | None, X]] = {}

    def get(self, device: torch.device, cfg: LayerConfig, derive: Callable[[GpuTable | None, ShapeKey], X]) -> X:
        """``derive(table, key)`` for ``cfg``'s shape on ``device``, recomputed only when the table changed."""
        table, key = table_for(device), ShapeKey.of(cfg)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not table:
            entry = self._entries[key] = (table, derive(table, key))
        return entry[1]


def point_for(points: Mapping[int, X], num_tokens: int) -> tuple[int, X]:
    """The measurement that stands for ``num_tokens``: the smallest measured T >= it (a path
    that measured fastest there handled at least as many rows), else the largest measured T."""
    if not points:
        raise ValueError("no measured points")
    above = [t for t in points if t >= num_tokens]
    t = min(above) if above else max(points)
    return t, points[t]


def crossover(low: Mapping[int, float], high: Mapping[int, float]) -> tuple[int | None, str]:
    """The threshold ``T*`` for "use ``low`` when T <= T*, ``high`` above" that fits two measured
    series best: among 0 and the T measured in both, the one minimising the summed
    ``log(chosen / faster)`` (the smallest on ties). ``None`` when they share no T."""
    both = sorted(set(low) & set(high))
    if not both:
        return None, "no token count measured for both paths"

    def loss(threshold: int) -> float:
        return sum(math.log((low[t] if t <= threshold else high[t]) / min(low[t], high[t])) for t in both)

    best = min([0, *both], key=lambda t: (loss(t), t))
    wins = [t for t in both if low[t] <= high[t]]
    note = f"the first path measured no slower at T in {wins or 'none'} of {both}"
    if loss(best) > 0:
        note += f"; this threshold costs {math.expm1(loss(best) / len(both)):.1%} over the per-T best on average"
    return best, note
