"""Checks of a layer call's arguments: a clear error instead of a silent wrong answer."""

from __future__ import annotations

import torch

from moe_kernels.config import LayerConfig


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def expect_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


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


def check_call(
    cfg: LayerConfig,
    device: torch.device,
    x: object,
    topk_weights: object,
    topk_ids: object,
    *,
    max_tokens: int | None,
    check_values: bool,
    num_ids: int | None = None,
) -> None:
    """Types, shapes, dtypes and devices of one call, and ``T <= max_tokens``. With
    ``check_values`` also the expert ids' range (``[-1, num_ids)``, default the experts; physical
    slots range over more) and distinctness within a token (one host sync; skip it on hot paths
    and inside CUDA-graph capture)."""
    moe = cfg.moe
    x = expect_tensor("x", x)
    topk_weights = expect_tensor("topk_weights", topk_weights)
    topk_ids = expect_tensor("topk_ids", topk_ids)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H] (2-D), got shape {list(x.shape)}")
    t = x.shape[0]
    expect_shape("x", x, (t, moe.hidden_size))
    expect_dtype("x", x, (moe.dtype,))
    expect_device("x", x, device)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    expect_shape("topk_ids", topk_ids, (t, moe.top_k))
    expect_shape("topk_weights", topk_weights, (t, moe.top_k))
    expect_dtype("topk_ids", topk_ids, (torch.int32, torch.int64))
    expect_dtype("topk_weights", topk_weights, (torch.float32,))
    expect_device("topk_ids", topk_ids, device)
    expect_device("topk_weights", topk_weights, device)
    if max_tokens is not None and t > max_tokens:
        raise ValueError(
            f"x has {t} tokens but this kernel was built for at most {max_tokens} per call "
            "(raise parallel.max_tokens_per_rank, or set moe.max_tokens_per_chunk to chunk larger batches)"
        )
    if check_values and t > 0:
        # one host sync for all value checks
        ids = topk_ids.sort(dim=1).values
        repeated = ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)).sum()
        lo, hi, dup = torch.stack([ids.min(), ids.max(), repeated.to(ids.dtype)]).tolist()
        limit = moe.num_experts if num_ids is None else num_ids
        if lo < -1 or hi >= limit:
            raise ValueError(f"topk_ids must lie in [-1, {limit}) (-1 = no expert), got values in [{lo}, {hi}]")
        if dup:
            raise ValueError(f"topk_ids repeats an expert within a token's top-k ({dup} repeats)")
