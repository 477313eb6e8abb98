"""The composer and the selector, exercised with the plain parts (TorchReferenceExperts behind
LocalPrepareAndFinalize) against a per-token loop: checks, workspace cache, chunking, bad
input, router weight on input, empty batches, expert maps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moe_kernels.compose import IncompatibleKernelsError, ModularKernel, WorkspaceCache, compose
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig
from moe_kernels.contract import StandardTokens, WorkspaceSpec
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
from moe_kernels.select import candidates, select

CPU = torch.device("cpu")


def loop_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each token and each of its experts: w2 @ (silu(gate) * up), weighted, summed (fp32)."""
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


def layer_cfg(dtype: torch.dtype = torch.float32, **moe: object) -> LayerConfig:
    shape = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32, dtype=dtype)
    return LayerConfig(moe=MoEConfig(**{**shape, **moe}))


def problem(cfg: LayerConfig, tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, K] f32, topk_ids [T, K] int32
    (distinct experts per token)."""
    m = cfg.moe
    gen = torch.Generator().manual_seed(seed)
    e, h, i = cfg.num_local_experts, m.hidden_size, m.intermediate_size
    x = torch.randn(tokens, h, generator=gen).to(m.dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(m.dtype)
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(m.dtype)
    ids = torch.rand(tokens, m.num_experts, generator=gen).argsort(dim=1)[:, : m.top_k].to(torch.int32)
    weights = torch.rand(tokens, m.top_k, generator=gen)
    return x, w13, w2, weights, ids


def reference_pair(cfg: LayerConfig, **kwargs: object) -> ModularKernel:
    return compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device=CPU, **kwargs)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_reference_pair_matches_loop(dtype: torch.dtype, tol: float, tokens: int) -> None:
    cfg = layer_cfg(dtype)
    x, w13, w2, weights, ids = problem(cfg, tokens)
    out = reference_pair(cfg)(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), loop_moe(x, w13, w2, weights, ids), rtol=tol, atol=tol)


# --- compose's checks --------------------------------------------------------------------


def test_incompatible_pair_lists_every_failure() -> None:
    cfg = LayerConfig(moe=layer_cfg().moe, parallel=ParallelConfig(ep_size=2, cuda_graphs=True, max_tokens_per_rank=64))
    with pytest.raises(IncompatibleKernelsError) as info:
        compose(LocalPrepareAndFinalize(batched=True), TorchReferenceExperts(), cfg, device="meta")
    failed = {c.name for c in info.value.failures}
    assert failed == {
        "format",  # batched tokens for standard experts
        "prepare_finalize.device",  # Triton on a meta device
        "prepare_finalize.parallel",  # local P/F with ep_size=2
        "experts.device",
        "experts.cuda_graphs",  # the reference loop syncs with the host
    }
    message = str(info.value)
    assert message.startswith("LocalPrepareAndFinalize(batched) + TorchReferenceExperts cannot run this layer")
    for check in info.value.failures:
        assert f"- {check.name}: {check.reason}" in message
    assert isinstance(info.value, ValueError)


def test_compose_names_the_pair() -> None:
    kernel = reference_pair(layer_cfg())
    assert kernel.name == "LocalPrepareAndFinalize + TorchReferenceExperts"
    assert "TorchReferenceExperts" in repr(kernel)


# --- workspace cache ---------------------------------------------------------------------


class ScratchReferenceExperts(TorchReferenceExperts):
    """The reference experts, declaring a [T, H] float32 scratch buffer and recording the
    address of the one they are handed."""

    def __init__(self) -> None:
        self.addresses: list[int] = []

    def workspace_shapes(self, tokens: StandardTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        return {"scratch": WorkspaceSpec((tokens.x.shape[0], w2.shape[1]), torch.float32)}

    def apply(self, tokens, w13, w2, out, workspace) -> None:  # type: ignore[no-untyped-def]
        scratch = workspace["scratch"]
        assert scratch.shape == (tokens.x.shape[0], w2.shape[1]) and scratch.dtype == torch.float32
        self.addresses.append(scratch.data_ptr())
        super().apply(tokens, w13, w2, out, workspace)


def test_workspace_cache_reuses_its_buffer() -> None:
    cfg = layer_cfg()
    cache = WorkspaceCache()
    experts = ScratchReferenceExperts()
    kernel = compose(LocalPrepareAndFinalize(), experts, cfg, device=CPU, workspace_cache=cache)
    hidden = cfg.moe.hidden_size

    kernel(*problem(cfg, 8))
    assert cache.nbytes() == 8 * hidden * 4
    first = experts.addresses[-1]

    kernel(*problem(cfg, 8, seed=1))  # same size: no new allocation
    kernel(*problem(cfg, 5, seed=2))  # smaller: a view of the same buffer
    assert experts.addresses[1:] == [first, first]
    assert cache.nbytes() == 8 * hidden * 4

    kernel(*problem(cfg, 20, seed=3))  # larger: grows once
    assert cache.nbytes() == 20 * hidden * 4
    grown = experts.addresses[-1]
    kernel(*problem(cfg, 20, seed=4))
    assert experts.addresses[-1] == grown


def test_layers_share_one_cache() -> None:
    cfg = layer_cfg()
    cache = WorkspaceCache()
    first, second = ScratchReferenceExperts(), ScratchReferenceExperts()
    for experts in (first, second):
        compose(LocalPrepareAndFinalize(), experts, cfg, device=CPU, workspace_cache=cache)(*problem(cfg, 6))
    assert first.addresses == second.addresses
    assert cache.nbytes() == 6 * cfg.moe.hidden_size * 4


# --- chunking ----------------------------------------------------------------------------


class CountingReferenceExperts(TorchReferenceExperts):
    def __init__(self) -> None:
        self.chunks: list[int] = []

    def apply(self, tokens, w13, w2, out, workspace) -> None:  # type: ignore[no-untyped-def]
        self.chunks.append(tokens.x.shape[0])
        super().apply(tokens, w13, w2, out, workspace)


class UnchunkableLocal(LocalPrepareAndFinalize):
    supports_chunking = False


def test_chunking_gives_the_same_result() -> None:
    whole = layer_cfg()
    chunked = layer_cfg(max_tokens_per_chunk=3)
    x, w13, w2, weights, ids = problem(whole, 10)
    experts = CountingReferenceExperts()
    out = compose(LocalPrepareAndFinalize(), experts, chunked, device=CPU)(x, w13, w2, weights, ids)
    assert experts.chunks == [3, 3, 3, 1]  # each chunk counted on its own tokens
    torch.testing.assert_close(out, reference_pair(whole)(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, loop_moe(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_chunking_is_off_when_a_part_cannot_chunk() -> None:
    cfg = layer_cfg(max_tokens_per_chunk=3)
    experts = CountingReferenceExperts()
    kernel = compose(UnchunkableLocal(), experts, cfg, device=CPU)
    assert kernel.chunk_size is None
    kernel(*problem(cfg, 10))
    assert experts.chunks == [10]


# --- bad input ---------------------------------------------------------------------------


class CappedLocal(LocalPrepareAndFinalize):
    def max_num_tokens_per_rank(self) -> int | None:
        return 4


Args = dict[str, object]
BAD_INPUTS: list[tuple[str, Callable[[Args], None], type[Exception], str]] = [
    ("x dtype", lambda a: a.update(x=a["x"].bfloat16()), TypeError, "x must have dtype float32, got bfloat16"),
    ("x 3-D", lambda a: a.update(x=a["x"][None]), ValueError, r"x must be \[T, H\]"),
    ("x hidden", lambda a: a.update(x=torch.zeros(6, 24)), ValueError, r"x must have shape \[6, 16\]"),
    ("x strided", lambda a: a.update(x=torch.zeros(16, 6).t()), ValueError, "x must be contiguous"),
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
    ("w13 shape", lambda a: a.update(w13=a["w13"][:, :8]), ValueError, r"w13 must have shape \[8, 64, 16\]"),
    ("w2 dtype", lambda a: a.update(w2=a["w2"].half()), TypeError, "w2 must have dtype float32"),
    ("w2 strided", lambda a: a.update(w2=a["w2"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "contig"),
    ("map shape", lambda a: a.update(expert_map=torch.arange(4, dtype=torch.int32)), ValueError, r"expert_map.*\[8\]"),
    ("map dtype", lambda a: a.update(expert_map=torch.arange(8.0)), TypeError, "expert_map must be int32 or int64"),
    ("map device", lambda a: a.update(expert_map=torch.arange(8, device="meta")), ValueError, "expert_map must be on"),
]


@pytest.mark.parametrize(("mutate", "error", "match"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(mutate: Callable[[Args], None], error: type[Exception], match: str) -> None:
    cfg = layer_cfg()
    x, w13, w2, weights, ids = problem(cfg, 6)
    args: Args = dict(x=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    reference_pair(cfg)(**args)  # valid as built
    mutate(args)
    with pytest.raises(error, match=match):
        reference_pair(cfg)(**args)


def test_too_many_tokens_for_the_dispatcher() -> None:
    cfg = layer_cfg()
    kernel = compose(CappedLocal(), TorchReferenceExperts(), cfg, device=CPU)
    kernel(*problem(cfg, 4))
    with pytest.raises(ValueError, match="x has 5 tokens but this kernel takes at most 4"):
        kernel(*problem(cfg, 5))


# --- router weight on the input ----------------------------------------------------------


def test_router_weight_on_input_with_top1() -> None:
    cfg = layer_cfg(top_k=1)
    x, w13, w2, weights, ids = problem(cfg, 9)
    out = reference_pair(cfg)(x, w13, w2, weights, ids, apply_router_weight_on_input=True)
    # expert(w * x) with weight 1, which is not w * expert(x): the MLP is not linear
    want = loop_moe(x * weights, w13, w2, torch.ones_like(weights), ids)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, loop_moe(x, w13, w2, weights, ids), rtol=1e-3, atol=1e-3)


def test_router_weight_on_input_refused_for_top_k_above_1() -> None:
    cfg = layer_cfg(top_k=2)
    with pytest.raises(ValueError, match="apply_router_weight_on_input needs top_k == 1, got top_k=2"):
        reference_pair(cfg)(*problem(cfg, 3), apply_router_weight_on_input=True)


# --- batch sizes and expert maps -----------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 2])
def test_empty_batch(chunk: int | None) -> None:
    cfg = layer_cfg(max_tokens_per_chunk=chunk)
    out = reference_pair(cfg)(*problem(cfg, 0))
    assert out.shape == (0, cfg.moe.hidden_size)


def test_no_expert_ids_contribute_nothing() -> None:
    cfg = layer_cfg()
    x, w13, w2, weights, ids = problem(cfg, 5)
    ids[0, :] = -1  # token 0 goes nowhere
    ids[1, 1] = -1  # token 1 to one expert only
    out = reference_pair(cfg)(x, w13, w2, weights, ids)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, loop_moe(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_expert_map_disables_experts() -> None:
    cfg = layer_cfg()
    x, w13, w2, weights, ids = problem(cfg, 12)
    expert_map = torch.arange(8, dtype=torch.int32)
    expert_map[[2, 5]] = -1
    out = reference_pair(cfg)(x, w13, w2, weights, ids, expert_map=expert_map)
    torch.testing.assert_close(out, loop_moe(x, w13, w2, weights, ids, expert_map), rtol=1e-5, atol=1e-5)
    unmapped = reference_pair(cfg)(x, w13, w2, weights, ids)
    uses_disabled = ((ids == 2) | (ids == 5)).any(dim=1)
    assert uses_disabled.any() and (~uses_disabled).any()
    assert not torch.allclose(out[uses_disabled], unmapped[uses_disabled])
    torch.testing.assert_close(out[~uses_disabled], unmapped[~uses_disabled])


def test_expert_map_renumbers_experts() -> None:
    cfg = layer_cfg()
    x, w13, w2, weights, ids = problem(cfg, 12)
    expert_map = torch.arange(7, -1, -1, dtype=torch.int64)  # global e -> local 7 - e
    out = reference_pair(cfg)(x, w13, w2, weights, ids, expert_map=expert_map)
    torch.testing.assert_close(out, loop_moe(x, w13.flip(0), w2.flip(0), weights, ids), rtol=1e-5, atol=1e-5)


# --- selection ---------------------------------------------------------------------------


def test_selection_ranks_valid_pairs_and_explains_refusals() -> None:
    cfg = layer_cfg(torch.bfloat16)
    selection = select(moe=cfg.moe, device="cpu")
    valid = [c for c in selection.candidates if c.valid]
    assert valid and selection.best is valid[0]
    assert [c.score for c in valid] == sorted(c.score for c in valid)
    assert all(c.failures for c in selection.candidates if not c.valid)
    text = selection.explain()
    assert f"CHOSEN  {valid[0].name}" in text
    for c in selection.candidates:
        assert c.name in text
        for f in c.failures:
            assert f"- {f.name}: {f.reason}" in text
    assert selection.kernel.name == valid[0].name


def test_cpu_without_triton_interpreter_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    selection = select(moe=layer_cfg().moe, device="cpu")
    assert selection.kernel.name == "LocalPrepareAndFinalize + TorchReferenceExperts"
    assert "TRITON_INTERPRET=1" in selection.explain()  # why the Triton pairs were refused


def test_cuda_graphs_only_selects_capturable_parts() -> None:
    cfg = layer_cfg(torch.bfloat16)
    selection = select(moe=cfg.moe, parallel=ParallelConfig(cuda_graphs=True, max_tokens_per_rank=16), device="cpu")
    for c in selection.candidates:
        capturable = c.prepare_finalize.supports_cuda_graphs and c.experts.supports_cuda_graphs
        assert c.valid <= capturable, c.name  # valid implies capturable
    refused = next(c for c in selection.candidates if c.experts.name == "TorchReferenceExperts")
    assert "experts.cuda_graphs" in {f.name for f in refused.failures}


def test_no_valid_pair_raises_with_every_reason() -> None:
    cfg = layer_cfg()
    selection = select(moe=cfg.moe, parallel=ParallelConfig(ep_size=2), device="cpu")
    with pytest.raises(RuntimeError, match="no registered pair can run this layer on cpu") as info:
        selection.kernel  # noqa: B018 (the property composes and raises)
    assert "ep_size=2 needs an EP dispatcher" in str(info.value)


def test_candidates_from_explicit_factories_keep_registration_order_on_ties() -> None:
    cfg = layer_cfg()
    pair = candidates(
        cfg,
        CPU,
        prepare_finalize_factories=[lambda c, g: LocalPrepareAndFinalize(), lambda c, g: UnchunkableLocal()],
        experts_factories=[lambda c: TorchReferenceExperts()],
    )
    assert [type(c.prepare_finalize) for c in pair] == [LocalPrepareAndFinalize, UnchunkableLocal]
    assert all(c.valid for c in pair) and pair[0].score == pair[1].score
