"""The expert weights every experts implementation takes: one typed object, quantized or not."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_kernels.config import LayerConfig

FP8_DTYPE = torch.float8_e4m3fn


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass(frozen=True)
class ExpertWeights:
    """The local experts' MLP weights (nn.Linear layout: rows are output features, K-major).

    ``w13 [E_local, 2I, H]``: rows ``[0, I)`` gate, ``[I, 2I)`` up (SiLU on the gate half);
    ``w2 [E_local, H, I]``. Unquantized: both in the activation dtype, no scales.
    ``fp8_w8a8_block``: both float8_e4m3fn with float32 block scales, one per 128 x 128 block:
    ``w13_scale [E_local, ceil(2I/128), ceil(H/128)]``, ``w2_scale [E_local, ceil(H/128),
    ceil(I/128)]``; the real weight is ``w * scale`` blockwise (DeepSeek-V3's ``weight_scale_inv``).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]

    @property
    def inter(self) -> int:
        return self.w2.shape[2]

    @property
    def is_fp8(self) -> bool:
        return self.w13_scale is not None

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def check(self, cfg: LayerConfig, device: torch.device) -> None:
        """Raise ``TypeError``/``ValueError`` naming the tensor unless these are the weights of
        ``cfg``'s local experts on ``device``."""
        e, h, i = cfg.num_local_experts, cfg.moe.hidden_size, cfg.moe.intermediate_size
        fp8 = cfg.quant.is_fp8
        want = FP8_DTYPE if fp8 else cfg.moe.dtype
        for name, t, shape in (("w13", self.w13, (e, 2 * i, h)), ("w2", self.w2, (e, h, i))):
            _expect(name, t, shape, want, device)
        scales = (("w13_scale", self.w13_scale, self.w13.shape), ("w2_scale", self.w2_scale, self.w2.shape))
        for name, s, weight_shape in scales:
            if not fp8:
                if s is not None:
                    raise ValueError(f"{name}: the layer is unquantized (quant.scheme none) but a scale was given")
                continue
            if s is None:
                raise ValueError(f"{name}: quant.scheme fp8_w8a8_block needs float32 block scales, got None")
            block_n, block_k = cfg.quant.weight_block
            shape = (e, math.ceil(weight_shape[1] / block_n), math.ceil(weight_shape[2] / block_k))
            _expect(name, s, shape, torch.float32, device)

    def dequantized(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert ``expert``'s ``(w13 [2I, H], w2 [H, I])`` as float32, the scales applied
        blockwise: what the reference computes with (one expert at a time, so the float32 copy
        stays small)."""
        if not self.is_fp8:
            return self.w13[expert].float(), self.w2[expert].float()
        from moe_kernels.kernels.quant import dequantize_fp8_blocks

        assert self.w13_scale is not None and self.w2_scale is not None
        w13 = dequantize_fp8_blocks(self.w13[expert : expert + 1], self.w13_scale[expert : expert + 1])[0]
        w2 = dequantize_fp8_blocks(self.w2[expert : expert + 1], self.w2_scale[expert : expert + 1])[0]
        return w13, w2

    def nbytes(self) -> int:
        tensors = (self.w13, self.w2, self.w13_scale, self.w2_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _expect(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {_dt(dtype)}, got {_dt(t.dtype)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the kernel's device), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (K-major rows), got strides {t.stride()}")
