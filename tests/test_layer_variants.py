"""The layer-level variants around the experts, each against a plain torch loop written here from the
model's definition: zero-compute identity experts (LongCat-Flash), the router weight on the expert's
input (Llama-4), an RMSNorm on the experts' input (Gemma-4) and on the output (A.X-K1), a bias on the
output (JetMoE), a scaled shared expert (Cohere2's average), a shared expert with its own activation
(HY-V4); and the refusals of what does not combine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import LayerConfig, MoEConfig
from moe_kernels.mlp.activations import Activation
from moe_kernels.model.layer import FusedMoE

E, K, H, INTER, S, T = 6, 2, 32, 16, 24, 10


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def expert(t: dict[str, torch.Tensor], e: int, x: torch.Tensor) -> torch.Tensor:
    return swiglu(x, t["gate"][e], t["up"][e], t["down"][e])


def build(**fields: object) -> tuple[FusedMoE, dict[str, torch.Tensor]]:
    moe = MoEConfig(
        num_experts=E, top_k=fields.pop("top_k", K), hidden_size=H, intermediate_size=INTER, dtype=torch.float32,
        **fields,
    )  # fmt: skip
    layer = FusedMoE(LayerConfig(moe=moe), device="cpu")
    g = torch.Generator().manual_seed(0)
    t = {
        "gate": torch.randn(E, INTER, H, generator=g) * 0.3,
        "up": torch.randn(E, INTER, H, generator=g) * 0.3,
        "down": torch.randn(E, H, INTER, generator=g) * 0.3,
        "router": torch.randn(moe.router_width, H, generator=g),
        "x": torch.randn(T, H, generator=g),
        "norm": 1 + 0.5 * torch.randn(H, generator=g),
        "bias": torch.randn(H, generator=g),
        "shared_gate": torch.randn(S, H, generator=g) * 0.3,
        "shared_up": torch.randn(S, H, generator=g) * 0.3,
        "shared_down": torch.randn(H, S, generator=g) * 0.3,
    }
    shared = {}
    if moe.num_shared_experts:
        shared = {
            "shared_gate_proj": t["shared_gate"],
            "shared_up_proj": t["shared_up"],
            "shared_down_proj": t["shared_down"],
        }
    layer.load_weights(gate_proj=t["gate"], up_proj=t["up"], down_proj=t["down"], router_weight=t["router"], **shared)
    return layer, t


def softmax_topk(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(x @ router.T, dim=-1)
    w, ids = probs.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_identity_experts_add_weight_times_x() -> None:
    layer, t = build(identity_experts=3, renormalize=False)
    probs = torch.softmax(t["x"] @ t["router"].T, dim=-1)  # over E + 3
    w, ids = probs.topk(K, dim=-1)
    ref = torch.zeros(T, H)
    for i in range(T):
        for k in range(K):
            e = int(ids[i, k])
            x = t["x"][i : i + 1]
            y = x if e >= E else swiglu(x, t["gate"][e], t["up"][e], t["down"][e])
            ref[i] += w[i, k] * y[0]
    assert (ids >= E).any() and (ids < E).any()  # both kinds are exercised
    assert_close(layer(t["x"]), ref)


def test_router_weight_on_the_expert_input() -> None:
    layer, t = build(top_k=1, weight_on_input=True, scoring="sigmoid", choose_on="logits", renormalize=False)
    logits = t["x"] @ t["router"].T
    top, ids = logits.topk(1, dim=-1)
    ref = torch.stack(
        [
            swiglu(t["x"][i] * torch.sigmoid(top[i]), t["gate"][e], t["up"][e], t["down"][e])
            for i, e in enumerate(ids[:, 0])
        ]
    )
    assert_close(layer(t["x"]), ref)
    with pytest.raises(ValueError, match="weight_on_input needs top_k 1"):
        MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=INTER, weight_on_input=True)


def test_norms_and_bias_around_the_experts() -> None:
    layer, t = build(input_norm_eps=1e-6, output_norm_eps=1e-6, output_bias=True)
    layer.load_extras(input_norm=t["norm"], output_norm=t["norm"].flip(0), output_bias=t["bias"])
    w, ids = softmax_topk(t["x"], t["router"], K)  # the router reads the un-normed input
    xn = rms(t["x"], t["norm"])
    routed = torch.stack(
        [
            sum(w[i, k] * swiglu(xn[i], t["gate"][e], t["up"][e], t["down"][e]) for k, e in enumerate(ids[i]))
            for i in range(T)
        ]
    )
    assert_close(layer(t["x"]), rms(routed + t["bias"], t["norm"].flip(0)))


def test_the_layer_refuses_to_run_without_its_extras() -> None:
    layer, t = build(output_bias=True)
    with pytest.raises(RuntimeError, match="output_bias"):
        layer(t["x"])
    with pytest.raises(ValueError, match="input_norm: the layer has no such tensor"):
        layer.load_extras(input_norm=t["norm"])


def test_shared_expert_scaled_and_with_its_own_activation() -> None:
    clamp = Activation("silu", limit=0.5)
    layer, t = build(
        num_shared_experts=1, shared_intermediate_size=S, shared_scale=0.5, routed_scaling_factor=0.5,
        activation=clamp, shared_activation="silu",
    )  # fmt: skip
    w, ids = softmax_topk(t["x"], t["router"], K)

    def clamped(x: torch.Tensor, e: int) -> torch.Tensor:
        g, u = (x @ t["gate"][e].T).clamp(max=0.5), (x @ t["up"][e].T).clamp(-0.5, 0.5)
        return (F.silu(g) * u) @ t["down"][e].T

    routed = torch.stack([sum(w[i, k] * clamped(t["x"][i], e) for k, e in enumerate(ids[i])) for i in range(T)])
    shared = swiglu(t["x"], t["shared_gate"], t["shared_up"], t["shared_down"])
    assert_close(layer(t["x"]), (routed + shared) / 2)  # Cohere2's average of the two


def test_tensor_parallel_read_of_non_gated_experts(tmp_path) -> None:
    """Nemotron-H's non-gated experts and shared expert (no gate projection) read as one TP rank's
    slice: rows of up, columns of down, equal to slicing the whole read."""
    from safetensors.torch import save_file

    from moe_kernels.model.checkpoint import read_moe_layer

    p, inter, width = "backbone.layers.0.mixer", 64, 48
    g = torch.Generator().manual_seed(0)
    tensors = {f"{p}.gate.weight": torch.randn(2, H, generator=g), f"{p}.gate.e_score_correction_bias": torch.zeros(2)}
    for e in range(2):
        tensors[f"{p}.experts.{e}.up_proj.weight"] = torch.randn(inter, H, generator=g)
        tensors[f"{p}.experts.{e}.down_proj.weight"] = torch.randn(H, inter, generator=g)
    tensors[f"{p}.shared_experts.up_proj.weight"] = torch.randn(width, H, generator=g)
    tensors[f"{p}.shared_experts.down_proj.weight"] = torch.randn(H, width, generator=g)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    whole = read_moe_layer(tmp_path, 0, [0, 1], naming="nemotron-h", shared=True)
    part = read_moe_layer(tmp_path, 0, [0, 1], naming="nemotron-h", shared=True, tensor_parallel=(2, 1))
    assert not part.gate_proj and part.shared is not None and part.shared.gate_proj is None
    assert whole.shared is not None
    for e in range(2):
        assert torch.equal(part.up_proj[e], whole.up_proj[e][inter // 2 :])
        assert torch.equal(part.down_proj[e], whole.down_proj[e][:, inter // 2 :])
    assert torch.equal(part.shared.up_proj, whole.shared.up_proj[width // 2 :])
    assert torch.equal(part.shared.down_proj, whole.shared.down_proj[:, width // 2 :])
