"""The EP-local layer shapes the benchmarks and the tuner measure, and how a config becomes one.

An EP-local layer is what one rank computes: its ``E_local`` experts, each token routed to
``top_k`` of them (uniformly at random, distinct). DeepSeek-V3 at EP=8 is 32 local experts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig


@dataclass(frozen=True)
class BenchShape:
    """``num_experts`` local experts, each token picks ``top_k`` of them; H and I of each expert."""

    label: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int

    def layer(self, max_tokens: int, quant: str = "none") -> LayerConfig:
        """The single-rank layer of this shape, built for calls of up to ``max_tokens`` tokens."""
        moe = MoEConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            hidden_size=self.hidden,
            intermediate_size=self.inter,
            dtype=torch.bfloat16,
        )
        return LayerConfig(
            name=self.label,
            moe=moe,
            parallel=ParallelConfig(max_tokens_per_rank=max_tokens),
            quant=QuantConfig(scheme=quant),  # type: ignore[arg-type]
        )

    @classmethod
    def of(cls, cfg: LayerConfig) -> BenchShape:
        """The EP-local shape of a layer config (one rank of its expert parallelism)."""
        e_local = cfg.num_local_experts
        ep = cfg.parallel.ep_size
        label = f"{cfg.name or 'layer'}" + (
            f", EP={ep} local ({e_local} of {cfg.moe.num_experts} experts)" if ep > 1 else ""
        )
        return cls(label, e_local, min(cfg.moe.top_k, e_local), cfg.moe.hidden_size, cfg.moe.intermediate_size)


SHAPES: dict[str, BenchShape] = {
    "deepseek-v3": BenchShape("DeepSeek-V3, EP=8 local (32 of 256 experts), top-8", 32, 8, 7168, 2048),
    "qwen3-30b-a3b": BenchShape("Qwen3-30B-A3B (128 experts), top-8", 128, 8, 2048, 768),
    "qwen3-235b-a22b": BenchShape("Qwen3-235B-A22B, EP=8 local (16 of 128 experts), top-8", 16, 8, 4096, 1536),
    "mixtral-8x7b": BenchShape("Mixtral-8x7B (8 experts), top-2", 8, 2, 4096, 14336),
    # nobody tuned for it: no table of ours, no vLLM config file (E=40, N=1536)
    "untuned": BenchShape("an untuned shape: 40 experts, top-6, H=3072, I=1536", 40, 6, 3072, 1536),
}


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
