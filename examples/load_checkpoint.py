"""Build a FusedMoE layer and load it from a safetensors checkpoint, as a serving engine does.

Checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V3) store each expert as three nn.Linear weights
named like ``model.layers.N.mlp.experts.E.gate_proj.weight``, often sharded over several
files with a ``model.safetensors.index.json``. This example writes such a checkpoint for the
tiny test layer (seeded random values, two shards), then loads layer 0 from it: the naming is
detected, and only this rank's experts are read.

    python examples/load_checkpoint.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_kernels import FusedMoE, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"


def write_checkpoint(directory: Path, num_experts: int, hidden: int, inter: int, layer: int = 0) -> None:
    """Two shards (experts split in halves) and the index that maps every key to its shard."""
    gen = torch.Generator().manual_seed(0)
    prefix = f"model.layers.{layer}.mlp"
    shards: list[dict[str, torch.Tensor]] = [
        {f"{prefix}.gate.weight": torch.randn(num_experts, hidden, generator=gen)},
        {},
    ]
    for e in range(num_experts):
        shard = shards[e * 2 // num_experts]
        for proj, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            shard[f"{prefix}.experts.{e}.{proj}.weight"] = (
                torch.randn(*shape, generator=gen) * shape[1] ** -0.5
            ).bfloat16()
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update(dict.fromkeys(shard, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    cfg = load_config(CONFIG)
    m = cfg.moe
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), m.num_experts, m.hidden_size, m.intermediate_size)
        layer = FusedMoE(cfg)
        layer.load_checkpoint(tmp, layer=0)
    print(layer)
    print(layer.selection.explain() if layer.selection else "")

    hidden_states = torch.randn(5, m.hidden_size, generator=torch.Generator().manual_seed(1)).to(m.dtype)
    out = layer(hidden_states.to(layer.w13.device))
    print(f"out: {list(out.shape)} {out.dtype}, mean |out| = {out.float().abs().mean().item():.4f}")


if __name__ == "__main__":
    main()
