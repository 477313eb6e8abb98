"""Checks of a layer call's arguments: a clear error instead of a silent wrong answer."""

from __future__ import annotations

import torch

from moe_kernels.config import LayerConfig


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def expect_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        want = " or ".join(_dt(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {want}, got {_dt(t.dtype)}")


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def expect_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_weights(cfg: LayerConfig, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """``w13 [E_local, 2I, H]`` and ``w2 [E_local, H, I]`` in the layer's dtype."""
    e, h, i = cfg.num_local_experts, cfg.moe.hidden_size, cfg.moe.intermediate_size
    expect_shape("w13", w13, (e, 2 * i, h))
    expect_shape("w2", w2, (e, h, i))
    expect_dtype("w13", w13, (cfg.moe.dtype,))
    expect_dtype("w2", w2, (cfg.moe.dtype,))
    expect_device("w2", w2, w13.device)
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("w13 and w2 must be contiguous (K-major rows)")


def check_call(
    cfg: LayerConfig,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    max_tokens: int | None,
    check_values: bool,
) -> None:
    """Shapes, dtypes and devices of one call. With ``check_values`` also the expert ids'
    range (one host sync; skip it on hot paths and inside CUDA-graph capture)."""
    moe = cfg.moe
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H] (2-D), got shape {list(x.shape)}")
    t = x.shape[0]
    expect_shape("x", x, (t, moe.hidden_size))
    expect_dtype("x", x, (moe.dtype,))
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    expect_shape("topk_ids", topk_ids, (t, moe.top_k))
    expect_shape("topk_weights", topk_weights, (t, moe.top_k))
    expect_dtype("topk_ids", topk_ids, (torch.int32, torch.int64))
    expect_dtype("topk_weights", topk_weights, (torch.float32,))
    expect_device("topk_ids", topk_ids, x.device)
    expect_device("topk_weights", topk_weights, x.device)
    if max_tokens is not None and t > max_tokens:
        raise ValueError(
            f"x has {t} tokens but this kernel takes at most {max_tokens} per rank (raise parallel.max_tokens_per_rank)"
        )
    if check_values and t > 0:
        # one host sync for all value checks
        ids = topk_ids.sort(dim=1).values
        repeated = ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)).sum()
        lo, hi, dup = torch.stack([ids.min(), ids.max(), repeated.to(ids.dtype)]).tolist()
        if lo < -1 or hi >= moe.num_experts:
            raise ValueError(
                f"topk_ids must lie in [-1, {moe.num_experts}) (-1 = no expert), got values in [{lo}, {hi}]"
            )
        if dup:
            raise ValueError(f"topk_ids repeats an expert within a token's top-k ({dup} repeats)")
