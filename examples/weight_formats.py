"""Quantize one bf16 MoE layer into each weight format and run it on the fused decode path.

Without a checkpoint, ``quantize_weights`` stores float weights in a format (one function per
format); ``FusedMoE.load_expert_weights`` takes them (a published GPTQ/AWQ/compressed-tensors/
gpt-oss checkpoint comes through ``moe_kernels.model.published.published_expert_weights``).
Each output is compared with the bf16 layer's: the difference is the format's rounding.

    python examples/weight_formats.py    # a CUDA GPU (fp8 on SM89+), else the CPU (slowly)
"""

from __future__ import annotations

import os

import torch

# The fused path is Triton: without a GPU its kernels run in Triton's CPU interpreter, which
# must be switched on before they are defined (at import)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_kernels import (  # noqa: E402
    FusedMoE,
    FusedTritonExperts,
    LayerConfig,
    LocalPrepareAndFinalize,
    MoEConfig,
    QuantConfig,
    compose,
)
from moe_kernels.mlp.weights import quantize_weights  # noqa: E402

SCHEMES = [
    QuantConfig(scheme="fp8_w8a8_channel"),
    QuantConfig(scheme="fp8_w8a8_tensor"),
    QuantConfig(scheme="int4_w4a16", group_size=64, symmetric=False),
    QuantConfig(scheme="mxfp4"),
]


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moe = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(8, 256, 256, generator=gen) / 16).bfloat16().to(device)
    w2 = (torch.randn(8, 256, 128, generator=gen) / 11).bfloat16().to(device)
    router = torch.randn(8, 256, generator=gen).bfloat16().to(device)
    x = torch.randn(4, 256, generator=gen).bfloat16().to(device)
    outputs = {}
    for quant in [QuantConfig(), *SCHEMES]:
        cfg = LayerConfig(name=quant.scheme, moe=moe, quant=quant)
        kernel = compose(LocalPrepareAndFinalize(), FusedTritonExperts(), cfg, device=device)
        layer = FusedMoE(cfg, device=device, kernel=kernel)
        layer.load_expert_weights(quantize_weights(w13, w2, cfg.mlp.weights))
        layer.load_weights(router_weight=router)
        outputs[quant.scheme] = layer(x).float()
        diff = (outputs[quant.scheme] - outputs["none"]).abs().max() / outputs["none"].abs().max()
        print(f"{quant.scheme:18s} {cfg.mlp.weights.describe():40s} {layer.weights.nbytes() / 2**20:6.2f} MiB, "
              f"max diff to bf16 {diff:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
