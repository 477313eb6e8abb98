"""Weight formats: how one expert projection ``[N, K]`` (``nn.Linear`` layout: rows are output
features) is stored, what it stands for, and how a float weight becomes one.

A format names the tensors it stores per projection -- ``weight`` always, ``scale`` (and later
``zero``) when quantized -- with their shapes for a given ``[N, K]``, dequantizes them (the
reference path and tests compute from that), quantizes a float weight into them (loading a bf16
checkpoint into a quantized layer, tests, benchmarks), and says which shard boundaries it
allows (a block-scaled format cannot be cut inside a block). Kernels read the format to pick
their GEMM, the way DeepGEMM takes ``(tensor, scale)`` operands.

Adding a weight-only format: a subclass here (stored tensors, dequantize, quantize), its scheme
in :mod:`moe_kernels.mlp.schemes`, its dequantizing load in the Triton GEMMs, its tensors'
names in the checkpoint naming, and tests (docs/architecture.md walks through it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_kernels.mlp import fp8, packed

#: ``name -> (shape, dtype)`` of the tensors a format stores for one projection of one expert
StoredSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


class WeightFormat(ABC):
    """How a projection is stored. Subclasses are frozen dataclasses (hashable, comparable)."""

    #: a short name for messages and tuning-table keys
    kind: ClassVar[str]
    #: the largest ``max|out - ref| / max|ref|`` a layer on this format should show against the
    #: fp32 reference on the dequantized weights (the format's own rounding excluded)
    tolerance: ClassVar[float]
    #: weight values per stored ``weight`` element along K (two 4-bit values per byte)
    values_per_element: ClassVar[int] = 1
    #: gate and up share w13's scales, so an expert's gate and up are stored together (from whole
    #: experts: ``FusedMoE.load_expert_weights``), never one projection at a time
    gate_and_up_together: ClassVar[bool] = False

    @abstractmethod
    def stored(self, n: int, k: int) -> StoredSpec:
        """The tensors of one ``[N, K]`` projection: always ``"weight"``, then any scales."""

    @abstractmethod
    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 ``[..., N, K]`` weight the stored ``tensors`` (leading dims allowed) stand for."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store a float ``w [..., N, K]`` in this format (setup time, plain torch)."""

    @property
    def shard_multiple(self) -> tuple[int, int]:
        """``(rows, cols)``: a slice of a projection must start and end on multiples of these."""
        return 1, 1

    def rows(self, part: str, start: int, stop: int) -> slice:
        """The slice of stored tensor ``part`` that holds weight rows ``[start, stop)`` (both on
        multiples of ``shard_multiple[0]``, or ``stop`` the last row)."""
        return slice(start, stop)

    def cols(self, part: str, start: int, stop: int) -> slice:
        """The slice of stored tensor ``part``'s columns that holds weight columns ``[start, stop)``
        (both on multiples of ``shard_multiple[1]``, or ``stop`` the last column)."""
        return slice(start, stop)

    @property
    def is_quantized(self) -> bool:
        return len(self.stored(1, 1)) > 1

    def describe(self) -> str:
        return self.kind


@dataclass(frozen=True)
class Dense(WeightFormat):
    """The weight in a floating dtype, nothing else."""

    dtype: torch.dtype = torch.bfloat16
    kind: ClassVar[str] = "dense"
    tolerance: ClassVar[float] = 0.0

    def stored(self, n: int, k: int) -> StoredSpec:
        return {"weight": ((n, k), self.dtype)}

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float()

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": w.to(self.dtype).contiguous()}

    def describe(self) -> str:
        return _dt(self.dtype)


class Fp8Scaled(WeightFormat):
    """float8_e4m3fn values with float32 scales on a grid of blocks: ``scale[i, j]`` multiplies
    weight rows ``[i * bn, (i + 1) * bn)`` and columns ``[j * bk, (j + 1) * bk)``, where
    ``(bn, bk) = scale_block(N, K)``. The kernels apply every fp8 format by this one rule; the
    subclasses only choose the block."""

    # Rounding activations to e4m3 (3 mantissa bits) moves each by up to 2^-4 of itself (about
    # 3.6 % standard deviation); that passes through two GEMMs and the activation, so a few
    # percent of the output's scale is expected and 0.1 of its maximum leaves room without
    # hiding a wrong row.
    tolerance: ClassVar[float] = 0.1

    @abstractmethod
    def scale_block(self, n: int, k: int) -> tuple[int, int]:
        """``(bn, bk)``: the rows and columns of an ``[N, K]`` projection one scale covers."""

    def stored(self, n: int, k: int) -> StoredSpec:
        bn, bk = self.scale_block(n, k)
        return {"weight": ((n, k), fp8.FP8_DTYPE), "scale": ((-(-n // bn), -(-k // bk)), torch.float32)}

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        q = tensors["weight"]
        return fp8.dequantize_blocks(q, tensors["scale"], self.scale_block(*q.shape[-2:]))

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = fp8.quantize_blocks(w, self.scale_block(*w.shape[-2:]))
        return {"weight": q, "scale": scale}


@dataclass(frozen=True)
class Fp8Block(Fp8Scaled):
    """One float32 scale per ``block`` (N x K) block; the real weight is ``weight * scale``
    blockwise (DeepSeek-V3's ``weight_scale_inv``)."""

    block: tuple[int, int] = (fp8.SCALE_BLOCK, fp8.SCALE_BLOCK)
    kind: ClassVar[str] = "fp8_block"

    def scale_block(self, n: int, k: int) -> tuple[int, int]:
        return self.block

    @property
    def shard_multiple(self) -> tuple[int, int]:
        return self.block

    def rows(self, part: str, start: int, stop: int) -> slice:
        return self._blocks(part, start, stop, self.block[0], "rows")

    def cols(self, part: str, start: int, stop: int) -> slice:
        return self._blocks(part, start, stop, self.block[1], "columns")

    def _blocks(self, part: str, start: int, stop: int, block: int, what: str) -> slice:
        if part == "weight":
            return slice(start, stop)
        if start % block:
            raise ValueError(f"{what} {start}..{stop} cut a {block}-wide scale block of {self.describe()}")
        return slice(start // block, -(-stop // block))

    def describe(self) -> str:
        return f"fp8 e4m3, {self.block[0]}x{self.block[1]} block scales"


@dataclass(frozen=True)
class Fp8Channel(Fp8Scaled):
    """One float32 scale per output row, ``scale [N, 1]`` (the compressed-tensors / ModelOpt
    ``channel`` strategy's ``weight_scale``): the real weight is ``weight * scale`` row by row."""

    kind: ClassVar[str] = "fp8_channel"

    def scale_block(self, n: int, k: int) -> tuple[int, int]:
        return 1, max(k, 1)

    def describe(self) -> str:
        return "fp8 e4m3, one scale per output channel"


@dataclass(frozen=True)
class Fp8Tensor(Fp8Scaled):
    """One float32 scale per projection of an expert, ``scale [1, 1]`` (ModelOpt /
    compressed-tensors ``tensor`` strategy). Gate and up, which checkpoints scale apart, share
    w13's scale: loading requantizes both to the larger of their scales (as vLLM does), which
    moves a value by at most half an e4m3 step of that scale."""

    kind: ClassVar[str] = "fp8_tensor"
    gate_and_up_together: ClassVar[bool] = True

    def scale_block(self, n: int, k: int) -> tuple[int, int]:
        return max(n, 1), max(k, 1)

    def rows(self, part: str, start: int, stop: int) -> slice:
        return slice(start, stop) if part == "weight" else slice(0, 1)

    def describe(self) -> str:
        return "fp8 e4m3, one scale per tensor"


class Packed4Bit(WeightFormat):
    """4-bit values two to a byte (``weight [N, K/2] uint8``, :mod:`moe_kernels.mlp.packed`) with
    scales per row and ``group`` columns; activations stay in the layer dtype and the Triton
    GEMMs dequantize tiles in their loads. Rows shard freely, columns on whole groups."""

    # The kernels multiply bf16 activations by the dequantized weight rounded to bf16 (8 bits of
    # mantissa), the reference by the float32 one: the bf16 budget of an unquantized layer.
    tolerance: ClassVar[float] = 3e-2
    values_per_element: ClassVar[int] = 2
    #: how the kernels' dequantizing loads read the nibbles (:mod:`moe_kernels.kernels.dequant`)
    packing: ClassVar[str]

    @property
    @abstractmethod
    def group(self) -> int:
        """Columns sharing a scale."""

    @property
    def shard_multiple(self) -> tuple[int, int]:
        return 1, self.group


@dataclass(frozen=True)
class Int4Group(Packed4Bit):
    """int4 with one float32 scale per row and ``group_size`` columns, symmetric (nibble - 8) or
    with a uint8 zero point per group (``zero [N, K/group]``): GPTQ, AWQ and compressed-tensors
    ``pack-quantized`` checkpoints, repacked at load."""

    group_size: int = 128
    symmetric: bool = True
    kind: ClassVar[str] = "int4_group"
    packing: ClassVar[str] = "int4"

    @property
    def group(self) -> int:
        return self.group_size

    def stored(self, n: int, k: int) -> StoredSpec:
        groups = -(-k // self.group_size)
        spec: StoredSpec = {"weight": ((n, k // 2), torch.uint8), "scale": ((n, groups), torch.float32)}
        if not self.symmetric:
            spec["zero"] = ((n, groups), torch.uint8)
        return spec

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        zero = None if self.symmetric else tensors["zero"]
        return packed.dequantize_int4(tensors["weight"], tensors["scale"], zero, self.group_size)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return packed.quantize_int4(w, self.group_size, self.symmetric)

    def describe(self) -> str:
        zeros = "symmetric" if self.symmetric else "zero points"
        return f"int4, group {self.group_size} scales, {zeros}"


@dataclass(frozen=True)
class Mxfp4(Packed4Bit):
    """mxfp4 (OCP microscaling): e2m1 values with one e8m0 scale byte per row and 32 columns
    (``scale [N, K/32] uint8``, ``2^(s - 127)``): gpt-oss's ``*_blocks``/``*_scales``."""

    kind: ClassVar[str] = "mxfp4"
    packing: ClassVar[str] = "mxfp4"

    @property
    def group(self) -> int:
        return packed.MXFP4_GROUP

    def stored(self, n: int, k: int) -> StoredSpec:
        return {"weight": ((n, k // 2), torch.uint8), "scale": ((n, -(-k // self.group)), torch.uint8)}

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return packed.dequantize_mxfp4(tensors["weight"], tensors["scale"])

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return packed.quantize_mxfp4(w)

    def describe(self) -> str:
        return "mxfp4 (e2m1, e8m0 scales per 32)"


#: the float8_e4m3fn formats, all applied by the rule of :meth:`Fp8Scaled.scale_block`
FP8_FORMATS: tuple[type[Fp8Scaled], ...] = (Fp8Block, Fp8Channel, Fp8Tensor)
#: the 4-bit weight-only formats, dequantized inside the Triton GEMMs' loads
PACKED_FORMATS: tuple[type[Packed4Bit], ...] = (Int4Group, Mxfp4)
