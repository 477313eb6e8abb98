"""Tests of the fused decode path (moe_kernels.kernels.fused_moe) against plain-torch loops.

Without a GPU the kernels run in the Triton interpreter: shapes stay tiny and the GEMMs use
16-wide tiles. The tests marked ``gpu`` use the real model shapes and CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kernels.core.tiles import candidate_configs, default_configs
from moe_kernels.kernels.fused_moe import (
    ONE_LAUNCH_MAX_SLOTS,
    FusedConfig,
    GatherLayout,
    fused_experts,
    fused_gemm1,
    fused_gemm2_weighted,
    fused_workspace_shapes,
    gather_layout,
)
from moe_kernels.kernels.permute import contiguous_rows_bound

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FEW = settings(max_examples=12, deadline=None)
SENTINEL = 7.0
HIDDEN, INTER = 40, 24  # not multiples of the 16-wide tiles: the K and N tails are exercised


def tiles(block_m: int) -> FusedConfig:
    return FusedConfig(block_m=block_m, block_n=16, block_k=16, num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- references


def expert_mlp(x_row: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One token through one expert, fp32: w2 @ (silu(gate @ x) * (up @ x))."""
    gate, up = (w13_e.float() @ x_row.float()).chunk(2)
    return w2_e.float() @ (F.silu(gate) * up)


def moe_loop(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if 0 <= e < w13.shape[0]:
                weight = 1.0 if weights is None else float(weights[t, k])
                out[t] += weight * expert_mlp(x[t], w13[e], w2[e])
    return out


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Elementwise error within ``rel`` of the largest reference magnitude (GEMM-style tolerance)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale + 1e-6)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def rand_weights(num_tokens: int, top_k: int, seed: int) -> torch.Tensor:
    return torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def tricky_routing(num_tokens: int, top_k: int, num_experts: int, hot: int, seed: int) -> torch.Tensor:
    """Router-like ids plus everything the layout must cope with: -1 holes, an id past E,
    repeats within a token, and a hot expert holding slot 0 of every token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    ids[:, 0] = hot
    if top_k > 1:
        ids[1::3, -1] = -1
        ids[2::5, 1] = hot
    ids[3, -1] = num_experts + 2
    return ids.to(torch.int32).to(DEVICE)


# ----------------------------------------------------------------------------- layout


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """(topk_ids [T, K], E): ids in [-1, E] (E is out of range too), repeats allowed."""
    num_experts = draw(st.integers(1, 6))
    num_tokens = draw(st.integers(0, 12))
    top_k = draw(st.integers(1, 4))
    flat = draw(st.lists(st.integers(-1, num_experts), min_size=num_tokens * top_k, max_size=num_tokens * top_k))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return torch.tensor(flat, dtype=dtype).reshape(num_tokens, top_k).to(DEVICE), num_experts


def check_layout(layout: GatherLayout, ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    num_tokens, top_k = ids.shape
    n_slots = num_tokens * top_k
    assert layout.block_m == block_m and layout.top_k == top_k
    assert layout.num_rows == contiguous_rows_bound(n_slots, num_experts, block_m)
    assert layout.row_slot.dtype == torch.int32 and layout.block_expert.dtype == torch.int32
    assert layout.slot_row.dtype == torch.int64 and layout.slot_index.dtype == torch.int64
    assert layout.row_slot.shape == (layout.num_rows,)
    assert layout.block_expert.shape == (layout.num_rows // block_m,)
    assert layout.slot_row.shape == ids.shape and layout.slot_index.shape == ids.shape

    flat_ids = ids.flatten().tolist()
    row_slot = layout.row_slot.tolist()
    block_expert = layout.block_expert.tolist()
    slot_row = layout.slot_row.flatten().tolist()
    valid = [0 <= e < num_experts for e in flat_ids]
    assert layout.slot_index.flatten().tolist() == [s if v else -1 for s, v in enumerate(valid)]

    # Every valid slot appears exactly once in row_slot; slot_row is its inverse.
    held = [s for s in row_slot if s >= 0]
    assert sorted(held) == [s for s, v in enumerate(valid) if v]
    for s in range(n_slots):
        if valid[s]:
            assert row_slot[slot_row[s]] == s
        else:
            assert slot_row[s] == -1

    # Each block holds one expert; used blocks come first, in expert order, each segment starts
    # on a block boundary and holds exactly that expert's slots.
    used = [b for b, e in enumerate(block_expert) if e >= 0]
    assert used == list(range(len(used))), "blocks past the last segment must be -1"
    assert block_expert[: len(used)] == sorted(block_expert[: len(used)])
    for b, e in enumerate(block_expert):
        rows = row_slot[b * block_m : (b + 1) * block_m]
        if e < 0:
            assert rows == [-1] * block_m
        else:
            assert any(s >= 0 for s in rows), "a block in use holds at least one slot"
            assert all(flat_ids[s] == e for s in rows if s >= 0)
    for e in range(num_experts):
        count = sum(1 for i in flat_ids if i == e)
        blocks = [b for b, e2 in enumerate(block_expert) if e2 == e]
        assert len(blocks) == -(-count // block_m)
        if count:
            rows = row_slot[blocks[0] * block_m : blocks[0] * block_m + count]
            assert all(flat_ids[s] == e for s in rows), "a segment's slots are contiguous from its start"
            if layout.single_launch:
                assert rows == sorted(rows), "the one-program layout keeps slot order"


@FEW
@given(routings(), st.sampled_from([1, 4, 16, 32, 64]), st.booleans())
def test_gather_layout_invariants(routing: tuple[torch.Tensor, int], block_m: int, one_launch: bool) -> None:
    ids, num_experts = routing
    layout = gather_layout(ids, num_experts, block_m, max_one_launch_slots=ONE_LAUNCH_MAX_SLOTS if one_launch else 0)
    assert layout.single_launch == (one_launch or ids.numel() == 0)
    check_layout(layout, ids, num_experts, block_m)


def test_gather_layout_above_the_one_launch_limit_uses_the_atomic_build() -> None:
    num_tokens, top_k, num_experts = ONE_LAUNCH_MAX_SLOTS // 4 + 1, 4, 9
    ids = tricky_routing(num_tokens, top_k, num_experts, hot=5, seed=1)
    layout = gather_layout(ids, num_experts, 16)
    assert not layout.single_launch
    check_layout(layout, ids, num_experts, 16)
    exact = gather_layout(ids[:-1].contiguous(), num_experts, 16)
    assert exact.single_launch, "T*K == the limit still takes one launch"
    check_layout(exact, ids[:-1], num_experts, 16)


def test_gather_layout_no_tokens() -> None:
    ids = torch.empty(0, 4, dtype=torch.int32, device=DEVICE)
    layout = gather_layout(ids, 8, 16)
    assert layout.num_rows == 0 and layout.num_blocks == 0
    assert layout.row_slot.numel() == 0 and layout.slot_row.shape == (0, 4)


# ----------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize(
    ("dtype", "block_m"), [(torch.float32, 16), (torch.bfloat16, 32), (torch.float16, 64), (torch.float32, 64)]
)
def test_fused_gemm1(dtype: torch.dtype, block_m: int) -> None:
    num_tokens, top_k, num_experts = 11, 3, 4
    ids = tricky_routing(num_tokens, top_k, num_experts, hot=2, seed=2)
    layout = gather_layout(ids, num_experts, block_m)
    x = randn(num_tokens, HIDDEN, dtype=dtype, seed=3)
    w13 = randn(num_experts, 2 * INTER, HIDDEN, dtype=dtype, seed=4, scale=0.25)
    out = torch.full((layout.num_rows, INTER), float("nan"), dtype=dtype, device=DEVICE)
    fused_gemm1(x, w13, layout, out, tiles(block_m))

    written = set()
    for t in range(num_tokens):
        for k in range(top_k):
            e, row = int(ids[t, k]), int(layout.slot_row[t, k])
            if 0 <= e < num_experts:
                gate, up = (w13[e].float() @ x[t].float()).chunk(2)
                assert_close_rel(out[row], F.silu(gate) * up, 1e-5 if dtype == torch.float32 else 2e-2)
                written.add(row)
    untouched = [r for r in range(layout.num_rows) if r not in written]
    assert bool(out[untouched].isnan().all()), "padding rows must not be written"


@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize(("dtype", "block_m"), [(torch.float32, 16), (torch.bfloat16, 32)])
def test_fused_gemm2_weighted_writes_slot_major(dtype: torch.dtype, block_m: int, with_weights: bool) -> None:
    num_tokens, top_k, num_experts = 9, 3, 4
    ids = tricky_routing(num_tokens, top_k, num_experts, hot=1, seed=5)
    layout = gather_layout(ids, num_experts, block_m)
    act = randn(layout.num_rows, INTER, dtype=dtype, seed=6)
    padding = layout.row_slot < 0
    act[padding] = float("nan")  # padding rows are never written by GEMM1: they must not be read
    w2 = randn(num_experts, HIDDEN, INTER, dtype=dtype, seed=7, scale=0.25)
    weights = rand_weights(num_tokens, top_k, seed=8) if with_weights else None
    out = torch.full((num_tokens * top_k, HIDDEN), SENTINEL, dtype=dtype, device=DEVICE)
    fused_gemm2_weighted(act, w2, layout, weights, out, tiles(block_m))

    for t in range(num_tokens):
        for k in range(top_k):
            s, e = t * top_k + k, int(ids[t, k])
            if 0 <= e < num_experts:
                weight = 1.0 if weights is None else float(weights[t, k])
                expected = weight * (w2[e].float() @ act[int(layout.slot_row[t, k])].float())
                assert_close_rel(out[s], expected, 1e-5 if dtype == torch.float32 else 2e-2)
            else:
                assert bool((out[s] == SENTINEL).all()), f"slot {s} has no expert and must stay untouched"


def test_fused_gemm2_top1_writes_tokens_and_zeros_the_unrouted() -> None:
    num_tokens, num_experts = 13, 3
    ids = torch.tensor([[1], [-1], [1], [0], [1], [1], [5], [2], [1], [1], [-1], [1], [1]], dtype=torch.int32).to(
        DEVICE
    )
    layout = gather_layout(ids, num_experts, 16)
    act = randn(layout.num_rows, INTER, seed=9)
    w2 = randn(num_experts, HIDDEN, INTER, seed=10)
    weights = rand_weights(num_tokens, 1, seed=11)
    out = torch.full((num_tokens, HIDDEN), float("nan"), device=DEVICE)
    fused_gemm2_weighted(act, w2, layout, weights, out, tiles(16))
    for t in range(num_tokens):
        e = int(ids[t, 0])
        if 0 <= e < num_experts:
            expected = float(weights[t, 0]) * (w2[e] @ act[int(layout.slot_row[t, 0])])
            assert_close_rel(out[t], expected, 1e-5)
        else:
            assert bool((out[t] == 0).all()), f"token {t} has no expert: its row must be zeros"


# ----------------------------------------------------------------------------- whole path


def poisoned_workspace(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype, block_m: int):
    shapes = fused_workspace_shapes(num_tokens, top_k, num_experts, HIDDEN, INTER, dtype, block_m)
    return {name: torch.full(shape, float("nan"), dtype=dt, device=DEVICE) for name, (shape, dt) in shapes.items()}


@pytest.mark.parametrize(
    ("dtype", "block_m", "top_k"),
    [(torch.float32, 16, 3), (torch.bfloat16, 32, 2), (torch.float16, 64, 4), (torch.float32, 16, 1)],
)
def test_fused_experts_matches_the_loop(dtype: torch.dtype, block_m: int, top_k: int) -> None:
    # 20 tokens all on the hot expert: it spans two 16-row blocks.
    num_tokens, num_experts = 20, 5
    ids = tricky_routing(num_tokens, top_k, num_experts, hot=3, seed=12)
    weights = rand_weights(num_tokens, top_k, seed=13)
    x = randn(num_tokens, HIDDEN, dtype=dtype, seed=14)
    w13 = randn(num_experts, 2 * INTER, HIDDEN, dtype=dtype, seed=15, scale=0.25)
    w2 = randn(num_experts, HIDDEN, INTER, dtype=dtype, seed=16, scale=0.25)
    workspace = poisoned_workspace(num_tokens, top_k, num_experts, dtype, block_m)
    assert ("slot_rows" in workspace) == (top_k > 1), "top-1 writes the output directly"
    out = torch.full((num_tokens, HIDDEN), float("nan"), dtype=dtype, device=DEVICE)
    fused_experts(x, w13, w2, weights, ids, out, workspace=workspace, gemm1=tiles(block_m), gemm2=tiles(block_m))
    assert_close_rel(out, moe_loop(x, ids, weights, w13, w2), 1e-5 if dtype == torch.float32 else 3e-2)


@FEW
@given(routings(), st.booleans())
def test_fused_experts_any_routing(routing: tuple[torch.Tensor, int], with_weights: bool) -> None:
    ids, num_experts = routing
    num_tokens, top_k = ids.shape
    x = randn(num_tokens, HIDDEN, seed=num_tokens)
    w13 = randn(num_experts, 2 * INTER, HIDDEN, seed=17, scale=0.25)
    w2 = randn(num_experts, HIDDEN, INTER, seed=18, scale=0.25)
    weights = rand_weights(num_tokens, top_k, seed=19) if with_weights else None
    workspace = poisoned_workspace(num_tokens, top_k, num_experts, torch.float32, 16)
    out = torch.full((num_tokens, HIDDEN), float("nan"), device=DEVICE)
    fused_experts(x, w13, w2, weights, ids, out, workspace=workspace, gemm1=tiles(16), gemm2=tiles(16))
    assert_close_rel(out, moe_loop(x, ids, weights, w13, w2), 1e-5)


def test_fused_experts_no_tokens() -> None:
    x = torch.empty(0, HIDDEN, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    w13, w2 = randn(3, 2 * INTER, HIDDEN), randn(3, HIDDEN, INTER)
    workspace = poisoned_workspace(0, 2, 3, torch.float32, 16)
    assert workspace["activation"].shape == (0, INTER) and workspace["slot_rows"].shape == (0, HIDDEN)
    out = fused_experts(
        x,
        w13,
        w2,
        None,
        ids,
        torch.empty(0, HIDDEN, device=DEVICE),
        workspace=workspace,
        gemm1=tiles(16),
        gemm2=tiles(16),
    )
    assert out.shape == (0, HIDDEN)


def _small_call(fill: float) -> tuple[torch.Tensor, ...]:
    """``(ids [4, 2], x [4, H], w13 [3, 2I, H], w2 [3, H, I], out [4, H])`` on 3 experts, all ``fill`` but
    ids and out (zeros), with a poisoned workspace for 16-row blocks."""
    ids = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)
    x = torch.full((4, HIDDEN), fill, device=DEVICE)
    w13 = torch.full((3, 2 * INTER, HIDDEN), fill, device=DEVICE)
    w2 = torch.full((3, HIDDEN, INTER), fill, device=DEVICE)
    return ids, x, w13, w2, poisoned_workspace(4, 2, 3, torch.float32, 16), torch.zeros(4, HIDDEN, device=DEVICE)


def test_bad_inputs_raise_with_argument_names() -> None:
    ids, x, w13, w2, workspace, out = _small_call(0.0)
    with pytest.raises(ValueError, match="gemm2.block_m: expected gemm1.block_m = 16.*got 32"):
        fused_experts(x, w13, w2, None, ids, out, workspace=workspace, gemm1=tiles(16), gemm2=tiles(32))
    with pytest.raises(ValueError, match=r"workspace\['activation'\]: expected shape \[48, 24\], got \[47, 24\]"):
        bad = dict(workspace, activation=workspace["activation"][:-1])
        fused_experts(x, w13, w2, None, ids, out, workspace=bad, gemm1=tiles(16), gemm2=tiles(16))
    with pytest.raises(ValueError, match="workspace: expected a buffer 'slot_rows'"):
        fused_experts(
            x,
            w13,
            w2,
            None,
            ids,
            out,
            workspace={"activation": workspace["activation"]},
            gemm1=tiles(16),
            gemm2=tiles(16),
        )
    with pytest.raises(TypeError, match="w13: expected dtype .*float32.* got torch.bfloat16"):
        fused_experts(x, w13.bfloat16(), w2, None, ids, out, workspace=workspace, gemm1=tiles(16), gemm2=tiles(16))
    layout = gather_layout(ids, 3, 16)
    with pytest.raises(ValueError, match="config.block_m: expected the layout's block_m = 16, got 32"):
        fused_gemm1(x, w13, layout, workspace["activation"], tiles(32))
    with pytest.raises(ValueError, match=r"out: expected shape \[8, 40\]"):
        fused_gemm2_weighted(workspace["activation"], w2, layout, None, out, tiles(16))
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16, got 24"):
        FusedConfig(block_m=16, block_n=24, block_k=16, num_warps=4, num_stages=3)
    with pytest.raises(TypeError, match="topk_ids.*dtype"):
        gather_layout(ids.float(), 3, 16)


def test_bad_topk_weights_raise_before_any_kernel_runs() -> None:
    ids, x, w13, w2, workspace, out = _small_call(1.0)
    for bad, error in [
        (torch.ones(4, 3, device=DEVICE), r"topk_weights: expected shape \[4, 2\], got \[4, 3\]"),
        (torch.ones(4, 2, dtype=torch.int32, device=DEVICE), "topk_weights: expected dtype .* got torch.int32"),
    ]:
        with pytest.raises((ValueError, TypeError), match=error):
            fused_experts(x, w13, w2, bad, ids, out, workspace=workspace, gemm1=tiles(16), gemm2=tiles(16))
        # GEMM1 never ran: its output buffer still holds only the poison
        assert workspace["activation"].isnan().all()


# ----------------------------------------------------------------------------- configs

# (T, K, E, H, I): DeepSeek-V3 at 32 local experts and Qwen3-30B-A3B, decode to prefill.
SHAPES = [(t, 8, e, h, i) for t in (1, 7, 128, 256, 4096) for e, h, i in ((32, 7168, 2048), (128, 2048, 768))]


@pytest.mark.parametrize("shape", SHAPES)
def test_default_configs(shape: tuple[int, int, int, int, int]) -> None:
    num_tokens, top_k, num_experts, hidden, inter = shape
    gemm1, gemm2 = default_configs(*shape)
    assert gemm1.block_m == gemm2.block_m, "the two GEMMs share one layout"
    # At most one partial block per active expert at decode: the smallest tile.
    if num_tokens * top_k <= 2 * num_experts:
        assert gemm1.block_m == 16
    if num_tokens >= 4096:
        assert gemm1.block_m >= 64
    for config, weight_tiles in ((gemm1, 2), (gemm2, 1)):
        smem = config.num_stages * config.block_k * (config.block_m + weight_tiles * config.block_n) * 2
        assert smem <= 200 * 1024 and config.num_stages >= 3


@pytest.mark.parametrize("shape", SHAPES)
def test_candidate_configs(shape: tuple[int, int, int, int, int]) -> None:
    gemm1_space, gemm2_space = candidate_configs(*shape)
    assert 10 <= len(gemm1_space) <= 36 and 10 <= len(gemm2_space) <= 36
    assert len(set(gemm1_space)) == len(gemm1_space) and len(set(gemm2_space)) == len(gemm2_space)
    block_ms = {c.block_m for c in gemm1_space}
    assert block_ms == {c.block_m for c in gemm2_space} and len(block_ms) == 2
    gemm1, gemm2 = default_configs(*shape)
    assert gemm1 in gemm1_space and gemm2 in gemm2_space, "the tuner's space holds the defaults"


# ----------------------------------------------------------------------------- GPU

GPU_SHAPES = {"deepseek-v3-ep8": (32, 7168, 2048, 8), "qwen3-30b-a3b": (128, 2048, 768, 8)}


@pytest.fixture(scope="module")
def gpu_weights() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights = {}
    for name, (num_experts, hidden, inter, _) in GPU_SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(20)
        w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5
        w2 = torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5
        weights[name] = (w13.bfloat16(), w2.bfloat16())
    return weights


def gpu_routing(num_tokens: int, top_k: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct router ids, expert 0 in slot 0 of half the tokens (several row blocks once
    T >= 64), and every fifth token's last slot dropped (-1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=gen)
    scores[::2, 0] = 2.0
    weights, ids = scores.topk(top_k, dim=1)
    ids = ids.to(torch.int32)
    ids[::5, -1] = -1
    return ids, (weights / weights.sum(1, keepdim=True)).float()


def moe_by_expert(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """fp32 reference, one expert at a time (a per-token loop is too slow at these shapes)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        if tokens.numel():
            gate, up = (x[tokens].float() @ w13[e].float().T).chunk(2, dim=1)
            y = (F.silu(gate) * up) @ w2[e].float().T
            out.index_add_(0, tokens, y * weights[tokens, slots, None])
    return out


def gpu_buffers(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, block_m: int):
    shapes = fused_workspace_shapes(num_tokens, top_k, num_experts, hidden, inter, torch.bfloat16, block_m)
    return {n: torch.full(s, float("nan"), dtype=d, device="cuda") for n, (s, d) in shapes.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 128, 4096])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gpu_fused_experts(model: str, num_tokens: int, gpu_weights: dict) -> None:
    num_experts, hidden, inter, top_k = GPU_SHAPES[model]
    w13, w2 = gpu_weights[model]
    ids, weights = gpu_routing(num_tokens, top_k, num_experts, seed=num_tokens)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    x = x.bfloat16()
    gemm1, gemm2 = default_configs(num_tokens, top_k, num_experts, hidden, inter)
    workspace = gpu_buffers(num_tokens, top_k, num_experts, hidden, inter, gemm1.block_m)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    fused_experts(x, w13, w2, weights, ids, out, workspace=workspace, gemm1=gemm1, gemm2=gemm2)
    assert_close_rel(out, moe_by_expert(x, ids, weights, w13, w2), 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 128, 4096])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gpu_fused_experts_cuda_graph_replay(model: str, num_tokens: int, gpu_weights: dict) -> None:
    num_experts, hidden, inter, top_k = GPU_SHAPES[model]
    w13, w2 = gpu_weights[model]
    gemm1, gemm2 = default_configs(num_tokens, top_k, num_experts, hidden, inter)
    workspace = gpu_buffers(num_tokens, top_k, num_experts, hidden, inter, gemm1.block_m)
    ids, weights = gpu_routing(num_tokens, top_k, num_experts, seed=1)
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        fused_experts(x, w13, w2, weights, ids, out, workspace=workspace, gemm1=gemm1, gemm2=gemm2)

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_ids, new_weights = gpu_routing(num_tokens, top_k, num_experts, seed=2)
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    assert_close_rel(out, moe_by_expert(x, ids, weights, w13, w2), 3e-2)
