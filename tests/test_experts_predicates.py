"""CPU tests of the DeepGEMM / torch._grouped_mm experts: capability predicates, the composer's
refusals, the hybrid's threshold logic, the measured tuning tables, and the glue around the GEMMs.

The glue (permute, padding, psum row map, masked capacity, gather) runs here against a
stand-in ``deep_gemm`` module written in torch that mimics DeepGEMM's tile semantics: whole
BLOCK_M tiles are computed, tiles whose first row is -1 are skipped, psum groups start at
aligned offsets, masked groups write whole tiles into ``[G*M, N]`` (so an unaligned M would
corrupt the next group). Its fp8 contiguous GEMM multiplies the dequantized operands and
records whether the activation scales came in the layout DeepGEMM reads without a transpose.
The real kernels are tested in test_experts_gpu.py and test_fp8_gpu.py.
"""

from __future__ import annotations

import json
import math
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_kernels.backends import deep_gemm as dg_backend
from moe_kernels.backends.deep_gemm import MASKED_BLOCK_M_MAX, masked_rows_multiple, psum_layout_status
from moe_kernels.backends.deep_gemm import status as deep_gemm_status
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
from moe_kernels.core import tuning
from moe_kernels.core.compose import (
    IncompatibleKernelsError,
    ModularKernel,
    WorkspaceCache,
    check_pair,
    compose,
    layer_context,
    pair_name,
)
from moe_kernels.core.contract import (
    ExpandedTokens,
    LayerContext,
    Layout,
    MaskedTokens,
    StandardTokens,
    TokenFormat,
)
from moe_kernels.experts import hybrid as hybrid_module
from moe_kernels.experts.deepgemm import (
    DeepGemmExperts,
    ExpandedDeepGemmExperts,
    MaskedDeepGemmExperts,
    expanded_row_map,
)
from moe_kernels.experts.grouped_mm import GroupedMMExperts
from moe_kernels.experts.hybrid import HybridDeepGemmExperts
from moe_kernels.mlp.act_quant import ActQuant
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.prepare_finalize.local import LocalMaskedPrepareAndFinalize, LocalPrepareAndFinalize

# These tests pin the CPU machine's answers (no GPU, Triton interpreter, no deep_gemm/deep_ep);
# on a GPU machine the same checks pass, which tests/test_*_gpu.py cover.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: pins a GPU-less machine")

CPU = torch.device("cpu")
DEEPGEMM_CLASSES = (DeepGemmExperts, MaskedDeepGemmExperts, ExpandedDeepGemmExperts, HybridDeepGemmExperts)
ALL_CLASSES = (*DEEPGEMM_CLASSES, GroupedMMExperts)
E, K, H, I = 4, 2, 64, 64  # noqa: E741 (the paper's letters)


def layer(dtype: torch.dtype = torch.bfloat16, max_tokens: int = 8192, **moe: object) -> LayerConfig:
    shape = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, dtype=dtype)
    return LayerConfig(moe=MoEConfig(**{**shape, **moe}), parallel=ParallelConfig(max_tokens_per_rank=max_tokens))


def ctx_of(cfg: LayerConfig | None = None) -> LayerContext:
    return layer_context(cfg or layer(), device=CPU)


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
        mod.calls.append(("contiguous", use_psum_layout))
        contiguous(
            a, b, d, grouped_layout, lambda rows, e: _mm(a[rows], b[e]), use_psum_layout, expected_m_for_psum_layout
        )

    def m_grouped_fp8_gemm_nt_contiguous(
        a,
        b,
        d,
        grouped_layout,
        recipe=None,
        recipe_a=None,
        recipe_b=None,
        compiled_dims="nk",
        disable_ue8m0_cast=False,
        use_psum_layout=False,
        ensure_zero_padding=True,
        expected_m_for_psum_layout=None,
    ):
        """(a, b, d, grouped_layout, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast,
        use_psum_layout, ensure_zero_padding, expected_m_for_psum_layout): DeepGEMM 2.8's"""
        from moe_kernels.mlp.fp8 import dequantize_blocks, dequantize_groups

        (a, sa), (b, sb) = a, b
        assert a.dtype == b.dtype == torch.float8_e4m3fn and d.dtype == torch.bfloat16
        assert sa.shape == (a.shape[0], -(-a.shape[1] // 128)) and sa.dtype == torch.float32
        # what SM90 DeepGEMM reads as it is: token-major, column stride a multiple of 4 (TMA)
        mod.calls.append(("fp8_contiguous", use_psum_layout, sa.stride(0) == 1 and sa.stride(1) % 4 == 0))

        def mm(rows: slice, e: int) -> torch.Tensor:
            x = dequantize_groups(a[rows], sa[rows])
            return (x @ dequantize_blocks(b[e], sb[e]).T).to(torch.bfloat16)

        contiguous(a, b, d, grouped_layout, mm, use_psum_layout, expected_m_for_psum_layout)

    def contiguous(a, b, d, grouped_layout, mm, use_psum_layout, expected_m_for_psum_layout) -> None:
        """The contiguous GEMMs' tile semantics; ``mm(rows, e)`` multiplies rows of A by group e."""
        assert grouped_layout.dtype == torch.int32 and grouped_layout.is_contiguous()
        assert a.stride(-1) == 1 and b.is_contiguous() and d.is_contiguous()
        m, g = a.shape[0], b.shape[0]
        assert d.shape == (m, b.shape[1]) and a.shape[1] == b.shape[2] and a.shape[1] % 64 == 0
        gl = grouped_layout.tolist()
        if use_psum_layout:
            assert len(gl) == g and expected_m_for_psum_layout is not None and expected_m_for_psum_layout > 0
            prev = 0
            for e, end in enumerate(gl):
                start, stop = _align(prev, alignment), min(_align(end, alignment), m)
                if stop > start:  # whole tiles, the last one clipped by the tensor
                    d[start:stop] = mm(slice(start, stop), e)
                prev = end
            return
        assert len(gl) == m and expected_m_for_psum_layout is None
        for tile in range(0, m, alignment):
            if gl[tile] >= 0:  # the group of a tile is read from its first row
                d[tile : tile + alignment] = mm(slice(tile, tile + alignment), gl[tile])

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
    mod.m_grouped_fp8_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
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
    def broken(name: str):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(dg_backend.importlib, "import_module", broken)
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
    assert psum_layout_status(False)[0]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_cpu_checks_refuse_with_clear_reasons(cls, no_deep_gemm):
    checks = {c.name: c for c in cls().checks(ctx_of())}
    assert not checks["device"].ok and "CUDA GPU of SM90" in checks["device"].reason
    assert checks["mlp"].ok and checks["parallel"].ok
    if cls is GroupedMMExperts:
        assert "_grouped_mm" in checks["device"].reason
        assert checks["grouped_mm"].ok
    else:
        assert not checks["deep_gemm"].ok and "deep_gemm does not import" in checks["deep_gemm"].reason
        assert checks["shape"].ok


LOCAL_PF = {Layout.STANDARD: LocalPrepareAndFinalize, Layout.MASKED: LocalMaskedPrepareAndFinalize}


@pytest.mark.parametrize("cls", DEEPGEMM_CLASSES)
def test_compose_lists_every_failure(cls, no_deep_gemm):
    cfg = layer(torch.float32, hidden_size=32, intermediate_size=48)
    experts = cls()
    # no local prepare/finalize hands out expanded tokens: the standard one stands in
    pf = LOCAL_PF.get(experts.input_layout, LocalPrepareAndFinalize)()
    with pytest.raises(IncompatibleKernelsError) as info:
        compose(pf, experts, cfg, device=CPU)
    failed = {c.name: c.reason for c in info.value.failures}
    expected = {"experts.device", "experts.mlp", "experts.deep_gemm", "experts.shape"}
    if experts.input_layout is Layout.EXPANDED:
        expected.add("layout")
        assert "hands out standard tokens" in failed["layout"] and "takes expanded" in failed["layout"]
    assert set(failed) == expected
    assert "float32" in failed["experts.mlp"]
    assert "hidden_size=32" in failed["experts.shape"] and "intermediate_size=48" in failed["experts.shape"]
    for reason in failed.values():
        assert reason in str(info.value)


def test_grouped_mm_refuses_fp16_and_too_many_groups():
    checks = {c.name: c for c in GroupedMMExperts().checks(ctx_of(layer(torch.float16)))}
    assert not checks["mlp"].ok and "float16" in checks["mlp"].reason
    big = LayerConfig(moe=MoEConfig(num_experts=2048, top_k=2, hidden_size=H, intermediate_size=I))
    checks = {c.name: c for c in GroupedMMExperts().checks(ctx_of(big))}
    assert not checks["grouped_mm"].ok and "1024" in checks["grouped_mm"].reason
    # the limit is on the local experts: 2048 over 2 ranks is 1024 groups
    split = LayerConfig(moe=big.moe, parallel=ParallelConfig(ep_size=2))
    assert {c.name: c for c in GroupedMMExperts().checks(ctx_of(split))}["grouped_mm"].ok


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_parts_claim_cuda_graphs_and_any_placement(cls):
    from moe_kernels.core.placement import ExpertPlacement

    cfg = LayerConfig(moe=layer().moe, parallel=ParallelConfig(cuda_graphs=True, ep_size=2))
    interleaved = ExpertPlacement.from_owners([e % 2 for e in range(E)], 0)
    checks = {c.name: c for c in cls().checks(layer_context(cfg, placement=interleaved, device=CPU))}
    assert checks["parallel"].ok and "ep_size=2" in checks["parallel"].reason
    assert cls.supports_cuda_graphs


# --- the masked format: M a multiple of the masked GEMM's tile ----------------------------


@pytest.mark.parametrize("alignment", [32, 256])
@pytest.mark.parametrize("max_tokens", [1, 5, 128, 200])
def test_masked_capacity_is_rounded_to_the_experts_row_multiple(alignment, max_tokens, monkeypatch):
    """No masked prepare/finalize pins another row multiple (LocalMasked is the only one and
    takes any), so the experts' format decides M: the layer's largest call rounded up."""
    monkeypatch.setitem(sys.modules, "deep_gemm", make_fake_deep_gemm(alignment))
    clear_probes()
    try:
        multiple = masked_rows_multiple()
        assert multiple == math.lcm(alignment, MASKED_BLOCK_M_MAX)
        ctx = ctx_of(layer(max_tokens=max_tokens))
        experts, pf = MaskedDeepGemmExperts(), LocalMaskedPrepareAndFinalize()
        fmt = experts.input_format(ctx)
        assert (fmt.layout, fmt.alignment, fmt.act_quant) == (Layout.MASKED, multiple, None)
        format_check = check_pair(pf, experts, ctx)[0]
        assert format_check.name == "format" and format_check.ok, format_check
        capacity = pf.capacity(ctx, fmt)
        assert capacity % multiple == 0 and capacity - multiple < max_tokens <= capacity
        assert pf.max_expert_rows(ctx, fmt) == capacity
        specs = pf.workspace_specs(ctx, fmt)
        assert {n: s.shape for n, s in specs.items()} == {"masked_x": (E, capacity, H), "masked_out": (E, capacity, H)}
    finally:
        clear_probes()


def test_masked_prepare_takes_any_row_multiple():
    """Nothing pins LocalMaskedPrepareAndFinalize's M: it accepts the multiple it is asked for."""
    from moe_kernels.core.contract import TokenFormat

    ctx, pf = ctx_of(layer(max_tokens=100)), LocalMaskedPrepareAndFinalize()
    for multiple in (1, 64, 128, 384):
        fmt = TokenFormat(Layout.MASKED, multiple)
        c = pf.check_format(ctx, fmt)
        assert c.ok and f"multiple of {multiple}" in c.reason
        assert pf.capacity(ctx, fmt) == _align(100, multiple)


# --- hybrid threshold --------------------------------------------------------------------


MASKED_PAIR = pair_name(LocalMaskedPrepareAndFinalize(), MaskedDeepGemmExperts())
CONTIGUOUS_PAIR = pair_name(LocalPrepareAndFinalize(), DeepGemmExperts())


def table_with(cfg: LayerConfig, pairs: dict[str, dict[int, float]], gpu: str = "Test GPU") -> tuning.GpuTable:
    times = {name: {str(t): us for t, us in series.items()} for name, series in pairs.items()}
    return tuning.GpuTable(gpu, "a test run", "/nowhere.json", shapes={str(tuning.ShapeKey.of(cfg)): {"pairs": times}})


def test_hybrid_threshold_defaults_without_a_table():
    ctx = ctx_of()
    assert tuning.table_for(ctx.device) is None  # the CPU has no tuning table
    hybrid = HybridDeepGemmExperts()
    assert hybrid.threshold_for(ctx) == (hybrid_module.DEFAULT_THRESHOLD, hybrid_module.DEFAULT_THRESHOLD_SOURCE)
    assert hybrid_module.DEFAULT_THRESHOLD > 0 and "default" in hybrid_module.DEFAULT_THRESHOLD_SOURCE
    assert HybridDeepGemmExperts(threshold=5).threshold_for(ctx) == (5, "given")


def test_hybrid_threshold_is_the_tables_crossover(monkeypatch: pytest.MonkeyPatch):
    cfg = layer()
    masked = {1: 90.0, 64: 110.0, 1024: 420.0, 4096: 1000.0}
    contiguous = {1: 100.0, 64: 120.0, 1024: 400.0, 4096: 900.0}
    # keyed as the tuner writes them: from the parts' classes
    table = table_with(cfg, {MASKED_PAIR: masked, CONTIGUOUS_PAIR: contiguous})
    monkeypatch.setattr(tuning, "table_for", lambda device: table)
    ctx = ctx_of(cfg)
    hybrid = HybridDeepGemmExperts()
    threshold, source = hybrid.threshold_for(ctx)
    assert threshold == 64 and "measured crossover" in source and "Test GPU" in source
    assert hybrid.use_masked(ctx, 64) and not hybrid.use_masked(ctx, 65)
    # a threshold given by hand wins over the table
    assert HybridDeepGemmExperts(threshold=7).threshold_for(ctx) == (7, "given")


@pytest.mark.parametrize("what", ["only_masked", "other_shape", "no_shared_t"])
def test_hybrid_falls_back_to_the_default_when_the_table_cannot_decide(what, monkeypatch):
    cfg = layer()
    masked = {1: 90.0, 64: 110.0}
    contiguous = {1: 100.0, 64: 120.0} if what != "no_shared_t" else {2: 100.0, 128: 120.0}
    pairs = {MASKED_PAIR: masked}
    if what != "only_masked":
        pairs[CONTIGUOUS_PAIR] = contiguous
    table = table_with(layer(num_experts=8) if what == "other_shape" else cfg, pairs)
    monkeypatch.setattr(tuning, "table_for", lambda device: table)
    assert HybridDeepGemmExperts().threshold_for(ctx_of(cfg)) == (
        hybrid_module.DEFAULT_THRESHOLD,
        hybrid_module.DEFAULT_THRESHOLD_SOURCE,
    )


def test_hybrid_forced_paths_and_empty_batches():
    ctx = ctx_of()
    contiguous, masked = HybridDeepGemmExperts(threshold=0), HybridDeepGemmExperts(threshold=10**9)
    for t in (1, 7, 4096):
        assert not contiguous.use_masked(ctx, t)
        assert masked.use_masked(ctx, t)
    assert not masked.use_masked(ctx, 0)


def test_hybrid_memory_budget_forces_contiguous():
    ctx = ctx_of()
    hybrid = HybridDeepGemmExperts(threshold=10**9, masked_memory_budget=10**6)
    needed = hybrid.masked_bytes(ctx, 128)
    assert needed == E * 128 * (H + 3 * I) * 2
    assert hybrid.masked_bytes(ctx, 1) == needed  # rows per expert are rounded up to the tile
    assert (needed <= 10**6) == hybrid.use_masked(ctx, 128)
    assert not hybrid.use_masked(ctx, 10**5)
    # DeepSeek-V3 at 32 local experts, 16384 tokens: 16 GB of masked scratch -> contiguous
    dsv3 = ctx_of(LayerConfig(moe=MoEConfig(num_experts=32, top_k=8, hidden_size=7168, intermediate_size=2048)))
    assert not HybridDeepGemmExperts(threshold=10**9).use_masked(dsv3, 16384)


def test_hybrid_reserves_its_largest_call(fake_deep_gemm):
    """Kernels reserve their largest call when built: per name, max_workspace_specs covers the
    workspace of every T up to max_rows, whichever path T takes."""
    ctx = ctx_of(layer(max_tokens=300))
    for hybrid in (HybridDeepGemmExperts(threshold=130), HybridDeepGemmExperts(threshold=0)):
        hybrid.bind(ctx)
        reserved = hybrid.max_workspace_specs(ctx, 300)
        for t in range(1, 301):
            for name, spec in hybrid.workspace_specs(ctx, t).items():
                assert name in reserved and reserved[name].nbytes >= spec.nbytes, (hybrid, t, name)


def test_hybrid_rejects_bad_arguments():
    with pytest.raises(ValueError):
        HybridDeepGemmExperts(threshold=-1)
    with pytest.raises(ValueError):
        HybridDeepGemmExperts(masked_memory_budget=-5)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_preferences_are_well_formed_and_rank_between_triton_and_reference(cls):
    from moe_kernels.experts.reference import TorchReferenceExperts

    ctx = ctx_of()
    score, why = cls().preference(ctx)
    assert isinstance(score, float) and 0 < score < 50 and why
    assert score < TorchReferenceExperts().preference(ctx)[0]


# --- the measured tables (moe_kernels.core.tuning) ----------------------------------------------


def test_shape_key_is_the_local_layer():
    moe = MoEConfig(num_experts=32, top_k=8, hidden_size=7168, intermediate_size=2048)
    key = tuning.ShapeKey.of(LayerConfig(moe=moe, parallel=ParallelConfig(ep_size=4, ep_rank=3)))
    assert key == tuning.ShapeKey(8, 8, 7168, 2048, "bfloat16", "none")
    assert str(key) == "E=8,K=8,H=7168,I=2048,bfloat16,none"
    fp8 = tuning.ShapeKey.of(LayerConfig(moe=moe, quant=QuantConfig(scheme="fp8_w8a8_block")))
    assert str(fp8) == "E=32,K=8,H=7168,I=2048,bfloat16,fp8_w8a8_block"
    assert str(tuning.ShapeKey.of(layer(torch.float16))) == f"E={E},K={K},H={H},I={I},float16,none"


def test_point_for_takes_the_smallest_measured_t_at_or_above():
    points = {1: "a", 16: "b", 256: "c"}
    assert tuning.point_for(points, 1) == (1, "a")
    assert tuning.point_for(points, 2) == (16, "b")
    assert tuning.point_for(points, 16) == (16, "b")
    assert tuning.point_for(points, 17) == (256, "c")
    assert tuning.point_for(points, 10**6) == (256, "c")  # above every point: the largest
    with pytest.raises(ValueError):
        tuning.point_for({}, 1)


def crossover_by_brute_force(low: dict[int, float], high: dict[int, float]) -> int | None:
    """Try every candidate threshold; keep the one whose choices cost the least over the per-T
    best, as a product of ratios (the smallest threshold on ties)."""
    shared = sorted(set(low) & set(high))
    if not shared:
        return None
    best, best_cost = None, None
    for threshold in [0, *shared]:
        cost = 1.0
        for t in shared:
            chosen = low[t] if t <= threshold else high[t]
            cost *= chosen / min(low[t], high[t])
        if best_cost is None or cost < best_cost * (1 - 1e-12):
            best, best_cost = threshold, cost
    return best


def test_crossover_fits_the_measured_series():
    low = {1: 90.0, 64: 110.0, 1024: 420.0, 4096: 1000.0}
    high = {1: 100.0, 64: 120.0, 1024: 400.0, 4096: 900.0}
    threshold, note = tuning.crossover(low, high)
    assert threshold == 64 and "[1, 64]" in note
    assert tuning.crossover(low, {t: 1.0 for t in high})[0] == 0  # the first path never wins
    assert tuning.crossover({t: 1.0 for t in low}, high)[0] == 4096  # it always wins
    assert tuning.crossover(high, high)[0] == 0  # ties: the smallest threshold
    # one slow point at T=1 does not hide the run of wins after it
    slow_first = {1: 85.0, 8: 226.0, 64: 475.0, 256: 500.0, 4096: 1300.0}
    other = {1: 60.0, 8: 250.0, 64: 554.0, 256: 600.0, 4096: 1000.0}
    threshold, note = tuning.crossover(slow_first, other)
    assert threshold == 256 and "costs" in note  # T=1 is given up, and the note says so
    # only the token counts measured for both count
    assert tuning.crossover({1: 1.0, 16: 1.0, 99: 1.0}, {16: 2.0, 32: 0.5})[0] == 16
    assert tuning.crossover({1: 1.0}, {2: 1.0}) == (None, "no token count measured for both paths")


def test_crossover_matches_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(50):
        ts = sorted(rng.sample([1, 2, 4, 8, 16, 64, 256, 1024, 4096], rng.randint(1, 6)))
        low = {t: rng.uniform(10, 100) * t**0.5 for t in ts}
        high = {t: rng.uniform(10, 100) * t**0.5 for t in ts}
        assert tuning.crossover(low, high)[0] == crossover_by_brute_force(low, high), (low, high)


def table_json(gpu: str = "Test GPU 9000", source: str = "a test run") -> dict:
    cfg = layer()
    return {
        "format": tuning.FORMAT,
        "gpu": gpu,
        "source": source,
        "copy_gbps": 1234.5,
        "shapes": {
            str(tuning.ShapeKey.of(cfg)): {
                "pairs": {"LocalPrepareAndFinalize + TritonExperts": {"1": 12.5, "64": 40}},
                "kernels": {"fused_moe": {"16": {"gemm1": {"BLOCK_M": 16}}}},
            }
        },
    }


def test_load_table_reads_a_file(tmp_path: Path):
    path = tmp_path / "test-gpu-9000.json"
    path.write_text(json.dumps(table_json()))
    table = tuning.load_table(path)
    assert (table.gpu, table.source, table.path, table.copy_gbps) == ("Test GPU 9000", "a test run", str(path), 1234.5)
    key = tuning.ShapeKey.of(layer())
    assert table.pair_times(key) == {"LocalPrepareAndFinalize + TritonExperts": {1: 12.5, 64: 40.0}}
    assert table.kernel_configs(key, "fused_moe") == {16: {"gemm1": {"BLOCK_M": 16}}}
    other = tuning.ShapeKey.of(layer(num_experts=8))
    assert table.pair_times(other) == {} and table.kernel_configs(key, "other_kernel") == {}
    # what a tuning run writes reads back the same
    again = tmp_path / "again.json"
    again.write_text(json.dumps(table.to_json()))
    assert tuning.load_table(again).shapes == table.shapes


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"format": tuning.FORMAT + 1, "shapes": {}}),
        json.dumps({"format": tuning.FORMAT}),
        json.dumps({"format": tuning.FORMAT, "shapes": []}),
        json.dumps([1, 2]),
    ],
    ids=["not_json", "other_format", "no_shapes", "shapes_not_a_dict", "a_list"],
)
def test_load_table_refuses_a_malformed_file_naming_it(tmp_path: Path, text: str):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="broken.json"):
        tuning.load_table(path)


@pytest.mark.parametrize("text", ["5", "null", json.dumps([{"a": 1}, {"b": 2}])])
def test_load_table_refuses_a_json_value_that_is_not_an_object(tmp_path: Path, text: str):
    path = tmp_path / "scalar.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="scalar.json"):
        tuning.load_table(path)


def test_load_table_names_a_missing_file(tmp_path: Path):
    with pytest.raises(ValueError, match="absent.json"):
        tuning.load_table(tmp_path / "absent.json")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Every device reports a GPU called "Test GPU 9000"; cached tables are dropped around the test."""
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "Test GPU 9000")
    tuning.forget_tables()
    yield "test-gpu-9000.json"
    tuning.forget_tables()


def test_tables_are_found_in_the_env_directory(tmp_path: Path, monkeypatch, fake_gpu):
    assert tuning.slug("Test GPU 9000") + ".json" == fake_gpu
    assert tuning.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    monkeypatch.delenv(tuning.ENV_DIR, raising=False)
    assert tuning.table_dirs() == [tuning.cache_dir(), tuning.SHIPPED_DIR]
    assert tuning.table_for(CPU) is None  # nobody tuned this GPU
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    assert tuning.table_dirs() == [tmp_path, tuning.cache_dir(), tuning.SHIPPED_DIR]  # the user's come first
    assert tuning.table_for(CPU) is None
    (tmp_path / fake_gpu).write_text(json.dumps(table_json(source="first run")))
    assert tuning.table_for(CPU) is None  # looked up once and remembered...
    tuning.forget_tables()
    found = tuning.table_for(CPU)  # ...until told to forget
    assert found is not None and found.path == str(tmp_path / fake_gpu) and found.source == "first run"
    (tmp_path / fake_gpu).write_text(json.dumps(table_json(source="second run")))
    tuning.forget_tables()
    assert tuning.table_for(CPU).source == "second run"


def test_a_malformed_table_in_the_env_directory_is_an_error_naming_it(tmp_path: Path, monkeypatch, fake_gpu):
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    (tmp_path / fake_gpu).write_text("{}")
    with pytest.raises(ValueError, match=fake_gpu):
        tuning.table_for(CPU)


def test_a_cpu_has_no_table():
    assert tuning.gpu_name(CPU) is None and tuning.table_for(CPU) is None


# --- empty batches launch nothing (deep_gemm not even imported) ----------------------------


def test_empty_batches_launch_no_experts(no_deep_gemm):
    """The composer skips the experts of an empty call (prepare and finalize still run, as EP
    ranks must): deep_gemm, which does not import here, is never touched."""
    ctx = ctx_of()
    weights = ExpertWeights(torch.zeros(E, 2 * I, H, dtype=torch.bfloat16), torch.zeros(E, H, I, dtype=torch.bfloat16))
    x = torch.zeros(0, H, dtype=torch.bfloat16)
    for experts in (DeepGemmExperts(), HybridDeepGemmExperts(), GroupedMMExperts()):
        kernel = ModularKernel(LocalPrepareAndFinalize(), experts, ctx, WorkspaceCache())
        out = kernel(x, weights, torch.zeros(0, K), torch.zeros(0, K, dtype=torch.int32))
        assert out.shape == (0, H)


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
    ctx = ctx_of(layer(max_tokens=64))
    experts = STANDARD_EXPERTS[kind]()
    experts.bind(ctx)
    if kind == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    ws = poisoned(experts.workspace_specs(ctx, t), WorkspaceCache())
    out = torch.full((t, H), float("nan"), dtype=torch.bfloat16)
    experts.apply(StandardTokens(x, ids, weights), ExpertWeights(w13, w2), out, ws)
    close(out, loop_reference(x, w13, w2, weights, ids))
    expected_gemms = {
        "contiguous": {"contiguous"},
        "hybrid_contiguous": {"contiguous"},
        "hybrid_masked": {"masked"},
        "grouped_mm": set(),
    }[kind]
    assert {call[0] for call in fake_deep_gemm.calls} == expected_gemms


def test_contiguous_workspace_is_declared_exactly(fake_deep_gemm):
    ctx = ctx_of()
    specs = DeepGemmExperts().workspace_specs(ctx, 17)
    rows = (17 * K + min(E, 17 * K) * 31) // 32 * 32  # host bound at the stand-in's alignment of 32
    assert {n: s.shape for n, s in specs.items()} == {
        "permuted": (rows, H),
        "gate_up": (rows, 2 * I),
        "activation": (rows, I),
    }
    masked = HybridDeepGemmExperts(threshold=10**9).workspace_specs(ctx, 17)
    assert {n: s.shape for n, s in masked.items()} == {
        "masked_rows": (E, 128, H),
        "gate_up": (E, 128, 2 * I),
        "activation": (E, 128, I),
    }
    assert {n: s.shape for n, s in MaskedDeepGemmExperts().workspace_specs(ctx, 256).items()} == {
        "gate_up": (E, 256, 2 * I),
        "activation": (E, 256, I),
    }


def poison_cache(cache: WorkspaceCache) -> None:
    """Every reserved byte 0xFF: a NaN in bf16, so a stale row that reached the output would show."""
    for buf in cache._buffers.values():
        buf.fill_(255)


@pytest.mark.parametrize(("t", "max_tokens"), [(1, 1), (128, 128), (5, 200)])
def test_masked_glue_matches_the_loop(t, max_tokens, fake_deep_gemm):
    """Local masked prepare/finalize + masked DeepGEMM, chained by the composer: M is the
    capacity rounded to the GEMM tile (never T), rows past the counts are never read."""
    x, w13, w2, weights, ids = problem(t, seed=t)
    ctx = ctx_of(layer(max_tokens=max_tokens))
    pf, experts = LocalMaskedPrepareAndFinalize(), MaskedDeepGemmExperts()
    assert all(c.ok for c in check_pair(pf, experts, ctx) if not c.name.startswith("experts.device"))
    seen: list[MaskedTokens] = []
    apply = experts.apply
    experts.apply = lambda tokens, *args: (seen.append(tokens), apply(tokens, *args))[1]
    cache = WorkspaceCache()
    kernel = ModularKernel(pf, experts, ctx, cache)  # bound without checks: the device check refuses the CPU
    poison_cache(cache)
    out = kernel(x, ExpertWeights(w13, w2), weights, ids)
    close(out, loop_reference(x, w13, w2, weights, ids))
    assert [call[0] for call in fake_deep_gemm.calls] == ["masked", "masked"]
    (tokens,) = seen
    assert tokens.num_rows == _align(max_tokens, 128)
    assert tokens.counts.tolist() == [int((ids == e).sum()) for e in range(E)]


def expanded_problem(counts: list[int], alignment: int, extra_rows: int, seed: int = 0, hidden: int = H):
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
    x = torch.full((rows, hidden), float("nan"))
    row_expert = [-1] * rows
    for e, (s, c) in enumerate(zip(starts, counts, strict=True)):
        x[s : s + c] = torch.randn(c, hidden, generator=g)
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
    ctx = ctx_of()
    _, w13, w2, _, _ = problem(0, seed=1)
    x, ends, row_weights, row_expert = expanded_problem(counts, alignment=32, extra_rows=32, seed=len(counts))
    tokens = ExpandedTokens(x, ends, row_weights, alignment=32, expected_m=max(1, sum(counts) // E))
    experts = ExpandedDeepGemmExperts()
    experts.bind(ctx)
    assert experts.input_format(ctx).alignment == 32  # the stand-in's contiguous alignment
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    ws = poisoned(experts.workspace_specs(ctx, tokens.num_rows), WorkspaceCache())
    experts.apply(tokens, ExpertWeights(w13, w2), out, ws)
    for r, e in enumerate(row_expert):
        if e < 0:
            assert (out[r] == 0).all(), r
            continue
        h = w13[e].float() @ x[r].float()
        ref = float(row_weights[r]) * (w2[e].float() @ (F.silu(h[:I]) * h[I:]))
        assert (out[r].float() - ref).abs().max() <= 3e-2 * max(ref.abs().max().item(), 1.0), r


def test_expanded_refuses_a_foreign_alignment(fake_deep_gemm):
    ctx = ctx_of()
    _, w13, w2, _, _ = problem(0, seed=1)
    x, ends, row_weights, _ = expanded_problem([3, 4, 0, 1], alignment=64, extra_rows=0)
    tokens = ExpandedTokens(x, ends, row_weights, alignment=64, expected_m=2)
    experts = ExpandedDeepGemmExperts()
    experts.bind(ctx)
    ws = WorkspaceCache().get(experts.workspace_specs(ctx, tokens.num_rows), CPU)
    with pytest.raises(ValueError, match="expert_alignment=32"):
        experts.apply(tokens, ExpertWeights(w13, w2), torch.empty_like(x), ws)


# --- the fp8 expanded experts (DeepEP's fp8 dispatch) ------------------------------------------


H8 = I8 = 128  # fp8 layers: H and I multiples of the 128 x 128 weight block


def fp8_layer() -> LayerConfig:
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=H8, intermediate_size=I8)
    quant = QuantConfig(scheme="fp8_w8a8_block")
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=64), quant=quant)


def test_fp8_expanded_checks_on_the_cpu(no_deep_gemm):
    ctx = ctx_of(fp8_layer())
    experts = ExpandedDeepGemmExperts()
    checks = {c.name: c for c in experts.checks(ctx)}
    assert not checks["device"].ok and "CUDA GPU of SM90, not cpu" in checks["device"].reason
    assert checks["mlp"].ok and checks["shape"].ok
    assert not checks["deep_gemm"].ok and "deep_gemm does not import" in checks["deep_gemm"].reason
    assert "psum_layout" not in checks  # asked only once deep_gemm imports
    assert experts.input_format(ctx) == TokenFormat(Layout.EXPANDED, alignment=1, act_quant=ActQuant())
    # the same class on bf16 weights asks for bf16 tokens
    assert experts.input_format(ctx_of(layer())) == TokenFormat(Layout.EXPANDED, alignment=1)
    assert experts.supports_cuda_graphs


def test_fp8_expanded_psum_check_reads_the_fp8_gemm(fake_deep_gemm):
    ctx = ctx_of(fp8_layer())
    assert ExpandedDeepGemmExperts().input_format(ctx) == TokenFormat(
        Layout.EXPANDED, alignment=32, act_quant=ActQuant()
    )
    psum = {c.name: c for c in ExpandedDeepGemmExperts().checks(ctx)}["psum_layout"]
    assert psum.ok and "m_grouped_fp8_gemm_nt_contiguous" in psum.reason, psum
    # a DeepGEMM whose fp8 contiguous GEMM predates the psum layout (the bf16 one still has it)
    fake_deep_gemm.m_grouped_fp8_gemm_nt_contiguous = lambda a, b, d, grouped_layout: None
    clear_probes()
    psum = {c.name: c for c in ExpandedDeepGemmExperts().checks(ctx)}["psum_layout"]
    assert not psum.ok and "m_grouped_fp8_gemm_nt_contiguous takes no use_psum_layout" in psum.reason, psum
    assert {c.name: c for c in ExpandedDeepGemmExperts().checks(ctx_of())}["psum_layout"].ok


def fp8_expanded_problem(counts: list[int], seed: int):
    """The hand-built expanded layout quantized as DeepEP's fp8 dispatch hands it over: fp8 rows
    and float32 scales [R, H/128] token-major with column stride align(R, 4); padding rows hold
    fp8 NaN (0x7F) and NaN scales. Weights quantized per 128 x 128 block."""
    from moe_kernels.kernels import quantize_rows
    from moe_kernels.mlp.act_quant import scale_view
    from moe_kernels.mlp.fp8 import quantize_blocks

    x, ends, row_weights, row_expert = expanded_problem(counts, alignment=32, extra_rows=32, seed=seed, hidden=H8)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    rows = x.shape[0]
    storage, _ = ActQuant().scale_storage(-(-rows // 4) * 4, x.shape[1])
    scale = scale_view(torch.empty(storage))[:rows]  # token-major, column stride align(R, 4)
    quantize_rows(x.nan_to_num(), q, scale)  # then the padding rows are poisoned
    pad = torch.tensor(row_expert) < 0
    q.view(torch.uint8)[pad] = 0x7F
    scale[pad] = float("nan")
    g = torch.Generator().manual_seed(seed + 1)
    (q13, s13) = quantize_blocks(torch.randn(E, 2 * I8, H8, generator=g) * H8**-0.5)
    (q2, s2) = quantize_blocks(torch.randn(E, H8, I8, generator=g) * I8**-0.5)
    tokens = ExpandedTokens(q, ends, row_weights, alignment=32, expected_m=max(1, sum(counts) // E), x_scale=scale)
    return tokens, ExpertWeights(q13, q2, s13, s2), row_expert


@pytest.mark.parametrize("counts", [[0, 3, 0, 40], [5, 0, 0, 0], [0, 0, 0, 0], [33, 1, 32, 2]])
def test_fp8_expanded_glue_weights_valid_rows_and_zeros_the_rest(counts, fake_deep_gemm):
    """Both GEMMs read the psum layout in place with the scales as dispatched (no transpose
    needed); padding never reaches the output. Tolerance: against the loop on the dequantized
    rows and weights the only difference is GEMM2's input, quantized to e4m3 inside (up to 2^-4
    per element, about 3.6 % rms) after a bf16 GEMM1 output: 0.1 max|ref|, as in test_fp8.py."""
    import torch.nn.functional as F

    from moe_kernels.mlp.fp8 import dequantize_groups

    ctx = ctx_of(fp8_layer())
    tokens, weights, row_expert = fp8_expanded_problem(counts, seed=len(counts) + sum(counts))
    experts = ExpandedDeepGemmExperts()
    experts.bind(ctx)
    out = torch.full(tokens.x.shape, float("nan"), dtype=torch.bfloat16)
    ws = poisoned(experts.workspace_specs(ctx, tokens.num_rows), WorkspaceCache())
    experts.apply(tokens, weights, out, ws)
    assert fake_deep_gemm.calls == [("fp8_contiguous", True, True)] * 2
    valid = [r for r, e in enumerate(row_expert) if e >= 0]
    assert all((out[r] == 0).all() for r, e in enumerate(row_expert) if e < 0)
    if not valid:
        return
    ref = torch.zeros(len(valid), H8)
    for j, r in enumerate(valid):
        w13, w2 = weights.dequantized(row_expert[r])
        h = w13 @ dequantize_groups(tokens.x[r], tokens.x_scale[r])
        ref[j] = float(tokens.row_weights[r]) * (w2 @ (F.silu(h[:I8]) * h[I8:]))
    got = out[valid].float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 0.1 * ref.abs().max()


def test_fp8_expanded_refuses_rows_without_scales(fake_deep_gemm):
    tokens, weights, _ = fp8_expanded_problem([3, 0, 1, 0], seed=0)
    experts = ExpandedDeepGemmExperts()
    experts.bind(ctx_of(fp8_layer()))
    ws = WorkspaceCache().get(experts.workspace_specs(ctx_of(fp8_layer()), tokens.num_rows), CPU)
    out = torch.empty(tokens.x.shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="the layer wants"):
        experts.apply(ExpandedTokens(tokens.x, tokens.expert_ends, tokens.row_weights, 32, 1), weights, out, ws)
