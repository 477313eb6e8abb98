"""The activation variants real models ship (mlp/activations.py), on every path that computes them.

Each variant's formula is written out below from the model's published definition (transformers
5.25: gpt-oss ``_apply_gate``, DeepSeek-V4's clamped SwiGLU, Ling/Step-3.7's clamp after the
activation, Inkling-2's soft-capped SwiGLU, GeGLU, Nemotron-H's relu^2) and compared with
``Activation.reference``, with the Triton activation kernel, with GEMM1 fused with it, and with
whole layers (Triton experts, the fused decode path) against the plain loop.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import (
    ExpertWeights,
    FusedTritonExperts,
    IncompatibleKernelsError,
    LayerConfig,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    TritonExperts,
    compose,
)
from moe_kernels.kernels import activate, contiguous_layout, grouped_gemm_contiguous
from moe_kernels.mlp.activations import Activation


def gpt_oss(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    return (up + 1) * (gate * torch.sigmoid(gate * 1.702))


def deepseek_v4(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)


def clamp_after(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate).clamp(max=3.0) * up.clamp(-3.0, 3.0)


def softcapped(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    def cap(x: torch.Tensor, c: float) -> torch.Tensor:
        return torch.tanh(x / c) * c

    return cap(gate, 4.0) * torch.sigmoid(gate) * cap(up, 25.0)


#: (activation, its definition from the model's code: (gate, up) -> out, or x -> out when not gated)
VARIANTS = {
    "silu": (Activation("silu"), lambda g, u: F.silu(g) * u),
    "gpt-oss": (Activation("silu", alpha=1.702, limit=7.0, up_offset=1.0), gpt_oss),
    "deepseek-v4": (Activation("silu", limit=10.0), deepseek_v4),
    "clamp-after": (Activation("silu", limit=3.0, clamp="output"), clamp_after),
    "softcap": (Activation("silu", gate_softcap=4.0, up_softcap=25.0), softcapped),
    "gelu-tanh": (Activation("gelu_tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
    "gelu": (Activation("gelu"), lambda g, u: F.gelu(g) * u),
    "relu2": (Activation("relu2"), lambda x: torch.relu(x) ** 2),
}
GATED = [name for name, (act, _) in VARIANTS.items() if act.gated]


def gate_up(rows: int, inter: int, activation: Activation, seed: int = 0) -> torch.Tensor:
    """GEMM1-like outputs wide enough (|values| up to ~12) to cross every clamp and cap."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, activation.gemm1_rows(inter), generator=gen) * 4.0


def definition(name: str, h: torch.Tensor) -> torch.Tensor:
    activation, fn = VARIANTS[name]
    if not activation.gated:
        return fn(h)
    inter = h.shape[-1] // 2
    return fn(h[..., :inter], h[..., inter:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_is_the_models_definition(name: str) -> None:
    activation, _ = VARIANTS[name]
    h = gate_up(64, 32, activation)
    torch.testing.assert_close(activation.reference(h), definition(name, h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_activation_matches_the_definition(name: str) -> None:
    activation, _ = VARIANTS[name]
    h = gate_up(40, 48, activation, seed=1)
    out = activate(h, torch.empty(40, 48), activation=activation)
    # fp32 throughout; the kernel's tanh goes through a sigmoid, erf through libm: a few ulps
    torch.testing.assert_close(out, definition(name, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", GATED)
def test_gemm1_fused_with_the_activation(name: str) -> None:
    activation, _ = VARIANTS[name]
    num_experts, hidden, inter = 3, 32, 16
    gen = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(6)]).int()
    layout = contiguous_layout(ids, num_experts, 16)
    a = torch.randn(layout.num_rows_bound, hidden, generator=gen)
    b = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.5
    out = torch.full((layout.num_rows_bound, inter), 7.0)
    kwargs = {"block_m": 16, "block_n": 16, "block_k": 16}
    grouped_gemm_contiguous(a, b, layout.grouped_layout, out, activation=activation, alignment=16, **kwargs)
    for r, e in enumerate(layout.grouped_layout.tolist()):
        if e >= 0:
            expected = definition(name, a[r : r + 1] @ b[e].T)[0]
            torch.testing.assert_close(out[r], expected, rtol=1e-4, atol=1e-4)
        else:
            assert (out[r] == 7.0).all()


def layer_cfg(activation: Activation) -> LayerConfig:
    moe = MoEConfig(
        num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float32, activation=activation
    )
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=16))


def expert_problem(activation: Activation, t: int = 9):
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(4, activation.gemm1_rows(32), 64, generator=gen) * 0.4
    w2 = torch.randn(4, 64, 32, generator=gen) * 0.2
    x = torch.randn(t, 64, generator=gen)
    ids = torch.rand(t, 4, generator=gen).argsort(dim=1)[:, :2].int()
    weights = torch.rand(t, 2, generator=gen)
    return x, ExpertWeights(w13, w2), weights, ids


def plain_loop(name: str, x, w: ExpertWeights, weights, ids) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            out[t] += weights[t, k] * (definition(name, x[t] @ w.w13[e].T) @ w.w2[e].T)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("experts_cls", [TorchReferenceExperts, TritonExperts, FusedTritonExperts])
def test_layers_compute_the_activation(name: str, experts_cls: type) -> None:
    activation, _ = VARIANTS[name]
    cfg = layer_cfg(activation)
    if experts_cls is FusedTritonExperts and not activation.gated:
        with pytest.raises(IncompatibleKernelsError, match="gated"):
            compose(LocalPrepareAndFinalize(), experts_cls(), cfg, device="cpu")
        return
    kernel = compose(LocalPrepareAndFinalize(), experts_cls(), cfg, device="cpu")
    x, w, weights, ids = expert_problem(activation)
    out = kernel(x, w, weights, ids)
    ref = plain_loop(name, x, w, weights, ids)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "gelu", "alpha": 2.0}, "alpha applies to silu only"),
        ({"kind": "relu2", "limit": 3.0}, "limit applies to gated activations only"),
        ({"kind": "silu", "limit": -1.0}, "limit must be a finite number > 0"),
        ({"kind": "silu", "limit": math.inf}, "limit must be a finite number > 0"),
        ({"kind": "silu", "clamp": "both"}, "clamp must be 'input' or 'output'"),
        ({"kind": "swish"}, "is not implemented"),
    ],
)
def test_bad_parameters_are_refused(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Activation(**params)


def test_config_takes_a_name_or_a_mapping_and_round_trips() -> None:
    plain = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32)
    assert plain.activation == Activation("silu") and plain.model_dump()["activation"] == "silu"
    params = {"kind": "silu", "alpha": 1.702, "limit": 7.0, "up_offset": 1.0}
    oss = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, activation=params)
    assert oss.activation == VARIANTS["gpt-oss"][0]
    assert MoEConfig.model_validate(oss.model_dump()) == oss
    with pytest.raises(ValueError, match="unknown activation fields"):
        MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, activation={"kind": "silu", "beta": 1})
