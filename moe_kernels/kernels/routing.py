"""Top-k routing in one launch: router logits ``[T, E]`` -> ``topk_weights [T, K]`` float32 and
``topk_ids [T, K]`` int32, for the routings most models use (softmax or sigmoid scores, an optional
correction bias, grouped selection, renormalization, a scaling factor).

The torch formulation (:func:`moe_kernels.model.router.route`) runs 7-10 small kernels at decode
(upcast, score, top-k, gather, norm, divide, casts); each costs a launch on the host and a
couple of microseconds even inside a CUDA graph, about what the experts' own launches cost at
T = 1. Here each program holds ``BLOCK_T`` tokens' rows of scores in registers and picks the
experts by ``K`` rounds of arg-max, so the whole routing is one launch. Ties go to the lower
expert id (``torch.topk`` leaves their order unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2
from .replicas import choose_replica

#: most score elements a program holds (BLOCK_T x BLOCK_E fp32, plus the choice and a mask)
_TILE_ELEMENTS = 4096


@dataclass(frozen=True)
class FusedRouting:
    """What :func:`fused_route` computes, beside ``top_k``: the subset of
    :class:`moe_kernels.model.router.Routing` the kernel implements.

    Attributes:
        softmax: softmax scores over the E experts; else a sigmoid per expert.
        choose_on_logits: top-k over the logits (+ bias) instead of the scores; weights are scores.
        renormalize: divide the chosen weights by their sum.
        num_groups, topk_group: grouped selection (1 and 1: none): only experts of the best
            ``topk_group`` of ``num_groups`` equal groups may be chosen.
        top2_sum: a group scores the sum of its two best choices; else its best.
        scaling: multiplies the final weights.
    """

    softmax: bool = True
    choose_on_logits: bool = False
    renormalize: bool = True
    num_groups: int = 1
    topk_group: int = 1
    top2_sum: bool = False
    scaling: float = 1.0


@triton.jit
def _group_mask(choice, cols, col_ok, per_group, GROUPS: tl.constexpr, G_PAD: tl.constexpr,
                TOPK_GROUP: tl.constexpr, TOP2_SUM: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """``[BLOCK_T, BLOCK_E]`` true where an expert belongs to one of its token's best groups."""
    group_of = cols // per_group
    gcols = tl.arange(0, G_PAD)
    group_scores = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
    for g in tl.static_range(GROUPS):
        member = tl.where((group_of == g)[None, :] & col_ok[None, :], choice, float("-inf"))
        score = tl.max(member, axis=1)
        if TOP2_SUM:  # the best two members, a repeated best counted twice (as torch.topk does)
            first = tl.argmax(member, axis=1, tie_break_left=True)
            score += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), member), axis=1)
        group_scores = tl.where(gcols[None, :] == g, score[:, None], group_scores)
    keep = tl.zeros(choice.shape, tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.argmax(group_scores, axis=1, tie_break_left=True)
        keep = keep | (group_of[None, :] == best[:, None])
        group_scores = tl.where(gcols[None, :] == best[:, None], float("-inf"), group_scores)
    return keep


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, slot_table_ptr, load_ptr, num_tokens, num_experts, stride_t,
    per_group, scaling, table_width, SLOTS: tl.constexpr, RECORD: tl.constexpr, TOP_K: tl.constexpr,
    K_PAD: tl.constexpr, SOFTMAX: tl.constexpr, CHOOSE_ON_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
    G_PAD: tl.constexpr, TOP2_SUM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok, col_ok = rows < num_tokens, cols < num_experts
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    x = tl.where(col_ok[None, :], x, float("-inf"))  # rows past T stay finite: no NaN from their softmax
    if SOFTMAX:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        e = tl.where(col_ok[None, :], e, 0.0)
        scores = e / tl.sum(e, axis=1)[:, None]
    else:
        scores = tl.sigmoid(x)
    if CHOOSE_ON_LOGITS:
        choice = x
    else:
        choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok[None, :], choice, float("-inf"))
    if GROUPS > 1:
        keep = _group_mask(choice, cols, col_ok, per_group, GROUPS, G_PAD, TOPK_GROUP, TOP2_SUM, BLOCK_T)
        choice = tl.where(keep & col_ok[None, :], choice, float("-inf"))
    kcols = tl.arange(0, K_PAD)
    weights = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        weights = tl.where(kcols[None, :] == k, weight[:, None], weights)
        ids = tl.where(kcols[None, :] == k, best[:, None].to(tl.int32), ids)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORMALIZE:  # the scores are positive: their sum is their 1-norm
        weights = weights / tl.sum(weights, axis=1)[:, None]
    weights = weights * scaling
    out = rows[:, None] * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    if SLOTS:  # each token's replica of each chosen expert
        ids = choose_replica(ids, rows[:, None], slot_table_ptr, table_width, load_ptr, out_ok, RECORD)
    tl.store(weights_ptr + out, weights, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)


def fused_route(
    logits: torch.Tensor,
    top_k: int,
    routing: FusedRouting,
    correction_bias: torch.Tensor | None = None,
    slot_table: torch.Tensor | None = None,
    load: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` (float) -> ``(topk_weights [T, K] float32, topk_ids [T, K] int32)``, best
    choice first, as :func:`moe_kernels.model.router.route` computes them for the same options;
    ``correction_bias [E]`` is added to what experts and groups are chosen on. With a
    ``slot_table`` (``[E]`` or ``[E, L]`` int32, :meth:`~moe_kernels.core.placement.ExpertPlacement.slot_map`)
    the ids are the chosen experts' physical slots, the replica by token index as
    :func:`~moe_kernels.core.placement.map_expert_ids` picks it, each counted in ``load [P]``
    int32 when given: replicas chosen in the same launch. The caller checks the arguments
    (``route`` does); one launch, no host sync."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()  # the kernel reads rows
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(16, _TILE_ELEMENTS // block_e, next_power_of_2(num_tokens)))
    table = slot_table.contiguous() if slot_table is not None else None
    _route_kernel[(cdiv(num_tokens, block_t),)](
        logits, correction_bias if correction_bias is not None else logits, weights, ids,
        table if table is not None else ids, load if load is not None else ids,
        num_tokens, num_experts, logits.stride(0), num_experts // routing.num_groups, float(routing.scaling),
        table.shape[1] if table is not None and table.dim() == 2 else 1,
        SLOTS=table is not None, RECORD=table is not None and load is not None,
        TOP_K=top_k, K_PAD=next_power_of_2(top_k), SOFTMAX=routing.softmax,
        CHOOSE_ON_LOGITS=routing.choose_on_logits, HAS_BIAS=correction_bias is not None,
        RENORMALIZE=routing.renormalize, GROUPS=routing.num_groups, TOPK_GROUP=routing.topk_group,
        G_PAD=next_power_of_2(routing.num_groups), TOP2_SUM=routing.top2_sum,
        BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return weights, ids
