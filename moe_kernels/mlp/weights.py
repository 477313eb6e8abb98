"""The expert weights every experts implementation takes: one typed object, quantized or not."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_kernels.mlp.formats import Dense, Fp8Block, WeightFormat
from moe_kernels.mlp.spec import ExpertMLP

PROJECTIONS = ("w13", "w2")


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass(frozen=True)
class ExpertWeights:
    """The local experts' MLP weights (``nn.Linear`` layout: rows are output features, K-major).

    ``w13 [E_local, 2I, H]``: rows ``[0, I)`` gate, ``[I, 2I)`` up; ``w2 [E_local, H, I]``, stored
    as ``format`` says (:mod:`moe_kernels.mlp.formats`): in the activation dtype with no scales
    (:class:`~moe_kernels.mlp.formats.Dense`), or float8_e4m3fn with float32 block scales
    ``w13_scale [E_local, ceil(2I/128), ceil(H/128)]``, ``w2_scale [E_local, ceil(H/128),
    ceil(I/128)]`` (:class:`~moe_kernels.mlp.formats.Fp8Block`: the real weight is ``w * scale``
    blockwise, DeepSeek-V3's ``weight_scale_inv``), or any other format's tensors (``*_scale``
    and ``*_zero`` as :meth:`~moe_kernels.mlp.formats.WeightFormat.stored` names them: e.g. int4
    ``w13 [E_local, 2I, H/2] uint8`` with ``w13_scale [E_local, 2I, H/group]``). ``format``
    defaults to what the tensors are: dense without scales, fp8 blocks with them. Expert biases (an
    MLP with ``biases``): ``w13_bias [E_local, 2I]`` (gate then up, as ``w13``'s rows) and ``w2_bias
    [E_local, H]`` in the activation dtype, added to each GEMM's fp32 result.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    format: WeightFormat | None = None
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    w13_zero: torch.Tensor | None = None
    w2_zero: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.format is None:
            if isinstance(self.w13, torch.Tensor) and self.w13.dtype == torch.uint8:
                # packed codes say nothing of their format (int4 or mxfp4, group, zero points)
                raise ValueError("w13 is uint8 (packed 4-bit): give format= (an Int4Group or Mxfp4)")
            if self.w13_scale is None and isinstance(self.w13, torch.Tensor):
                inferred: WeightFormat = Dense(self.w13.dtype)
            else:
                inferred = Fp8Block()
            object.__setattr__(self, "format", inferred)

    @property
    def weight_format(self) -> WeightFormat:
        assert self.format is not None  # set in __post_init__
        return self.format

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]

    @property
    def inter(self) -> int:
        return self.w2.shape[2] * self.weight_format.values_per_element

    @property
    def is_quantized(self) -> bool:
        return self.weight_format.is_quantized

    @property
    def has_biases(self) -> bool:
        return self.w13_bias is not None or self.w2_bias is not None

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def tensors(self, projection: str) -> dict[str, torch.Tensor | None]:
        """``{"weight": ..., "scale": ..., "zero": ..., "bias": ...}`` of ``"w13"`` or ``"w2"`` (all experts)."""
        if projection == "w13":
            return {"weight": self.w13, "scale": self.w13_scale, "zero": self.w13_zero, "bias": self.w13_bias}
        if projection == "w2":
            return {"weight": self.w2, "scale": self.w2_scale, "zero": self.w2_zero, "bias": self.w2_bias}
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")

    def check(self, mlp: ExpertMLP, num_experts: int, device: torch.device) -> None:
        """Raise ``TypeError``/``ValueError`` naming the tensor unless these are ``num_experts``
        experts of ``mlp`` on ``device``, stored as ``mlp.weights``."""
        for projection, stored in mlp.stored().items():
            for part, t in self.tensors(projection).items():
                name = projection if part == "weight" else f"{projection}_{part}"
                if part not in stored:
                    if t is not None and part == "bias":
                        raise ValueError(f"{name}: the layer has no expert biases ({mlp.describe()}), but one is given")
                    if t is not None:
                        why = "is unquantized" if not mlp.weights.is_quantized else "stores no such tensor"
                        raise ValueError(f"{name}: the layer {why} ({mlp.weights.describe()}), but one was given")
                    continue
                shape, dtype = stored[part]
                _expect(name, t, (num_experts, *shape), dtype, device)
        if self.format != mlp.weights:
            # same tensors, another meaning (a block size, a packing): computing would be wrong
            have, want = self.weight_format.describe(), mlp.weights.describe()
            raise TypeError(f"weights are stored as {have}, the layer wants {want}")

    def dequantized(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert ``expert``'s ``(w13 [2I, H], w2 [H, I])`` as float32, scales applied:
        what the reference computes with (one expert at a time, so the float32 copy stays small)."""
        fmt = self.weight_format
        out = []
        for projection in PROJECTIONS:
            tensors = {k: v[expert] for k, v in self.tensors(projection).items() if v is not None}
            out.append(fmt.dequantize(tensors))
        return out[0], out[1]

    def biases(self, expert: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Local expert ``expert``'s ``(w13_bias [2I], w2_bias [H])`` as float32 (``None``: no bias)."""
        return tuple(None if b is None else b[expert].float() for b in (self.w13_bias, self.w2_bias))  # type: ignore[return-value]

    def nbytes(self) -> int:
        tensors: tuple[torch.Tensor | None, ...] = (self.w13, self.w2, self.w13_scale, self.w2_scale)
        tensors += (self.w13_zero, self.w2_zero, self.w13_bias, self.w2_bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_weights(w13: torch.Tensor, w2: torch.Tensor, fmt: WeightFormat) -> ExpertWeights:
    """Float ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` stored as ``fmt`` (setup time, plain torch;
    one expert at a time, so the float32 temporaries stay one expert's size)."""
    q13, q2 = ({part: torch.stack([d[part] for d in per]) for part in per[0]}
               for per in ([fmt.quantize(w[e]) for e in range(w.shape[0])] for w in (w13, w2)))  # fmt: skip
    return ExpertWeights(
        q13["weight"],
        q2["weight"],
        q13.get("scale"),
        q2.get("scale"),
        fmt,
        w13_zero=q13.get("zero"),
        w2_zero=q2.get("zero"),
    )


def _expect(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if t is None:
        raise ValueError(f"{name}: missing (expected {list(shape)} {_dt(dtype)})")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {_dt(dtype)}, got {_dt(t.dtype)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the kernel's device), got {t.device}")
    if not t.is_contiguous() and name in PROJECTIONS:
        raise ValueError(f"{name} must be contiguous (K-major rows), got strides {t.stride()}")
