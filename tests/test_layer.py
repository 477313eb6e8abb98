"""FusedMoE: weight loading, the whole layer (router included) against per-token loops,
expert placement, and the errors a new user meets first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_compose import loop_moe
from test_router import loop_route

from moe_kernels import (
    ExpertPlacement,
    ExpertWeights,
    FusedMoE,
    LayerConfig,
    LocalPrepareAndFinalize,
    ModularKernel,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    WorkspaceCache,
    compose,
)

E, K, H, INTER = 8, 2, 16, 32
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def moe_cfg(dtype: torch.dtype = torch.float32, **changes: object) -> MoEConfig:
    return MoEConfig(**{**dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=INTER, dtype=dtype), **changes})


def layer_cfg(
    dtype: torch.dtype = torch.float32, parallel: ParallelConfig | None = None, **changes: object
) -> LayerConfig:
    return LayerConfig(moe=moe_cfg(dtype, **changes), parallel=parallel or ParallelConfig(max_tokens_per_rank=64))


def checkpoint(seed: int = 0) -> dict[str, object]:
    """Per-expert tensors as a checkpoint holds them (fp32, nn.Linear layout)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        gate_proj={e: torch.randn(INTER, H, generator=gen) * H**-0.5 for e in range(E)},
        up_proj={e: torch.randn(INTER, H, generator=gen) * H**-0.5 for e in range(E)},
        down_proj={e: torch.randn(H, INTER, generator=gen) * INTER**-0.5 for e in range(E)},
        router_weight=torch.randn(E, H, generator=gen) * 0.5,
    )


def reference_kernel(cfg: LayerConfig, placement: ExpertPlacement | None = None) -> ModularKernel:
    """The plain pair; for one rank of an EP layer, the partial local P/F computes exactly this
    rank's share."""
    pf = LocalPrepareAndFinalize(partial=cfg.parallel.ep_size > 1)
    return compose(
        pf, TorchReferenceExperts(), cfg, placement=placement, device="cpu", workspace_cache=WorkspaceCache()
    )


def loop_layer(x: torch.Tensor, ckpt: dict, moe: MoEConfig, owned=range(E), bias=None) -> torch.Tensor:
    """The whole layer per token: gate GEMM in the model dtype, routing and experts in loops;
    only the experts in ``owned`` contribute (one EP rank's share)."""
    gate = ckpt["router_weight"].to(moe.dtype)
    logits = F.linear(x, gate)
    ids, weights = loop_route(
        logits,
        moe.top_k,
        scoring=moe.scoring,
        renormalize=moe.renormalize,
        num_expert_group=moe.num_expert_group,
        topk_group=moe.topk_group,
        routed_scaling_factor=moe.routed_scaling_factor,
        correction_bias=bias,
    )
    # the experts in the layer's dtype, as the layer stores them
    w13 = torch.stack([torch.cat([ckpt["gate_proj"][e], ckpt["up_proj"][e]]) for e in range(E)]).to(moe.dtype)
    w2 = torch.stack([ckpt["down_proj"][e] for e in range(E)]).to(moe.dtype)
    expert_map = torch.tensor([e if e in owned else -1 for e in range(E)])
    return loop_moe(x, ExpertWeights(w13, w2), torch.tensor(weights), torch.tensor(ids), expert_map)


def assert_close_rel(out: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (out.float() - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max abs err {err:.3g} vs max |ref| {want.abs().max().item():.3g}"


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dict", "str-keys", "list", "stacked"])
def test_load_weights_round_trip(form: str) -> None:
    layer = FusedMoE(layer_cfg(torch.bfloat16), device="cpu")
    ckpt = checkpoint()
    projections = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        per_expert = ckpt[name]
        projections[name] = {
            "dict": per_expert,
            "str-keys": {str(e): t for e, t in per_expert.items()},
            "list": [per_expert[e] for e in range(E)],
            "stacked": torch.stack([per_expert[e] for e in range(E)]),
        }[form]
    layer.load_weights(**projections, router_weight=ckpt["router_weight"])
    for e in range(E):
        assert torch.equal(layer.w13[e, :INTER], ckpt["gate_proj"][e].bfloat16())  # gate rows first
        assert torch.equal(layer.w13[e, INTER:], ckpt["up_proj"][e].bfloat16())
        assert torch.equal(layer.w2[e], ckpt["down_proj"][e].bfloat16())
    assert torch.equal(layer.router.weight, ckpt["router_weight"].bfloat16())
    assert layer.w13.dtype == layer.w2.dtype == torch.bfloat16


def test_load_weights_one_projection_at_a_time() -> None:
    layer = FusedMoE(layer_cfg(), device="cpu")
    ckpt = checkpoint()
    layer.load_weights(down_proj=ckpt["down_proj"])
    layer.load_weights(gate_proj=ckpt["gate_proj"], up_proj=ckpt["up_proj"])
    assert torch.equal(layer.w2[3], ckpt["down_proj"][3])
    assert torch.equal(layer.w13[3, INTER:], ckpt["up_proj"][3])


@pytest.mark.parametrize(
    ("make_args", "error", "match"),
    [
        (lambda c: dict(up_proj={**c["up_proj"], 2: torch.zeros(INTER, H + 8)}), ValueError, r"up_proj\[2\] must have"),
        (
            lambda c: dict(down_proj={**c["down_proj"], 5: torch.zeros(INTER, H)}),
            ValueError,
            r"down_proj\[5\].*\[16, 32\]",
        ),
        (lambda c: dict(gate_proj=list(c["gate_proj"].values())[:7]), ValueError, "gate_proj: a list"),
        (lambda c: dict(gate_proj={**c["gate_proj"], "w.3": torch.zeros(INTER, H)}), ValueError, "keys must be expert"),
        (lambda c: dict(gate_proj={**c["gate_proj"], 9: torch.zeros(INTER, H)}), ValueError, "expert id 9 is outside"),
        (
            lambda c: dict(gate_proj={**c["gate_proj"], 1: torch.zeros(INTER, H, dtype=torch.int8)}),
            TypeError,
            "floating",
        ),
        (lambda c: dict(gate_proj="weights.safetensors"), TypeError, "gate_proj: expected a dict"),
        (lambda c: dict(router_weight=torch.zeros(E, H + 8)), ValueError, r"router_weight must have shape \[8, 16\]"),
        (lambda c: dict(e_score_correction_bias=torch.zeros(E)), ValueError, "moe.correction_bias false"),
        (lambda c: dict(gate_proj_scale=c["gate_proj"]), ValueError, "the layer is unquantized"),
        (
            lambda c: dict(gate_proj={**c["gate_proj"], 1: torch.zeros(INTER, H, dtype=torch.float8_e4m3fn)}),
            TypeError,
            "floating-point tensor",
        ),
    ],
)
def test_load_weights_errors_leave_the_layer_unchanged(make_args, error: type[Exception], match: str) -> None:
    layer = FusedMoE(layer_cfg(), device="cpu")
    ckpt = checkpoint()
    layer.load_weights(**{k: ckpt[k] for k in ("gate_proj", "up_proj", "down_proj", "router_weight")})
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    # the good projections passed alongside the bad one must not be copied either
    new = checkpoint(seed=1)
    with pytest.raises(error, match=match):
        layer.load_weights(**{"gate_proj": new["gate_proj"], **make_args(new)})
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_weights_needs_something_to_load() -> None:
    with pytest.raises(ValueError, match="nothing to load"):
        FusedMoE(layer_cfg(), device="cpu").load_weights()


# --- forward -----------------------------------------------------------------------------


def loaded_layer(cfg: LayerConfig, ckpt: dict, **kwargs: object) -> FusedMoE:
    layer = FusedMoE(cfg, device="cpu", **kwargs)
    layer.load_weights(**{k: ckpt[k] for k in ("gate_proj", "up_proj", "down_proj", "router_weight")})
    return layer


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("selected", [True, False], ids=["selected-kernel", "reference-kernel"])
def test_forward_matches_loop(dtype: torch.dtype, rel: float, selected: bool) -> None:
    cfg = layer_cfg(dtype)
    ckpt = checkpoint()
    layer = loaded_layer(cfg, ckpt, kernel=None if selected else reference_kernel(cfg))
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(7)).to(dtype)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_rel(out, loop_layer(x, ckpt, cfg.moe), rel)


def test_forward_deepseek_style_routing() -> None:
    cfg = layer_cfg(
        top_k=3, scoring="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5, correction_bias=True
    )
    ckpt = checkpoint(seed=2)
    layer = loaded_layer(cfg, ckpt, kernel=reference_kernel(cfg))
    bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.2
    layer.load_weights(e_score_correction_bias=bias)
    x = torch.randn(11, H, generator=torch.Generator().manual_seed(4))
    assert_close_rel(layer(x), loop_layer(x, ckpt, cfg.moe, bias=bias), 1e-5)


def test_forward_empty_batch_and_bad_input() -> None:
    layer = loaded_layer(layer_cfg(), checkpoint())
    assert layer(torch.zeros(0, H)).shape == (0, H)
    with pytest.raises(ValueError, match=r"hidden_states must be \[T, 16\]"):
        layer(torch.zeros(4, H + 8))
    with pytest.raises(TypeError, match="hidden_states must have dtype float32"):
        layer(torch.zeros(4, H, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="hidden_states: expected a torch.Tensor, got ndarray"):
        layer(torch.zeros(4, H).numpy())
    with pytest.raises(ValueError, match="hidden_states must be on cpu, got meta"):
        layer(torch.zeros(4, H, device="meta"))
    with pytest.raises(ValueError, match="x has 65 tokens but this kernel was built for at most 64"):
        layer(torch.zeros(65, H))


def test_forward_before_the_weights_are_loaded_is_refused() -> None:
    """Uninitialized parameters would give NaN or garbage: the layer says what is missing."""
    layer = FusedMoE(layer_cfg(), device="cpu")
    x = torch.randn(3, H)
    with pytest.raises(RuntimeError, match=r"weights not loaded: router_weight; gate_proj of expert\(s\) \[0, 1,"):
        layer(x)
    ckpt = checkpoint()
    layer.load_weights(gate_proj=ckpt["gate_proj"], up_proj=ckpt["up_proj"], router_weight=ckpt["router_weight"])
    layer.load_weights(down_proj={e: ckpt["down_proj"][e] for e in range(E) if e != 5})
    with pytest.raises(RuntimeError, match=r"weights not loaded: down_proj of expert\(s\) \[5\]"):
        layer(x)
    layer.load_weights(down_proj={5: ckpt["down_proj"][5]})
    assert_close_rel(layer(x), loop_layer(x, ckpt, layer.cfg.moe), 1e-4)


def test_device_arguments_are_checked() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            FusedMoE(layer_cfg(), device="cuda")
    with pytest.raises(ValueError, match="device: MoE kernels run on 'cpu' or 'cuda"):
        FusedMoE(layer_cfg(), device="meta")
    with pytest.raises(TypeError, match="cfg: expected a LayerConfig, got a MoEConfig"):
        FusedMoE(moe_cfg(), device="cpu")  # type: ignore[arg-type]


# --- expert parallelism ------------------------------------------------------------------


def test_ep_layer_without_a_dispatcher_is_refused_with_reasons() -> None:
    with pytest.raises(RuntimeError, match="no registered pair can run this layer") as info:
        FusedMoE(layer_cfg(parallel=ParallelConfig(ep_size=2, ep_rank=1)), device="cpu")
    assert "needs the expert-parallel process group" in str(info.value)


@pytest.mark.parametrize(
    "rank_experts",
    [[[0, 1, 2, 3], [4, 5, 6, 7]], [[7, 6, 5, 4], [3, 2, 1, 0]], [[0, 2, 4, 6], [1, 3, 5, 7]]],
    ids=["contiguous", "reversed", "interleaved"],
)
def test_ep_rank_keeps_only_its_placed_experts(rank_experts: list[list[int]]) -> None:
    """Each rank loads the experts its placement gives it, in local order, and computes their
    share; the two ranks' shares add up to the whole layer (the placement is honoured)."""
    ckpt = checkpoint()
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(5))
    outputs = []
    for rank in (0, 1):
        cfg = layer_cfg(parallel=ParallelConfig(ep_size=2, ep_rank=rank, max_tokens_per_rank=64))
        placement = ExpertPlacement.from_rank_experts(rank_experts, rank)
        layer = loaded_layer(cfg, ckpt, placement=placement, kernel=reference_kernel(cfg, placement))
        mine = rank_experts[rank]
        assert list(layer.local_experts) == mine
        assert layer.w13.shape == (4, 2 * INTER, H) and layer.w2.shape == (4, H, INTER)
        for local, expert in enumerate(mine):
            assert torch.equal(layer.w13[local, :INTER], ckpt["gate_proj"][expert])
            assert torch.equal(layer.w2[local], ckpt["down_proj"][expert])
        share = layer(x)
        assert_close_rel(share, loop_layer(x, ckpt, cfg.moe, owned=set(mine)), 1e-5)
        outputs.append(share)
    assert_close_rel(outputs[0] + outputs[1], loop_layer(x, ckpt, layer_cfg().moe), 1e-5)


def test_a_rank_reads_only_its_experts_from_a_partial_checkpoint() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(ep_size=2, ep_rank=1, max_tokens_per_rank=64))
    ckpt = checkpoint()
    layer = FusedMoE(cfg, device="cpu", kernel=reference_kernel(cfg))
    layer.load_weights(gate_proj={e: ckpt["gate_proj"][e] for e in range(4, 8)})
    assert "rank 1/2 holds experts 4..7" in repr(layer)


def test_placement_must_fit_the_layer() -> None:
    with pytest.raises(ValueError, match="placed exactly once; out of range: none, placed twice: \\[3\\]"):
        ExpertPlacement.from_rank_experts([[0, 1, 2, 3], [3, 5, 6, 7]], 0)
    with pytest.raises(ValueError, match="same number"):
        ExpertPlacement.from_rank_experts([[0, 1, 2], [3, 4, 5, 6, 7]], 0)
    with pytest.raises(ValueError, match="placement: places 8 experts over 4 ranks"):
        FusedMoE(layer_cfg(), device="cpu", placement=ExpertPlacement.contiguous(8, 4, 0))


# --- construction ------------------------------------------------------------------------


def test_selection_and_repr() -> None:
    layer = FusedMoE(layer_cfg(), device="cpu")
    assert layer.selection is not None
    assert f"CHOSEN T>=1: {layer.kernel.name}" in layer.selection.explain()
    assert f"kernel={layer.kernel.name}" in repr(layer)
    assert set(layer.state_dict()) == {"router.weight", "w13", "w2"}
    assert not any(p.requires_grad for p in layer.parameters())


def test_supplied_kernel_must_match_the_layer() -> None:
    other = layer_cfg(top_k=1)
    with pytest.raises(ValueError, match="kernel was composed for"):
        FusedMoE(layer_cfg(), device="cpu", kernel=reference_kernel(other))
    cfg = layer_cfg()
    kernel = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")
    with pytest.raises(ValueError, match="workspace_cache"):
        FusedMoE(cfg, device="cpu", kernel=kernel, workspace_cache=WorkspaceCache())
    reversed_placement = ExpertPlacement.from_rank_experts([list(range(7, -1, -1))], 0)
    with pytest.raises(ValueError, match="non-contiguous placement"):
        FusedMoE(cfg, device="cpu", kernel=kernel, placement=reversed_placement)
    layer = FusedMoE(cfg, device="cpu", kernel=kernel)
    assert layer.selection is None and layer.kernel is kernel
