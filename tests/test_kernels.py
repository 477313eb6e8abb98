"""Tests of the Triton kernels in moe_kernels.kernels against plain-torch loop references.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET),
which is slow: shapes stay tiny and the GEMM tests use 16-wide tiles.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kernels.kernels import (
    activate,
    contiguous_layout,
    contiguous_rows_bound,
    grouped_gemm_contiguous,
    grouped_gemm_masked,
    masked_layout,
    scatter_rows,
    weighted_gather,
)
from moe_kernels.mlp.activations import SILU

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FEW = settings(max_examples=15, deadline=None)
SENTINEL = 7.0
SMALL_TILES = {"block_m": 16, "block_n": 16, "block_k": 16}


# ----------------------------------------------------------------------------- references


def histogram(ids: torch.Tensor, num_experts: int) -> list[int]:
    counts = [0] * num_experts
    for e in ids.flatten().tolist():
        if e >= 0:
            counts[e] += 1
    return counts


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def expert_mlp_ref(x: torch.Tensor, w: torch.Tensor, fuse: bool) -> torch.Tensor:
    """One expert's rows ``x [M, K]`` times ``w [N, K]`` in fp32, optionally through SiLU-and-mul."""
    y = x.float() @ w.float().T
    return silu_mul_ref(y) if fuse else y


def moe_ref(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                h = expert_mlp_ref(x[t : t + 1], w13[e], fuse=True)
                out[t] += weights[t, k] * (h @ w2[e].float().T)[0]
    return out


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Elementwise error within ``rel`` of the largest reference magnitude (GEMM-style tolerance)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale + 1e-6)


# ----------------------------------------------------------------------------- strategies


@st.composite
def routings(draw: st.DrawFn, max_tokens: int = 10, min_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(topk_ids [T, K], E) with -1 holes; ids of a token may repeat (the layouts must cope)."""
    num_experts = draw(st.integers(1, 5))
    num_tokens = draw(st.integers(min_tokens, max_tokens))
    top_k = draw(st.integers(1, 4))
    flat = draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_tokens * top_k, max_size=num_tokens * top_k))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    ids = torch.tensor(flat, dtype=dtype, device=DEVICE).reshape(num_tokens, top_k)
    return ids, num_experts


def distinct_routing(num_tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Router-like ids: distinct experts per token, last slot of every third token dropped (-1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    ids[::3, -1] = -1
    return ids.to(torch.int32).to(DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------- permutation


@FEW
@given(routings())
def test_layout_counts_match_histogram(routing: tuple[torch.Tensor, int]) -> None:
    ids, num_experts = routing
    counts = contiguous_layout(ids, num_experts, 1).counts
    assert counts.dtype == torch.int32
    assert counts.tolist() == histogram(ids, num_experts)


@FEW
@given(routings(), st.sampled_from([1, 4, 16]))
def test_contiguous_layout_invariants(routing: tuple[torch.Tensor, int], alignment: int) -> None:
    ids, num_experts = routing
    layout = contiguous_layout(ids, num_experts, alignment)
    counts = histogram(ids, num_experts)
    start = layout.expert_start.tolist()
    assert layout.counts.tolist() == counts
    assert layout.expert_start.dtype == torch.int64 and layout.dst_row.dtype == torch.int64
    assert layout.segment_ends.tolist() == [s + c for s, c in zip(start, counts, strict=True)]

    # Segments start aligned, in expert order, and never overlap.
    end = 0
    for e in range(num_experts):
        assert start[e] % alignment == 0 and start[e] >= end
        end = start[e] + counts[e]
    assert layout.num_rows_bound >= end and layout.num_rows_bound % alignment == 0
    assert layout.grouped_layout.shape == (layout.num_rows_bound,)

    # Every valid slot owns a distinct row inside its expert's segment; -1 slots own none.
    expected_layout = [-1] * layout.num_rows_bound
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e, row = int(ids[t, k]), int(layout.dst_row[t, k])
            if e < 0:
                assert row == -1
                continue
            assert start[e] <= row < start[e] + counts[e]
            assert expected_layout[row] == -1, "two slots share a row"
            expected_layout[row] = e
    assert layout.grouped_layout.tolist() == expected_layout


def test_contiguous_layout_no_tokens() -> None:
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    layout = contiguous_layout(ids, 3, 16)
    assert layout.counts.tolist() == [0, 0, 0]
    assert layout.expert_start.tolist() == [0, 0, 0]
    assert layout.num_rows_bound == 0 and layout.grouped_layout.numel() == 0
    assert layout.dst_row.shape == (0, 2)


def test_contiguous_rows_bound_is_tight() -> None:
    # 3 slots on 3 experts with alignment 4 really need 12 rows.
    assert contiguous_rows_bound(3, 3, 4) == 12
    # More experts than slots: only the slots can open segments.
    assert contiguous_rows_bound(2, 64, 128) == 256
    assert contiguous_rows_bound(0, 8, 128) == 0
    assert contiguous_rows_bound(100, 8, 1) == 100


@FEW
@given(routings(), st.integers(0, 3))
def test_masked_layout(routing: tuple[torch.Tensor, int], spare: int) -> None:
    ids, num_experts = routing
    num_tokens = ids.shape[0]
    capacity = max(num_tokens, 1) + spare
    layout = masked_layout(ids, num_experts, capacity)
    # A token takes one row per distinct expert, however often it names that expert.
    tokens_of = [{t for t in range(num_tokens) if e in ids[t].tolist()} for e in range(num_experts)]
    assert layout.counts.tolist() == [len(tokens) for tokens in tokens_of]

    row_of: dict[tuple[int, int], int] = {}
    for t in range(num_tokens):
        for e, row in zip(ids[t].tolist(), layout.dst_row[t].tolist(), strict=True):
            if e < 0:
                assert row == -1
            else:
                assert row_of.setdefault((t, e), row) == row, "repeats of an expert in a token must share its row"
    # Rows of expert e are exactly e*capacity + [0, counts[e]), one per token.
    for e in range(num_experts):
        rows = sorted(row for (_, e2), row in row_of.items() if e2 == e)
        assert rows == list(range(e * capacity, e * capacity + len(tokens_of[e])))


def test_masked_layout_repeated_ids_match_the_loop() -> None:
    # Expert 2 is named by every slot of the first three tokens: 7 slots but 4 tokens, and the
    # capacity is exactly T, so a per-slot layout would overflow and drop slots.
    ids = torch.tensor([[2, 2], [2, 2], [1, 2], [2, -1]], dtype=torch.int32, device=DEVICE)
    num_tokens, top_k = ids.shape
    num_experts = 3
    layout = masked_layout(ids, num_experts, capacity=num_tokens)
    assert layout.counts.tolist() == [0, 1, 4]
    weights = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    x = randn(num_tokens, HIDDEN, dtype=torch.bfloat16, seed=13)
    w13 = randn(num_experts, 2 * INTER, HIDDEN, dtype=torch.bfloat16, seed=14) / 4
    w2 = randn(num_experts, HIDDEN, INTER, dtype=torch.bfloat16, seed=15) / 4
    a = torch.full((num_experts, num_tokens, HIDDEN), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    scatter_rows(x, layout, a)
    h = torch.empty(num_experts, num_tokens, INTER, dtype=torch.bfloat16, device=DEVICE)
    grouped_gemm_masked(a, w13, layout.counts, h, activation=SILU, **SMALL_TILES)
    y = torch.empty(num_experts, num_tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    grouped_gemm_masked(h, w2, layout.counts, y, **SMALL_TILES)
    out = weighted_gather(y, layout, weights, torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE))
    assert_close_rel(out, moe_ref(x, ids, weights, w13, w2), 3e-2)


def test_masked_layout_capacity_below_tokens_raises() -> None:
    ids = distinct_routing(num_tokens=10, top_k=2, num_experts=4, seed=1)
    with pytest.raises(ValueError, match=r"capacity \(4\) must be >= the tokens \(10\): an expert may receive one row"):
        masked_layout(ids, 4, capacity=4)
    layout = masked_layout(ids, 4, capacity=10)
    assert layout.counts.tolist() == histogram(ids, 4)


@FEW
@given(
    routings(),
    st.sampled_from(["contiguous", "masked"]),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.booleans(),
)
def test_scatter_then_gather(
    routing: tuple[torch.Tensor, int], kind: str, dtype: torch.dtype, with_weights: bool
) -> None:
    ids, num_experts = routing
    num_tokens, top_k = ids.shape
    hidden = 24
    x = randn(num_tokens, hidden, dtype=dtype, seed=num_tokens)
    weights = torch.rand(num_tokens, top_k, device=DEVICE) if with_weights else None
    if kind == "contiguous":
        layout = contiguous_layout(ids, num_experts, 4)
        buf = torch.full((layout.num_rows_bound, hidden), SENTINEL, dtype=dtype, device=DEVICE)
    else:
        layout = masked_layout(ids, num_experts, capacity=max(num_tokens * top_k, 1))
        buf = torch.full((num_experts, layout.capacity, hidden), SENTINEL, dtype=dtype, device=DEVICE)
    scatter_rows(x, layout, buf)

    # Scatter follows the slot -> row map and leaves every other row alone.
    rows = buf.view(-1, hidden)
    written = set()
    for t in range(num_tokens):
        for k in range(top_k):
            row = int(layout.dst_row[t, k])
            if row >= 0:
                assert torch.equal(rows[row], x[t])
                written.add(row)
    untouched = [r for r in range(rows.shape[0]) if r not in written]
    assert bool((rows[untouched] == SENTINEL).all())

    out = torch.full((num_tokens, hidden), SENTINEL, dtype=dtype, device=DEVICE)
    weighted_gather(buf, layout, weights, out)
    valid = (ids >= 0).float()
    total = (valid * weights).sum(1) if weights is not None else valid.sum(1)
    expected = (x.float() * total[:, None]).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_gather_sums_rows_in_slot_order() -> None:
    # Arbitrary rows (not produced by scatter) and repeated rows: a direct loop reference.
    y = randn(7, 20)
    dst_row = torch.tensor([[3, -1, 3], [0, 6, 2], [-1, -1, -1]], dtype=torch.int64, device=DEVICE)
    weights = torch.tensor([[0.5, float("nan"), 2.0], [1.0, -1.0, 0.25], [1.0, 1.0, 1.0]], device=DEVICE)
    out = weighted_gather(y, dst_row, weights, torch.empty(3, 20, device=DEVICE))
    expected = torch.zeros(3, 20, device=DEVICE)
    for t in range(3):
        for k in range(3):
            if dst_row[t, k] >= 0:
                expected[t] += weights[t, k] * y[dst_row[t, k]]
    torch.testing.assert_close(out, expected)


def test_empty_batches_launch_nothing() -> None:
    ids = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    layout = contiguous_layout(ids, 2, 16)
    x = torch.empty(0, 16, device=DEVICE)
    scatter_rows(x, layout, torch.empty(0, 16, device=DEVICE))
    out = weighted_gather(torch.empty(0, 16, device=DEVICE), layout, None, torch.empty(0, 16, device=DEVICE))
    assert out.shape == (0, 16)


# ----------------------------------------------------------------------------- activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activate(dtype: torch.dtype) -> None:
    x = randn(5, 2 * 24, dtype=dtype)
    out = activate(x, torch.empty(5, 24, dtype=dtype, device=DEVICE))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), silu_mul_ref(x).to(dtype).float(), rtol=tol, atol=tol)


def test_silu_and_mul_skips_padding_rows_of_grouped_layout() -> None:
    x = randn(6, 16, dtype=torch.bfloat16)
    grouped_layout = torch.tensor([0, -1, 2, -1, -1, 1], dtype=torch.int32, device=DEVICE)
    out = torch.full((6, 8), SENTINEL, dtype=torch.bfloat16, device=DEVICE)
    activate(x, out, grouped_layout=grouped_layout)
    live = grouped_layout >= 0
    torch.testing.assert_close(out[live].float(), silu_mul_ref(x[live]).bfloat16().float(), rtol=1e-2, atol=1e-2)
    assert bool((out[~live] == SENTINEL).all())


def test_silu_and_mul_skips_rows_past_counts() -> None:
    x = randn(3, 4, 2 * 12)
    counts = torch.tensor([0, 3, 4], dtype=torch.int32, device=DEVICE)
    out = torch.full((3, 4, 12), SENTINEL, device=DEVICE)
    activate(x, out, counts=counts)
    for e, count in enumerate(counts.tolist()):
        torch.testing.assert_close(out[e, :count], silu_mul_ref(x[e, :count]))
        assert bool((out[e, count:] == SENTINEL).all())


# ----------------------------------------------------------------------------- grouped GEMM

# K = 40 and N = 2 * 24 are not multiples of the 16-wide test tiles: the tails are exercised.
HIDDEN, INTER = 40, 24


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_contiguous(fuse: bool, dtype: torch.dtype) -> None:
    num_experts = 3
    ids = distinct_routing(num_tokens=8, top_k=2, num_experts=num_experts, seed=2)
    layout = contiguous_layout(ids, num_experts, alignment=16)
    rows = layout.num_rows_bound
    a = randn(rows, HIDDEN, dtype=dtype, seed=3)
    b = randn(num_experts, 2 * INTER, HIDDEN, dtype=dtype, seed=4)
    n_out = INTER if fuse else 2 * INTER
    out = torch.full((rows, n_out), SENTINEL, dtype=dtype, device=DEVICE)
    grouped_gemm_contiguous(
        a, b, layout.grouped_layout, out, activation=SILU if fuse else None, alignment=16, **SMALL_TILES
    )
    for r, e in enumerate(layout.grouped_layout.tolist()):
        if e < 0:
            assert bool((out[r] == SENTINEL).all()), f"padding row {r} was written"
        else:
            expected = expert_mlp_ref(a[r : r + 1], b[e], fuse)[0]
            assert_close_rel(out[r], expected, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_masked(fuse: bool, dtype: torch.dtype) -> None:
    num_experts, rows_per_expert = 3, 6  # 6 rows with 4-row tiles: a partial last tile
    counts = torch.tensor([5, 0, 6], dtype=torch.int32, device=DEVICE)
    a = randn(num_experts, rows_per_expert, HIDDEN, dtype=dtype, seed=5)
    b = randn(num_experts, 2 * INTER, HIDDEN, dtype=dtype, seed=6)
    n_out = INTER if fuse else 2 * INTER
    out = torch.full((num_experts, rows_per_expert, n_out), SENTINEL, dtype=dtype, device=DEVICE)
    grouped_gemm_masked(a, b, counts, out, activation=SILU if fuse else None, block_m=4, block_n=16, block_k=16)
    for e, count in enumerate(counts.tolist()):
        expected = expert_mlp_ref(a[e, :count], b[e], fuse)
        assert_close_rel(out[e, :count], expected, 1e-5 if dtype == torch.float32 else 2e-2)
        assert bool((out[e, count:] == SENTINEL).all()), f"rows past counts[{e}] were written"


@pytest.mark.parametrize("kind", ["contiguous", "masked"])
def test_full_moe_pipeline_matches_reference(kind: str) -> None:
    num_tokens, top_k, num_experts = 7, 2, 4
    ids = distinct_routing(num_tokens, top_k, num_experts, seed=7)
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    x = randn(num_tokens, HIDDEN, dtype=torch.bfloat16, seed=8)
    w13 = randn(num_experts, 2 * INTER, HIDDEN, dtype=torch.bfloat16, seed=9) / 4
    w2 = randn(num_experts, HIDDEN, INTER, dtype=torch.bfloat16, seed=10) / 4
    if kind == "contiguous":
        layout = contiguous_layout(ids, num_experts, alignment=16)
        a = torch.zeros(layout.num_rows_bound, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
        scatter_rows(x, layout, a)
        h = torch.empty(layout.num_rows_bound, INTER, dtype=torch.bfloat16, device=DEVICE)
        grouped_gemm_contiguous(a, w13, layout.grouped_layout, h, activation=SILU, **SMALL_TILES)
        y = torch.empty(layout.num_rows_bound, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
        grouped_gemm_contiguous(h, w2, layout.grouped_layout, y, **SMALL_TILES)
    else:
        layout = masked_layout(ids, num_experts, capacity=num_tokens)
        a = torch.zeros(num_experts, num_tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
        scatter_rows(x, layout, a)
        h = torch.empty(num_experts, num_tokens, INTER, dtype=torch.bfloat16, device=DEVICE)
        grouped_gemm_masked(a, w13, layout.counts, h, activation=SILU, **SMALL_TILES)
        y = torch.empty(num_experts, num_tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
        grouped_gemm_masked(h, w2, layout.counts, y, **SMALL_TILES)
    out = weighted_gather(y, layout, weights, torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device=DEVICE))
    assert_close_rel(out, moe_ref(x, ids, weights, w13, w2), 3e-2)


def test_segments_aligned_to_the_default_tile_run_with_default_tiles() -> None:
    from moe_kernels.kernels.grouped_gemm import BLOCK_M

    ids = distinct_routing(num_tokens=4, top_k=2, num_experts=4, seed=11)
    layout = contiguous_layout(ids, 4, BLOCK_M)
    a = torch.zeros(layout.num_rows_bound, 16, device=DEVICE)
    out = torch.full((layout.num_rows_bound, 8), SENTINEL, device=DEVICE)
    b = torch.ones(4, 8, 16, device=DEVICE)
    grouped_gemm_contiguous(a, b, layout.grouped_layout, out, alignment=layout.alignment)
    live = layout.grouped_layout >= 0
    assert bool((out[live] == 0).all()) and bool((out[~live] == SENTINEL).all())


# ----------------------------------------------------------------------------- validation


def test_bad_inputs_raise_with_argument_names() -> None:
    ids = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="topk_ids.*dtype.*float32"):
        contiguous_layout(ids.float(), 4, 1)
    with pytest.raises(ValueError, match="topk_ids.*2-D"):
        contiguous_layout(ids.flatten(), 4, 16)
    with pytest.raises(ValueError, match="capacity"):
        masked_layout(ids, 4, 0)

    a = torch.zeros(32, 16, dtype=torch.bfloat16, device=DEVICE)
    b = torch.zeros(2, 8, 16, dtype=torch.bfloat16, device=DEVICE)
    layout = torch.zeros(32, dtype=torch.int32, device=DEVICE)
    out = torch.zeros(32, 8, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(TypeError, match=r"b: expected dtype .*bfloat16.* got torch.float32"):
        grouped_gemm_contiguous(a, b.float(), layout, out)
    with pytest.raises(ValueError, match=r"out: expected shape \[32, 4\], got \[32, 8\]"):
        grouped_gemm_contiguous(a, b, layout, out, activation=SILU)
    with pytest.raises(ValueError, match=r"b: expected K = 16"):
        grouped_gemm_contiguous(a, b[..., :8].contiguous(), layout, out)
    with pytest.raises(ValueError, match="a: expected a contiguous"):
        grouped_gemm_contiguous(a.t().contiguous().t(), b, layout, out)
    with pytest.raises(TypeError, match="grouped_layout.*int64"):
        grouped_gemm_contiguous(a, b, layout.long(), out)
    with pytest.raises(ValueError, match="alignment: expected a multiple of block_m = 64, got 32"):
        grouped_gemm_contiguous(a, b, layout, out, alignment=32)
    with pytest.raises(ValueError, match="counts"):
        grouped_gemm_masked(a.view(2, 16, 16), b, layout[:3], out.view(2, 16, 8))

    with pytest.raises(ValueError, match="x: expected shape"):
        activate(torch.zeros(4, 7, device=DEVICE), torch.zeros(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="at most one"):
        activate(a, out, grouped_layout=layout, counts=layout[:2])
    with pytest.raises(ValueError, match=r"dst_row: expected shape \[4, \*\]"):
        scatter_rows(torch.zeros(4, 16, device=DEVICE), torch.zeros(3, 2, dtype=torch.int64, device=DEVICE), a)
    with pytest.raises(TypeError, match="topk_weights"):
        weighted_gather(a, torch.zeros(4, 2, dtype=torch.int64, device=DEVICE), ids, out[:4])
