"""The CPU stand-in of DeepEP 2.5 (``tests/deep_ep_standin.py``) on 2 and 4 gloo ranks.

Each world size is one launch (process start-up dominates on small CI machines): every rank
installs the stand-in as ``deep_ep``, runs every scenario in the same order (so collectives
pair up) and reports small dicts that the tests below read. Every rank regenerates all ranks'
inputs from a seed, so it can build the single-process reference of what it must receive and
of what its combine must return. Rows inside an expert's segment have no fixed order, so the
layout checks compare sets keyed by (source rank, source token); the rows carry that key in
their first two values, which bf16 holds exactly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from moe_kernels.tools.launcher import run_ranks

E, K, H = 8, 3, 256  # experts, top-k, hidden (combine needs a multiple of 256)
MAX_TOKENS = 16
SF_BLOCK = 128  # fp8 scales: one float32 per 128 values, as DeepEP's reference uses


# --- inputs and the single-process reference -------------------------------------------------


def make_inputs(world: int, routing: str = "random", seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Every rank's ``(x [T, H] bf16, topk_idx [T, K] int64, topk_weights [T, K] float32)``.

    ``x[t, 0]`` is the rank and ``x[t, 1]`` the token index, so a received row names its
    source. ``routing``: "random" (K distinct experts per token), "empty_rank" (rank 1 has no
    tokens), "minus_one" (some lanes -1; token 0 routed nowhere)."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for r in range(world):
        t = 0 if routing == "empty_rank" and r == 1 else 5 + 3 * r
        x = torch.randn(t, H, generator=g)
        x[:, 0] = r
        x[:, 1] = torch.arange(t)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.empty(0, K)
        ids = ids.to(torch.int64)
        if routing == "minus_one" and t:
            ids[1::2, 1] = -1
            ids[0, :] = -1
        weights = torch.rand(t, K, generator=g)
        inputs.append((x.to(torch.bfloat16), ids, weights))
    return inputs


def expert_scale(expert: int) -> float:
    """Each expert multiplies its rows by its own scalar, so the routing shows in the output."""
    return (expert + 1) / 4


def expected_entries(inputs: list[tuple[torch.Tensor, ...]], rank: int, world: int) -> dict[tuple[int, int, int], Any]:
    """``{(source rank, source token, local expert): (x row [H] bf16, weight)}`` that ``rank``
    must receive."""
    local = E // world
    entries = {}
    for s, (x, ids, weights) in enumerate(inputs):
        for t in range(x.shape[0]):
            for k in range(K):
                e = int(ids[t, k]) - rank * local
                if 0 <= e < local:
                    entries[(s, t, e)] = (x[t], float(weights[t, k]))
    return entries


def reference_output(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k bf16(x[t] * scale(id) * w[t, k])`` in float32, over lanes with an id."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                out[t] += (x[t].float() * expert_scale(e) * float(weights[t, k])).to(torch.bfloat16).float()
    return out


# --- what a rank checks ------------------------------------------------------------------------


def segments(handle: Any, alignment: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each local expert's valid rows, from the handle's prefix sums."""
    psum = handle.psum_num_recv_tokens_per_expert.tolist()
    bounds, previous = [], 0
    for end in psum:
        start = -(-previous // alignment) * alignment
        bounds.append((start, end))
        previous = end
    return bounds


def run_experts(recv_x: torch.Tensor, recv_w: torch.Tensor, handle: Any, rank: int, world: int, alignment: int):
    """The experts: each valid row times its expert's scale and its router weight, bf16; every
    other row NaN, so a combine that read one would show it."""
    out = torch.full_like(recv_x, float("nan"))
    local = E // world
    for e, (start, end) in enumerate(segments(handle, alignment)):
        rows = recv_x[start:end].float() * expert_scale(rank * local + e) * recv_w[start:end, None]
        out[start:end] = rows.to(torch.bfloat16)
    return out


def layout_problems(
    recv_x: torch.Tensor,
    recv_w: torch.Tensor,
    handle: Any,
    expected: dict,
    rank: int,
    world: int,
    alignment: int,
    do_cpu_sync: bool,
    zero_padding: bool,
) -> list[str]:
    """Everything the expanded layout promises, checked against ``expected`` entries."""
    problems = []
    local = E // world
    psum, unaligned = handle.psum_num_recv_tokens_per_expert, handle.num_unaligned_recv_tokens_per_expert
    if psum.dtype != torch.int32 or tuple(psum.shape) != (local,):
        problems.append(f"psum is {psum.dtype} {list(psum.shape)}, want int32 [{local}]")
    if recv_w.dim() != 1 or recv_w.shape[0] != recv_x.shape[0] or recv_w.dtype != torch.float32:
        problems.append(f"recv_topk_weights is {recv_w.dtype} {list(recv_w.shape)}, want float32 [rows]")
    counts = [sum(1 for (_, _, e) in expected if e == i) for i in range(local)]
    if unaligned.tolist() != counts:
        problems.append(f"unaligned counts {unaligned.tolist()} != expected {counts}")
    seen, covered = {}, torch.zeros(recv_x.shape[0], dtype=torch.bool)
    for e, (start, end) in enumerate(segments(handle, alignment)):
        if start % alignment or end - start != counts[e]:
            problems.append(f"expert {e}: segment [{start}, {end}) for {counts[e]} rows at alignment {alignment}")
            continue
        for row in range(start, end):
            key = (int(recv_x[row, 0]), int(recv_x[row, 1]), e)
            seen[key] = (recv_x[row], float(recv_w[row]))
        pad_end = -(-end // alignment) * alignment
        pad_x, pad_w = recv_x[end:pad_end].float(), recv_w[end:pad_end]
        if zero_padding and not (bool((pad_x == 0).all()) and bool((pad_w == 0).all())):
            problems.append(f"expert {e}: padding rows [{end}, {pad_end}) are not zero")
        if not zero_padding and not (bool(pad_x.isnan().all()) and bool(pad_w.isnan().all())):
            problems.append(f"expert {e}: padding rows [{end}, {pad_end}) are not the NaN sentinel")
        covered[start:pad_end] = True
    if set(seen) != set(expected):
        problems.append(f"received {sorted(set(seen) ^ set(expected))[:4]} (symmetric difference)")
    else:
        for key, (row, weight) in expected.items():
            if not torch.equal(seen[key][0], row) or seen[key][1] != weight:
                problems.append(f"{key}: row or weight differs from the source")
                break
    tail = recv_x[~covered].float()
    if not bool(tail.isnan().all()):
        problems.append("rows outside every segment are not the NaN sentinel")
    valid_rows = int(covered.sum())
    if do_cpu_sync:
        if recv_x.shape[0] != valid_rows or handle.num_expanded_tokens != valid_rows:
            problems.append(f"{recv_x.shape[0]} rows with a host sync, want exactly {valid_rows}")
        aligned = [-(-c // alignment) * alignment for c in counts]
        if handle.num_recv_tokens_per_expert_list != aligned:
            problems.append(f"num_recv_tokens_per_expert_list {handle.num_recv_tokens_per_expert_list} != {aligned}")
    else:
        worst = world * MAX_TOKENS * min(K, local) + (alignment - 1) * local
        capacity = -(-worst // alignment) * alignment
        if recv_x.shape[0] != capacity or handle.num_expanded_tokens != capacity:
            problems.append(f"{recv_x.shape[0]} rows without a host sync, want the capacity {capacity}")
        if handle.num_recv_tokens_per_expert_list != [] or handle.num_recv_tokens != world * MAX_TOKENS:
            problems.append("without a host sync the handle must not claim exact counts")
    per_source = [len({(s, t) for (s, t, _) in expected if s == src}) for src in range(world)]
    psum_ranks = torch.tensor(per_source).cumsum(0).tolist()
    if handle.psum_num_recv_tokens_per_scaleup_rank.tolist() != psum_ranks:
        problems.append(f"per-rank prefix sum {handle.psum_num_recv_tokens_per_scaleup_rank.tolist()} != {psum_ranks}")
    return problems


def outcome(fn: Callable[[], dict]) -> dict:
    """``fn()``'s report, or what it raised."""
    try:
        return fn()
    except Exception as exc:
        return {"status": "raised", "type": type(exc).__name__, "message": str(exc)}


def raised(fn: Callable[[], Any]) -> dict:
    """What ``fn()`` raised, or ``{"status": "no error"}`` (its result stays on this rank)."""
    return outcome(lambda: (fn(), {"status": "no error"})[1])


def new_buffer(group, **kwargs) -> Any:
    import deep_ep

    num_bytes = deep_ep.EPBuffer.get_buffer_size_hint(group, MAX_TOKENS, H, num_topk=K, use_fp8_dispatch=True)
    return deep_ep.EPBuffer(group, num_bytes=num_bytes, explicitly_destroy=True, **kwargs)


def dispatch(buffer, x, ids, weights, **kwargs):
    kwargs = {"num_max_tokens_per_rank": MAX_TOKENS, "num_sms": 24, "do_expand": True, **kwargs}
    return buffer.dispatch(x, topk_idx=ids, topk_weights=weights, num_experts=E, **kwargs)


# --- scenarios ---------------------------------------------------------------------------------


def roundtrip(group, routing: str, alignment: int, do_cpu_sync: bool, zero_padding: bool) -> dict:
    """dispatch -> the experts -> combine, against the single-process reference."""
    world, rank = group.size(), group.rank()
    inputs = make_inputs(world, routing)
    x, ids, weights = inputs[rank]
    buffer = new_buffer(group)
    recv_x, recv_idx, recv_w, handle, _ = dispatch(
        buffer, x, ids, weights, expert_alignment=alignment, do_cpu_sync=do_cpu_sync, do_zero_padding=zero_padding
    )
    problems = [] if recv_idx is None else ["recv_topk_idx must be None in the expanded layout"]
    problems += layout_problems(
        recv_x, recv_w, handle, expected_entries(inputs, rank, world), rank, world, alignment, do_cpu_sync, zero_padding
    )
    y = run_experts(recv_x, recv_w, handle, rank, world, alignment)
    out, combined_w, _ = buffer.combine(y, handle)
    ref = reference_output(x, ids, weights)
    if combined_w is not None:
        problems.append("combine without topk_weights must return None weights")
    if out.dtype != torch.bfloat16 or tuple(out.shape) != tuple(x.shape):
        problems.append(f"combined {out.dtype} {list(out.shape)}, want bf16 {list(x.shape)}")
    elif not torch.allclose(out.float(), ref, rtol=1.6e-2, atol=1e-2):
        problems.append(f"combine is off the reference by {(out.float() - ref).abs().max().item():.4f}")
    nowhere = (ids < 0).all(dim=1)
    if bool(nowhere.any()) and not bool((out[nowhere] == 0).all()):
        problems.append("a token routed nowhere must combine to zeros")
    buffer.destroy()
    return {"status": "wrong" if problems else "ok", "problems": problems, "tokens": x.shape[0]}


def keyed_rows(recv_x, recv_w, handle, alignment: int) -> dict[tuple[int, int, int], tuple[list[int], float]]:
    """``{(source rank, source token, local expert): (row bytes, weight)}`` of a dispatch."""
    rows = {}
    for e, (start, end) in enumerate(segments(handle, alignment)):
        for row in range(start, end):
            key = (int(recv_x[row, 0]), int(recv_x[row, 1]), e)
            rows[key] = (recv_x[row].view(torch.int16).tolist(), float(recv_w[row]))
    return rows


def sync_vs_no_sync(group) -> dict:
    """The same dispatch with and without a host sync holds the same valid rows."""
    world, rank = group.size(), group.rank()
    x, ids, weights = make_inputs(world, seed=3)[rank]
    buffer = new_buffer(group)
    a = dispatch(buffer, x, ids, weights, expert_alignment=4, do_cpu_sync=True)
    b = dispatch(buffer, x, ids, weights, expert_alignment=4, do_cpu_sync=False)
    same_psum = torch.equal(a[3].psum_num_recv_tokens_per_expert, b[3].psum_num_recv_tokens_per_expert)
    same_rows = keyed_rows(a[0], a[2], a[3], 4) == keyed_rows(b[0], b[2], b[3], 4)
    buffer.destroy()
    ok = same_psum and same_rows and b[0].shape[0] > a[0].shape[0]
    return {"status": "ok" if ok else "wrong", "psum": same_psum, "rows": same_rows}


def row_order(group, deterministic: bool) -> dict:
    """Whether every segment is ordered by (source rank, source token), over a few dispatches."""
    world, rank = group.size(), group.rank()
    buffer = new_buffer(group, deterministic=deterministic)
    all_sorted = True
    for seed in range(3):
        x, ids, weights = make_inputs(world, seed=seed)[rank]
        recv_x, _, _, handle, _ = dispatch(buffer, x, ids, weights)
        for start, end in segments(handle, 1):
            keys = [(int(recv_x[r, 0]), int(recv_x[r, 1])) for r in range(start, end)]
            all_sorted &= keys == sorted(keys)
    buffer.destroy()
    return {"status": "ok", "sorted": all_sorted}


def fp8_dispatch(group, scale_dtype: torch.dtype, col_major: bool, zero_padding: bool) -> dict:
    """fp8 rows and their scales arrive together at the right rows; gaps hold the sentinel or
    zeros."""
    world, rank = group.size(), group.rank()
    inputs = []
    for x, ids, weights in make_inputs(world, seed=5):
        # the first two values stay exact in e4m3 (small integers), so rows still name their source
        fp8 = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
        if scale_dtype == torch.float32:
            scales = torch.arange(x.shape[0] * (H // SF_BLOCK), dtype=torch.float32).view(-1, H // SF_BLOCK) + 0.5
        else:  # four UE8M0 exponents packed in an int32
            scales = torch.arange(x.shape[0], dtype=torch.int32).view(-1, 1) + 0x7F7F7F00
        inputs.append((fp8, scales, ids, weights))
    fp8, scales, ids, weights = inputs[rank]
    buffer = new_buffer(group)
    recv, _, recv_w, handle, _ = dispatch(
        buffer, (fp8, scales), ids, weights, expert_alignment=4, do_zero_padding=zero_padding,
        use_tma_aligned_col_major_sf=col_major,
    )  # fmt: skip
    buffer.destroy()
    if not isinstance(recv, tuple):
        return {"status": "wrong", "problems": ["recv_x must be a (data, scales) tuple"]}
    recv_x, recv_sf = recv
    problems = []
    rows = recv_x.shape[0]
    if recv_x.dtype != torch.float8_e4m3fn or recv_sf.dtype != scale_dtype or recv_sf.shape[0] != rows:
        problems.append(f"got {recv_x.dtype} {list(recv_x.shape)} and {recv_sf.dtype} {list(recv_sf.shape)}")
    want_stride = (1, -(-rows // 4) * 4) if col_major else (recv_sf.shape[1], 1)
    if recv_sf.stride() != want_stride:
        problems.append(f"scale strides {recv_sf.stride()}, want {want_stride}")
    local = E // world
    for e, (start, end) in enumerate(segments(handle, 4)):
        for row in range(start, end):
            s, t = int(recv_x[row, 0].float()), int(recv_x[row, 1].float())
            src_x, src_sf, src_ids, src_w = inputs[s]
            lane = (src_ids[t] == rank * local + e).nonzero().flatten().tolist()
            if not torch.equal(recv_x[row].view(torch.uint8), src_x[t].view(torch.uint8)):
                problems.append(f"row {row}: fp8 bytes differ from source ({s}, {t})")
            if len(lane) != 1 or not torch.equal(recv_sf[row], src_sf[t]) or float(recv_w[row]) != src_w[t, lane[0]]:
                problems.append(f"row {row}: scales or weight differ from source ({s}, {t})")
        gap = recv_sf[end : -(-end // 4) * 4]
        if zero_padding and not bool((gap == 0).all()):
            problems.append(f"expert {e}: padding scales are not zero")
        sentinel = gap.isnan() if scale_dtype == torch.float32 else gap == -1
        if not zero_padding and not bool(sentinel.all()):
            problems.append(f"expert {e}: padding scales are not the sentinel")
    return {"status": "wrong" if problems else "ok", "problems": problems[:4]}


def combine_weights_and_bias(group) -> dict:
    """combine gathers the row weights back per lane (0 for -1 lanes) and adds both biases."""
    world, rank = group.size(), group.rank()
    x, ids, weights = make_inputs(world, "minus_one", seed=7)[rank]
    buffer = new_buffer(group)
    recv_x, _, recv_w, handle, _ = dispatch(buffer, x, ids, weights, expert_alignment=8)
    y = run_experts(recv_x, recv_w, handle, rank, world, 8)
    bias = (torch.full(x.shape, 0.5, dtype=torch.bfloat16), torch.full(x.shape, 2.0, dtype=torch.bfloat16))
    out, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, bias=bias)
    buffer.destroy()
    want_w = torch.where(ids >= 0, weights, torch.zeros_like(weights))
    ref = reference_output(x, ids, weights) + 2.5
    ok_w = combined_w is not None and torch.equal(combined_w, want_w)
    ok_x = torch.allclose(out.float(), ref, rtol=1.6e-2, atol=2e-2)
    return {"status": "ok" if ok_w and ok_x else "wrong", "weights": ok_w, "values": ok_x}


def events(group) -> dict:
    """DeepEP's event conventions: no event unless asynchronous; deferred results come from
    the first wait."""
    world, rank = group.size(), group.rank()
    x, ids, weights = make_inputs(world, seed=9)[rank]
    buffer = new_buffer(group)
    found = {}
    *_, event = dispatch(buffer, x, ids, weights)
    found["sync_wait"] = raised(event.current_stream_wait)
    recv_x, _, recv_w, handle, event = dispatch(buffer, x, ids, weights, async_with_compute_stream=True)
    found["async_wait"] = event.current_stream_wait()
    deferred = dispatch(buffer, x, ids, weights, async_with_compute_stream=True, defer_epilogue=True)
    result = deferred.current_stream_wait()
    found["deferred_dispatch"] = [type(v).__name__ for v in result]
    found["second_wait"] = deferred.current_stream_wait()
    y = run_experts(recv_x, recv_w, handle, rank, world, 1)
    deferred = buffer.combine(y, handle, async_with_compute_stream=True, defer_epilogue=True)
    found["deferred_combine"] = [type(v).__name__ for v in deferred.current_stream_wait()]
    found["defer_without_async"] = raised(lambda: dispatch(buffer, x, ids, weights, defer_epilogue=True))
    buffer.destroy()
    return {"status": "ok", **found}


def refusal(group, case: str) -> dict:
    """One bad call (on every rank, or on rank 0 only): what each rank raises."""
    import deep_ep

    world, rank = group.size(), group.rank()
    x, ids, weights = make_inputs(world, seed=11)[rank]
    buffer = new_buffer(group)
    kwargs: dict[str, Any] = {}
    if case == "int32_ids_on_rank0" and rank == 0:
        ids = ids.to(torch.int32)
    elif case == "too_many_tokens_on_rank0" and rank == 0:
        x, ids, weights = make_inputs(1, seed=11)[0]
        x, ids, weights = (torch.cat([v] * 4)[: MAX_TOKENS + 1] for v in (x, ids, weights))
    elif case == "bf16_weights":
        weights = weights.to(torch.bfloat16)
    elif case == "narrow_weights":
        weights = weights[:, :-1].contiguous()
    elif case == "duplicate_ids":
        ids[0, 1] = ids[0, 0]
    elif case == "id_out_of_range":
        ids[0, 0] = E
    elif case == "hidden_mismatch" and rank == world - 1:
        x = torch.cat([x, x], dim=1)
    elif case == "buffer_too_small":
        buffer.destroy()
        buffer = deep_ep.EPBuffer(group, num_bytes=2 * 1024 * 1024, explicitly_destroy=True)
        kwargs["num_max_tokens_per_rank"] = 4096
    if case.startswith("combine_"):
        recv_x, _, recv_w, handle, _ = dispatch(buffer, x, ids, weights)
        y = run_experts(recv_x, recv_w, handle, rank, world, 1)
        if case == "combine_short_x":
            y = y[:-1].contiguous()
        elif case == "combine_ids_changed":
            ids.add_(0)  # an in-place change the handle must notice
        found = raised(lambda: buffer.combine(y, handle))
    else:
        found = raised(lambda: dispatch(buffer, x, ids, weights, **kwargs))
    buffer.destroy()
    return found


def narrow_hidden_combine(group) -> dict:
    """dispatch takes H=128 (256-byte rows); combine cannot (its vector width needs 256)."""
    world, rank = group.size(), group.rank()
    x, ids, weights = make_inputs(world, seed=13)[rank]
    x = x[:, :128].contiguous()
    buffer = new_buffer(group)
    recv_x, _, _, handle, _ = dispatch(buffer, x, ids, weights)
    found = raised(lambda: buffer.combine(recv_x, handle))
    buffer.destroy()
    return found


def mixed_operations(group) -> dict:
    """Rank 0 dispatches while the others combine: every rank raises instead of hanging."""
    world, rank = group.size(), group.rank()
    x, ids, weights = make_inputs(world, seed=17)[rank]
    buffer = new_buffer(group)
    recv_x, _, recv_w, handle, _ = dispatch(buffer, x, ids, weights)
    if rank == 0:
        found = raised(lambda: dispatch(buffer, x, ids, weights))
    else:
        found = raised(lambda: buffer.combine(run_experts(recv_x, recv_w, handle, rank, world, 1), handle))
    buffer.destroy()
    return found


def lifecycle(group) -> dict:
    """Construction checks, sizing, the SM estimate, statistics and destroy."""
    import deep_ep

    world, rank = group.size(), group.rank()
    found: dict[str, Any] = {"status": "ok"}
    hint = deep_ep.EPBuffer.get_buffer_size_hint(group, MAX_TOKENS, H, num_topk=K)
    bigger = deep_ep.EPBuffer.get_buffer_size_hint(group, 1024 * MAX_TOKENS, H, num_topk=K)
    found["hint"] = (hint, bigger)
    found["odd_num_bytes"] = raised(lambda: deep_ep.EPBuffer(group, num_bytes=hint + 1))
    found["uneven_num_bytes"] = raised(lambda: deep_ep.EPBuffer(group, num_bytes=hint * (1 + rank)))
    # sized from the MoE settings, explicitly_destroy=False
    implicit = deep_ep.EPBuffer(group, num_max_tokens_per_rank=MAX_TOKENS, hidden=H, num_topk=K)
    found["implicit_num_bytes"] = implicit.num_bytes
    found["destroy_implicit"] = raised(implicit.destroy)
    buffer = deep_ep.EPBuffer(group, num_bytes=hint, explicitly_destroy=True)
    found["num_sms"] = buffer.get_theoretical_num_sms(E, K)
    os.environ["DEEP_EP_STANDIN_NVLINK_GBS"] = "0"
    found["num_sms_without_nvlink"] = buffer.get_theoretical_num_sms(E, K)
    from deep_ep.utils.envs import get_nvlink_gbs

    found["nvlink_gbs_without_nvlink"] = get_nvlink_gbs()
    del os.environ["DEEP_EP_STANDIN_NVLINK_GBS"]
    inputs = make_inputs(world, seed=15)
    x, ids, weights = inputs[rank]
    stats = torch.full((E // world,), 10, dtype=torch.int32)
    _, _, _, handle, _ = dispatch(buffer, x, ids, weights, cumulative_local_expert_recv_stats=stats)
    counts = [0] * (E // world)
    for _, _, e in expected_entries(inputs, rank, world):
        counts[e] += 1
    found["stats"] = stats.tolist() == [10 + c for c in counts]
    found["handle_num_sms"] = handle.num_sms
    buffer.destroy()
    buffer.destroy()  # a second destroy does nothing
    found["after_destroy"] = raised(lambda: dispatch(buffer, x, ids, weights))
    return found


def rank_scenarios(group) -> dict:
    """Every scenario on this rank, in the same order on every rank."""
    import deep_ep_standin

    deep_ep_standin.install()
    results: dict[str, dict] = {}

    def record(name: str, fn: Callable[..., dict], *args: Any) -> None:
        results[name] = outcome(lambda: fn(group, *args))

    for do_cpu_sync in (True, False):
        for zero_padding in (False, True):
            for alignment in (1, 8):
                name = f"roundtrip-sync{int(do_cpu_sync)}-pad{int(zero_padding)}-align{alignment}"
                record(name, roundtrip, "random", alignment, do_cpu_sync, zero_padding)
    record("empty_rank", roundtrip, "empty_rank", 4, True, False)
    record("empty_rank_no_sync", roundtrip, "empty_rank", 4, False, True)
    record("minus_one", roundtrip, "minus_one", 8, True, False)
    record("sync_vs_no_sync", sync_vs_no_sync)
    record("order_deterministic", row_order, True)
    record("order_default", row_order, False)
    record("fp8_float_scales", fp8_dispatch, torch.float32, False, False)
    record("fp8_ue8m0_col_major", fp8_dispatch, torch.int32, True, False)
    record("fp8_zero_padding", fp8_dispatch, torch.float32, True, True)
    record("combine_weights_and_bias", combine_weights_and_bias)
    record("events", events)
    for case in REFUSALS:
        record(f"refuse_{case}", refusal, case)
    record("narrow_hidden_combine", narrow_hidden_combine)
    record("mixed_operations", mixed_operations)
    record("lifecycle", lifecycle)
    return results


#: the bad call -> (what the ranks that made it raise, what the others raise, a message fragment)
REFUSALS = {
    "int32_ids_on_rank0": ("HostAssertionError", "UncheckedByDeepEPError", "topk_idx_t"),
    "too_many_tokens_on_rank0": ("HostAssertionError", "UncheckedByDeepEPError", "num_max_tokens_per_rank"),
    "bf16_weights": ("HostAssertionError", None, "float32"),
    "narrow_weights": ("UncheckedByDeepEPError", None, "columns"),
    "duplicate_ids": ("UncheckedByDeepEPError", None, "same expert twice"),
    "id_out_of_range": ("UncheckedByDeepEPError", None, "[-1, 8)"),
    "hidden_mismatch": ("UncheckedByDeepEPError", None, "the ranks disagree (hidden"),
    "buffer_too_small": ("HostAssertionError", None, "dispatch needs"),
    "combine_short_x": ("UncheckedByDeepEPError", None, "rows"),
    "combine_ids_changed": ("AssertionError", None, "must not be modified"),
}


# --- the tests ---------------------------------------------------------------------------------


@functools.cache
def launch(world: int) -> list[dict]:
    # spawned ranks inherit sys.path, so they import this module and the stand-in as pytest did
    return run_ranks(rank_scenarios, world, "gloo", timeout_s=240, collective_timeout_s=60)


def outcomes(world: int, scenario: str) -> list[dict]:
    return [r[scenario] for r in launch(world)]


ROUNDTRIPS = [f"roundtrip-sync{s}-pad{p}-align{a}" for s in (1, 0) for p in (0, 1) for a in (1, 8)] + [
    "empty_rank",
    "empty_rank_no_sync",
    "minus_one",
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", ROUNDTRIPS)
def test_roundtrip_matches_reference_and_layout(world: int, scenario: str):
    for rank, o in enumerate(outcomes(world, scenario)):
        assert o["status"] == "ok", f"rank {rank}: {o}"


@pytest.mark.parametrize("world", [2, 4])
def test_empty_rank_takes_part(world: int):
    assert [o["tokens"] for o in outcomes(world, "empty_rank")][1] == 0


@pytest.mark.parametrize("world", [2, 4])
def test_host_sync_and_capacity_layouts_hold_the_same_rows(world: int):
    for rank, o in enumerate(outcomes(world, "sync_vs_no_sync")):
        assert o["status"] == "ok", f"rank {rank}: {o}"


@pytest.mark.parametrize("world", [2, 4])
def test_row_order_inside_segments(world: int):
    assert all(o["sorted"] for o in outcomes(world, "order_deterministic"))
    # the default order is shuffled: nobody may rely on it
    assert not all(o["sorted"] for o in outcomes(world, "order_default"))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", ["fp8_float_scales", "fp8_ue8m0_col_major", "fp8_zero_padding"])
def test_fp8_rows_and_scales_arrive_together(world: int, scenario: str):
    for rank, o in enumerate(outcomes(world, scenario)):
        assert o["status"] == "ok", f"rank {rank}: {o}"


@pytest.mark.parametrize("world", [2, 4])
def test_combine_gathers_weights_and_adds_bias(world: int):
    for rank, o in enumerate(outcomes(world, "combine_weights_and_bias")):
        assert o["status"] == "ok", f"rank {rank}: {o}"


@pytest.mark.parametrize("world", [2, 4])
def test_event_conventions(world: int):
    for o in outcomes(world, "events"):
        assert o["sync_wait"]["type"] == "AssertionError", o
        assert o["async_wait"] is None and o["second_wait"] is None, o
        assert o["deferred_dispatch"] == ["Tensor", "NoneType", "Tensor", "EPHandle"], o
        assert o["deferred_combine"] == ["Tensor", "NoneType"], o
        assert o["defer_without_async"]["type"] == "HostAssertionError", o


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_calls_raise_on_every_rank(world: int, case: str):
    own, others, fragment = REFUSALS[case]
    for rank, o in enumerate(outcomes(world, f"refuse_{case}")):
        assert o.get("status") == "raised", f"rank {rank}: {o}"
        if others is None or rank == 0:
            assert o["type"] == own and fragment in o["message"], f"rank {rank}: {o}"
        else:
            assert o["type"] == others and "rank 0" in o["message"], f"rank {rank}: {o}"


@pytest.mark.parametrize("world", [2, 4])
def test_combine_needs_hidden_multiple_of_256(world: int):
    for o in outcomes(world, "narrow_hidden_combine"):
        assert o["type"] == "HostAssertionError" and "multiple of 256" in o["message"], o


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_calling_different_operations_raise(world: int):
    for o in outcomes(world, "mixed_operations"):
        assert o["type"] == "UncheckedByDeepEPError" and "different operations" in o["message"], o


@pytest.mark.parametrize("world", [2, 4])
def test_lifecycle(world: int):
    for o in outcomes(world, "lifecycle"):
        hint, bigger = o["hint"]
        assert hint % (2 * 1024 * 1024) == 0 and bigger > hint and o["implicit_num_bytes"] == hint, o
        assert o["odd_num_bytes"]["type"] == "HostAssertionError", o
        assert (
            o["uneven_num_bytes"]["type"] == "UncheckedByDeepEPError"
            and "num_bytes" in o["uneven_num_bytes"]["message"]
        )
        assert o["destroy_implicit"]["type"] == "AssertionError", o
        assert o["num_sms"] % 2 == 0 and 4 <= o["num_sms"] <= 132, o
        assert o["num_sms_without_nvlink"] == 4 and o["nvlink_gbs_without_nvlink"] == 0, o
        assert o["stats"] and o["handle_num_sms"] == 24, o
        assert o["after_destroy"]["type"] == "UncheckedByDeepEPError", o
