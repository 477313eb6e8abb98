"""One MoE layer of a Hugging Face model directory: ``config.json`` + safetensors in, a FusedMoE out.

``FusedMoE.from_pretrained(path, layer=N)`` reads the family's fields from ``config.json`` (router,
activation, biases, shared experts, norms around the experts; anything it cannot compute is refused
naming the field) and loads layer N's tensors under the family's naming. Given no directory, this
example writes a tiny gpt-oss-style one (transposed, interleaved gate/up with expert biases, a router
bias, clamped SwiGLU with alpha 1.702 and ``up + 1``) and loads that.

    python examples/from_pretrained.py                      # the tiny gpt-oss-style layer
    python examples/from_pretrained.py /models/gpt-oss-20b 3
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_kernels import FusedMoE

E, K, H, INTER = 8, 2, 64, 48


def write_gpt_oss_like(directory: Path) -> None:
    """gpt-oss's config fields and key names for one layer, seeded random values."""
    config = {
        "model_type": "gpt_oss",
        "num_hidden_layers": 1,
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_local_experts": E,
        "num_experts_per_tok": K,
        "swiglu_limit": 7.0,
        "dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    p = "model.layers.0.mlp"
    tensors = {
        f"{p}.router.weight": randn(E, H),
        f"{p}.router.bias": randn(E),
        f"{p}.experts.gate_up_proj": randn(E, H, 2 * INTER, scale=H**-0.5),  # [E, H, 2I], gate/up interleaved
        f"{p}.experts.gate_up_proj_bias": randn(E, 2 * INTER, scale=0.1),
        f"{p}.experts.down_proj": randn(E, INTER, H, scale=INTER**-0.5),
        f"{p}.experts.down_proj_bias": randn(E, H, scale=0.1),
    }
    save_file(tensors, str(directory / "model.safetensors"))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if len(sys.argv) > 1:
        layer = FusedMoE.from_pretrained(sys.argv[1], layer=int(sys.argv[2]), device=device)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_gpt_oss_like(Path(tmp))
            layer = FusedMoE.from_pretrained(tmp, layer=0, device=device)
    m = layer.cfg.moe
    print(layer)
    print(f"activation: {m.activation.describe()}; expert biases: {m.expert_bias}; router bias: {m.router_bias}")
    x = torch.randn(4, m.hidden_size, device=device, dtype=m.dtype)
    print(f"output: {list(layer(x).shape)} {layer(x).dtype}")


if __name__ == "__main__":
    main()
