"""The SGLang adapter against SGLang's own classes (0.5.23, on the CPU): SGLang's
StandardDispatcher and MoeRunner, with a runner backend registered by our adapter, == a plain
per-token loop; what we cannot run is refused with our reasons.

Runs where SGLang is installed (the third CI environment, requirements/sglang-cpu.txt); skips
elsewhere."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sglang", reason="SGLang is not installed (requirements/sglang-cpu.txt)")

from sglang.srt.layers.moe.moe_runner import MoeRunner, MoeRunnerConfig  # noqa: E402
from sglang.srt.layers.moe.moe_runner.triton import TritonMoeQuantInfo  # noqa: E402
from sglang.srt.layers.moe.token_dispatcher import StandardDispatcher  # noqa: E402
from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput  # noqa: E402
from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput  # noqa: E402
from sglang.srt.layers.moe.topk import StandardTopKOutput  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402

from moe_kernels import FusedTritonExperts, GroupedMMExperts, MaskedTritonExperts, TorchReferenceExperts  # noqa: E402
from moe_kernels.core.compose import IncompatibleKernelsError  # noqa: E402
from moe_kernels.integrations import sglang as adapter  # noqa: E402

E, K, H, INTER = 8, 2, 32, 64

# SGLang keeps one factory per backend name per process: one name per experts class here
BACKENDS = {
    "reference": adapter.register_runner_backend("mk_test_reference", TorchReferenceExperts, max_tokens=64),
    "fused_triton": adapter.register_runner_backend("mk_test_fused_triton", FusedTritonExperts, max_tokens=64),
    "masked_triton": adapter.register_runner_backend("mk_test_masked_triton", MaskedTritonExperts, max_tokens=16),
}


@pytest.fixture(autouse=True)
def _no_expert_parallelism() -> Iterator[None]:
    """The runtime context SGLang's dispatcher reads; with EP > 1 it needs an accelerator."""
    with get_parallel().override(moe_ep_size=1, moe_ep_rank=0):
        yield


def runner_config(backend: object, **fields: object) -> MoeRunnerConfig:
    args: dict[str, object] = dict(
        num_experts=E,
        num_local_experts=E,
        hidden_size=H,
        intermediate_size_per_partition=INTER,
        top_k=K,
        num_fused_shared_experts=0,
        params_dtype=torch.float32,
        runner_backend=backend,
    )
    args.update(fields)
    return MoeRunnerConfig(**args)


def problem(t: int, top_k: int = K, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights, ids = torch.topk(torch.rand(t, E, generator=gen), top_k, dim=1)
    return dict(
        x=torch.randn(t, H, generator=gen).to(dtype),
        w13=(torch.randn(E, 2 * INTER, H, generator=gen) * H**-0.5).to(dtype),
        w2=(torch.randn(E, H, INTER, generator=gen) * INTER**-0.5).to(dtype),
        topk_weights=weights / weights.sum(1, keepdim=True),
        topk_ids=ids.to(torch.int32),
    )


def expert_mlp(p: dict[str, torch.Tensor], e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s SwiGLU MLP of one row, in float32: gate rows first, then up rows."""
    gate, up = (p["w13"][e].float() @ x.float()).chunk(2)
    return p["w2"][e].float() @ (F.silu(gate) * up)


def loop_reference(p: dict[str, torch.Tensor], scale: float = 1.0, on_input: bool = False) -> torch.Tensor:
    """Per token, per slot: the expert's MLP, weighted and summed; id -1 is another rank's."""
    out = torch.zeros(p["x"].shape)
    for t in range(p["x"].shape[0]):
        for slot in range(p["topk_ids"].shape[1]):
            e, weight = int(p["topk_ids"][t, slot]), float(p["topk_weights"][t, slot]) * scale
            if e < 0:
                continue
            if on_input:
                out[t] += expert_mlp(p, e, p["x"][t].float() * weight)
            else:
                out[t] += weight * expert_mlp(p, e, p["x"][t])
    return out


def run_sglang(backend: object, p: dict[str, torch.Tensor], **fields: object) -> torch.Tensor:
    """SGLang's own dispatcher and runner, our registered backend behind them."""
    cfg = runner_config(backend, params_dtype=p["x"].dtype, top_k=p["topk_ids"].shape[1], **fields)
    dispatcher, runner = StandardDispatcher(cfg), MoeRunner(backend, cfg)
    routed = StandardTopKOutput(p["topk_weights"], p["topk_ids"], None)
    combine_input = runner.run(dispatcher.dispatch(p["x"], routed), TritonMoeQuantInfo(p["w13"], p["w2"]))
    return dispatcher.combine(combine_input)


TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("backend", ["reference", "fused_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 13])
def test_sglang_runner_with_our_backend_equals_the_loop(backend: str, dtype: torch.dtype, tokens: int) -> None:
    p = problem(tokens, dtype=dtype)
    out = run_sglang(BACKENDS[backend], p)
    assert out.shape == p["x"].shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), loop_reference(p), **TOLERANCES[dtype])


def test_routed_scaling_factor_scales_the_sum() -> None:
    p = problem(7)
    out = run_sglang(BACKENDS["reference"], p, routed_scaling_factor=2.5)
    torch.testing.assert_close(out, loop_reference(p, scale=2.5), **TOLERANCES[torch.float32])


def test_router_weight_on_input() -> None:
    p = problem(6, top_k=1)
    p["topk_weights"] = torch.linspace(0.2, 0.9, 6)[:, None]  # not renormalized: 1.0 would hide a miss
    out = run_sglang(BACKENDS["fused_triton"], p, apply_router_weight_on_input=True)
    torch.testing.assert_close(out, loop_reference(p, on_input=True), **TOLERANCES[torch.float32])


def test_other_ranks_experts_are_skipped() -> None:
    """Under EP, SGLang's dispatcher hands local ids with -1 for other ranks' experts (its id
    map needs an accelerator, so the dispatch output is built here as it would hand it)."""
    p = problem(9)
    p["topk_ids"][::2, 1] = -1
    cfg = runner_config(BACKENDS["reference"])
    routed = StandardTopKOutput(p["topk_weights"], p["topk_ids"], None)
    dispatched = StandardDispatchOutput(p["x"], None, routed)
    out = MoeRunner(BACKENDS["reference"], cfg).run(dispatched, TritonMoeQuantInfo(p["w13"], p["w2"])).hidden_states
    torch.testing.assert_close(out, loop_reference(p), **TOLERANCES[torch.float32])


def test_deepep_low_latency_rows_through_a_masked_part() -> None:
    """DEEPEP_LL: ``[E, M, H]`` rows, ``masked_m`` valid per expert -> the raw rows for DeepEP's
    combine (built here: DeepEP itself needs GPUs)."""
    p, capacity = problem(1), 16
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(E, capacity, H, generator=gen)
    counts = torch.tensor([0, 3, 16, 1, 5, 0, 2, 7], dtype=torch.int32)
    dispatched = DeepEPLLDispatchOutput(rows, None, p["topk_ids"], p["topk_weights"], counts, 4)
    cfg = runner_config(BACKENDS["masked_triton"])
    combine_input = MoeRunner(BACKENDS["masked_triton"], cfg).run(dispatched, TritonMoeQuantInfo(p["w13"], p["w2"]))
    assert combine_input.topk_ids is p["topk_ids"] and combine_input.hidden_states.shape == rows.shape
    for e in range(E):
        for m in range(int(counts[e])):
            want = expert_mlp(p, e, rows[e, m])
            torch.testing.assert_close(combine_input.hidden_states[e, m], want, **TOLERANCES[torch.float32])


def test_what_we_cannot_run_is_refused_with_our_reason() -> None:
    backend = BACKENDS["reference"]
    # fields with no counterpart: refused when SGLang builds the layer's runner
    with pytest.raises(ValueError, match=r"gemm1_alpha=1\.702.*gemm1_clamp_limit=7\.0"):
        MoeRunner(backend, runner_config(backend, gemm1_alpha=1.702, gemm1_clamp_limit=7.0))
    with pytest.raises(ValueError, match="activation: SGLang's 'situ'"):
        MoeRunner(backend, runner_config(backend, activation="situ"))
    with pytest.raises(ValueError, match="apply_router_weight_on_input needs top_k == 1"):
        MoeRunner(backend, runner_config(backend, apply_router_weight_on_input=True))
    # our part's own checks: grouped_mm needs bf16 on a GPU
    grouped = adapter.register_runner_backend("mk_test_grouped_mm", GroupedMMExperts)
    with pytest.raises(IncompatibleKernelsError, match=r"GroupedMMExperts.*\n.*device:"):
        MoeRunner(grouped, runner_config(grouped))
    # quantized weights, and a dispatch format the part does not take: refused per call
    p = problem(3)
    runner = MoeRunner(backend, runner_config(backend))
    dispatched = StandardDispatchOutput(p["x"], None, StandardTopKOutput(p["topk_weights"], p["topk_ids"], None))
    with pytest.raises(ValueError, match="quant_info: use_fp8_w8a8"):
        runner.run(dispatched, TritonMoeQuantInfo(p["w13"], p["w2"], use_fp8_w8a8=True))
    with pytest.raises(ValueError, match="quant_info: fuse_swiglu_interleaved"):
        runner.run(dispatched, TritonMoeQuantInfo(p["w13"], p["w2"], fuse_swiglu_interleaved=True))
    masked = DeepEPLLDispatchOutput(p["x"][None], None, p["topk_ids"], p["topk_weights"], torch.ones(1), 1)
    with pytest.raises(ValueError, match="dispatch format 'deepep_ll'"):
        runner.run(masked, TritonMoeQuantInfo(p["w13"], p["w2"]))


def test_registration_is_idempotent_and_refuses_a_changed_name() -> None:
    again = adapter.register_runner_backend("mk_test_reference", TorchReferenceExperts, max_tokens=64)
    assert again == BACKENDS["reference"]
    with pytest.raises(ValueError, match="already registered for TorchReferenceExperts"):
        adapter.register_runner_backend("mk_test_reference", FusedTritonExperts, max_tokens=64)
    with pytest.raises(ValueError, match="already built in"):
        adapter.register_runner_backend("triton", TorchReferenceExperts)
