"""The expert-parallel parts' capability checks, on a CPU with no DeepEP and no process group:
each refusal names what was required and what was found, and no probe ever raises."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from moe_kernels import LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.distributed import check_expert_map
from moe_kernels.prepare_finalize import deepep_buffer as epb
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
) -> LayerConfig:
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=2048, dtype=dtype)
    par = ParallelConfig(ep_size=ep, ep_rank=rank, max_tokens_per_rank=max_tokens, cuda_graphs=cuda_graphs)
    return LayerConfig(moe=moe, parallel=par)


def check(part, cfg: LayerConfig, name: str, device: torch.device = CUDA):
    """The one check called ``name`` among the part's checks."""
    found = [c for c in part.checks(cfg, device) if c.name == name]
    assert len(found) == 1, [c.name for c in part.checks(cfg, device)]
    return found[0]


@pytest.fixture
def no_cuda_checks(monkeypatch):
    """Let checks other than the device one run as if on a GPU (sm_check would fail here)."""
    monkeypatch.setattr("moe_kernels.platform.sm_check", lambda device, major, what: epb.Check.passed("device", "SM90"))


@pytest.fixture
def fresh_probe():
    epb.probe_deep_ep.cache_clear()
    yield
    epb.probe_deep_ep.cache_clear()


# --- building never fails ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [*DEEPEP, TorchAllToAllPrepareAndFinalize])
def test_parts_build_without_group_or_deep_ep_and_refuse(cls, no_cuda_checks):
    part = cls(None, 128)
    c = check(part, layer(), "parallel")
    assert not c.ok and "needs the expert-parallel process group" in c.reason
    with pytest.raises(RuntimeError, match="without a process group"):
        part.num_dispatchers()


# --- deep_ep and NCCL probes -----------------------------------------------------------------


def test_deep_ep_absent_is_a_refusal_not_an_error(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # import raises ModuleNotFoundError
    c = epb.deep_ep_check()
    assert not c.ok and "does not import here" in c.reason and "ModuleNotFoundError" in c.reason


def test_deep_ep_import_assertion_is_a_refusal(monkeypatch, fresh_probe):
    # deep_ep's import asserts when the loaded NCCL differs from the linked one
    def broken_import(name, package=None):
        raise AssertionError("Invalid NCCL versions: libnccl.so.2 (loaded) v.s. other (expected)")

    monkeypatch.setattr(epb.importlib, "import_module", broken_import)
    c = epb.deep_ep_check()
    assert not c.ok and "AssertionError: Invalid NCCL versions" in c.reason


def test_deep_ep_without_epbuffer_is_refused(monkeypatch, fresh_probe):
    old = types.ModuleType("deep_ep")
    old.__version__ = "1.2.1"
    old.Buffer = object  # V1 API only
    monkeypatch.setitem(sys.modules, "deep_ep", old)
    c = epb.deep_ep_check()
    assert not c.ok and "has no EPBuffer" in c.reason


def test_deep_ep_25_passes(monkeypatch, fresh_probe):
    new = types.ModuleType("deep_ep")
    new.__version__ = "2.5.0"
    new.EPBuffer = object
    monkeypatch.setitem(sys.modules, "deep_ep", new)
    assert epb.deep_ep_check() == epb.Check.passed("deep_ep", "deep_ep 2.5.0")


@pytest.mark.parametrize(
    ("version", "ok", "words"),
    [
        ((2, 28, 9), False, "needs NCCL >= 2.29.2, found 2.28.9"),
        ((2, 30, 1), True, "compiled against exactly this NCCL"),
        ((2, 32, 3), True, "NCCL 2.32.3 (loaded library"),
    ],
)
def test_nccl_version_check(monkeypatch, version, ok, words):
    monkeypatch.setattr(epb, "nccl_version", lambda: (version, "loaded library /x/libnccl.so.2"))
    c = epb.nccl_check()
    assert c.ok is ok and words in c.reason


def test_no_nccl_here_is_a_refusal():
    c = epb.nccl_check()  # CPU-only torch: no libnccl mapped, no torch.cuda.nccl
    assert not c.ok and "no NCCL in this process" in c.reason


def test_nccl_version_codes():
    assert epb._decode_nccl(23203) == (2, 32, 3)
    assert epb._decode_nccl(22809) == (2, 28, 9)
    assert epb._decode_nccl(2708) == (2, 7, 8)  # pre-2.9 encoding


# --- DeepEP limits and parallel checks ---------------------------------------------------------


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_refuses_the_cpu(cls):
    c = cls(FakeGroup(0, 2), 128).check_device(CPU)
    assert not c.ok and "DeepEP needs a CUDA GPU, not cpu" in c.reason


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
    c = cls(FakeGroup(0, 2), 128).check_limits(cfg)
    assert not c.ok and words in c.reason


@pytest.mark.parametrize("cls", DEEPEP)
@pytest.mark.parametrize(
    ("group", "cfg", "words"),
    [
        (FakeGroup(0, 4), layer(ep=2), "process group has size 4, rank 0; the config says ep_size=2"),
        (FakeGroup(1, 2), layer(ep=2, rank=0), "rank 1; the config says ep_size=2, ep_rank=0"),
        (FakeGroup(0, 2, "gloo"), layer(ep=2), "NCCL process group, this one is gloo"),
        (FakeGroup(0, 1), layer(ep=1), "ep_size=1: nothing to exchange"),
        (FakeGroup(0, 2), layer(ep=2, max_tokens=4096), "may pass 4096 tokens per rank; this part was built for 128"),
    ],
)
def test_deepep_parallel_refusals(cls, group, cfg, words):
    c = cls(group, 128).check_parallel(cfg)
    assert not c.ok and words in c.reason, c.reason


def test_high_throughput_cannot_be_captured_low_latency_can():
    cfg = layer(cuda_graphs=True)
    ht = DeepEPHighThroughputPrepareAndFinalize(FakeGroup(0, 2), 128).check_parallel(cfg)
    ll = DeepEPLowLatencyPrepareAndFinalize(FakeGroup(0, 2), 128).check_parallel(cfg)
    assert not ht.ok and "cannot be captured in a CUDA graph" in ht.reason
    assert ll.ok, ll.reason


def test_low_latency_refuses_huge_worst_case_outputs():
    cfg = layer(ep=8, max_tokens=8192)
    c = DeepEPLowLatencyPrepareAndFinalize(FakeGroup(0, 8), 8192).check_parallel(cfg)
    assert not c.ok and "sized for the worst case" in c.reason and "GiB" in c.reason


@pytest.mark.parametrize("cls", DEEPEP)
def test_deepep_is_bf16_only(cls):
    c = cls(FakeGroup(0, 2), 128).check_quant(layer(dtype=torch.float32))
    assert not c.ok and "bfloat16" in c.reason


def test_capacity_rows_formula():
    # DeepEP 2.5: align(W * Tmax * min(K, E_local) + (A - 1) * E_local, A)
    assert epb.expanded_capacity_rows(2, 128, 8, 128, 128) == 18304
    assert epb.expanded_capacity_rows(8, 16, 8, 4, 128) == 1024  # 8*16*min(8, 4) + 127*4 = 1020 -> 1024


def test_every_check_passes_for_a_valid_deepseek_layer(no_cuda_checks, monkeypatch, fresh_probe):
    new = types.ModuleType("deep_ep")
    new.__version__, new.EPBuffer = "2.5.0", object
    monkeypatch.setitem(sys.modules, "deep_ep", new)
    monkeypatch.setattr(epb, "nccl_version", lambda: ((2, 32, 3), "loaded library"))
    for cls in DEEPEP:
        failures = [c for c in cls(FakeGroup(0, 2), 128).checks(layer(), CUDA) if not c.ok]
        assert not failures, failures


# --- preferences -------------------------------------------------------------------------------


def score(part, cfg: LayerConfig) -> float:
    return part.preference(cfg, CUDA)[0]


def test_low_latency_preferred_for_decode_and_graphs_high_throughput_for_prefill():
    g = FakeGroup(0, 2)
    ht, ll, a2a = (
        DeepEPHighThroughputPrepareAndFinalize(g, 4096),
        DeepEPLowLatencyPrepareAndFinalize(g, 4096),
        TorchAllToAllPrepareAndFinalize(g, 4096),
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
    c = TorchAllToAllPrepareAndFinalize(group).check_device(device)
    assert c.ok is ok and words in c.reason


@pytest.mark.parametrize(
    ("group", "cfg", "words"),
    [
        (FakeGroup(0, 1, "gloo"), layer(ep=1), "ep_size=1: nothing to exchange"),
        (FakeGroup(0, 4, "gloo"), layer(ep=2), "process group has size 4"),
        (FakeGroup(0, 2, "gloo"), layer(ep=2, cuda_graphs=True), "cannot be captured in a CUDA graph"),
    ],
)
def test_torch_a2a_parallel_refusals(group, cfg, words):
    c = TorchAllToAllPrepareAndFinalize(group).check_parallel(cfg)
    assert not c.ok and words in c.reason


def test_torch_a2a_reports_its_limits():
    part = TorchAllToAllPrepareAndFinalize(FakeGroup(1, 4, "gloo"), 512)
    assert part.num_dispatchers() == 4 and part.max_num_tokens_per_rank() == 512
    assert not part.supports_cuda_graphs


# --- expert ownership --------------------------------------------------------------------------


def test_expert_map_must_be_the_contiguous_view():
    good = torch.tensor([-1, -1, 0, 1, -1, -1], dtype=torch.int32)
    check_expert_map(good, rank=1, num_local_experts=2)
    with pytest.raises(ValueError, match="contiguous expert ownership"):
        check_expert_map(torch.tensor([-1, -1, 1, 0, -1, -1]), rank=1, num_local_experts=2)
