"""CPU tests of the DeepGEMM / torch._grouped_mm experts: capability predicates, the composer's
refusals, the hybrid's threshold logic, the tuning tables, and the glue around the GEMMs.

The glue (permute, padding, psum row map, staging of unaligned batches, gather) runs here
against a stand-in ``deep_gemm`` module written in torch that mimics DeepGEMM's tile
semantics: whole BLOCK_M tiles are computed, tiles whose first row is -1 are skipped, psum
groups start at aligned offsets, masked groups write whole tiles into ``[G*M, N]`` (so an
unaligned M would corrupt the next group). The real kernels are tested in test_experts_gpu.py.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from moe_kernels.compose import IncompatibleKernelsError, WorkspaceCache, compose
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.contract import ExpandedTokens, StandardTokens
from moe_kernels.experts import tuning
from moe_kernels.experts.deepgemm import (
    MASKED_BLOCK_M_MAX,
    BatchedDeepGemmExperts,
    DeepGemmExperts,
    ExpandedDeepGemmExperts,
    deep_gemm_status,
    expanded_row_map,
    psum_layout_status,
)
from moe_kernels.experts.grouped_mm import GroupedMMExperts
from moe_kernels.experts.hybrid import HybridDeepGemmExperts
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize

# These tests pin the CPU machine's answers (no GPU, Triton interpreter, no deep_gemm/deep_ep);
# on a GPU machine the same checks pass, which tests/test_*_gpu.py cover.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: pins a GPU-less machine")

CPU = torch.device("cpu")
DEEPGEMM_CLASSES = (DeepGemmExperts, BatchedDeepGemmExperts, ExpandedDeepGemmExperts, HybridDeepGemmExperts)
ALL_CLASSES = (*DEEPGEMM_CLASSES, GroupedMMExperts)
E, K, H, I = 4, 2, 64, 64  # noqa: E741 (the paper's letters)


def layer(dtype: torch.dtype = torch.bfloat16, **moe: object) -> LayerConfig:
    shape = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=dtype)
    return LayerConfig(moe=MoEConfig(**{**shape, **moe}))


def clear_probes() -> None:
    deep_gemm_status.cache_clear()
    psum_layout_status.cache_clear()


@pytest.fixture
def no_deep_gemm(monkeypatch: pytest.MonkeyPatch):
    """``import deep_gemm`` fails (as on a CPU-only CI machine)."""
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    clear_probes()
    yield
    clear_probes()


# --- a torch stand-in for deep_gemm -----------------------------------------------------


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() @ b.float().T).to(torch.bfloat16)


def make_fake_deep_gemm(alignment: int = 32) -> types.ModuleType:
    mod = types.ModuleType("deep_gemm")
    mod.__version__ = "0.0-fake"
    mod.calls = []

    def get_mk_alignment_for_contiguous_layout() -> int:
        return alignment

    def m_grouped_bf16_gemm_nt_contiguous(
        a,
        b,
        d,
        grouped_layout,
        compiled_dims="nk",
        use_psum_layout=False,
        ensure_zero_padding=True,
        expected_m_for_psum_layout=None,
        epilogue=None,
    ):
        """(a, b, d, grouped_layout, compiled_dims, use_psum_layout, ensure_zero_padding,
        expected_m_for_psum_layout, epilogue)"""
        assert a.dtype == b.dtype == d.dtype == torch.bfloat16
        assert grouped_layout.dtype == torch.int32 and grouped_layout.is_contiguous()
        assert a.stride(-1) == 1 and b.is_contiguous() and d.is_contiguous()
        m, g = a.shape[0], b.shape[0]
        assert d.shape == (m, b.shape[1]) and a.shape[1] == b.shape[2] and a.shape[1] % 64 == 0
        mod.calls.append(("contiguous", use_psum_layout))
        gl = grouped_layout.tolist()
        if use_psum_layout:
            assert len(gl) == g and expected_m_for_psum_layout is not None and expected_m_for_psum_layout > 0
            prev = 0
            for e, end in enumerate(gl):
                start, stop = _align(prev, alignment), min(_align(end, alignment), m)
                if stop > start:  # whole tiles, the last one clipped by the tensor
                    d[start:stop] = _mm(a[start:stop], b[e])
                prev = end
            return
        assert len(gl) == m and expected_m_for_psum_layout is None
        for tile in range(0, m, alignment):
            if gl[tile] >= 0:  # the group of a tile is read from its first row
                d[tile : tile + alignment] = _mm(a[tile : tile + alignment], b[gl[tile]])

    def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m, compiled_dims="nk", epilogue=None):
        assert a.dtype == b.dtype == d.dtype == torch.bfloat16 and masked_m.dtype == torch.int32
        g, m, k = a.shape
        assert expected_m > 0 and m > 0 and k % 64 == 0
        assert m % MASKED_BLOCK_M_MAX == 0, f"M={m}: a whole-tile store would spill into the next group"
        mod.calls.append(("masked", expected_m))
        a_rows, d_rows = a.reshape(g * m, k), d.view(g * m, d.shape[2])
        for e, count in enumerate(masked_m.tolist()):
            start = e * m
            stop = min(start + _align(count, MASKED_BLOCK_M_MAX), g * m)
            if stop > start:
                d_rows[start:stop] = _mm(a_rows[start:stop], b[e])

    mod.get_mk_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
    mod.m_grouped_bf16_gemm_nt_contiguous = m_grouped_bf16_gemm_nt_contiguous
    mod.m_grouped_bf16_gemm_nt_masked = m_grouped_bf16_gemm_nt_masked
    return mod


@pytest.fixture
def fake_deep_gemm(monkeypatch: pytest.MonkeyPatch):
    mod = make_fake_deep_gemm()
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    clear_probes()
    yield mod
    clear_probes()


# --- probes and checks ------------------------------------------------------------------


def test_probe_reports_a_missing_module(no_deep_gemm):
    ok, why = deep_gemm_status()
    assert not ok and "deep_gemm does not import" in why


def test_probe_never_raises_on_a_broken_import(monkeypatch: pytest.MonkeyPatch):
    import moe_kernels.experts.deepgemm as dg_module

    def broken(name: str):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(dg_module.importlib, "import_module", broken)
    clear_probes()
    try:
        ok, why = deep_gemm_status()
        assert not ok and "OSError" in why and "libcuda" in why
    finally:
        clear_probes()


def test_probe_names_missing_bf16_symbols(monkeypatch: pytest.MonkeyPatch):
    mod = make_fake_deep_gemm()
    del mod.m_grouped_bf16_gemm_nt_masked
    monkeypatch.setitem(sys.modules, "deep_gemm", mod)
    clear_probes()
    try:
        ok, why = deep_gemm_status()
        assert not ok and "m_grouped_bf16_gemm_nt_masked" in why
    finally:
        clear_probes()


def test_probe_accepts_the_bf16_symbols_and_the_psum_signature(fake_deep_gemm):
    assert deep_gemm_status() == (True, "deep_gemm 0.0-fake with bf16 grouped GEMMs")
    assert psum_layout_status()[0]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_cpu_checks_refuse_with_clear_reasons(cls, no_deep_gemm):
    checks = {c.name: c for c in cls().checks(layer(), CPU)}
    assert not checks["device"].ok and "CUDA GPU of SM90" in checks["device"].reason
    assert checks["quant"].ok and checks["activation"].ok and checks["expert_map"].ok
    if cls is GroupedMMExperts:
        assert "_grouped_mm" in checks["device"].reason
        assert checks["grouped_mm"].ok
    else:
        assert not checks["deep_gemm"].ok and "deep_gemm does not import" in checks["deep_gemm"].reason
        assert checks["shape"].ok


@pytest.mark.parametrize("cls", DEEPGEMM_CLASSES)
def test_compose_lists_every_failure(cls, no_deep_gemm):
    cfg = layer(torch.float32, hidden_size=32, intermediate_size=48)
    experts = cls()
    pf = LocalPrepareAndFinalize(batched=experts.input_format.value == "batched")
    with pytest.raises(IncompatibleKernelsError) as info:
        compose(pf, experts, cfg, device=CPU)
    failed = {c.name: c.reason for c in info.value.failures}
    expected = {"experts.device", "experts.quant", "experts.deep_gemm", "experts.shape"}
    if experts.input_format.value == "expanded":
        expected.add("format")  # no local prepare hands out expanded tokens
    assert set(failed) == expected
    assert "float32" in failed["experts.quant"]
    assert "hidden_size=32" in failed["experts.shape"] and "intermediate_size=48" in failed["experts.shape"]
    for reason in failed.values():
        assert reason in str(info.value)


def test_grouped_mm_refuses_fp16_and_too_many_groups():
    checks = {c.name: c for c in GroupedMMExperts().checks(layer(torch.float16), CPU)}
    assert not checks["quant"].ok and "float16" in checks["quant"].reason
    big = LayerConfig(moe=MoEConfig(num_experts=2048, top_k=2, hidden_size=H, intermediate_size=I))
    checks = {c.name: c for c in GroupedMMExperts().checks(big, CPU)}
    assert not checks["grouped_mm"].ok and "1024" in checks["grouped_mm"].reason


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_parts_claim_cuda_graphs_and_expert_maps(cls):
    cfg = LayerConfig(moe=layer().moe, parallel=ParallelConfig(cuda_graphs=True, ep_size=2))
    checks = {c.name: c for c in cls().checks(cfg, CPU)}
    assert checks["parallel"].ok and checks["expert_map"].ok


# --- hybrid threshold and tuning ---------------------------------------------------------


def test_hybrid_threshold_defaults_to_tuning(monkeypatch: pytest.MonkeyPatch):
    hybrid = HybridDeepGemmExperts()
    assert hybrid.threshold_for(E, H, I) == tuning.DEFAULT_HYBRID_THRESHOLD
    monkeypatch.setitem(tuning.HYBRID_THRESHOLDS, (E, H, I), 96)
    assert hybrid.threshold_for(E, H, I) == 96
    assert hybrid.use_masked(96, E, H, I) and not hybrid.use_masked(97, E, H, I)
    assert HybridDeepGemmExperts(threshold=5).threshold_for(E, H, I) == 5


def test_hybrid_forced_paths_and_empty_batches():
    contiguous, masked = HybridDeepGemmExperts(threshold=0), HybridDeepGemmExperts(threshold=10**9)
    for t in (1, 7, 4096):
        assert not contiguous.use_masked(t, E, H, I)
        assert masked.use_masked(t, E, H, I)
    assert not masked.use_masked(0, E, H, I)


def test_hybrid_memory_budget_forces_contiguous():
    hybrid = HybridDeepGemmExperts(threshold=10**9, masked_memory_budget=10**6)
    needed = hybrid.masked_bytes(128, E, H, I)
    assert needed == E * 128 * (H + 3 * I) * 2
    assert (needed <= 10**6) == hybrid.use_masked(128, E, H, I)
    assert not hybrid.use_masked(10**5, E, H, I)
    # DeepSeek-V3 at 32 local experts, 16384 tokens: 16 GB of masked scratch -> contiguous
    assert not HybridDeepGemmExperts(threshold=10**9).use_masked(16384, 32, 7168, 2048)


def test_hybrid_rejects_bad_arguments():
    with pytest.raises(ValueError):
        HybridDeepGemmExperts(threshold=-1)
    with pytest.raises(ValueError):
        HybridDeepGemmExperts(masked_memory_budget=-5)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_preferences_are_well_formed_and_rank_between_triton_and_reference(cls):
    score, why = cls().preference(layer(), CPU)
    assert isinstance(score, float) and 0 < score < 50 and why


def test_measured_table_drives_the_score(monkeypatch: pytest.MonkeyPatch):
    key = (E, H, I)
    table = {
        "HybridDeepGemmExperts": {1: 10.0, 1024: 100.0},
        "GroupedMMExperts": {1: 20.0, 1024: 100.0},
    }
    monkeypatch.setitem(tuning.EXPERTS_US, key, table)
    assert tuning.relative_cost("HybridDeepGemmExperts", key) == pytest.approx(1.0)
    assert tuning.relative_cost("GroupedMMExperts", key) == pytest.approx(math.sqrt(2.0))
    assert tuning.relative_cost("DeepGemmExperts", key) is None
    # on the CPU (not Hopper) the defaults apply
    assert (
        tuning.experts_preference("GroupedMMExperts", layer(), CPU)[0] == tuning.DEFAULT_SCORES["GroupedMMExperts"][0]
    )


def test_every_default_score_has_a_reason_and_the_threshold_says_where_it_comes_from():
    for name, (score, why) in tuning.DEFAULT_SCORES.items():
        assert 0 < score <= 50 and why, name
        assert (score == 50) == (name == "TritonExperts"), name
    assert tuning.DEFAULT_HYBRID_THRESHOLD > 0 and tuning.DEFAULT_HYBRID_THRESHOLD_SOURCE
    assert all(m.source for m in tuning.GEMM_MEASUREMENTS)


# --- empty batches launch nothing (deep_gemm not even imported) ----------------------------


def test_empty_batches_return_without_touching_deep_gemm(no_deep_gemm):
    w13 = torch.zeros(E, 2 * I, H, dtype=torch.bfloat16)
    w2 = torch.zeros(E, H, I, dtype=torch.bfloat16)
    x = torch.zeros(0, H, dtype=torch.bfloat16)
    std = StandardTokens(x, torch.zeros(0, K, dtype=torch.int32), torch.zeros(0, K), E)
    for experts in (DeepGemmExperts(), HybridDeepGemmExperts(), GroupedMMExperts()):
        assert experts.workspace_shapes(std, w13, w2) == {}
        experts.apply(std, w13, w2, torch.empty(0, H, dtype=torch.bfloat16), {})
    from moe_kernels.contract import BatchedTokens

    batched = BatchedTokens(torch.zeros(E, 0, H, dtype=torch.bfloat16), torch.zeros(E, dtype=torch.int32), 1)
    assert BatchedDeepGemmExperts().workspace_shapes(batched, w13, w2) == {}
    BatchedDeepGemmExperts().apply(batched, w13, w2, torch.empty(E, 0, H, dtype=torch.bfloat16), {})
    expanded = ExpandedTokens(x, torch.zeros(E, dtype=torch.int32), torch.zeros(0), 128, 1)
    assert ExpandedDeepGemmExperts().workspace_shapes(expanded, w13, w2) == {}
    ExpandedDeepGemmExperts().apply(expanded, w13, w2, torch.empty(0, H, dtype=torch.bfloat16), {})


# --- the glue, end to end on the stand-in -------------------------------------------------


def loop_reference(x, w13, w2, weights, ids) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            h = w13[e].float() @ x[t].float()
            out[t] += float(weights[t, k]) * (w2[e].float() @ (F.silu(h[:I]) * h[I:]))
    return out


def problem(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K)
    ids = ids.to(torch.int32)
    if t:
        ids[:, 0] = 2  # one hot expert
        ids[:, 1] = torch.where(ids[:, 1] == 2, torch.zeros_like(ids[:, 1]), ids[:, 1])
        ids[1::3, 1] = -1  # slots on other ranks
    weights = torch.rand(t, K, generator=g)
    return x, w13, w2, weights, ids


def poisoned(specs, cache: WorkspaceCache) -> dict[str, torch.Tensor]:
    """Workspaces full of NaN: any padding row that leaked into the output would show."""
    ws = cache.get(specs, CPU)
    for buf in ws.values():
        buf.fill_(float("nan"))
    return ws


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err <= 3e-2 * max(ref.abs().max().item(), 1.0), err


STANDARD_EXPERTS = {
    "contiguous": DeepGemmExperts,
    "hybrid_contiguous": lambda: HybridDeepGemmExperts(threshold=0),
    "hybrid_masked": lambda: HybridDeepGemmExperts(threshold=10**9),
    "grouped_mm": GroupedMMExperts,
}


@pytest.mark.parametrize("t", [1, 5, 17])
@pytest.mark.parametrize("kind", list(STANDARD_EXPERTS))
def test_standard_glue_matches_the_loop(kind, t, fake_deep_gemm):
    x, w13, w2, weights, ids = problem(t, seed=t)
    experts = STANDARD_EXPERTS[kind]()
    tokens = StandardTokens(x, ids, weights, E)
    ws = poisoned(experts.workspace_shapes(tokens, w13, w2), WorkspaceCache())
    out = torch.full((t, H), float("nan"), dtype=torch.bfloat16)
    experts.apply(tokens, w13, w2, out, ws)
    close(out, loop_reference(x, w13, w2, weights, ids))
    expected_gemms = {
        "contiguous": {"contiguous"},
        "hybrid_contiguous": {"contiguous"},
        "hybrid_masked": {"masked"},
        "grouped_mm": set(),
    }[kind]
    assert {call[0] for call in fake_deep_gemm.calls} == expected_gemms


def test_contiguous_workspace_is_declared_exactly(fake_deep_gemm):
    x, w13, w2, weights, ids = problem(17, seed=3)
    specs = DeepGemmExperts().workspace_shapes(StandardTokens(x, ids, weights, E), w13, w2)
    rows = (17 * K + min(E, 17 * K) * 31) // 32 * 32  # host bound at the stand-in's alignment of 32
    assert {n: s.shape for n, s in specs.items()} == {
        "permuted": (rows, H),
        "gate_up": (rows, 2 * I),
        "activation": (rows, I),
    }
    masked = HybridDeepGemmExperts(threshold=10**9).workspace_shapes(StandardTokens(x, ids, weights, E), w13, w2)
    assert {n: s.shape for n, s in masked.items()} == {
        "masked_rows": (E, 128, H),
        "gate_up": (E, 128, 2 * I),
        "activation": (E, 128, I),
    }


@pytest.mark.parametrize("t", [1, 5, 128])
def test_batched_glue_matches_the_loop(t, fake_deep_gemm):
    """Through local batched prepare/finalize: M = T (staged when unaligned) or a 128 capacity."""
    x, w13, w2, weights, ids = problem(t, seed=t)
    pf = LocalPrepareAndFinalize(batched=True)
    prepared = pf.prepare(x, ids, weights, num_experts=E, num_local_experts=E, expert_map=None)
    experts = BatchedDeepGemmExperts()
    specs = experts.workspace_shapes(prepared.tokens, w13, w2)
    assert ("masked_rows" in specs) == (t % 128 != 0)
    expert_out = torch.full(prepared.tokens.x.shape, float("nan"), dtype=torch.bfloat16)
    experts.apply(prepared.tokens, w13, w2, expert_out, poisoned(specs, WorkspaceCache()))
    out = torch.empty(t, H, dtype=torch.bfloat16)
    pf.finalize(out, expert_out, prepared)
    close(out, loop_reference(x, w13, w2, weights, ids))


def expanded_problem(counts: list[int], alignment: int, extra_rows: int, seed: int = 0):
    """DeepEP-style expanded layout built by hand: segment e starts at align(end[e-1]); rows
    outside segments (and past the last one) hold NaN, as garbage a dispatch might leave."""
    g = torch.Generator().manual_seed(seed)
    ends, starts, end = [], [], 0
    for c in counts:
        start = _align(end, alignment)
        starts.append(start)
        end = start + c
        ends.append(end)
    rows = _align(end, alignment) + extra_rows
    x = torch.full((rows, H), float("nan"))
    row_expert = [-1] * rows
    for e, (s, c) in enumerate(zip(starts, counts, strict=True)):
        x[s : s + c] = torch.randn(c, H, generator=g)
        row_expert[s : s + c] = [e] * c
    weights = torch.rand(rows, generator=g)
    return x.to(torch.bfloat16), torch.tensor(ends, dtype=torch.int32), weights, row_expert


def test_expanded_row_map_marks_segments_only():
    _, ends, _, row_expert = expanded_problem([0, 3, 0, 40, 1, 0], alignment=32, extra_rows=32)
    got_expert, dst = expanded_row_map(ends, len(row_expert), 32)
    assert got_expert.tolist() == row_expert
    assert dst.squeeze(1).tolist() == [r if e >= 0 else -1 for r, e in enumerate(row_expert)]


@pytest.mark.parametrize("counts", [[0, 3, 0, 40], [5, 0, 0, 0], [0, 0, 0, 0], [33, 1, 32, 2]])
def test_expanded_glue_weights_valid_rows_and_zeros_the_rest(counts, fake_deep_gemm):
    _, w13, w2, _, _ = problem(0, seed=1)
    x, ends, row_weights, row_expert = expanded_problem(counts, alignment=32, extra_rows=32, seed=len(counts))
    tokens = ExpandedTokens(x, ends, row_weights, alignment=32, expected_m=max(1, sum(counts) // E))
    experts = ExpandedDeepGemmExperts()
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    experts.apply(tokens, w13, w2, out, poisoned(experts.workspace_shapes(tokens, w13, w2), WorkspaceCache()))
    for r, e in enumerate(row_expert):
        if e < 0:
            assert (out[r] == 0).all(), r
            continue
        h = w13[e].float() @ x[r].float()
        ref = float(row_weights[r]) * (w2[e].float() @ (F.silu(h[:I]) * h[I:]))
        assert (out[r].float() - ref).abs().max() <= 3e-2 * max(ref.abs().max().item(), 1.0), r


def test_expanded_refuses_a_foreign_alignment(fake_deep_gemm):
    _, w13, w2, _, _ = problem(0, seed=1)
    x, ends, row_weights, _ = expanded_problem([3, 4, 0, 1], alignment=64, extra_rows=0)
    tokens = ExpandedTokens(x, ends, row_weights, alignment=64, expected_m=2)
    experts = ExpandedDeepGemmExperts()
    with pytest.raises(ValueError, match="expert_alignment=32"):
        experts.apply(
            tokens, w13, w2, torch.empty_like(x), WorkspaceCache().get(experts.workspace_shapes(tokens, w13, w2), CPU)
        )


# --- the benchmark's pure-torch baselines and reporting (no GPU needed) -------------------


@pytest.mark.parametrize("t", [1, 9])
def test_bench_baselines_match_the_loop(t):
    from moe_kernels.bench.experts import per_expert_loop, torch_ops_moe

    x, w13, w2, weights, ids = problem(t, seed=t)
    ref = loop_reference(x, w13, w2, weights, ids)
    close(torch_ops_moe(x, w13, w2, weights, ids), ref)
    close(per_expert_loop(x, w13, w2, weights, ids), ref)


def test_bench_crossover_and_tuning_snippet():
    from moe_kernels.bench.experts import SHAPES, Point, ShapeResult, crossover, report, tuning_snippet

    def point(t: int, contiguous: float, masked: float | None) -> Point:
        us = {"deepgemm": contiguous, "grouped_mm": contiguous * 1.1, "triton": contiguous * 2}
        if masked is not None:
            us["masked"] = masked
        return Point(t, us=us)

    pts = [
        point(1, 100, 90),
        point(64, 120, 110),
        point(1024, 400, 420),
        point(4096, 900, 1000),
        point(16384, 3000, None),
    ]
    assert crossover(pts)[0] == 64
    assert crossover(pts[:2])[0] == 64
    assert crossover([point(1, 100, 101)])[0] == 0
    assert crossover([point(1, 100, None)])[0] is None
    # one slow point at T=1 does not hide the run of wins after it
    wins_after_a_loss = [point(1, 60, 85), point(8, 250, 226), point(64, 554, 475), point(256, 600, 500)]
    assert crossover([*wins_after_a_loss, point(4096, 1000, 1300)])[0] == 256

    result = ShapeResult("deepseek-v3", SHAPES["deepseek-v3"], pts, *crossover(pts))
    scope: dict[str, object] = {}
    exec(tuning_snippet([result], "test run"), scope)
    table = scope["EXPERTS_US"][(32, 7168, 2048)]
    assert table["HybridDeepGemmExperts"] == {1: 90, 64: 110, 1024: 400, 4096: 900, 16384: 3000}  # masked T <= 64
    assert table["GroupedMMExperts"][1] == pytest.approx(110)
    assert scope["HYBRID_THRESHOLDS"] == {(32, 7168, 2048): 64}
    text = report([result], ["- test"], "test run")
    assert "Hybrid crossover: masked up to T = 64" in text and "| 16384 |" in text


def test_measured_tables_are_consistent():
    """Every measured shape has a threshold, and the hybrid's row follows it."""
    assert set(tuning.HYBRID_THRESHOLDS) == set(tuning.EXPERTS_US)
    for key, table in tuning.EXPERTS_US.items():
        threshold = tuning.HYBRID_THRESHOLDS[key]
        hybrid, contiguous = table["HybridDeepGemmExperts"], table["DeepGemmExperts"]
        for t, us in hybrid.items():
            if t > threshold:
                assert us == contiguous[t], (key, t)
        for name in table:
            assert tuning.relative_cost(name, key) >= 1.0, (key, name)
