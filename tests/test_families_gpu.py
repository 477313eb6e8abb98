"""GPU checks of the Hugging Face families (``@pytest.mark.gpu``; they skip without a CUDA GPU).

* DeepSeek-V3's router at its real shape (H 7168, 256 experts, top-8, 8 groups of which 4 kept, a
  correction bias) in bf16 with the fp32 gate: the tokens it routes differently from an fp32
  reference written here (float64 GEMM rounded to fp32, as transformers' fp32 gate computes it) stay
  below 1 in 10,000, exact ties aside; the bf16 gate's rate is printed beside it, and the gate GEMM's
  time in both precisions (and in fp32 for weights off the bf16 grid).
* Every family the loader accepts, loaded on the GPU by ``FusedMoE.from_pretrained`` with
  ``select()``'s fast paths (not the reference loop) against transformers' own MoE block in bf16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from hf_families import CASES
from test_hf_parity import INPUT_IDS, LAYER, TOKENS, H, _build, _reference, _rel_err, _same_sets, _tied

from moe_kernels.config import MoEConfig
from moe_kernels.model.layer import FusedMoE
from moe_kernels.model.router import Router

DS_H, DS_E, DS_K, DS_GROUPS, DS_KEPT = 7168, 256, 8, 8, 4
ROUTED_TOKENS = 16384


def _deepseek_v3_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's noaux_tc choice from fp32 logits: ``(ids [T, K], tied [T])``, ``tied`` where the
    k-th and (k+1)-th biased scores of the kept groups are equal (either expert may be chosen)."""
    logits = (x.double() @ w.double().T).float()
    choice = torch.sigmoid(logits) + bias
    groups = choice.view(-1, DS_GROUPS, DS_E // DS_GROUPS)
    group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, group_scores.topk(DS_KEPT, dim=1).indices, True)
    masked = choice.masked_fill(~kept.repeat_interleave(DS_E // DS_GROUPS, dim=1), float("-inf"))
    top = masked.topk(DS_K + 1, dim=1)
    return top.indices[:, :DS_K], top.values[:, DS_K - 1] == top.values[:, DS_K]


def _deepseek_v3_router(router_dtype: torch.dtype | None, w: torch.Tensor, bias: torch.Tensor) -> Router:
    cfg = MoEConfig(
        num_experts=DS_E, top_k=DS_K, hidden_size=DS_H, intermediate_size=2048, dtype=torch.bfloat16,
        scoring="sigmoid", num_expert_group=DS_GROUPS, topk_group=DS_KEPT, routed_scaling_factor=2.5,
        correction_bias=True, router_dtype=router_dtype,
    )  # fmt: skip
    router = Router(cfg, device="cuda")
    router.load_tensors(weight=w, e_score_correction_bias=bias)
    return router


@pytest.mark.gpu
def test_deepseek_v3_fp32_gate_routes_as_the_fp32_reference() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    # the checkpoint's gate is bf16; hidden states come out of an RMSNorm (unit scale) in bf16
    w = (torch.randn(DS_E, DS_H, device="cuda", generator=gen) * DS_H**-0.5).bfloat16()
    bias = torch.randn(DS_E, device="cuda", generator=gen) * 0.05
    x = torch.randn(ROUTED_TOKENS, DS_H, device="cuda", generator=gen).bfloat16()
    ref_ids, tied = _deepseek_v3_reference(x, w.float(), bias)
    fast_gate = _deepseek_v3_router(torch.float32, w, bias)
    assert fast_gate.gate_lowp is not None  # a bf16-exact fp32 gate takes the bf16-in, fp32-out GEMM
    exact_logits = (x.double() @ w.double().T).float()
    fast_err = (fast_gate.logits(x) - exact_logits).abs().max().item()
    fp32_err = (x.float() @ w.float().T - exact_logits).abs().max().item()
    rates = {}
    for name, dtype in (("fp32 gate", torch.float32), ("bf16 gate", None)):
        _, ids = _deepseek_v3_router(dtype, w, bias)(x)
        differ = ~_same_sets(ids.long(), ref_ids) & ~tied
        rates[name] = differ.float().mean().item()
    print(
        f"\nfast fp32 gate logits: max |error| {fast_err:.2e} (an fp32 GEMM: {fp32_err:.2e})"
        f"\nDeepSeek-V3 routing, {ROUTED_TOKENS} tokens ({int(tied.sum())} exact ties aside): tokens routed "
        f"differently from the fp32 reference: fp32 gate {rates['fp32 gate']:.2e}, bf16 gate {rates['bf16 gate']:.2e}"
    )
    # fp32 out, not rounded to bf16: a bf16 output errs by up to |logit| * 2^-9 (1e-2 here), fp32
    # accumulation over 7168 products by a few 1e-5 (the tensor cores' sums err more than cuBLAS's fp32
    # GEMM: 5.3e-5 against 5.1e-6 on an H100)
    assert fast_err <= exact_logits.abs().max().item() * 2**-14
    assert rates["fp32 gate"] < 1e-4
    _print_gate_times(w, bias)


def _print_gate_times(w: torch.Tensor, bias: torch.Tensor) -> None:
    """The gate GEMM (``Router.logits``: [T, 7168] x [7168, 256]), CUDA-graph replays: the fp32 gate
    of bf16-exact weights (bf16 operands, fp32 output), of weights that need fp32 (an fp32 GEMM),
    and the bf16 gate."""
    from moe_kernels.selection.timing import Timer

    timer = Timer(max_runs=200, target_s=0.3)
    fp32_values = w.float() * (1 + 2**-12)  # off the bf16 grid: no low-precision copy
    routers = {
        "fp32 (bf16-exact)": _deepseek_v3_router(torch.float32, w, bias),
        "fp32 (fp32 values)": _deepseek_v3_router(torch.float32, fp32_values, bias),
        "bf16": _deepseek_v3_router(None, w, bias),
    }
    assert routers["fp32 (fp32 values)"].gate_lowp is None
    gpu = torch.cuda.get_device_name()
    for t in (1, 64, 512, 4096):
        x = torch.randn(t, DS_H, device="cuda").bfloat16()
        times = {name: timer.graphed(lambda r=r, x=x: r.logits(x), f"gate {name} T={t}") for name, r in routers.items()}
        print(f"gate GEMM T={t}: " + ", ".join(f"{name} {us:.1f} us" for name, us in times.items()) + f" on {gpu}")


#: every family the loader accepts: each must keep transformers' parity on select()'s fast paths
GPU_FAMILIES = [name for name, case in CASES.items() if case.refused is None]


@pytest.mark.gpu
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_family_on_the_gpu_fast_paths(family: str, tmp_path: Path) -> None:
    case = CASES[family]
    model = _build(case, tmp_path / "fp32")
    bf16 = transformers.AutoModelForCausalLM if hasattr(model, "lm_head") else transformers.AutoModel
    model16 = bf16.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    model16.save_pretrained(tmp_path / "bf16")
    x16 = torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(2)).bfloat16()

    layer = FusedMoE.from_pretrained(tmp_path / "bf16", layer=LAYER, dtype=torch.bfloat16, device="cuda")
    print(f"\n{family}: {layer.kernel.name}")
    assert "Reference" not in layer.kernel.name, f"{family} fell back to the reference loop"
    ref16, ref_ids = _reference(model16, case, layer.cfg.moe.top_k)(x16)
    ids_in = INPUT_IDS.cuda() if case.hashed else None
    _, ids = layer.router(x16.cuda(), ids_in)
    keep = torch.ones(TOKENS, dtype=torch.bool) if case.hashed else ~_tied(layer, x16.cuda()).cpu()
    assert keep.sum() >= TOKENS // 4, f"{family}: {int((~keep).sum())} of {TOKENS} tokens tie"
    same = _same_sets(ids.cpu().long(), ref_ids.long())
    assert same[keep].all(), f"{family}: tokens {(keep & ~same).nonzero().flatten().tolist()} routed differently"
    assert _rel_err(layer(x16.cuda(), ids_in).cpu()[keep], ref16[keep]) < 3e-2
