"""The EP-local layer shapes the benchmarks and the tuner measure, and how a config becomes one.

An EP-local layer is what one rank computes: its ``E_local`` experts, each token routed to
``top_k`` of them (uniformly at random, distinct). DeepSeek-V3 at EP=8 is 32 local experts.
"""

from __future__ import annotations

import argparse

from moe_kernels.selection.problems import SHAPES


def int_list(text: str, minimum: int) -> list[int]:
    """``"1,16,64"`` -> ``[1, 16, 64]`` for command-line options, each at least ``minimum``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def positive_ints(text: str) -> list[int]:
    """Token counts, sizes: integers >= 1."""
    return int_list(text, 1)


def non_negative_ints(text: str) -> list[int]:
    """Counts that may be zero (SMs kept back, say)."""
    return int_list(text, 0)


def shape_names(text: str) -> list[str]:
    """``"deepseek-v3,qwen3-30b"`` -> the names, each a key of :data:`SHAPES`."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    return names
