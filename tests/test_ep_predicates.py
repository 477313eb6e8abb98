"""The expert-parallel parts' capability checks, on a CPU with no DeepEP and no process group:
each refusal names what was required and what was found, and no probe ever raises."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from moe_kernels import LayerConfig, MoEConfig, ParallelConfig, QuantConfig, TorchReferenceExperts, compose
from moe_kernels.backends import deep_ep as deep_ep_backend
from moe_kernels.core.compose import IncompatibleKernelsError
from moe_kernels.core.contract import Check, LayerContext, Layout, TokenFormat, WorkspaceSpec
from moe_kernels.core.placement import ExpertPlacement, map_expert_ids
from moe_kernels.mlp.act_quant import ActQuant
from moe_kernels.prepare_finalize.deepep import (
    DeepEPHighThroughputPrepareAndFinalize,
    DeepEPLowLatencyPrepareAndFinalize,
)
from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

# These tests pin the CPU machine's answers (no GPU, Triton interpreter, no deep_gemm/deep_ep);
# on a GPU machine the same checks pass, which tests/test_*_gpu.py cover.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: pins a GPU-less machine")

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
DEEPEP = (DeepEPHighThroughputPrepareAndFinalize, DeepEPLowLatencyPrepareAndFinalize)


class FakeGroup:
    """Answers what the checks ask a process group: rank, size, backend name."""

    def __init__(self, rank: int, size: int, backend: str = "nccl") -> None:
        self._rank, self._size, self._backend = rank, size, backend

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def name(self) -> str:
        return self._backend


def layer(
    ep: int = 2,
    rank: int = 0,
    *,
    num_experts: int = 256,
    top_k: int = 8,
    hidden: int = 7168,
    dtype: torch.dtype = torch.bfloat16,
    max_tokens: int = 128,
    cuda_graphs: bool = False,
    fp8: bool = False,
) -> LayerConfig:
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=2048, dtype=dtype)
    par = ParallelConfig(ep_size=ep, ep_rank=rank, max_tokens_per_rank=max_tokens, cuda_graphs=cuda_graphs)
    return LayerConfig(moe=moe, parallel=par, quant=QuantConfig(scheme="fp8_w8a8_block" if fp8 else "none"))


def ctx(
    cfg: LayerConfig,
    group: FakeGroup | None = None,
    device: torch.device = CUDA,
    placement: ExpertPlacement | None = None,
) -> LayerContext:
    """The context a part is checked in (built by hand: the composer would refuse a CUDA
    device on this CPU-only machine)."""
    par = cfg.parallel
    placement = placement or ExpertPlacement.contiguous(cfg.moe.num_experts, par.ep_size, par.ep_rank)
    return LayerContext(cfg, device, placement, group)


def check(part, context: LayerContext, name: str):
    """The one check called ``name`` among the part's checks."""
    found = [c for c in part.checks(context) if c.name == name]
    assert len(found) == 1, [c.name for c in part.checks(context)]
    return found[0]


@pytest.fixture
def no_cuda_checks(monkeypatch):
    """Let checks other than the device one run as if on a GPU (sm_check would fail here)."""
    monkeypatch.setattr(
        "moe_kernels.prepare_finalize.deepep.sm_check", lambda device, major, what: Check.passed("device", "SM90")
    )


@pytest.fixture
def fresh_probe():
    deep_ep_backend.probe_deep_ep.cache_clear()
    yield
    deep_ep_backend.probe_deep_ep.cache_clear()


# --- building never fails ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [*DEEPEP, TorchAllToAllPrepareAndFinalize])
def test_parts_build_without_group_or_deep_ep_and_refuse(cls, no_cuda_checks):
    part = cls()
    c = check(part, ctx(layer()), "parallel")
    assert not c.ok and "needs the expert-parallel process group (pass group=)" in c.reason


@pytest.mark.parametrize("cls", [*DEEPEP, TorchAllToAllPrepareAndFinalize])
def test_compose_refuses_a_missing_group_before_any_collective(cls):
    """Refused by the checks, so bind (where the ranks' agreement collective runs) never starts."""
    cfg = layer(num_experts=8, top_k=2, hidden=64, dtype=torch.float32)
    part = cls()
    with pytest.raises(IncompatibleKernelsError) as info:
        compose(part, TorchReferenceExperts(), cfg, device=CPU)
    reasons = {c.name: c.reason for c in info.value.failures}
    assert "needs the expert-parallel process group" in reasons["prepare_finalize.parallel"], reasons
    assert not hasattr(part, "ctx")  # never bound


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_options_are_checked(cls):
    for bad in ({"num_sms": 0}, {"num_sms": -2}, {"expert_alignment": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cls(**bad)
    part = cls(num_sms=20, expert_alignment=64, zero_padding=True)
    assert (part.num_sms, part.expert_alignment, part.zero_padding) == (20, 64, True)


# --- deep_ep and NCCL probes -----------------------------------------------------------------


def test_deep_ep_absent_is_a_refusal_not_an_error(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # import raises ModuleNotFoundError
    c = deep_ep_backend.deep_ep_check()
    assert not c.ok and "does not import here" in c.reason and "ModuleNotFoundError" in c.reason


def test_deep_ep_import_assertion_is_a_refusal(monkeypatch, fresh_probe):
    # deep_ep's import asserts when the loaded NCCL differs from the linked one
    def broken_import(name, package=None):
        raise AssertionError("Invalid NCCL versions: libnccl.so.2 (loaded) v.s. other (expected)")

    monkeypatch.setattr(deep_ep_backend.importlib, "import_module", broken_import)
    c = deep_ep_backend.deep_ep_check()
    assert not c.ok and "AssertionError: Invalid NCCL versions" in c.reason


def test_deep_ep_without_epbuffer_is_refused(monkeypatch, fresh_probe):
    old = types.ModuleType("deep_ep")
    old.__version__ = "1.2.1"
    old.Buffer = object  # V1 API only
    monkeypatch.setitem(sys.modules, "deep_ep", old)
    c = deep_ep_backend.deep_ep_check()
    assert not c.ok and "has no EPBuffer" in c.reason


def test_deep_ep_25_passes(monkeypatch, fresh_probe):
    new = types.ModuleType("deep_ep")
    new.__version__ = "2.5.0"
    new.EPBuffer = object
    monkeypatch.setitem(sys.modules, "deep_ep", new)
    assert deep_ep_backend.deep_ep_check() == Check.passed("deep_ep", "deep_ep 2.5.0")


@pytest.mark.parametrize(
    ("version", "ok", "words"),
    [
        ((2, 28, 9), False, "needs NCCL >= 2.29.2, found 2.28.9"),
        ((2, 30, 1), True, "compiled against exactly this NCCL"),
        ((2, 32, 3), True, "NCCL 2.32.3 (loaded library"),
    ],
)
def test_nccl_version_check(monkeypatch, version, ok, words):
    monkeypatch.setattr(deep_ep_backend, "nccl_version", lambda: (version, "loaded library /x/libnccl.so.2"))
    c = deep_ep_backend.nccl_check()
    assert c.ok is ok and words in c.reason


def test_no_nccl_here_is_a_refusal():
    c = deep_ep_backend.nccl_check()  # CPU-only torch: no libnccl mapped, no torch.cuda.nccl
    assert not c.ok and "no NCCL in this process" in c.reason


def test_nccl_version_codes():
    assert deep_ep_backend._decode_nccl(23203) == (2, 32, 3)
    assert deep_ep_backend._decode_nccl(22809) == (2, 28, 9)
    assert deep_ep_backend._decode_nccl(2708) == (2, 7, 8)  # pre-2.9 encoding


# --- DeepEP limits and parallel checks ---------------------------------------------------------


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_refuses_the_cpu(cls):
    c = cls().check_device(ctx(layer(), FakeGroup(0, 2), CPU))
    assert not c.ok and "DeepEP needs a CUDA GPU of SM90/SM100, not cpu" in c.reason


@pytest.mark.parametrize("cls", DEEPEP)
@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (layer(num_experts=64, top_k=33), "top_k <= 32, got 33"),
        (layer(num_experts=4096, top_k=8), "<= 2048 experts, got 4096"),
        (layer(num_experts=2048, top_k=8), "<= 512 experts per rank, got 1024"),
    ],
)
def test_deepep_limits(cls, cfg, words):
    c = cls().check_limits(ctx(cfg, FakeGroup(0, 2)))
    assert not c.ok and words in c.reason


@pytest.mark.parametrize("cls", DEEPEP)
@pytest.mark.parametrize(
    ("group", "cfg", "words"),
    [
        (FakeGroup(0, 4), layer(ep=2), "process group has size 4, rank 0; the config says ep_size=2"),
        (FakeGroup(1, 2), layer(ep=2, rank=0), "rank 1; the config says ep_size=2, ep_rank=0"),
        (FakeGroup(0, 2, "gloo"), layer(ep=2), "DeepEP runs on an NCCL process group, this one is gloo"),
        (FakeGroup(0, 1), layer(ep=1), "ep_size=1: nothing to exchange"),
        (None, layer(ep=2), "needs the expert-parallel process group"),
        (FakeGroup(0, 2048), layer(ep=2048, num_experts=2048), "at most 1024 ranks, ep_size=2048"),
    ],
)
def test_deepep_parallel_refusals(cls, group, cfg, words):
    c = cls().check_parallel(ctx(cfg, group))
    assert not c.ok and words in c.reason, c.reason


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_takes_any_max_tokens_and_placement(cls):
    """The limit travels in the config (agreed on at bind), so any value passes the checks;
    so does any placement (the parts translate ids to contiguous slots)."""
    for max_tokens in (1, 128, 4096):
        assert cls().check_parallel(ctx(layer(max_tokens=max_tokens), FakeGroup(0, 2))).ok
    owners = [e % 2 for e in range(256)]  # every other expert on each rank
    placement = ExpertPlacement.from_owners(owners, 0)
    assert not placement.is_contiguous
    assert cls().check_parallel(ctx(layer(), FakeGroup(0, 2), placement=placement)).ok


def test_high_throughput_cannot_be_captured_low_latency_can():
    context = ctx(layer(cuda_graphs=True), FakeGroup(0, 2))
    ht = DeepEPHighThroughputPrepareAndFinalize().check_parallel(context)
    ll = DeepEPLowLatencyPrepareAndFinalize().check_parallel(context)
    assert not ht.ok and "cannot be captured in a CUDA graph" in ht.reason
    assert ll.ok, ll.reason


def test_low_latency_refuses_huge_worst_case_outputs():
    """The worst-case recv_x is counted in the experts' format (its alignment, its bytes): at
    E_local=32, top-8, H=7168, A=128 and 8 ranks x 8192 tokens it holds 528384 rows, 7.1 GiB in
    bf16 but 3.6 GiB as fp8 rows with their float32 scales (H + 4 H/128 bytes a row)."""
    ll = DeepEPLowLatencyPrepareAndFinalize()
    bf16 = TokenFormat(Layout.EXPANDED, alignment=128)
    fp8 = TokenFormat(Layout.EXPANDED, alignment=128, act_quant=ActQuant())
    big = ctx(layer(ep=8, max_tokens=8192), FakeGroup(0, 8))
    c = ll.check_format(big, bf16)
    assert not c.ok and "sized for the worst case: 528384 rows x H=7168 bfloat16 = 7.1 GiB" in c.reason, c.reason
    assert ll.check_format(ctx(layer(ep=8, max_tokens=8192, fp8=True), FakeGroup(0, 8)), fp8).ok
    c = ll.check_format(ctx(layer(ep=8, max_tokens=16384, fp8=True), FakeGroup(0, 8)), fp8)
    assert not c.ok and "H=7168 fp8 + float32 scales = 7.2 GiB" in c.reason, c.reason
    assert ll.check_format(ctx(layer(ep=8, max_tokens=128), FakeGroup(0, 8)), bf16).ok
    # the high-throughput mode sizes its outputs exactly: no such limit
    assert DeepEPHighThroughputPrepareAndFinalize().check_format(big, bf16).ok


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_is_bf16_only(cls):
    c = cls().check_mlp(ctx(layer(dtype=torch.float32), FakeGroup(0, 2)))
    assert not c.ok and "bfloat16" in c.reason


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_format_follows_the_experts_alignment_unless_pinned(cls):
    context = ctx(layer(), FakeGroup(0, 2))
    wants_128 = TokenFormat(Layout.EXPANDED, alignment=128)
    free = cls().check_format(context, wants_128)
    assert free.ok and "aligned to 128 rows" in free.reason
    assert cls().alignment(wants_128) == 128
    pinned_ok = cls(expert_alignment=256).check_format(context, wants_128)  # a multiple of 128 is aligned to 128
    assert pinned_ok.ok and "256" in pinned_ok.reason
    pinned_bad = cls(expert_alignment=64).check_format(context, wants_128)
    assert not pinned_bad.ok and "expert_alignment=64" in pinned_bad.reason
    fp8 = cls().check_format(context, TokenFormat(Layout.EXPANDED, alignment=128, act_quant=ActQuant()))
    assert fp8.ok and "fp8 rows with float32 scales per 128 columns" in fp8.reason and "128 rows" in fp8.reason
    assert cls.output_layout is Layout.EXPANDED


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_refuses_fp8_it_cannot_dispatch(cls, monkeypatch):
    fp8 = TokenFormat(Layout.EXPANDED, alignment=128, act_quant=ActQuant())
    odd = cls().check_format(ctx(layer(hidden=7168 + 64), FakeGroup(0, 2)), fp8)
    assert not odd.ok and "one float32 scale per 128 columns, but hidden_size=7232" in odd.reason, odd.reason
    # the quantizer is a Triton kernel: on the CPU without the interpreter there is none
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = cls().check_format(ctx(layer(), FakeGroup(0, 2), CPU), fp8)
    assert not cpu.ok and "quantizes x with a Triton kernel first: Triton needs a CUDA device" in cpu.reason
    assert cls().check_format(ctx(layer(), FakeGroup(0, 2), CPU), TokenFormat(Layout.EXPANDED, 128)).ok


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_workspaces_hold_the_quantized_rows_for_fp8_only(cls):
    context = ctx(layer(max_tokens=64), FakeGroup(0, 2))
    fp8 = cls().workspace_specs(context, TokenFormat(Layout.EXPANDED, alignment=128, act_quant=ActQuant()))
    assert fp8["dispatch_x"] == WorkspaceSpec((64, 7168), torch.float8_e4m3fn)
    assert fp8["dispatch_x_scale"] == WorkspaceSpec((64, 56), torch.float32)
    bf16 = cls().workspace_specs(context, TokenFormat(Layout.EXPANDED, alignment=128))
    assert not {"dispatch_x", "dispatch_x_scale"} & set(bf16)


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_pinned_alignment_refused_by_the_composer(cls, monkeypatch):
    """The composer asks the prepare/finalize for the experts' format: a pinned alignment that
    is not a multiple of it is the failed "format" check (the layouts agree)."""
    from moe_kernels.backends import deep_gemm
    from moe_kernels.core.compose import check_pair
    from moe_kernels.experts.deepgemm import ExpandedDeepGemmExperts

    monkeypatch.setattr(deep_gemm, "alignment", lambda: 128)
    context = ctx(layer(), FakeGroup(0, 2))
    assert ExpandedDeepGemmExperts().input_format(context) == TokenFormat(Layout.EXPANDED, 128)
    first = check_pair(cls(expert_alignment=64), ExpandedDeepGemmExperts(), context)[0]
    assert first.name == "format" and not first.ok
    assert "ExpandedDeepGemmExperts needs expanded, aligned to 128 rows" in first.reason
    assert "expert_alignment=64" in first.reason
    assert check_pair(cls(), ExpandedDeepGemmExperts(), context)[0].ok


def test_compose_refuses_mismatched_fp8_pairs_with_plain_reasons(monkeypatch):
    """Each refusal names what one side needs and what the other offers: fp8 expanded experts
    behind a STANDARD dispatcher, and a pinned alignment the fp8 experts' format does not divide."""
    from moe_kernels import ExpandedDeepGemmExperts
    from moe_kernels.backends import deep_gemm
    from moe_kernels.core.compose import check_pair

    monkeypatch.setattr(deep_gemm, "alignment", lambda: 128)
    ll, fp8_experts_part = DeepEPLowLatencyPrepareAndFinalize(), ExpandedDeepGemmExperts()
    cases = [
        (
            TorchAllToAllPrepareAndFinalize(),
            fp8_experts_part,
            layer(fp8=True),
            "layout",
            "TorchAllToAllPrepareAndFinalize hands out standard tokens, ExpandedDeepGemmExperts takes expanded",
        ),
        (
            DeepEPLowLatencyPrepareAndFinalize(expert_alignment=64),
            fp8_experts_part,
            layer(fp8=True),
            "format",
            "ExpandedDeepGemmExperts needs expanded, aligned to 128 rows, fp8 (e4m3) activations, one float32 scale "
            "per 128 columns; DeepEPLowLatencyPrepareAndFinalize was built with expert_alignment=64",
        ),
    ]
    for pf, experts, cfg, name, words in cases:
        with pytest.raises(IncompatibleKernelsError) as info:
            compose(pf, experts, cfg, group=FakeGroup(0, 2), device=CPU)
        reasons = {c.name: c.reason for c in info.value.failures}
        assert words in reasons[name], reasons
        assert f"- {name}: {reasons[name]}" in str(info.value)
    # the matching pair agrees on the format (this CPU refuses it for other reasons)
    fmt_check = check_pair(ll, fp8_experts_part, ctx(layer(fp8=True), FakeGroup(0, 2)))[0]
    assert fmt_check.name == "format" and fmt_check.ok and "fp8 rows with float32 scales" in fmt_check.reason


def test_capacity_rows_formula():
    # DeepEP 2.5: align(W * Tmax * min(K, E_local) + (A - 1) * E_local, A)
    assert deep_ep_backend.expanded_capacity_rows(2, 128, 8, 128, 128) == 18304
    assert deep_ep_backend.expanded_capacity_rows(8, 16, 8, 4, 128) == 1024  # 8*16*min(8, 4) + 127*4 = 1020 -> 1024


def test_every_check_passes_for_a_valid_deepseek_layer(no_cuda_checks, monkeypatch, fresh_probe):
    new = types.ModuleType("deep_ep")
    new.__version__, new.EPBuffer = "2.5.0", object
    monkeypatch.setitem(sys.modules, "deep_ep", new)
    monkeypatch.setattr(deep_ep_backend, "nccl_version", lambda: ((2, 32, 3), "loaded library"))
    for cls in DEEPEP:
        failures = [c for c in cls().checks(ctx(layer(), FakeGroup(0, 2))) if not c.ok]
        assert not failures, failures


# --- preferences -------------------------------------------------------------------------------


def score(part, cfg: LayerConfig) -> float:
    score, why = part.preference(ctx(cfg, FakeGroup(0, 2)))
    assert why
    return score


def test_low_latency_preferred_for_decode_and_graphs_high_throughput_for_prefill():
    ht, ll, a2a = (
        DeepEPHighThroughputPrepareAndFinalize(),
        DeepEPLowLatencyPrepareAndFinalize(),
        TorchAllToAllPrepareAndFinalize(),
    )
    decode, graphs, prefill = layer(max_tokens=128), layer(max_tokens=128, cuda_graphs=True), layer(max_tokens=4096)
    assert score(ll, decode) < score(ht, decode) < score(a2a, decode)
    assert score(ll, graphs) < score(a2a, graphs)
    assert score(ht, prefill) < score(ll, prefill) < score(a2a, prefill)


# --- torch all-to-all --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "device", "ok", "words"),
    [
        (FakeGroup(0, 2, "gloo"), CUDA, False, "needs a nccl process group, this one is gloo"),
        (FakeGroup(0, 2, "nccl"), CPU, False, "needs a gloo process group, this one is nccl"),
        (FakeGroup(0, 2, "gloo"), CPU, True, "cpu over gloo"),
        (FakeGroup(0, 2, "cpu:gloo,cuda:nccl"), CUDA, True, "cuda over cpu:gloo,cuda:nccl"),
    ],
)
def test_torch_a2a_backend_matches_device(group, device, ok, words):
    c = TorchAllToAllPrepareAndFinalize().check_device(ctx(layer(), group, device))
    assert c.ok is ok and words in c.reason


def test_torch_a2a_sends_whole_rows():
    context = ctx(layer(), FakeGroup(0, 2, "gloo"), CPU)
    a2a = TorchAllToAllPrepareAndFinalize()
    assert a2a.output_layout is Layout.STANDARD
    assert a2a.check_format(context, TokenFormat(Layout.STANDARD)).ok
    aligned = a2a.check_format(context, TokenFormat(Layout.STANDARD, alignment=32))
    assert not aligned.ok and "alignment 1" in aligned.reason
    fp8 = a2a.check_format(context, TokenFormat(Layout.STANDARD, act_quant=ActQuant()))
    assert fp8.ok and "fp8" in fp8.reason  # rows travel quantized, with their scales


@pytest.mark.parametrize(
    ("group", "cfg", "words"),
    [
        (FakeGroup(0, 1, "gloo"), layer(ep=1), "ep_size=1: nothing to exchange"),
        (FakeGroup(0, 4, "gloo"), layer(ep=2), "process group has size 4"),
        (FakeGroup(0, 2, "gloo"), layer(ep=2, cuda_graphs=True), "cannot be captured in a CUDA graph"),
    ],
)
def test_torch_a2a_parallel_refusals(group, cfg, words):
    c = TorchAllToAllPrepareAndFinalize().check_parallel(ctx(cfg, group, CPU))
    assert not c.ok and words in c.reason


def test_torch_a2a_accepts_its_group():
    c = TorchAllToAllPrepareAndFinalize().check_parallel(ctx(layer(ep=4, rank=1), FakeGroup(1, 4, "gloo"), CPU))
    assert c.ok, c.reason


@pytest.mark.parametrize("cls", [*DEEPEP, TorchAllToAllPrepareAndFinalize])
def test_ep_parts_never_chunk(cls):
    # every rank would have to agree on the chunk count
    assert not cls.supports_chunking
    assert cls.supports_cuda_graphs is (cls is DeepEPLowLatencyPrepareAndFinalize)


# --- expert placement --------------------------------------------------------------------------


def test_slots_translate_any_placement_to_contiguous_ownership():
    """What the EP parts route by: global id -> owner * E_local + local index."""
    rank_experts = [[6, 1, 3], [0, 7, 2], [5, 8, 4]]
    placement = ExpertPlacement.from_rank_experts(rank_experts, 1)
    expected = {}
    for owner, experts in enumerate(rank_experts):
        for local, e in enumerate(experts):
            expected[e] = owner * 3 + local
    assert placement.slots == tuple(expected[e] for e in range(9))
    assert placement.local_experts == (0, 7, 2) and not placement.is_contiguous
    ids = torch.tensor([[6, -1], [0, 4], [-1, -1]])
    assert map_expert_ids(ids, placement.slot_map(CPU)).tolist() == [[0, -1], [3, 8], [-1, -1]]
    assert map_expert_ids(ids, placement.expert_map(CPU)).tolist() == [[-1, -1], [0, -1], [-1, -1]]
    contiguous = ExpertPlacement.contiguous(9, 3, 1)
    assert contiguous.is_contiguous and contiguous.slots == tuple(range(9))


@pytest.mark.parametrize("cls", [*DEEPEP, TorchAllToAllPrepareAndFinalize])
def test_ranks_agree_on_the_layer_and_the_placement(cls):
    """What bind's collective compares: the same on every rank of one layer, and different
    wherever a rank built a different layer or placement."""
    fmt = TokenFormat(Layout.EXPANDED if cls in DEEPEP else Layout.STANDARD, alignment=1)
    cfg0, cfg1 = layer(ep=2, rank=0), layer(ep=2, rank=1)
    owners = [e % 2 for e in range(256)]
    rank0 = cls().agreement(ctx(cfg0, FakeGroup(0, 2)), fmt)
    rank1 = cls().agreement(ctx(cfg1, FakeGroup(1, 2)), fmt)
    assert rank0 == rank1
    for field in (
        "hidden_size",
        "top_k",
        "num_experts",
        "dtype",
        "max_tokens_per_rank",
        "expert placement (fingerprint)",
    ):
        assert field in rank0
    interleaved = cls().agreement(ctx(cfg1, FakeGroup(1, 2), placement=ExpertPlacement.from_owners(owners, 1)), fmt)
    assert {k for k in rank0 if rank0[k] != interleaved[k]} == {"expert placement (fingerprint)"}
    other = cls().agreement(ctx(layer(ep=2, rank=1, hidden=4096), FakeGroup(1, 2)), fmt)
    assert {k for k in rank0 if rank0[k] != other[k]} == {"hidden_size"}
    aligned = cls().agreement(ctx(cfg1, FakeGroup(1, 2)), TokenFormat(fmt.layout, alignment=128))
    assert rank0["token alignment"] != aligned["token alignment"]
    if cls in DEEPEP:
        assert rank0["mode (do_cpu_sync)"] == cls.do_cpu_sync
        assert cls(num_sms=20).agreement(ctx(cfg1, FakeGroup(1, 2)), fmt)["num_sms (0 = automatic)"] == 20
