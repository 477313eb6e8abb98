"""The DeepEP prepare/finalize parts on the CPU stand-in of DeepEP 2.5, 2 and 4 gloo ranks.

``moe_kernels.prepare_finalize.deepep`` (both modes) and its buffer management
(``deepep_buffer``) run their real code here on ``tests/deep_ep_standin.py``, installed as
``deep_ep`` in every rank before anything imports it. The composer's checks refuse DeepEP on a
CPU/gloo group, so kernels are built with ``ModularKernel(pf, experts, layer_context(...),
WorkspaceCache())``, which binds the parts without checking them.

Each world size is one launch (process start-up dominates on small CI machines): every rank
runs every scenario in the same order (so collectives pair up) and reports small dicts that the
tests below read. Every rank regenerates all ranks' inputs from a seed, so it can build the
single-process plain-torch reference of its own tokens' output (the whole layer over all
experts) and of the rows each of its experts must receive. The experts are
:class:`ExpandedReferenceExperts`, written here: the EXPANDED contract in plain torch, which
also takes fp8 rows (dequantized) for the fp8 scenarios.

fp8 tolerances. *The dispatched rows*: the part quantizes each token per 128 columns with scale
``s = max(amax, 1e-4) / 448`` and e4m3 keeps 3 mantissa bits, so rounding moves a normal value by
at most half a unit in its last place, ``2^-4`` of itself, and a value in e4m3's subnormal
range (``|x| / s < 2^-6``) by at most half the subnormal spacing, ``2^-10 s``; the received row
dequantizes to within ``2^-4 |x| + 2^-10 s`` of the sent one (``FP8_ROW_SLACK`` doubles the
absolute term for the fp32 rounding of ``s`` and of ``q * s``). *The layer*: the reference loop
runs on the dequantized weights (exactly what the experts multiply) and the unquantized
activations, so the difference is the activations' quantization error: up to ``2^-4`` per
element (about 3.6 % rms), which a dot product over H roughly keeps; two GEMMs, the SiLU and
bf16 rounding follow. As in tests/test_fp8.py we accept ``max|out - ref| <= 0.1 max|ref|``; the
row check above is the sharp one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moe_kernels.core.contract import ExpandedTokens, Layout, PermuteExpertsUnpermute, TokenFormat
from moe_kernels.mlp.formats import Dense, Fp8Block
from moe_kernels.tools.launcher import run_ranks

E, K, H, I = 8, 3, 256, 32  # noqa: E741 (the usual MoE letters; combine needs H % 256 == 0)
FP8_I = 128  # fp8 layers need I % 128 == 0 (one weight block must not straddle gate and up)
GROUP = 128  # columns per activation scale
MAX_TOKENS = 16
BIG_MAX_TOKENS = 4096  # large enough that the stand-in's size hint outgrows the first buffer
REL_TOL = 3e-2  # bf16: max|out - ref| <= REL_TOL * max|ref|
FP8_REL_TOL = 0.1  # fp8 layers against the loop on dequantized weights (module docstring)
FP8_ROW_SLACK = 2**-9  # a dispatched fp8 row: |dequantized - sent| <= 2^-4 |sent| + 2^-9 s
HOT = 5  # the hot expert of the "hot_expert" routing


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


# --- the experts: EXPANDED in plain torch ------------------------------------------------------


class ExpandedReferenceExperts(PermuteExpertsUnpermute):
    """EXPANDED experts in plain torch: for local expert e, rows ``[align_up(expert_ends[e-1],
    A), expert_ends[e])`` of ``tokens.x`` go through the SiLU-gated MLP in fp32 and are scaled by
    their ``row_weights``; every other row of ``out`` is zero (DeepEP's combine sums rows as they
    are). ``A`` is the alignment the tokens say they carry (a multiple of the one asked for here).
    On an fp8 layer its format asks for fp8 rows; it dequantizes them with ``x_scale`` and
    computes on the dequantized weights.

    Each call records what it received (row count, alignment, per expert the count and the
    sorted row weights, and the raw rows, scales and weights of every segment), so the tests can
    compare the dispatch with the global routing and with the tokens that were sent."""

    input_layout = Layout.EXPANDED
    weight_formats = (Dense, Fp8Block)

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.calls: list[dict[str, Any]] = []

    def input_format(self, ctx) -> TokenFormat:
        return TokenFormat(Layout.EXPANDED, alignment=self.alignment, act_quant=ctx.mlp.act_quant)

    def apply(self, tokens, weights, out, workspace) -> None:
        from moe_kernels.mlp.fp8 import dequantize_groups

        if not isinstance(tokens, ExpandedTokens):
            raise TypeError(f"expected ExpandedTokens, got {type(tokens).__name__}")
        a = tokens.alignment
        if a % self.alignment:
            raise ValueError(f"tokens aligned to {a} rows, these experts asked for {self.alignment}")
        rows = tokens.x.shape[0]
        if tuple(out.shape) != tuple(tokens.x.shape) or tuple(tokens.row_weights.shape) != (rows,):
            raise ValueError(
                f"shapes: x {list(tokens.x.shape)}, out {list(out.shape)}, w {list(tokens.row_weights.shape)}"
            )
        ends = tokens.expert_ends.tolist()
        if len(ends) != weights.num_experts:
            raise ValueError(f"{len(ends)} expert ends for {weights.num_experts} local experts")
        inter = weights.inter
        out.zero_()
        scales = tokens.x_scale
        record: dict[str, Any] = {
            "rows": rows,
            "alignment": a,
            "counts": [],
            "weights": [],
            "finite": True,
            "x_dtype": str(tokens.x.dtype),
            "scale_layout": None if scales is None else [list(scales.shape), list(scales.stride()), str(scales.dtype)],
            "segments": [],
        }
        prev = 0
        for e, end in enumerate(ends):
            start = align_up(prev, a)
            prev = end
            if not start <= end <= rows:
                raise ValueError(f"expert {e}: segment [{start}, {end}) outside [0, {rows}]")
            record["counts"].append(end - start)
            record["weights"].append(sorted(tokens.row_weights[start:end].tolist()))
            x, w = tokens.x[start:end], tokens.row_weights[start:end]
            s = None if scales is None else scales[start:end]
            record["segments"].append((x.clone(), None if s is None else s.clone(), w.clone()))
            if end == start:
                continue
            x = x.float() if s is None else dequantize_groups(x, s, GROUP)
            record["finite"] &= bool(x.isfinite().all()) and bool(w.isfinite().all())
            w13, w2 = weights.dequantized(e)
            gate_up = x @ w13.t()
            y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2.t()
            out[start:end] = (y * w[:, None]).to(out.dtype)
        self.calls.append(record)


# --- inputs and the single-process reference -------------------------------------------------


def make_layer(world: int, routing: str, seed: int = 0, *, fp8: bool = False):
    """The same global layer on every rank: all experts' weights and every rank's
    ``(x [T, H] bf16, topk_ids [T, K] (int32 on odd ranks), topk_weights [T, K] float32)``.
    ``fp8``: I = FP8_I, and each 128-column group of a token is scaled by its own power of two
    in ``[2^-3, 2^3]``, so a scale that landed on another row or group would show."""
    g = torch.Generator().manual_seed(seed)
    inter = FP8_I if fp8 else I
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(torch.bfloat16)
    per_rank = []
    for r in range(world):
        t = 5 + 3 * r
        if routing == "empty_rank" and r == 1:
            t = 0
        if routing == "tiny":  # one token or none: a micro-batch of two-batch overlap is empty
            t = (r + 1) % 2
        x = torch.randn(t, H, generator=g)
        if fp8:
            magnitudes = 2.0 ** torch.randint(-3, 4, (t, H // GROUP), generator=g)
            x = x * magnitudes.repeat_interleave(GROUP, dim=1)
        x = x.to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.empty(0, K)
        ids = ids.to(torch.int64)
        if routing == "hot_expert" and t:  # every token of every rank uses expert HOT, plus others
            others = [e for e in range(E) if e != HOT]
            ids = torch.tensor(
                [[HOT] + [others[i] for i in torch.randperm(E - 1, generator=g)[: K - 1]] for _ in range(t)]
            )
        if routing == "minus_one" and t:
            ids[1::2, 1] = -1
            ids[0, :] = -1  # a token routed nowhere: its output is zero
        weights = torch.rand(t, K, generator=g)
        per_rank.append((x, ids.to(torch.int32 if r % 2 else torch.int64), weights))
    return w13, w2, per_rank


def loop_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * w2[e] @ (silu(gate_e @ x[t]) * (up_e @ x[t])) over all E experts, fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            h = w13[e].float() @ x[t].float()
            out[t] += float(topk_weights[t, k]) * (w2[e].float() @ (F.silu(h[:inter]) * h[inter:]))
    return out


def layer_weights(w13, w2, mine: list[int], fp8: bool):
    """This rank's ``ExpertWeights`` of the global ``w13``, ``w2`` and the global weights the
    reference loop runs on: as they are, or (``fp8``) quantized per 128 x 128 block and the
    dequantized values of exactly those blocks."""
    from moe_kernels import ExpertWeights
    from moe_kernels.mlp.fp8 import dequantize_blocks, quantize_blocks

    if not fp8:
        return ExpertWeights(w13[mine].contiguous(), w2[mine].contiguous()), w13, w2
    (q13, s13), (q2, s2) = quantize_blocks(w13), quantize_blocks(w2)
    local = ExpertWeights(q13[mine].contiguous(), q2[mine].contiguous(), s13[mine].contiguous(), s2[mine].contiguous())
    return local, dequantize_blocks(q13, s13), dequantize_blocks(q2, s2)


def expected_rows(per_rank, mine: list[int], spans: list[tuple[int, int]]) -> dict[str, list]:
    """What this rank's experts must receive from one call whose tokens on rank r are
    ``spans[r]``: per local expert (global ``mine[j]``), the count and the sorted row weights."""
    weights: list[list[float]] = [[] for _ in mine]
    for (_, ids, w), (a, b) in zip(per_rank, spans, strict=True):
        for j, g in enumerate(mine):
            weights[j] += w[a:b][ids[a:b].long() == g].tolist()
    return {"counts": [len(ws) for ws in weights], "weights": [sorted(ws) for ws in weights]}


def compare(out: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL) -> dict:
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    bound = rel_tol * ref.abs().max().item() if ref.numel() else 0.0
    finite = bool(out.isfinite().all())
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    return {"max_abs_err": err, "ref_max": ref_max, "bound": bound, "finite": finite, "close": finite and err <= bound}


# --- building kernels on the stand-in ----------------------------------------------------------


def layer_cfg(
    world: int,
    rank: int,
    *,
    hidden: int = H,
    max_tokens: int = MAX_TOKENS,
    tbo: bool = False,
    fp8: bool = False,
    **moe,
):
    from moe_kernels import LayerConfig, MoEConfig, ParallelConfig, QuantConfig

    inter = FP8_I if fp8 else I
    return LayerConfig(
        moe=MoEConfig(num_experts=E, top_k=K, hidden_size=hidden, intermediate_size=inter, dtype=torch.bfloat16, **moe),
        parallel=ParallelConfig(ep_size=world, ep_rank=rank, max_tokens_per_rank=max_tokens, two_batch_overlap=tbo),
        quant=QuantConfig(scheme="fp8_w8a8_block" if fp8 else "none"),
    )


def make_placement(kind: str, world: int, rank: int):
    from moe_kernels.core.placement import ExpertPlacement

    if kind == "contiguous":
        return ExpertPlacement.contiguous(E, world, rank)
    if kind == "reversed_interleaved":  # rank r: experts E-1-r, E-1-r-W, ... (descending, strided)
        return ExpertPlacement.from_rank_experts([list(range(E - 1 - r, -1, -world)) for r in range(world)], rank)
    if kind == "redundant":  # EPLB: 4 more physical experts (12), the hot expert twice among them
        order = [*range(E), HOT, HOT, 0, 1]
        per = len(order) // world
        return ExpertPlacement.from_rank_experts([order[r * per : (r + 1) * per] for r in range(world)], rank, 4)
    raise ValueError(kind)


def make_pf(mode: str, **kwargs):
    from moe_kernels.prepare_finalize.deepep import (
        DeepEPHighThroughputPrepareAndFinalize,
        DeepEPLowLatencyPrepareAndFinalize,
    )

    return {"ht": DeepEPHighThroughputPrepareAndFinalize, "ll": DeepEPLowLatencyPrepareAndFinalize}[mode](**kwargs)


def build(group, cfg, pf, experts, placement, cache=None):
    """A kernel bound without the composer's checks (they refuse DeepEP on a CPU/gloo group)."""
    from moe_kernels.core.compose import ModularKernel, WorkspaceCache, layer_context

    ctx = layer_context(cfg, placement=placement, group=group, device="cpu")
    return ModularKernel(pf, experts, ctx, cache if cache is not None else WorkspaceCache())


def buffer_entry(group):
    from moe_kernels.prepare_finalize import deepep_buffer as epb

    return epb._BUFFERS.get(group)


def release_all_checked(group, kernels) -> dict:
    """Release every kernel; afterwards the group's buffer must be gone and destroyed."""
    entry = buffer_entry(group)
    for kernel in kernels:
        kernel.release()
    return {"buffer_gone": buffer_entry(group) is None, "destroyed": entry is not None and entry.buffer.runtime is None}


# --- the scenarios -------------------------------------------------------------------------------


def run_layer(
    group,
    mode: str,
    routing: str,
    alignment: int,
    placement: str = "contiguous",
    residual: bool = False,
    pf_kwargs: dict | None = None,
    fp8: bool = False,
) -> dict:
    """One kernel, one call, compared with the reference; then released. ``fp8``: an fp8 layer,
    so the part dispatches fp8 rows; the reference loop runs on the dequantized weights."""
    from moe_kernels.backends import deep_ep as deep_ep_backend
    from moe_kernels.core.compose import WorkspaceCache

    world, rank = group.size(), group.rank()
    w13, w2, per_rank = make_layer(world, routing, fp8=fp8)
    x, ids, weights = per_rank[rank]
    placed = make_placement(placement, world, rank)
    mine = list(placed.local_experts)
    local_weights, ref13, ref2 = layer_weights(w13, w2, mine, fp8)
    experts = ExpandedReferenceExperts(alignment)
    cache = WorkspaceCache()
    cfg = layer_cfg(world, rank, fp8=fp8)
    kernel = build(group, cfg, make_pf(mode, **(pf_kwargs or {})), experts, placed, cache)
    tol = FP8_REL_TOL if fp8 else REL_TOL
    try:
        reserved_bytes = cache.nbytes()
        res = None
        if residual:
            res = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + rank)).to(torch.bfloat16)
        out = kernel(x, local_weights, weights, ids, residual=res)
        ref = loop_reference(x, ref13, ref2, weights, ids)
        result: dict[str, Any] = {
            "status": "ok",
            "tokens": x.shape[0],
            "shape": list(out.shape),
            "dtype": str(out.dtype),
        }
        result |= compare(out, ref + (res.float() if res is not None else 0), tol)
        if res is not None:
            # added once: without the residual the same call lands on the reference
            result["without_residual"] = compare(out.float() - res.float(), ref, tol)
        nowhere = (ids < 0).all(dim=1) if x.shape[0] else torch.zeros(0, dtype=torch.bool)
        result["nowhere_rows"] = int(nowhere.sum())
        result["nowhere_zero"] = bool((out[nowhere] == 0).all())
        # what the experts received, against the global routing
        (call,) = experts.calls
        want = expected_rows(per_rank, mine, [(0, p[0].shape[0]) for p in per_rank])
        result["received"] = {k: call[k] for k in ("rows", "alignment", "counts", "finite", "x_dtype", "scale_layout")}
        if fp8:
            result["sent_rows"] = sent_rows_report(call, per_rank, mine)
        result["rows_as_routed"] = call["counts"] == want["counts"] and call["weights"] == want["weights"]
        result["want_counts"] = want["counts"]
        a = call["alignment"]
        if mode == "ht":  # exact: the aligned segments and nothing else
            result["want_rows"] = sum(align_up(c, a) for c in want["counts"])
        else:  # the worst case, what the low-latency workspaces were reserved for
            result["want_rows"] = deep_ep_backend.expanded_capacity_rows(world, MAX_TOKENS, K, len(mine), a)
            local = len(mine)
            result["want_rows_own_formula"] = align_up(world * MAX_TOKENS * min(K, local) + (a - 1) * local, a)
        result["workspace_grew"] = cache.nbytes() > reserved_bytes
        result["local_experts"] = mine
        result["contiguous"] = placed.is_contiguous
    finally:
        released = release_all_checked(group, [kernel])
    result["released"] = released
    return result


def sent_rows_report(call: dict, per_rank, mine: list[int]) -> dict:
    """Every fp8 row this rank's experts received, against the token it was sent from (found by
    its global expert and its router weight, which are unique here): the largest ratio of
    ``|dequantized - sent|`` to its bound (module docstring), and whether rows and scales arrived
    bit for bit as the part's quantizer makes them from that token (they travel as bytes)."""
    from moe_kernels.kernels import quantize_rows
    from moe_kernels.mlp.fp8 import FP8_DTYPE, dequantize_groups

    sent = {}
    for x, ids, w in per_rank:
        q, s = torch.empty(x.shape, dtype=FP8_DTYPE), torch.empty(x.shape[0], H // GROUP)
        quantize_rows(x, q, s, group=GROUP)
        for t in range(x.shape[0]):
            for k in range(K):
                sent[(int(ids[t, k]), float(w[t, k]))] = (x[t].float(), q[t], s[t])
    worst, bit_exact, checked = 0.0, True, 0
    for g, (rows, scales, row_weights) in zip(mine, call["segments"], strict=True):
        got = dequantize_groups(rows, scales, GROUP)
        for i, w in enumerate(row_weights.tolist()):
            x, q, s = sent[(g, w)]
            bound = 2**-4 * x.abs() + FP8_ROW_SLACK * s.repeat_interleave(GROUP)
            worst = max(worst, ((got[i] - x).abs() / bound).max().item())
            bit_exact &= torch.equal(rows[i].view(torch.uint8), q.view(torch.uint8)) and torch.equal(scales[i], s)
            checked += 1
    return {"rows": checked, "worst_error_over_bound": worst, "bit_exact": bit_exact}


def run_two_batch_overlap(group, mode: str, routing: str, placement: str, fp8: bool = False) -> dict:
    """The same call through a serial kernel and a two-batch-overlapped one (both with a
    residual): equal results, and the overlapped kernel dispatched two micro-batches."""
    world, rank = group.size(), group.rank()
    w13, w2, per_rank = make_layer(world, routing, seed=3, fp8=fp8)
    x, ids, weights = per_rank[rank]
    placed = make_placement(placement, world, rank)
    mine = list(placed.local_experts)
    w, ref13, ref2 = layer_weights(w13, w2, mine, fp8)
    tol = FP8_REL_TOL if fp8 else REL_TOL
    res = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + rank)).to(torch.bfloat16)
    serial_experts, tbo_experts = ExpandedReferenceExperts(8), ExpandedReferenceExperts(8)
    serial = build(group, layer_cfg(world, rank, fp8=fp8), make_pf(mode), serial_experts, placed)
    tbo_pf = make_pf(mode)
    dispatched: list[int] = []
    real_prepare_async = tbo_pf.prepare_async

    def recording_prepare_async(x, topk_weights, topk_ids, workspace):
        dispatched.append(x.shape[0])
        return real_prepare_async(x, topk_weights, topk_ids, workspace)

    tbo_pf.prepare_async = recording_prepare_async  # the instance's; the class's code runs
    tbo = build(group, layer_cfg(world, rank, tbo=True, fp8=fp8), tbo_pf, tbo_experts, placed)
    try:
        out_serial = serial(x, w, weights, ids, residual=res)
        out_tbo = tbo(x, w, weights, ids, residual=res)
        ref = loop_reference(x, ref13, ref2, weights, ids) + res.float()
        t = x.shape[0]
        h = (t + 1) // 2
        sizes = [(p[0].shape[0] + 1) // 2 for p in per_rank]
        spans0 = [(0, s) for s in sizes]
        spans1 = [(s, p[0].shape[0]) for s, p in zip(sizes, per_rank, strict=True)]
        received = [[c["counts"], c["weights"]] for c in tbo_experts.calls]
        want = [list(expected_rows(per_rank, mine, spans).values()) for spans in (spans0, spans1)]
        # the composer skips the experts of a micro-batch that received no rows (exact sizes: HT)
        if mode == "ht":
            want = [w for w in want if sum(w[0])]
        result = {
            "status": "ok",
            "tokens": t,
            "serial": compare(out_serial, ref, tol),
            "tbo": compare(out_tbo, ref, tol),
            "tbo_vs_serial": compare(out_tbo, out_serial.float()),
            "dispatched": dispatched,
            "want_dispatched": [h, t - h],
            "micro_batch_rows_as_routed": received == want,
        }
    finally:
        released = release_all_checked(group, [serial, tbo])
    result["released"] = released
    return result


def run_shared_buffer(group) -> dict:
    """Two layers (one per mode) share the group's buffer: one reservation each, both run, the
    buffer outlives the first release (a second release of it changes nothing) and is destroyed
    with the last."""
    from moe_kernels import ExpertWeights

    world, rank = group.size(), group.rank()
    placed = make_placement("contiguous", world, rank)
    mine = list(placed.local_experts)
    first = build(group, layer_cfg(world, rank), make_pf("ht"), ExpandedReferenceExperts(1), placed)
    buffer = buffer_entry(group).buffer
    second = build(group, layer_cfg(world, rank), make_pf("ll"), ExpandedReferenceExperts(8), placed)
    entry = buffer_entry(group)
    result: dict[str, Any] = {"status": "ok", "same_buffer": entry.buffer is buffer, "users": entry.users}
    errors = []
    try:
        for seed, kernel in ((1, first), (2, second), (4, first), (5, second)):
            w13, w2, per_rank = make_layer(world, "random", seed=seed)
            x, ids, weights = per_rank[rank]
            out = kernel(x, ExpertWeights(w13[mine].contiguous(), w2[mine].contiguous()), weights, ids)
            errors.append(compare(out, loop_reference(x, w13, w2, weights, ids)))
        first.release()
        first.release()  # idempotent: must not drop the second layer's reservation
        entry = buffer_entry(group)
        result["after_first_release"] = {
            "alive": entry is not None and entry.buffer is buffer and buffer.runtime is not None,
            "users": entry.users if entry is not None else 0,
        }
        w13, w2, per_rank = make_layer(world, "minus_one", seed=6)
        x, ids, weights = per_rank[rank]
        out = second(x, ExpertWeights(w13[mine].contiguous(), w2[mine].contiguous()), weights, ids)
        errors.append(compare(out, loop_reference(x, w13, w2, weights, ids)))
    finally:
        released = release_all_checked(group, [first, second])
    result["calls"] = errors
    result["released"] = released
    return result


def run_regrown_buffer(group) -> dict:
    """A later layer with more tokens per rank needs a larger buffer: it is replaced (the old one
    destroyed), and the earlier layer keeps working on the new one."""
    from moe_kernels import ExpertWeights

    world, rank = group.size(), group.rank()
    placed = make_placement("contiguous", world, rank)
    mine = list(placed.local_experts)
    small = build(group, layer_cfg(world, rank), make_pf("ht"), ExpandedReferenceExperts(8), placed)
    old = buffer_entry(group).buffer
    big = build(
        group, layer_cfg(world, rank, max_tokens=BIG_MAX_TOKENS), make_pf("ht"), ExpandedReferenceExperts(8), placed
    )
    entry = buffer_entry(group)
    result: dict[str, Any] = {
        "status": "ok",
        "replaced": entry.buffer is not old,
        "old_destroyed": old.runtime is None,
        "grew": entry.num_bytes > old.num_bytes,
        "users": entry.users,
    }
    errors = []
    try:
        for seed, kernel in ((7, small), (8, big)):
            w13, w2, per_rank = make_layer(world, "random", seed=seed)
            x, ids, weights = per_rank[rank]
            out = kernel(x, ExpertWeights(w13[mine].contiguous(), w2[mine].contiguous()), weights, ids)
            errors.append(compare(out, loop_reference(x, w13, w2, weights, ids)))
    finally:
        released = release_all_checked(group, [small, big])
    result["calls"] = errors
    result["released"] = released
    return result


def raised_at_build(group, make: Callable[[], Any]) -> dict:
    try:
        kernel = make()
    except ValueError as exc:
        return {
            "status": "raised",
            "type": type(exc).__name__,
            "message": str(exc),
            "leaked": buffer_entry(group) is not None,
        }
    kernel.release()
    return {"status": "no error"}


def run_mismatch(group, field: str) -> dict:
    """The last rank builds a different layer; building must raise on every rank."""
    world, rank = group.size(), group.rank()
    odd = rank == world - 1
    placement = "reversed_interleaved" if odd and field == "placement" else "contiguous"
    hidden = 2 * H if odd and field == "hidden_size" else H
    mode = "ll" if odd and field == "mode" else "ht"
    fp8 = odd and field == "fp8"  # an fp8 layer: its experts ask for fp8 rows
    placed = make_placement(placement, world, rank)
    cfg = layer_cfg(world, rank, hidden=hidden, fp8=fp8)
    return raised_at_build(group, lambda: build(group, cfg, make_pf(mode), ExpandedReferenceExperts(8), placed))


def run_num_sms_mismatch(group) -> dict:
    """The last rank's NVLink probe fails (the stand-in then reports 0 GB/s), so it settles on
    the fallback SM count while the others use DeepEP's estimate: building must raise on every
    rank. Runs last: it restores the environment and drops whatever the failed build left
    reserved, so that nothing leaks into the rank's teardown."""
    import os

    from deep_ep_standin import NVLINK_ENV

    from moe_kernels.prepare_finalize import deepep_buffer as epb

    world, rank = group.size(), group.rank()
    placed = make_placement("contiguous", world, rank)
    if rank == world - 1:
        os.environ[NVLINK_ENV] = "0"
    try:
        result = raised_at_build(
            group, lambda: build(group, layer_cfg(world, rank), make_pf("ht"), ExpandedReferenceExperts(8), placed)
        )
    finally:
        os.environ.pop(NVLINK_ENV, None)
    entry = buffer_entry(group)
    result["leaked_users"] = entry.users if entry is not None else 0
    while buffer_entry(group) is not None:  # every rank holds the same count: collective destroys pair up
        epb.release(group)
    return result


def run_fused_moe(group, mode: str, placement: str) -> dict:
    """FusedMoE (router, shared expert, per-expert checkpoint tensors) on a DeepEP kernel,
    against a plain loop over the whole layer."""
    from moe_kernels import FusedMoE

    world, rank = group.size(), group.rank()
    g = torch.Generator().manual_seed(11)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    router = (torch.randn(E, H, generator=g) / H**0.5).to(torch.bfloat16)
    shared13 = (torch.randn(2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    shared2 = (torch.randn(H, I, generator=g) / I**0.5).to(torch.bfloat16)
    xs = [torch.randn(5 + 3 * r, H, generator=g).to(torch.bfloat16) for r in range(world)]
    x = xs[rank]
    cfg = layer_cfg(world, rank, num_shared_experts=1, shared_intermediate_size=I)
    placed = make_placement(placement, world, rank)
    kernel = build(group, cfg, make_pf(mode), ExpandedReferenceExperts(8), placed)
    try:
        layer = FusedMoE(cfg, placement=placed, group=group, device="cpu", kernel=kernel)
        layer.load_weights(
            gate_proj={e: w13[e, :I] for e in range(E)},  # every expert: the layer takes its own
            up_proj={e: w13[e, I:] for e in range(E)},
            down_proj={e: w2[e] for e in range(E)},
            router_weight=router,
            shared_gate_proj=shared13[:I],
            shared_up_proj=shared13[I:],
            shared_down_proj=shared2,
        )
        out = layer(x)
        # the reference: softmax top-k routing (renormalized) on the bf16 gate logits, a loop
        scores = F.linear(x, router).float().softmax(dim=-1)
        topk_weights, topk_ids = scores.topk(K, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        gate_up = x.float() @ shared13.float().t()
        shared = (F.silu(gate_up[:, :I]) * gate_up[:, I:]) @ shared2.float().t()
        ref = loop_reference(x, w13, w2, topk_weights, topk_ids) + shared
        result = {"status": "ok", "kernel_is_given": layer.kernel is kernel, **compare(out, ref)}
    finally:
        released = release_all_checked(group, [kernel])
    result["released"] = released
    return result


# --- every scenario on one rank ------------------------------------------------------------------


LAYER_SCENARIOS: dict[str, tuple] = {}
for _mode in ("ht", "ll"):
    LAYER_SCENARIOS |= {
        f"{_mode}_random_a1": (_mode, "random", 1),
        f"{_mode}_random_a8": (_mode, "random", 8),
        f"{_mode}_hot_expert": (_mode, "hot_expert", 8),
        f"{_mode}_minus_one": (_mode, "minus_one", 8),
        f"{_mode}_empty_rank": (_mode, "empty_rank", 8),
        f"{_mode}_placement_reversed_interleaved": (_mode, "minus_one", 8, "reversed_interleaved"),
        f"{_mode}_residual": (_mode, "minus_one", 1, "contiguous", True),
    }
# a pinned alignment coarser than the experts ask for, with DeepEP zeroing the gaps
LAYER_SCENARIOS["ht_pinned_alignment16_zero_padding"] = (
    "ht",
    "random",
    8,
    "contiguous",
    False,
    {"expert_alignment": 16, "zero_padding": True},
)
LAYER_SCENARIOS["ll_pinned_alignment16_zero_padding"] = (
    "ll",
    "empty_rank",
    8,
    "reversed_interleaved",
    True,
    {"expert_alignment": 16, "zero_padding": True},
)

# fp8 layers: the parts quantize and dispatch fp8 rows with their scales (same argument order)
FP8_SCENARIOS: dict[str, tuple] = {}
for _mode in ("ht", "ll"):
    FP8_SCENARIOS |= {
        f"{_mode}_fp8_random_a1": (_mode, "random", 1),
        f"{_mode}_fp8_hot_expert": (_mode, "hot_expert", 8),
        f"{_mode}_fp8_empty_rank": (_mode, "empty_rank", 8),
        f"{_mode}_fp8_placement_reversed_interleaved": (_mode, "minus_one", 8, "reversed_interleaved", True),
    }
# DeepEP zeroes the gaps' rows and scales
FP8_SCENARIOS["ll_fp8_pinned_alignment16_zero_padding"] = (
    "ll",
    "random",
    8,
    "contiguous",
    False,
    {"expert_alignment": 16, "zero_padding": True},
)
EVERY_LAYER_SCENARIO = {**LAYER_SCENARIOS, **FP8_SCENARIOS}

TBO_SCENARIOS = {
    "ht_tbo_random": ("ht", "random", "contiguous"),
    "ll_tbo_random": ("ll", "minus_one", "reversed_interleaved"),
    "ht_tbo_tiny": ("ht", "tiny", "contiguous"),
    "ll_tbo_empty_rank": ("ll", "empty_rank", "contiguous"),
    "ll_fp8_tbo_random": ("ll", "minus_one", "contiguous", True),
    "ht_fp8_tbo_tiny": ("ht", "tiny", "reversed_interleaved", True),
}
MISMATCHES = ("placement", "hidden_size", "mode", "fp8")


def rank_scenarios(group) -> dict:
    """Every scenario on this rank, in the same order on every rank (so collectives pair up)."""
    import deep_ep_standin

    deep_ep_standin.install()  # before anything imports deep_ep (probe_deep_ep is cached per process)
    results: dict[str, dict] = {}

    def record(name: str, fn: Callable[..., dict], *args: Any) -> None:
        try:
            results[name] = fn(group, *args)
        except Exception as exc:  # one scenario failing must not hide the others
            results[name] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}

    from moe_kernels.backends.deep_ep import probe_deep_ep

    module, version = probe_deep_ep()
    results["probe"] = {"status": "ok", "version": version, "is_standin": module is deep_ep_standin}
    for name, args in LAYER_SCENARIOS.items():
        record(name, run_layer, *args)
    for name, args in FP8_SCENARIOS.items():
        record(name, functools.partial(run_layer, fp8=True), *args)
    for name, args in TBO_SCENARIOS.items():
        record(name, run_two_batch_overlap, *args)
    record("shared_buffer", run_shared_buffer)
    record("regrown_buffer", run_regrown_buffer)
    for field in MISMATCHES:
        record(f"mismatch_{field}", run_mismatch, field)
    for mode in ("ht", "ll"):  # replicas: DeepEP routes to physical experts
        record(f"{mode}_redundant", run_layer, mode, "hot_expert", 8, "redundant")
    record("fused_moe_ht", run_fused_moe, "ht", "reversed_interleaved")
    record("fused_moe_ll", run_fused_moe, "ll", "contiguous")
    record("mismatch_num_sms", run_num_sms_mismatch)  # last: see there
    return results


# --- the tests ---------------------------------------------------------------------------------


@functools.cache
def launch(world: int) -> list[dict]:
    # spawned ranks inherit sys.path, so they import this module and the stand-in as pytest did
    return run_ranks(rank_scenarios, world, "gloo", timeout_s=300, collective_timeout_s=60)


def outcomes(world: int, scenario: str) -> list[dict]:
    per_rank = [r[scenario] for r in launch(world)]
    for rank, o in enumerate(per_rank):
        assert o["status"] in ("ok", "raised", "no error"), f"rank {rank}: {o}"
    return per_rank


WORLDS = pytest.mark.parametrize("world", [2, 4])


@WORLDS
def test_the_standin_is_what_the_parts_import(world: int):
    for o in outcomes(world, "probe"):
        assert o["is_standin"] and o["version"] == "2.5.0+cpu-standin", o


@WORLDS
@pytest.mark.parametrize("scenario", list(EVERY_LAYER_SCENARIO))
def test_layer_matches_single_process_reference(world: int, scenario: str):
    """bf16 layers within bf16 rounding; fp8 layers within the activations' quantization error
    of the loop on the dequantized weights (module docstring)."""
    for rank, o in enumerate(outcomes(world, scenario)):
        assert o["close"], f"rank {rank}: {o}"
        assert o["shape"] == [o["tokens"], H] and o["dtype"] == "torch.bfloat16", o


@WORLDS
@pytest.mark.parametrize("scenario", list(EVERY_LAYER_SCENARIO))
def test_experts_receive_exactly_the_routed_rows(world: int, scenario: str):
    """Per local expert: as many rows as the global routing sends it, with exactly those router
    weights; the rows it reads are finite (no padding, no capacity tail)."""
    _, _, alignment, *rest = EVERY_LAYER_SCENARIO[scenario]
    pinned = rest[2].get("expert_alignment") if len(rest) > 2 else None
    for rank, o in enumerate(outcomes(world, scenario)):
        assert o["rows_as_routed"], f"rank {rank}: received {o['received']}, want counts {o['want_counts']}"
        assert o["received"]["finite"], o
        assert o["received"]["alignment"] == (pinned or alignment), o
        assert o["received"]["rows"] == o["want_rows"], o
        if scenario.startswith("ll"):
            assert o["want_rows"] == o["want_rows_own_formula"], o
            # the low-latency mode's workspaces were reserved for its worst case at build
            assert not o["workspace_grew"], o


@WORLDS
@pytest.mark.parametrize("scenario", list(EVERY_LAYER_SCENARIO))
def test_each_scenario_releases_the_buffer(world: int, scenario: str):
    for o in outcomes(world, scenario):
        assert o["released"] == {"buffer_gone": True, "destroyed": True}, o


@WORLDS
@pytest.mark.parametrize("scenario", list(LAYER_SCENARIOS))
def test_bf16_layers_dispatch_bf16(world: int, scenario: str):
    for o in outcomes(world, scenario):
        assert o["received"]["x_dtype"] == "torch.bfloat16" and o["received"]["scale_layout"] is None, o


@WORLDS
@pytest.mark.parametrize("scenario", list(FP8_SCENARIOS))
def test_fp8_dispatch_hands_the_experts_the_sent_tokens_quantized(world: int, scenario: str):
    """The experts get fp8 rows and float32 scales [R, H/128], token-major with a column stride
    of align(R, 4) (what DeepGEMM reads without a transpose), handed over as DeepEP returned
    them. Every received row dequantizes to its sent token within e4m3's rounding bound
    (module docstring), and rows and scales arrive bit for bit as quantized before sending."""
    for rank, o in enumerate(outcomes(world, scenario)):
        rows = o["received"]["rows"]
        assert o["received"]["x_dtype"] == "torch.float8_e4m3fn", f"rank {rank}: {o}"
        assert o["received"]["scale_layout"] == [[rows, H // GROUP], [1, align_up(rows, 4)], "torch.float32"], o
        sent = o["sent_rows"]
        assert sent["rows"] == sum(o["received"]["counts"]) > 0, f"rank {rank}: {sent}"
        assert sent["worst_error_over_bound"] <= 1.0, f"rank {rank}: {sent}"
        assert sent["bit_exact"], f"rank {rank}: {sent}"


@WORLDS
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_token_routed_nowhere_is_zero(world: int, mode: str):
    per_rank = outcomes(world, f"{mode}_minus_one")
    assert all(o["nowhere_rows"] >= 1 for o in per_rank), per_rank
    assert all(o["nowhere_zero"] for o in per_rank), per_rank


@WORLDS
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_empty_rank_gets_empty_output(world: int, mode: str):
    per_rank = outcomes(world, f"{mode}_empty_rank")
    assert per_rank[1]["tokens"] == 0 and per_rank[1]["shape"] == [0, H], per_rank[1]
    assert all(o["tokens"] > 0 for r, o in enumerate(per_rank) if r != 1), per_rank


@WORLDS
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_non_contiguous_placement_is_honoured(world: int, mode: str):
    per_rank = outcomes(world, f"{mode}_placement_reversed_interleaved")
    held = [o["local_experts"] for o in per_rank]
    assert held == [list(range(E - 1 - r, -1, -world)) for r in range(world)], held
    assert not any(o["contiguous"] for o in per_rank), held


@WORLDS
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_redundant_experts_route_to_physical_experts(world: int, mode: str):
    """12 physical experts for 8 logical (the hot one replicated): the output is the layer's,
    and DeepEP saw every token routed to some physical expert (the counts cover all routed ids)."""
    per_rank = outcomes(world, f"{mode}_redundant")
    for rank, o in enumerate(per_rank):
        assert o["close"], f"rank {rank}: {o}"
    assert sum(len(o["local_experts"]) for o in per_rank) == E + 4


@WORLDS
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_residual_is_added_once(world: int, mode: str):
    for o in outcomes(world, f"{mode}_residual"):
        assert o["close"] and o["without_residual"]["close"], o


@WORLDS
@pytest.mark.parametrize("scenario", list(TBO_SCENARIOS))
def test_two_batch_overlap_equals_serial(world: int, scenario: str):
    for rank, o in enumerate(outcomes(world, scenario)):
        assert o["serial"]["close"] and o["tbo"]["close"], f"rank {rank}: {o}"
        # the same rows through the same experts and combine: equal up to bf16 rounding noise
        assert (
            o["tbo_vs_serial"]["finite"] and o["tbo_vs_serial"]["max_abs_err"] <= 1e-2 * o["tbo_vs_serial"]["ref_max"]
        ), o
        assert o["dispatched"] == o["want_dispatched"], f"rank {rank}: {o}"
        assert o["micro_batch_rows_as_routed"], f"rank {rank}: {o}"
        assert o["released"] == {"buffer_gone": True, "destroyed": True}, o


@WORLDS
def test_layers_share_the_groups_buffer(world: int):
    for o in outcomes(world, "shared_buffer"):
        assert o["same_buffer"] and o["users"] == 2, o
        assert o["after_first_release"] == {"alive": True, "users": 1}, o
        assert len(o["calls"]) == 5 and all(c["close"] for c in o["calls"]), o
        assert o["released"] == {"buffer_gone": True, "destroyed": True}, o


@WORLDS
def test_buffer_regrows_for_a_larger_layer(world: int):
    for o in outcomes(world, "regrown_buffer"):
        assert o["replaced"] and o["old_destroyed"] and o["grew"] and o["users"] == 2, o
        assert all(c["close"] for c in o["calls"]), o
        assert o["released"] == {"buffer_gone": True, "destroyed": True}, o


def _raised_on_every_rank(per_rank: list[dict], field: str, world: int, same_message: bool = True) -> None:
    messages = set()
    for rank, o in enumerate(per_rank):
        assert o["status"] == "raised" and o["type"] == "ValueError", f"rank {rank}: {o}"
        msg = o["message"]
        assert f"{field}:" in msg and "the ranks disagree on the layer" in msg, msg
        others = ",".join(str(r) for r in range(world - 1))
        assert f"on rank{'s' if world > 2 else ''} {others}" in msg and f"on rank {world - 1}" in msg, msg
        assert not o["leaked"], f"rank {rank}: a failed build left the buffer reserved"
        messages.add(msg)
    if same_message:
        assert len(messages) == 1, messages


@WORLDS
def test_ranks_with_different_placements_raise_at_build(world: int):
    per_rank = outcomes(world, "mismatch_placement")
    _raised_on_every_rank(per_rank, "expert placement (fingerprint)", world)
    for o in per_rank:  # the placement is all that differs: one problem listed
        assert " | " not in o["message"], o["message"]


@WORLDS
def test_ranks_with_different_hidden_sizes_raise_at_build(world: int):
    _raised_on_every_rank(outcomes(world, "mismatch_hidden_size"), "hidden_size", world)


@WORLDS
def test_ranks_with_different_modes_raise_at_build(world: int):
    # each rank names its own part, so the messages differ only in that prefix
    _raised_on_every_rank(outcomes(world, "mismatch_mode"), "mode (do_cpu_sync)", world, same_message=False)


@WORLDS
def test_ranks_disagreeing_on_fp8_dispatch_raise_at_build(world: int):
    """One rank's layer is fp8 (its experts ask for fp8 rows), the others' bf16: the ranks would
    size their symmetric buffers and rows differently, so every rank refuses at build, before
    any buffer is reserved."""
    per_rank = outcomes(world, "mismatch_fp8")
    _raised_on_every_rank(per_rank, "fp8 dispatch", world)
    for o in per_rank:
        assert "fp8 dispatch: False on rank" in o["message"] and "True on rank" in o["message"], o["message"]
        assert " | " not in o["message"], o["message"]  # nothing else differs


@WORLDS
def test_ranks_with_different_sm_counts_raise_at_build(world: int):
    for rank, o in enumerate(outcomes(world, "mismatch_num_sms")):
        assert o["status"] == "raised" and o["type"] == "ValueError", f"rank {rank}: {o}"
        assert "num_sms:" in o["message"] and f"on rank {world - 1}" in o["message"], o


@WORLDS
def test_a_build_that_fails_the_sm_agreement_leaves_nothing_reserved(world: int):
    for rank, o in enumerate(outcomes(world, "mismatch_num_sms")):
        assert o["leaked_users"] == 0 and not o["leaked"], f"rank {rank}: {o}"


@WORLDS
@pytest.mark.parametrize("mode", ["ht", "ll"])
def test_fused_moe_on_deepep_matches_loop(world: int, mode: str):
    for rank, o in enumerate(outcomes(world, f"fused_moe_{mode}")):
        assert o["kernel_is_given"] and o["close"], f"rank {rank}: {o}"
        assert o["released"] == {"buffer_gone": True, "destroyed": True}, o
