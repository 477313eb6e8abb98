"""The vLLM adapter against vLLM's own classes (0.33, on the CPU): vLLM's FusedMoEKernel with our
parts == our composed kernel == a per-token loop; our checks refuse through vLLM's interface.

Runs where vLLM is installed (the second CI environment, requirements/vllm-cpu.txt); skips
elsewhere."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before the first vllm import
pytest.importorskip("vllm", reason="vLLM is not installed (requirements/vllm-cpu.txt)")

from vllm.model_executor.layers.fused_moe import config as vconfig  # noqa: E402
from vllm.model_executor.layers.fused_moe import modular_kernel as mk  # noqa: E402
from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402

from moe_kernels import (  # noqa: E402
    ExpertWeights,
    LayerConfig,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    WorkspaceCache,
    compose,
)
from moe_kernels.experts.fused_triton import FusedTritonExperts  # noqa: E402
from moe_kernels.experts.grouped_mm import GroupedMMExperts  # noqa: E402
from moe_kernels.experts.triton import MaskedTritonExperts  # noqa: E402
from moe_kernels.integrations import vllm as adapter  # noqa: E402
from moe_kernels.prepare_finalize.local import LocalMaskedPrepareAndFinalize  # noqa: E402

E, K, H, INTER, MAX_TOKENS = 8, 2, 32, 64, 64


def moe_config(
    num_local_experts: int = E, top_k: int = K, dtype: torch.dtype = torch.float32, h: int = H, inter: int = INTER
) -> object:
    return vconfig.FusedMoEConfig(
        num_experts=E,
        experts_per_token=top_k,
        hidden_dim=h,
        intermediate_size=inter,
        num_local_experts=num_local_experts,
        num_logical_experts=E,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=vconfig.RoutingMethodType.Renormalize,
        moe_parallel_config=vconfig.FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=dtype,
        max_num_tokens=MAX_TOKENS,
    )


def problem(
    t: int, e_local: int = E, top_k: int = K, seed: int = 0, h: int = H, inter: int = INTER
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, E, generator=gen)
    weights, ids = torch.topk(scores, top_k, dim=1)
    return dict(
        x=torch.randn(t, h, generator=gen),
        w1=torch.randn(e_local, 2 * inter, h, generator=gen) * h**-0.5,
        w2=torch.randn(e_local, h, inter, generator=gen) * inter**-0.5,
        topk_weights=weights / weights.sum(1, keepdim=True),
        topk_ids=ids.to(torch.int32),
    )


def loop_reference(p: dict[str, torch.Tensor], expert_map: torch.Tensor | None = None, on_input: bool = False):
    """Per token, per slot: the local expert's SwiGLU MLP, weighted, summed (fp32)."""
    out = torch.zeros(p["x"].shape)
    for t in range(p["x"].shape[0]):
        for slot in range(p["topk_ids"].shape[1]):
            e = int(p["topk_ids"][t, slot])
            local = e if expert_map is None else int(expert_map[e])
            if local < 0:
                continue
            weight = float(p["topk_weights"][t, slot])
            x = p["x"][t] * weight if on_input else p["x"][t]
            gate, up = (p["w1"][local] @ x).chunk(2)
            y = p["w2"][local] @ (F.silu(gate) * up)
            out[t] += y if on_input else weight * y
    return out


def vllm_kernel(pf: object, experts_type: type, cfg: object) -> object:
    experts = adapter.experts_class(experts_type)(cfg, vconfig.FUSED_MOE_UNQUANTIZED_CONFIG)
    return mk.FusedMoEKernel(adapter.prepare_finalize(pf, cfg), experts)


def run_vllm(kernel: object, p: dict[str, torch.Tensor], **kwargs: object) -> torch.Tensor:
    args = dict(activation=MoEActivation.SILU, global_num_experts=E, expert_map=None)
    args.update(dict(apply_router_weight_on_input=False), **kwargs)
    return kernel.apply(
        hidden_states=p["x"], w1=p["w1"], w2=p["w2"], topk_weights=p["topk_weights"], topk_ids=p["topk_ids"], **args
    )


def run_ours(pf: object, experts: object, p: dict[str, torch.Tensor]) -> torch.Tensor:
    cfg = LayerConfig(
        moe=MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=INTER, dtype=torch.float32),
        parallel=ParallelConfig(max_tokens_per_rank=MAX_TOKENS),
    )
    kernel = compose(pf, experts, cfg, device="cpu", workspace_cache=WorkspaceCache())
    return kernel(p["x"], ExpertWeights(p["w1"], p["w2"]), p["topk_weights"], p["topk_ids"])


PAIRS = [
    (LocalPrepareAndFinalize, TorchReferenceExperts),
    (LocalPrepareAndFinalize, FusedTritonExperts),
    (LocalMaskedPrepareAndFinalize, MaskedTritonExperts),
]


@pytest.mark.parametrize(("pf_type", "experts_type"), PAIRS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tokens", [1, 13])
def test_vllm_kernel_with_our_parts_equals_ours_and_the_loop(pf_type: type, experts_type: type, tokens: int) -> None:
    p = problem(tokens)
    out = run_vllm(vllm_kernel(pf_type(), experts_type, moe_config()), p)
    ours = run_ours(pf_type(), experts_type(), p)
    want = loop_reference(p)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("pf_type", "experts_type"), PAIRS, ids=lambda c: c.__name__)
def test_expert_map_computes_this_ranks_share(pf_type: type, experts_type: type) -> None:
    """EP within TP as vLLM runs it: rank 1 of 2 holds experts 4..7 (global -> local map)."""
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
    p = problem(9, e_local=4)
    out = run_vllm(vllm_kernel(pf_type(), experts_type, moe_config(num_local_experts=4)), p, expert_map=expert_map)
    torch.testing.assert_close(out, loop_reference(p, expert_map), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("pf_type", "experts_type"), PAIRS, ids=lambda c: c.__name__)
def test_router_weight_on_input(pf_type: type, experts_type: type) -> None:
    p = problem(6, top_k=1)
    kernel = vllm_kernel(pf_type(), experts_type, moe_config(top_k=1))
    out = run_vllm(kernel, p, apply_router_weight_on_input=True)
    torch.testing.assert_close(out, loop_reference(p, on_input=True), rtol=1e-4, atol=1e-5)


def vllm_prepare_finalize(layout: str, e_local: int = E) -> object:
    from vllm.model_executor.layers.fused_moe.prepare_finalize.batched import BatchedPrepareAndFinalize
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import MoEPrepareAndFinalizeNoDPEPModular

    if layout == "standard":
        return MoEPrepareAndFinalizeNoDPEPModular()
    # the naive batched P/F owns experts [rank * E_local, (rank + 1) * E_local) and ignores expert_map
    return BatchedPrepareAndFinalize(MAX_TOKENS, e_local, num_dispatchers=1, rank=E // e_local - 1)


@pytest.mark.parametrize(
    ("layout", "experts_type"),
    [("standard", TorchReferenceExperts), ("standard", FusedTritonExperts), ("batched", MaskedTritonExperts)],
    ids=lambda c: getattr(c, "__name__", c),
)
@pytest.mark.parametrize("mapped", [False, True], ids=["all-local", "expert-map"])
def test_our_experts_behind_vllms_prepare_finalize(layout: str, experts_type: type, mapped: bool) -> None:
    """The other pairing: vLLM's own no-dispatch (Standard) or naive batched P/F, our experts."""
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32) if mapped else None
    e_local = 4 if mapped else E
    p = problem(11, e_local=e_local)
    experts = adapter.experts_class(experts_type)(moe_config(e_local), vconfig.FUSED_MOE_UNQUANTIZED_CONFIG)
    kernel = mk.FusedMoEKernel(vllm_prepare_finalize(layout, e_local), experts)
    out = run_vllm(kernel, p, expert_map=expert_map)
    torch.testing.assert_close(out, loop_reference(p, expert_map), rtol=1e-4, atol=1e-5)


def test_our_checks_refuse_through_vllms_interface() -> None:
    """vLLM's selection asks is_supported_config; our parts answer with our reasons."""
    grouped = adapter.experts_class(GroupedMMExperts)
    standard = mk.FusedMoEActivationFormat.Standard
    ok, reason = grouped.is_supported_config(grouped, moe_config(), None, None, standard)
    assert not ok and reason.startswith("GroupedMMExperts: device:") and "needs dtype in (bfloat16)" in reason, reason
    reference = adapter.experts_class(TorchReferenceExperts)
    assert reference.is_supported_config(reference, moe_config(), None, None, standard) == (True, None)
    batched = mk.FusedMoEActivationFormat.BatchedExperts
    ok, reason = reference.is_supported_config(reference, moe_config(), None, None, batched)
    assert not ok and "batched_experts" in reason
    with pytest.raises(ValueError, match="GroupedMMExperts"):
        grouped(moe_config(), vconfig.FUSED_MOE_UNQUANTIZED_CONFIG)


def test_fp8_keys_reach_our_checks() -> None:
    from vllm.model_executor.layers.quantization.utils import quant_utils as qu

    standard = mk.FusedMoEActivationFormat.Standard
    keys = (qu.kFp8Static128BlockSym, qu.kFp8Dynamic128Sym)
    # the fused path takes fp8 weights (its input quantized in GEMM1's loads); a pair that does not
    # refuses with our reason
    fused = adapter.experts_class(FusedTritonExperts)
    assert fused.is_supported_config(fused, moe_config(dtype=torch.bfloat16, h=128, inter=128), *keys, standard) == (
        True,
        None,
    )
    reference = adapter.experts_class(TorchReferenceExperts)
    cfg = moe_config(dtype=torch.bfloat16, h=128, inter=128)
    assert reference.is_supported_config(reference, cfg, *keys, standard) == (True, None)
    ok, reason = reference.is_supported_config(reference, moe_config(dtype=torch.bfloat16), *keys, standard)
    assert not ok and "multiples of 128" in reason, reason


def test_unmapped_activation_and_quantization_are_refused() -> None:
    cfg = moe_config()
    cfg.activation = MoEActivation.SWIGLUSTEP
    reference = adapter.experts_class(TorchReferenceExperts)
    ok, reason = reference.is_supported_config(reference, cfg, None, None, mk.FusedMoEActivationFormat.Standard)
    assert not ok and "swiglustep" in reason.lower()
    with pytest.raises(ValueError, match="swiglustep"):
        adapter.local_layer_config(cfg)
    per_tensor = vconfig.fp8_w8a8_moe_quant_config(torch.ones(E), torch.ones(E))
    with pytest.raises(ValueError, match="block_shape=None.*no counterpart"):
        adapter.local_layer_config(moe_config(), per_tensor)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, N, K]`` -> fp8 e4m3 ``[E, N, K]`` and float32 scales ``[E, N/128, K/128]`` (one per
    128 x 128 block: its amax over the largest e4m3 value)."""
    e, n, k = w.shape
    blocks = w.view(e, n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(2, 4)) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, :, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(e, n, k), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(128, 1).repeat_interleave(128, 2)


def test_fp8_block_weights_map_to_our_fp8_scheme() -> None:
    """DeepSeek-V3's format through vLLM's quant config: the loop on the dequantized weights."""
    p = problem(5, h=128, inter=128)  # fp8 blocks need multiples of 128
    (w1, s1), (w2, s2) = quantize_blocks(p["w1"]), quantize_blocks(p["w2"])
    quant = vconfig.fp8_w8a8_moe_quant_config(s1, s2, block_shape=[128, 128])
    cfg = moe_config(dtype=torch.bfloat16, h=128, inter=128)
    experts = adapter.experts_class(TorchReferenceExperts)(cfg, quant)
    kernel = mk.FusedMoEKernel(adapter.prepare_finalize(LocalPrepareAndFinalize(), cfg), experts)
    x = p["x"].bfloat16()
    out = run_vllm(kernel, {**p, "x": x, "w1": w1, "w2": w2})
    want = loop_reference({**p, "x": x.float(), "w1": dequantize_blocks(w1, s1), "w2": dequantize_blocks(w2, s2)})
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_fused_experts_signature_backed_by_selection() -> None:
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
    p = problem(5, e_local=4)
    out = adapter.fused_experts(p["x"], p["w1"], p["w2"], p["topk_weights"], p["topk_ids"], expert_map=expert_map)
    torch.testing.assert_close(out, loop_reference(p, expert_map), rtol=1e-4, atol=1e-5)
