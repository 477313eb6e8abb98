"""The composer and the selector, exercised with the plain parts (TorchReferenceExperts behind
LocalPrepareAndFinalize) against a per-token loop: checks, workspaces reserved at build time
and the capture rule, chunking, bad input, router weight on input, empty batches, placements,
memory-aware selection."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from moe_kernels import (
    ExpertPlacement,
    ExpertWeights,
    IncompatibleKernelsError,
    LayerConfig,
    LocalMaskedPrepareAndFinalize,
    LocalPrepareAndFinalize,
    MaskedTritonExperts,
    ModularKernel,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    TritonExperts,
    WorkspaceCache,
    WorkspaceError,
    WorkspaceSpec,
    compose,
    select,
)
from moe_kernels.core.contract import LayerContext
from moe_kernels.selection.select import candidates

CPU = torch.device("cpu")


def loop_moe(
    x: torch.Tensor,
    weights: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each token and each of its experts: w2 @ (silu(gate) * up), weighted, summed (fp32).
    ``expert_map`` (global -> local or -1) skips experts this rank does not hold."""
    w13, w2 = weights.w13, weights.w2
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, k])
            if expert < 0:
                continue
            local = expert if expert_map is None else int(expert_map[expert])
            if local < 0:
                continue
            gate_up = w13[local].float() @ x[t].float()
            gate, up = gate_up[:inter], gate_up[inter:]
            act = gate * torch.sigmoid(gate) * up
            out[t] += float(topk_weights[t, k]) * (w2[local].float() @ act)
    return out


def layer_cfg(dtype: torch.dtype = torch.float32, parallel: ParallelConfig | None = None, **moe: object) -> LayerConfig:
    shape = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32, dtype=dtype)
    return LayerConfig(moe=MoEConfig(**{**shape, **moe}), parallel=parallel or ParallelConfig(max_tokens_per_rank=64))


def problem(
    cfg: LayerConfig, tokens: int, seed: int = 0
) -> tuple[torch.Tensor, ExpertWeights, torch.Tensor, torch.Tensor]:
    """x [T, H], the local experts' weights, topk_weights [T, K] f32, topk_ids [T, K] int32
    (distinct experts per token)."""
    m = cfg.moe
    gen = torch.Generator().manual_seed(seed)
    e, h, i = cfg.num_local_experts, m.hidden_size, m.intermediate_size
    x = torch.randn(tokens, h, generator=gen).to(m.dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(m.dtype)
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(m.dtype)
    ids = torch.rand(tokens, m.num_experts, generator=gen).argsort(dim=1)[:, : m.top_k].to(torch.int32)
    weights = torch.rand(tokens, m.top_k, generator=gen)
    return x, ExpertWeights(w13, w2), weights, ids


def reference_pair(cfg: LayerConfig, **kwargs: object) -> ModularKernel:
    return compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device=CPU, **kwargs)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_reference_pair_matches_loop(dtype: torch.dtype, tol: float, tokens: int) -> None:
    cfg = layer_cfg(dtype)
    x, w, weights, ids = problem(cfg, tokens)
    out = reference_pair(cfg)(x, w, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), loop_moe(x, w, weights, ids), rtol=tol, atol=tol)


# --- compose's checks --------------------------------------------------------------------


def test_incompatible_pair_lists_every_failure() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(ep_size=2, cuda_graphs=True, max_tokens_per_rank=64))
    with pytest.raises(IncompatibleKernelsError) as info:
        compose(LocalMaskedPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")
    failed = {c.name for c in info.value.failures}
    assert {"layout", "prepare_finalize.parallel", "experts.cuda_graphs"} <= failed
    message = str(info.value)
    assert message.startswith("LocalMaskedPrepareAndFinalize + TorchReferenceExperts cannot run this layer")
    assert "LocalMaskedPrepareAndFinalize hands out masked tokens, TorchReferenceExperts takes standard" in message
    for check in info.value.failures:
        assert f"- {check.name}: {check.reason}" in message
    assert isinstance(info.value, ValueError)


def test_format_parameters_are_checked_naming_both_sides() -> None:
    class AlignedExperts(TorchReferenceExperts):
        def input_format(self, ctx):  # type: ignore[no-untyped-def]
            return super().input_format(ctx).__class__(super().input_format(ctx).layout, alignment=128)

    with pytest.raises(IncompatibleKernelsError, match="AlignedExperts needs standard, aligned to 128 rows; hands"):
        compose(LocalPrepareAndFinalize(), AlignedExperts(), layer_cfg(), device=CPU)


def test_compose_names_the_pair() -> None:
    kernel = reference_pair(layer_cfg())
    assert kernel.name == "LocalPrepareAndFinalize + TorchReferenceExperts"
    assert "TorchReferenceExperts" in repr(kernel)


# --- workspaces: reserved when built, never replaced under a captured graph -----------------


class ScratchReferenceExperts(TorchReferenceExperts):
    """The reference experts, declaring a [T, H] float32 scratch buffer and recording the
    address of the one they are handed."""

    def __init__(self) -> None:
        self.addresses: list[int] = []

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        return {"scratch": WorkspaceSpec((num_rows, ctx.cfg.moe.hidden_size), torch.float32)}

    def apply(self, tokens, weights, out, workspace) -> None:  # type: ignore[no-untyped-def]
        scratch = workspace["scratch"]
        assert scratch.shape == (tokens.num_rows, weights.hidden) and scratch.dtype == torch.float32
        self.addresses.append(scratch.data_ptr())
        super().apply(tokens, weights, out, workspace)


def test_workspaces_are_reserved_for_the_largest_call_when_built() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(max_tokens_per_rank=20))
    cache = WorkspaceCache()
    experts = ScratchReferenceExperts()
    kernel = compose(LocalPrepareAndFinalize(), experts, cfg, device=CPU, workspace_cache=cache)
    hidden = cfg.moe.hidden_size
    assert cache.nbytes() == 20 * hidden * 4  # before any call
    for tokens in (8, 5, 20, 1):
        kernel(*problem(cfg, tokens, seed=tokens))
    assert len(set(experts.addresses)) == 1  # every call a view of the one reserved buffer
    assert cache.nbytes() == 20 * hidden * 4


def test_layers_share_one_cache() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(max_tokens_per_rank=6))
    cache = WorkspaceCache()
    first, second = ScratchReferenceExperts(), ScratchReferenceExperts()
    for experts in (first, second):
        compose(LocalPrepareAndFinalize(), experts, cfg, device=CPU, workspace_cache=cache)(*problem(cfg, 6))
    assert first.addresses == second.addresses
    assert cache.nbytes() == 6 * cfg.moe.hidden_size * 4


def test_a_buffer_a_capture_used_never_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The growth rule on the CPU: a view taken while a capture runs pins the buffer; later
    growth raises instead of handing the captured memory back to the allocator."""
    cache = WorkspaceCache()
    dev = torch.device("cuda", 0)  # never allocated: the capture state is faked below
    small, big = WorkspaceSpec((4, 4), torch.float32), WorkspaceSpec((64, 4), torch.float32)
    monkeypatch.setattr(torch, "empty", lambda n, dtype, device: torch.zeros(n, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cache.reserve({"w": small}, dev)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = cache.view("w", small, dev).data_ptr()
    with pytest.raises(WorkspaceError, match="during CUDA-graph capture"):
        cache.view("w", big, dev)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(WorkspaceError, match="used by a captured CUDA graph and cannot grow"):
        cache.reserve({"w": big}, dev)
    assert cache.view("w", small, dev).data_ptr() == captured
    cache.clear()  # keeps what a capture used
    assert cache.view("w", small, dev).data_ptr() == captured
    cache.reserve({"other": big}, dev)  # untouched names still grow
    assert cache.nbytes() == small.nbytes + big.nbytes


# --- chunking ----------------------------------------------------------------------------


class CountingReferenceExperts(TorchReferenceExperts):
    def __init__(self) -> None:
        self.chunks: list[int] = []

    def apply(self, tokens, weights, out, workspace) -> None:  # type: ignore[no-untyped-def]
        self.chunks.append(tokens.num_rows)
        super().apply(tokens, weights, out, workspace)


class UnchunkableLocal(LocalPrepareAndFinalize):
    supports_chunking = False


def test_chunking_gives_the_same_result() -> None:
    whole = layer_cfg()
    chunked = layer_cfg(max_tokens_per_chunk=3)
    x, w, weights, ids = problem(whole, 10)
    experts = CountingReferenceExperts()
    out = compose(LocalPrepareAndFinalize(), experts, chunked, device=CPU)(x, w, weights, ids)
    assert experts.chunks == [3, 3, 3, 1]  # each chunk counted on its own tokens
    torch.testing.assert_close(out, reference_pair(whole)(x, w, weights, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, loop_moe(x, w, weights, ids), rtol=1e-5, atol=1e-5)


def test_chunking_is_off_when_a_part_cannot_chunk() -> None:
    cfg = layer_cfg(max_tokens_per_chunk=3)
    experts = CountingReferenceExperts()
    kernel = compose(UnchunkableLocal(), experts, cfg, device=CPU)
    assert kernel.chunk_size is None
    with pytest.raises(ValueError, match="x has 10 tokens but this kernel was built for at most 3 per call"):
        kernel(*problem(cfg, 10))


def test_chunking_with_a_fixed_masked_capacity_and_triton_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """T=10 through a masked capacity of 4: each chunk fits, nothing is refused or dropped."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = layer_cfg(parallel=ParallelConfig(max_tokens_per_rank=64, cuda_graphs=True), max_tokens_per_chunk=4)
    x, w, weights, ids = problem(cfg, 10)
    kernel = compose(LocalMaskedPrepareAndFinalize(), MaskedTritonExperts(), cfg, device=CPU)
    assert kernel.chunk_size == 4 and kernel.prepare_finalize.capacity(kernel.ctx, kernel.format) == 4
    torch.testing.assert_close(kernel(x, w, weights, ids), loop_moe(x, w, weights, ids), rtol=1e-4, atol=1e-4)
    standard = compose(LocalPrepareAndFinalize(), TritonExperts(), cfg, device=CPU)
    torch.testing.assert_close(standard(x, w, weights, ids), loop_moe(x, w, weights, ids), rtol=1e-4, atol=1e-4)


# --- bad input ---------------------------------------------------------------------------


Args = dict[str, object]
BAD_INPUTS: list[tuple[str, Callable[[Args], None], type[Exception], str]] = [
    ("x numpy", lambda a: a.update(x=a["x"].numpy()), TypeError, "x: expected a torch.Tensor, got ndarray"),
    ("x dtype", lambda a: a.update(x=a["x"].bfloat16()), TypeError, "x must have dtype float32, got bfloat16"),
    ("x 3-D", lambda a: a.update(x=a["x"][None]), ValueError, r"x must be \[T, H\]"),
    ("x hidden", lambda a: a.update(x=torch.zeros(6, 24)), ValueError, r"x must have shape \[6, 16\]"),
    ("x strided", lambda a: a.update(x=torch.zeros(16, 6).t()), ValueError, "x must be contiguous"),
    ("x meta", lambda a: a.update(x=a["x"].to("meta")), ValueError, "x must be on cpu, got meta"),
    ("ids None", lambda a: a.update(topk_ids=None), TypeError, "topk_ids: expected a torch.Tensor, got NoneType"),
    ("ids dtype", lambda a: a.update(topk_ids=a["topk_ids"].float()), TypeError, "topk_ids must have dtype int32"),
    ("ids shape", lambda a: a.update(topk_ids=a["topk_ids"][:, :1]), ValueError, r"topk_ids must have shape \[6, 2\]"),
    ("ids device", lambda a: a.update(topk_ids=a["topk_ids"].to("meta")), ValueError, "topk_ids must be on cpu"),
    ("ids too big", lambda a: a["topk_ids"].__setitem__((0, 0), 8), ValueError, r"topk_ids must lie in \[-1, 8\)"),
    ("ids below -1", lambda a: a["topk_ids"].__setitem__((1, 1), -2), ValueError, r"topk_ids must lie in \[-1, 8\)"),
    ("ids repeated", lambda a: a["topk_ids"][2].copy_(torch.tensor([3, 3])), ValueError, "repeats an expert"),
    (
        "weights dtype",
        lambda a: a.update(topk_weights=a["topk_weights"].bfloat16()),
        TypeError,
        "topk_weights must have dtype float32",
    ),
    ("weights shape", lambda a: a.update(topk_weights=torch.ones(5, 2)), ValueError, "topk_weights must have shape"),
    ("w tuple", lambda a: a.update(weights=(a["weights"].w13, a["weights"].w2)), TypeError, "weights: expected Exp"),
    (
        "w13 shape",
        lambda a: a.update(weights=ExpertWeights(a["weights"].w13[:, :8], a["weights"].w2)),
        ValueError,
        r"w13 must have shape \[8, 64, 16\]",
    ),
    (
        "w2 dtype",
        lambda a: a.update(weights=ExpertWeights(a["weights"].w13, a["weights"].w2.half())),
        TypeError,
        "w2 must have dtype float32",
    ),
    (
        "w2 strided",
        lambda a: a.update(weights=ExpertWeights(a["weights"].w13, a["weights"].w2.mT.contiguous().mT)),
        ValueError,
        "contig",
    ),
    (
        "weights on meta",
        lambda a: a.update(weights=ExpertWeights(a["weights"].w13.to("meta"), a["weights"].w2.to("meta"))),
        ValueError,
        r"w13 must be on cpu \(the kernel's device\), got meta",
    ),
    (
        "scales on unquantized",
        lambda a: a.update(weights=ExpertWeights(a["weights"].w13, a["weights"].w2, torch.ones(1), torch.ones(1))),
        ValueError,
        "the layer is unquantized",
    ),
]


@pytest.mark.parametrize(("mutate", "error", "match"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(mutate: Callable[[Args], None], error: type[Exception], match: str) -> None:
    cfg = layer_cfg()
    x, w, weights, ids = problem(cfg, 6)
    args: Args = dict(x=x, weights=w, topk_weights=weights, topk_ids=ids)
    kernel = reference_pair(cfg)
    kernel(**args)  # valid as built
    mutate(args)
    with pytest.raises(error, match=match):
        kernel(**args)


def test_builders_refuse_bad_configuration_and_devices() -> None:
    cfg = layer_cfg()
    with pytest.raises(TypeError, match=r"cfg: expected a LayerConfig, got a MoEConfig \(wrap it"):
        compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg.moe)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cfg: expected a LayerConfig, got dict"):
        select({"moe": {}})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="experts: expected a PermuteExpertsUnpermute"):
        compose(LocalPrepareAndFinalize(), LocalPrepareAndFinalize(), cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device: MoE kernels run on 'cpu' or 'cuda"):
        compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cuda")
    with pytest.raises(ValueError, match="placement: places 4 experts"):
        reference_pair(cfg, placement=ExpertPlacement.contiguous(4))


def test_too_many_tokens_for_the_kernel() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(max_tokens_per_rank=4))
    kernel = reference_pair(cfg)
    kernel(*problem(cfg, 4))
    with pytest.raises(ValueError, match="x has 5 tokens but this kernel was built for at most 4 per call"):
        kernel(*problem(cfg, 5))


# --- router weight on the input ----------------------------------------------------------


def test_router_weight_on_input_with_top1() -> None:
    cfg = layer_cfg(top_k=1)
    x, w, weights, ids = problem(cfg, 9)
    out = reference_pair(cfg)(x, w, weights, ids, apply_router_weight_on_input=True)
    # expert(w * x) with weight 1, which is not w * expert(x): the MLP is not linear
    want = loop_moe(x * weights, w, torch.ones_like(weights), ids)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, loop_moe(x, w, weights, ids), rtol=1e-3, atol=1e-3)


def test_router_weight_on_input_refused_for_top_k_above_1() -> None:
    cfg = layer_cfg(top_k=2)
    with pytest.raises(ValueError, match="apply_router_weight_on_input needs top_k == 1, got top_k=2"):
        reference_pair(cfg)(*problem(cfg, 3), apply_router_weight_on_input=True)


# --- batch sizes and placements ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 2])
def test_empty_batch(chunk: int | None) -> None:
    cfg = layer_cfg(max_tokens_per_chunk=chunk)
    out = reference_pair(cfg)(*problem(cfg, 0))
    assert out.shape == (0, cfg.moe.hidden_size)


def test_no_expert_ids_contribute_nothing() -> None:
    cfg = layer_cfg()
    x, w, weights, ids = problem(cfg, 5)
    ids[0, :] = -1  # token 0 goes nowhere
    ids[1, 1] = -1  # token 1 to one expert only
    out = reference_pair(cfg)(x, w, weights, ids)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, loop_moe(x, w, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_partial_rank_computes_its_placement_share(rank: int) -> None:
    """One rank of a 2-way EP layer with a shuffled placement, run by one process: its output
    is the sum over exactly the experts the placement gives it, in its local order."""
    full = layer_cfg()
    cfg = layer_cfg(parallel=ParallelConfig(ep_size=2, ep_rank=rank, max_tokens_per_rank=64))
    placement = ExpertPlacement.from_rank_experts([[6, 1, 3, 4], [0, 7, 2, 5]], rank)
    x, all_w, weights, ids = problem(full, 12)
    mine = list(placement.local_experts)
    w = ExpertWeights(all_w.w13[mine].contiguous(), all_w.w2[mine].contiguous())
    kernel = compose(LocalPrepareAndFinalize(partial=True), TorchReferenceExperts(), cfg, placement=placement)
    out = kernel(x, w, weights, ids)
    expert_map = placement.expert_map("cpu")
    torch.testing.assert_close(out, loop_moe(x, w, weights, ids, expert_map), rtol=1e-5, atol=1e-5)
    other = ExpertPlacement.from_rank_experts(placement.rank_experts, 1 - rank)
    other_w = ExpertWeights(
        all_w.w13[list(other.local_experts)].contiguous(), all_w.w2[list(other.local_experts)].contiguous()
    )
    both = out + loop_moe(x, other_w, weights, ids, other.expert_map("cpu"))
    torch.testing.assert_close(both, loop_moe(x, all_w, weights, ids), rtol=1e-5, atol=1e-5)


def test_the_local_part_refuses_ep_unless_partial() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(ep_size=2, max_tokens_per_rank=64))
    with pytest.raises(IncompatibleKernelsError, match="ep_size=2 needs an EP dispatcher"):
        compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device=CPU)


# --- selection ---------------------------------------------------------------------------


def test_selection_plans_valid_pairs_and_explains_refusals() -> None:
    cfg = layer_cfg(torch.bfloat16)
    selection = select(cfg, device="cpu")
    valid = [c for c in selection.candidates if c.valid]
    assert valid and selection.best in valid
    assert "no tuning table" in selection.decided_by
    text = selection.explain(width=None)
    assert f"CHOSEN T>=1: {selection.best.name}" in text
    for c in valid:
        assert c.name in text
    verbose = selection.explain(verbose=True, width=None)
    for c in selection.candidates:
        assert c.name in verbose
        for f in c.failures:
            assert f"- {f.name}: {f.reason}" in verbose
    assert selection.kernel.name == selection.best.name


def test_cpu_without_triton_interpreter_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    selection = select(layer_cfg(), device="cpu")
    assert selection.kernel.name == "LocalPrepareAndFinalize + TorchReferenceExperts"
    assert "TRITON_INTERPRET=1" in selection.explain()  # why the Triton pairs were refused


def test_cuda_graphs_only_selects_capturable_parts() -> None:
    cfg = layer_cfg(torch.bfloat16, parallel=ParallelConfig(cuda_graphs=True, max_tokens_per_rank=16))
    selection = select(cfg, device="cpu")
    for c in selection.candidates:
        capturable = c.prepare_finalize.supports_cuda_graphs and c.experts.supports_cuda_graphs
        assert c.valid <= capturable, c.name  # valid implies capturable
    refused = next(c for c in selection.candidates if c.experts.name == "TorchReferenceExperts")
    assert "experts.cuda_graphs" in {f.name for f in refused.failures}


def test_selection_counts_workspaces_against_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workspaces are counted per step of the plan, sized for that step's calls: the masked
    layout (memory E x M x H) is used where it fits the budget and left out from the step where
    it does not (explain says so), and the kernel built for the plan stays within the budget."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = layer_cfg(torch.bfloat16, parallel=ParallelConfig(max_tokens_per_rank=4096))
    masked = "LocalMaskedPrepareAndFinalize + MaskedTritonExperts"
    factories = dict(
        prepare_finalize_factories=[lambda c: LocalMaskedPrepareAndFinalize(), lambda c: LocalPrepareAndFinalize()],
        experts_factories=[lambda c: MaskedTritonExperts(), lambda c: TorchReferenceExperts()],
    )
    budget = 2**20  # the masked pair takes exactly 1 MiB at 1024 tokens, 4 MiB at 4096
    selection = select(cfg, device="cpu", memory_budget=budget, **factories)
    assert [(c.high, c.candidate.name) for c in selection.steps][-2:] == [
        (1024, masked),
        (4096, "LocalPrepareAndFinalize + TorchReferenceExperts"),
    ]
    note = selection.over_budget[masked]
    assert note == "left out from T=4096 on: workspaces 4 MiB, over the budget of 1 MiB"
    assert f"- memory: {note}" in selection.explain(width=None)
    assert selection.kernel.workspace_bytes() <= budget
    # nothing fits at the largest call: no kernel, and explain says why
    nothing = select(
        cfg,
        device="cpu",
        memory_budget=2**10,
        **{**factories, "prepare_finalize_factories": [factories["prepare_finalize_factories"][0]]},
    )
    with pytest.raises(RuntimeError, match="no registered pair can run this layer") as info:
        nothing.kernel  # noqa: B018
    assert "- memory: left out from T=" in str(info.value)


def test_no_valid_pair_raises_with_every_reason() -> None:
    cfg = layer_cfg(parallel=ParallelConfig(ep_size=2))
    selection = select(cfg, device="cpu")
    with pytest.raises(RuntimeError, match="no registered pair can run this layer on cpu") as info:
        selection.kernel  # noqa: B018 (the property composes and raises)
    assert "needs the expert-parallel process group" in str(info.value)


def test_candidates_from_explicit_factories_keep_registration_order() -> None:
    cfg = layer_cfg()
    ctx = LayerContext(cfg, CPU, ExpertPlacement.contiguous(8))
    pair = candidates(
        ctx,
        prepare_finalize_factories=[lambda c: LocalPrepareAndFinalize(), lambda c: UnchunkableLocal()],
        experts_factories=[lambda c: TorchReferenceExperts()],
    )
    assert [type(c.prepare_finalize) for c in pair] == [LocalPrepareAndFinalize, UnchunkableLocal]
    assert all(c.valid for c in pair)


def test_numpy_is_not_a_tensor_anywhere() -> None:
    cfg = layer_cfg()
    x, w, weights, ids = problem(cfg, 3)
    with pytest.raises(TypeError, match="topk_weights: expected a torch.Tensor, got ndarray"):
        reference_pair(cfg)(x, w, np.asarray(weights), ids)
