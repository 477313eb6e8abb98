"""Expert-parallel load balancing (DeepSeek's EPLB, the global policy, plus a swap refinement):
from each logical expert's measured load, how many replicas it gets and which rank holds each.

Plain host code on lists (it runs between calls, when an engine rebalances):

1. **replicate** -- each logical expert starts with one replica; each redundant replica goes to
   the expert whose load per replica is highest (a token is served by one replica, so a hot
   expert's replicas each carry ``load / count``);
2. **pack** -- replicas, heaviest first, each to the least loaded rank with a free slot that
   does not hold that expert yet (a second copy on one rank balances nothing);
3. **refine** -- swap a replica of the heaviest rank with one of another rank while that lowers
   the heavier of the two, until no swap helps.

:func:`imbalance` is the figure of merit: the heaviest rank's load over the mean.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def replicate(load: Sequence[float], num_redundant: int) -> list[int]:
    """Replica count per logical expert: one each, and ``num_redundant`` more to the experts
    with the highest load per replica."""
    counts = [1] * len(load)
    heap = [(-float(w), e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_redundant):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def pack(load: Sequence[float], counts: Sequence[int], ep_size: int) -> list[list[int]]:
    """Logical ids per rank (``sum(counts) / ep_size`` each): heaviest replica first, to the
    least loaded rank with room that lacks that expert (any rank with room if all hold it)."""
    per_rank = sum(counts) // ep_size
    replicas = sorted(
        ((float(load[e]) / counts[e], e) for e in range(len(load)) for _ in range(counts[e])), key=lambda r: -r[0]
    )
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    rank_load = [0.0] * ep_size
    for weight, e in replicas:
        open_ranks = [r for r in range(ep_size) if len(ranks[r]) < per_rank]
        fresh = [r for r in open_ranks if e not in ranks[r]] or open_ranks
        best = min(fresh, key=lambda r: rank_load[r])
        ranks[best].append(e)
        rank_load[best] += weight
    return ranks


def refine(load: Sequence[float], counts: Sequence[int], ranks: list[list[int]], max_rounds: int = 1000) -> None:
    """Swap replicas between the heaviest rank and another while the heavier of the two gets
    lighter (in place); a swap never puts two copies of an expert on one rank."""
    weight = [float(w) / c for w, c in zip(load, counts, strict=True)]
    totals = [sum(weight[e] for e in r) for r in ranks]
    for _ in range(max_rounds):
        heavy = max(range(len(ranks)), key=lambda r: totals[r])
        best: tuple[float, int, int, int] | None = None
        for other in range(len(ranks)):
            if other == heavy:
                continue
            for i, a in enumerate(ranks[heavy]):
                for j, b in enumerate(ranks[other]):
                    delta = weight[a] - weight[b]
                    if delta <= 0 or (a != b and (a in ranks[other] or b in ranks[heavy])):
                        continue
                    peak = max(totals[heavy] - delta, totals[other] + delta)
                    if peak < totals[heavy] - 1e-9 and (best is None or peak < best[0]):
                        best = (peak, other, i, j)
        if best is None:
            return
        _, other, i, j = best
        a, b = ranks[heavy][i], ranks[other][j]
        ranks[heavy][i], ranks[other][j] = b, a
        delta = weight[a] - weight[b]
        totals[heavy] -= delta
        totals[other] += delta


def balance(load: Sequence[float], num_redundant: int, ep_size: int) -> list[list[int]]:
    """Logical ids per rank for ``len(load) + num_redundant`` physical experts over ``ep_size``
    ranks (replicate, pack, refine)."""
    counts = replicate(load, num_redundant)
    ranks = pack(load, counts, ep_size)
    refine(load, counts, ranks)
    return ranks


def balance_hierarchical(
    load: Sequence[float], num_redundant: int, ep_size: int, num_nodes: int, num_groups: int
) -> list[list[int]]:
    """DeepSeek's hierarchical policy, for group-limited routing on several nodes: the expert
    groups (``num_groups`` of consecutive ids) are packed whole onto nodes by their load, so a
    token's experts stay on few nodes; then each node replicates and packs its own experts over
    its ranks (:func:`balance`). Ranks ``[n * ep_size / num_nodes, ...)`` are node ``n``'s."""
    num_experts = len(load)
    if num_experts % num_groups or num_groups % num_nodes or ep_size % num_nodes or num_redundant % num_nodes:
        raise ValueError(
            f"hierarchical balancing needs num_groups ({num_groups}) to divide the {num_experts} experts, and "
            f"num_nodes ({num_nodes}) to divide num_groups, ep_size ({ep_size}) and the redundant experts "
            f"({num_redundant})"
        )
    size = num_experts // num_groups
    group_load = [sum(load[g * size : (g + 1) * size]) for g in range(num_groups)]
    nodes = pack(group_load, [1] * num_groups, num_nodes)  # each group once: groups per node
    ranks: list[list[int]] = []
    for groups in nodes:
        experts = [g * size + i for g in sorted(groups) for i in range(size)]
        local = balance([load[e] for e in experts], num_redundant // num_nodes, ep_size // num_nodes)
        ranks += [[experts[i] for i in rank] for rank in local]
    return ranks


def imbalance(rank_experts: Sequence[Sequence[int]], load: Sequence[float]) -> float:
    """The heaviest rank's load over the mean rank load, each logical expert's load split evenly
    over its replicas (1.0 is perfect)."""
    counts = [0] * len(load)
    for experts in rank_experts:
        for e in experts:
            counts[e] += 1
    totals = [sum(float(load[e]) / counts[e] for e in experts) for experts in rank_experts]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0
