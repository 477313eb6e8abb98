"""What the tuner and the benchmarks measure on: EP-local layer shapes, random problems and
weights of a shape, and the valid pairs of the registry.

An EP-local layer is what one rank computes: its ``E_local`` experts, each token routed to
``top_k`` of them (uniformly at random, distinct). DeepSeek-V3 at EP=8 is 32 local experts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
from moe_kernels.mlp.weights import PROJECTIONS, ExpertWeights, quantize_weights


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
        return cls(label, e_local, min(cfg.moe.top_k, e_local), cfg.moe.hidden_size, cfg.mlp.inter)


SHAPES: dict[str, BenchShape] = {
    "deepseek-v3": BenchShape("DeepSeek-V3, EP=8 local (32 of 256 experts), top-8", 32, 8, 7168, 2048),
    "qwen3-30b-a3b": BenchShape("Qwen3-30B-A3B (128 experts), top-8", 128, 8, 2048, 768),
    "qwen3-235b-a22b": BenchShape("Qwen3-235B-A22B, EP=8 local (16 of 128 experts), top-8", 16, 8, 4096, 1536),
    "mixtral-8x7b": BenchShape("Mixtral-8x7B (8 experts), top-2", 8, 2, 4096, 14336),
    # nobody tuned for it: no table of ours, no vLLM config file (E=40, N=1536)
    "untuned": BenchShape("an untuned shape: 40 experts, top-6, H=3072, I=1536", 40, 6, 3072, 1536),
}


#: where problems and weights are made (the tests run the measuring code on the CPU)
DEVICE = "cuda"


def make_problem(shape: BenchShape, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, H]`` bf16, ``topk_weights [T, K]`` f32 (rows sum to 1), ``topk_ids [T, K]`` int32."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, shape.hidden, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(tokens, shape.num_experts, device=DEVICE, generator=gen).argsort(dim=1)[:, : shape.top_k]
    weights = torch.rand(tokens, shape.top_k, device=DEVICE, generator=gen)
    weights /= weights.sum(dim=1, keepdim=True)
    return x, weights, ids.to(torch.int32).contiguous()


def make_weights(shape: BenchShape, seed: int = 0, quant: str = "none") -> ExpertWeights:
    """Random bf16 expert weights (N(0, 1/fan_in)) stored in the weight format of scheme ``quant``."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    w13 = torch.randn(e, 2 * i, h, device=DEVICE, dtype=torch.bfloat16, generator=gen).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, device=DEVICE, dtype=torch.bfloat16, generator=gen).mul_(i**-0.5)
    return quantize_weights(w13, w2, shape.layer(1, quant).mlp.weights)


def dequantized(w: ExpertWeights) -> ExpertWeights:
    """The bf16 weights a quantized layer's weights stand for (what its bf16 twin runs on)."""
    fmt = w.weight_format
    w13, w2 = (fmt.dequantize({k: v for k, v in w.tensors(p).items() if v is not None}) for p in PROJECTIONS)
    return ExpertWeights(w13.bfloat16(), w2.bfloat16())


def valid_pairs(cfg: Any) -> list[tuple[str, Callable[[], Any]]]:
    """``(name, build)`` for every registered pair the composer accepts for ``cfg`` here
    (the reference loop left out: it syncs per expert); ``build()`` composes a fresh kernel."""
    from moe_kernels.core.compose import check_pair, layer_context, pair_name
    from moe_kernels.selection import registry

    ctx = layer_context(cfg)
    out: list[tuple[str, Callable[[], Any]]] = []
    for make_pf in registry.PREPARE_FINALIZE:
        for make_ex in registry.EXPERTS:
            pf, ex = make_pf(cfg), make_ex(cfg)
            if ex.name == "TorchReferenceExperts" or not all(c.ok for c in check_pair(pf, ex, ctx)):
                continue

            out.append((pair_name(pf, ex), functools.partial(_compose_fresh, make_pf, make_ex, cfg)))
    return out


def _compose_fresh(make_pf: Callable[[Any], Any], make_ex: Callable[[Any], Any], cfg: Any) -> Any:
    """A newly composed kernel of the pair, with a workspace cache of its own."""
    from moe_kernels.core.compose import WorkspaceCache, compose

    return compose(make_pf(cfg), make_ex(cfg), cfg, workspace_cache=WorkspaceCache())
