"""Quantization schemes: the names ``quant.scheme`` takes, each a weight format plus how the
GEMMs' activation inputs are quantized.

A scheme reads the parameters it declares from the config's ``quant`` section (the others must
keep their defaults, so a parameter that would be ignored is an error), checks them against the
layer's shape and dtype, and builds the :class:`~moe_kernels.mlp.formats.WeightFormat` and
:class:`~moe_kernels.mlp.act_quant.ActQuant` the experts compute with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moe_kernels.mlp import fp8, packed
from moe_kernels.mlp.act_quant import ActQuant
from moe_kernels.mlp.formats import Dense, Fp8Block, Fp8Channel, Fp8Tensor, Int4Group, Mxfp4, WeightFormat

Params = Mapping[str, Any]


@dataclass(frozen=True)
class Scheme:
    """``build(params, dtype) -> (weight format, activation quantization or None)``;
    ``check_params(params)`` and ``check_layer(params, dtype, hidden, inter)`` raise
    ``ValueError`` naming what does not fit."""

    name: str
    description: str
    #: the ``quant`` fields this scheme reads
    params: tuple[str, ...]
    build: Callable[[Params, torch.dtype], tuple[WeightFormat, ActQuant | None]]
    check_params: Callable[[Params], None]
    check_layer: Callable[[Params, torch.dtype, int, int], None]


def _no_params(params: Params) -> None:
    return None


def _any_layer(params: Params, dtype: torch.dtype, hidden: int, inter: int) -> None:
    return None


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _check_fp8_block_params(params: Params) -> None:
    block, group = tuple(params["weight_block"]), params["act_group"]
    implemented = (fp8.SCALE_BLOCK, fp8.SCALE_BLOCK)
    if block != implemented or group != fp8.SCALE_BLOCK:
        raise ValueError(
            f"weight_block must be {list(implemented)} and act_group {fp8.SCALE_BLOCK} (the only blocking the fp8 "
            f"kernels implement); got weight_block={list(block)}, act_group={group}"
        )


def _check_fp8_block_layer(params: Params, dtype: torch.dtype, hidden: int, inter: int) -> None:
    block = tuple(params["weight_block"])
    if dtype != torch.bfloat16:
        raise ValueError(f"fp8_w8a8_block computes in bfloat16: moe.dtype must be bfloat16, got {_dtype_name(dtype)}")
    bad = [f"{n}={v}" for n, v in (("hidden_size", hidden), ("intermediate_size", inter)) if v % block[0]]
    if bad:
        # gate and up rows are stacked into one weight: a block must not straddle them
        raise ValueError(
            f"fp8_w8a8_block needs hidden_size and intermediate_size multiples of {block[0]}; got {', '.join(bad)}"
        )


def _check_act_group(params: Params) -> None:
    if params["act_group"] != fp8.SCALE_BLOCK:
        raise ValueError(
            f"act_group must be {fp8.SCALE_BLOCK} (the only activation grouping the fp8 kernels implement); "
            f"got {params['act_group']}"
        )


def _check_bf16_layer(name: str) -> Callable[[Params, torch.dtype, int, int], None]:
    def check(params: Params, dtype: torch.dtype, hidden: int, inter: int) -> None:
        if dtype != torch.bfloat16:
            raise ValueError(f"{name} computes in bfloat16: moe.dtype must be bfloat16, got {_dtype_name(dtype)}")

    return check


def _fp8_scheme(name: str, weights: str, fmt: WeightFormat) -> Scheme:
    """A scheme of fp8 weights scaled per ``weights`` and activations quantized per token and
    ``act_group`` columns: a finer grouping than vLLM's per-token scale for these checkpoints (the
    same quantize kernels and fp8 dispatch as the block scheme; a checkpoint's static
    ``input_scale`` is not needed)."""
    return Scheme(
        name,
        f"fp8 e4m3 weights with one float32 scale per {weights}, activations quantized per token and act_group "
        "columns (compressed-tensors / ModelOpt FP8)",
        ("act_group",),
        lambda params, dtype: (fmt, ActQuant(group=params["act_group"])),
        _check_act_group,
        _check_bf16_layer(name),
    )


def _check_group_size(params: Params) -> None:
    group = params["group_size"]
    if group < 16 or group & (group - 1):
        # a K tile of the GEMMs must lie in one group: a power of two >= their smallest tile
        raise ValueError(f"group_size must be a power of two >= 16; got {group}")


def _check_groups_divide(
    name: str, group_of: Callable[[Params], int]
) -> Callable[[Params, torch.dtype, int, int], None]:
    def check(params: Params, dtype: torch.dtype, hidden: int, inter: int) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"{name} computes in bf16/fp16: moe.dtype must be one of them, got {_dtype_name(dtype)}")
        group = group_of(params)
        bad = [f"{n}={v}" for n, v in (("hidden_size", hidden), ("intermediate_size", inter)) if v % group]
        if bad:
            raise ValueError(
                f"{name} needs hidden_size and intermediate_size multiples of its group {group}; got {', '.join(bad)}"
            )

    return check


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme(
            "none",
            "weights and activations in moe.dtype",
            (),
            lambda params, dtype: (Dense(dtype), None),
            _no_params,
            _any_layer,
        ),
        Scheme(
            "fp8_w8a8_block",
            "fp8 e4m3 weights with one float32 scale per weight_block block, activations quantized per token "
            "and act_group columns (DeepSeek-V3)",
            ("weight_block", "act_group"),
            lambda params, dtype: (
                Fp8Block(tuple(params["weight_block"])),
                ActQuant(group=params["act_group"]),
            ),
            _check_fp8_block_params,
            _check_fp8_block_layer,
        ),
        _fp8_scheme("fp8_w8a8_channel", "output channel", Fp8Channel()),
        _fp8_scheme("fp8_w8a8_tensor", "expert projection", Fp8Tensor()),
        Scheme(
            "int4_w4a16",
            "int4 weights with one float32 scale (and, not symmetric, a zero point) per row and group_size columns, "
            "activations in moe.dtype (GPTQ, AWQ, compressed-tensors pack-quantized)",
            ("group_size", "symmetric"),
            lambda params, dtype: (Int4Group(params["group_size"], params["symmetric"]), None),
            _check_group_size,
            _check_groups_divide("int4_w4a16", lambda params: params["group_size"]),
        ),
        Scheme(
            "mxfp4",
            "mxfp4 weights (e2m1, one e8m0 scale per 32 columns), activations in moe.dtype (gpt-oss)",
            (),
            lambda params, dtype: (Mxfp4(), None),
            _no_params,
            _check_groups_divide("mxfp4", lambda params: packed.MXFP4_GROUP),
        ),
    )
}
