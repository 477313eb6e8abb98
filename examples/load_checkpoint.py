"""Build a FusedMoE layer and load it from checkpoint-style tensors.

Checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V3) store each expert as three nn.Linear weights
named like ``model.layers.N.mlp.experts.E.gate_proj.weight``. This example makes such a state
dict with random values, groups it per expert id and hands it to ``load_weights``.

    python examples/load_checkpoint.py
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moe_kernels import load_config
from moe_kernels.layer import FusedMoE

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"
EXPERT_WEIGHT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fake_checkpoint(num_experts: int, hidden: int, inter: int, layer: int = 0) -> dict[str, torch.Tensor]:
    """A state dict as a checkpoint holds one MoE layer: fp32 here, any float dtype works."""
    gen = torch.Generator().manual_seed(0)
    prefix = f"model.layers.{layer}.mlp"
    state = {f"{prefix}.gate.weight": torch.randn(num_experts, hidden, generator=gen) * hidden**-0.5}
    for e in range(num_experts):
        state[f"{prefix}.experts.{e}.gate_proj.weight"] = torch.randn(inter, hidden, generator=gen) * hidden**-0.5
        state[f"{prefix}.experts.{e}.up_proj.weight"] = torch.randn(inter, hidden, generator=gen) * hidden**-0.5
        state[f"{prefix}.experts.{e}.down_proj.weight"] = torch.randn(hidden, inter, generator=gen) * inter**-0.5
    return state


def main() -> None:
    cfg = load_config(CONFIG)
    m = cfg.moe
    state = fake_checkpoint(m.num_experts, m.hidden_size, m.intermediate_size)

    per_expert: dict[str, dict[int, torch.Tensor]] = {"gate_proj": {}, "up_proj": {}, "down_proj": {}}
    for name, tensor in state.items():
        match = EXPERT_WEIGHT.search(name)
        if match:
            per_expert[match.group(2)][int(match.group(1))] = tensor

    layer = FusedMoE.from_config(cfg)
    layer.load_weights(**per_expert, router_weight=state["model.layers.0.mlp.gate.weight"])
    print(layer)
    print(layer.selection.explain())

    hidden_states = torch.randn(5, m.hidden_size, dtype=m.dtype, device=layer.w13.device)
    out = layer(hidden_states)
    print(f"out: {list(out.shape)} {out.dtype}, mean |out| = {out.float().abs().mean().item():.4f}")


if __name__ == "__main__":
    main()
