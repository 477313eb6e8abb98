"""Expert placement: which rank holds each expert, and at which local index.

Fixed when a kernel is built and shared by every part: prepare/finalize moves a token to the
ranks that own its experts, the experts index their weights by local id, the layer loads the
owned experts' checkpoint tensors. It is the only place the ownership rule is written.

Every rank holds the same number of *physical* experts (``P_local``): weights are
``[P_local, ...]`` tensors on every rank and DeepEP requires it. Physical expert ``p`` is local
index ``p % P_local`` of rank ``p // P_local`` (its *slot*). Without redundancy each logical
expert has one physical expert; with ``num_redundant_experts = R`` (DeepSeek's EPLB) there are
``P = E + R`` physical experts and a hot logical expert has several replicas: a token's replica
is its index modulo the replica count, chosen on the device (no host sync).
:meth:`ExpertPlacement.contiguous` is the default (rank ``r`` holds ``[r * E_local, (r + 1) * E_local)``);
:meth:`ExpertPlacement.rebalance` computes a placement from measured per-physical-expert load.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_kernels.core import eplb

#: the widest replica table (columns) :meth:`ExpertPlacement.slot_map` builds
MAX_REPLICA_PERIOD = 1024


@dataclass(frozen=True)
class ExpertPlacement:
    """``rank_experts[r]`` lists the logical (global) ids of the physical experts rank ``r``
    holds, in local order; this process is rank ``ep_rank``; ``num_redundant_experts`` of the
    physical experts are extra replicas. Build with :meth:`contiguous`, :meth:`from_rank_experts`,
    :meth:`from_owners` or :meth:`rebalance`; the constructor checks the table."""

    rank_experts: tuple[tuple[int, ...], ...]
    ep_rank: int
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        ranks = self.rank_experts
        if not ranks:
            raise ValueError("rank_experts: expected at least one rank, got none")
        per_rank = {len(r) for r in ranks}
        if len(per_rank) != 1 or 0 in per_rank:
            sizes = [len(r) for r in ranks]
            raise ValueError(f"rank_experts: every rank must hold the same number (> 0) of experts, got {sizes}")
        flat = [e for r in ranks for e in r]
        redundant = self.num_redundant_experts
        if not 0 <= redundant < len(flat):
            raise ValueError(f"num_redundant_experts must be in [0, {len(flat)}) physical experts, got {redundant}")
        num_experts = len(flat) - redundant
        bad = sorted({e for e in flat if not 0 <= e < num_experts})
        if redundant == 0 and sorted(flat) != list(range(num_experts)):
            dup = sorted({e for e in flat if flat.count(e) > 1})
            raise ValueError(
                f"rank_experts: each of the {num_experts} global experts must be placed exactly once; "
                f"out of range: {bad or 'none'}, placed twice: {dup or 'none'}"
            )
        missing = sorted(set(range(num_experts)) - set(flat))
        if bad or missing:
            raise ValueError(
                f"rank_experts: {len(flat)} physical experts with {redundant} redundant place {num_experts} logical "
                f"experts; out of range: {bad or 'none'}, logical experts without a replica: {missing or 'none'}"
            )
        if not 0 <= self.ep_rank < len(ranks):
            raise ValueError(f"ep_rank must be in [0, {len(ranks)}), got {self.ep_rank}")

    # --- constructors -----------------------------------------------------------------------

    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int = 1, ep_rank: int = 0) -> ExpertPlacement:
        """Rank ``r`` holds experts ``[r * E_local, (r + 1) * E_local)``."""
        if ep_size <= 0 or num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        per = num_experts // ep_size
        return cls(tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ep_size)), ep_rank)

    @classmethod
    def from_rank_experts(
        cls, rank_experts: Sequence[Sequence[int]], ep_rank: int, num_redundant_experts: int = 0
    ) -> ExpertPlacement:
        """From the global ids each rank holds, in local order (a logical id listed more than
        once is replicated: ``num_redundant_experts`` is the number of extra copies). An id that
        is not an integer (``2.5``, ``"3"``, ``True``) is a ``TypeError``, not truncated."""
        experts = tuple(tuple(_expert_id(e, rank) for e in r) for rank, r in enumerate(rank_experts))
        return cls(experts, ep_rank, num_redundant_experts)

    @classmethod
    def redundant(
        cls, num_experts: int, num_redundant_experts: int, ep_size: int = 1, ep_rank: int = 0
    ) -> ExpertPlacement:
        """Logical experts in order over the ranks' first slots, then the first
        ``num_redundant_experts`` logical experts again as replicas (uniform load assumed until
        :meth:`rebalance` is given a measured one)."""
        physical = num_experts + num_redundant_experts
        if ep_size <= 0 or physical % ep_size:
            raise ValueError(
                f"num_experts + num_redundant_experts ({num_experts} + {num_redundant_experts}) must be divisible by "
                f"ep_size ({ep_size})"
            )
        order = list(range(num_experts)) + [e % num_experts for e in range(num_redundant_experts)]
        per = physical // ep_size
        return cls(tuple(tuple(order[r * per : (r + 1) * per]) for r in range(ep_size)), ep_rank, num_redundant_experts)

    @classmethod
    def from_owners(cls, owners: Sequence[int], ep_rank: int) -> ExpertPlacement:
        """From the owning rank of each global expert; each rank's local order is ascending
        global id."""
        owners = [int(o) for o in owners]
        ep_size = max(owners, default=-1) + 1
        if min(owners, default=0) < 0:
            raise ValueError(f"owners: ranks must be >= 0, got {min(owners)}")
        return cls(tuple(tuple(e for e, o in enumerate(owners) if o == r) for r in range(ep_size)), ep_rank)

    # --- what the parts read ---------------------------------------------------------------

    @property
    def ep_size(self) -> int:
        return len(self.rank_experts)

    @property
    def num_local_experts(self) -> int:
        return len(self.rank_experts[0])

    @property
    def num_physical_experts(self) -> int:
        """``P = E + num_redundant_experts``: the expert weights held over all ranks."""
        return self.ep_size * self.num_local_experts

    @property
    def num_experts(self) -> int:
        """The logical experts ``E`` (the router's ids)."""
        return self.num_physical_experts - self.num_redundant_experts

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The logical ids of the physical experts this rank holds, in local order."""
        return self.rank_experts[self.ep_rank]

    @functools.cached_property
    def is_contiguous(self) -> bool:
        return self == ExpertPlacement.contiguous(self.num_experts, self.ep_size, self.ep_rank)

    @functools.cached_property
    def replicas(self) -> tuple[tuple[int, ...], ...]:
        """For each logical expert, the slots (``owner * P_local + local index``) of its
        physical experts, ascending."""
        found: list[list[int]] = [[] for _ in range(self.num_experts)]
        for rank, experts in enumerate(self.rank_experts):
            for local, e in enumerate(experts):
                found[e].append(rank * self.num_local_experts + local)
        return tuple(tuple(r) for r in found)

    @functools.cached_property
    def slots(self) -> tuple[int, ...]:
        """For each global expert, its first replica's slot (``owner * P_local + local index``):
        its id under contiguous ownership. Mapping ids through this lets a dispatcher that
        knows only contiguous ownership (DeepEP) honour any placement."""
        return tuple(r[0] for r in self.replicas)

    def slot_map(self, device: torch.device | str) -> torch.Tensor:
        """int32 logical id -> slot: ``[E]`` (:attr:`slots`) without redundancy, else ``[E, L]``
        with ``L`` the least common multiple of the replica counts and row ``e`` its replicas
        repeated, so that column ``t % L`` is replica ``t % count(e)`` (:func:`map_expert_ids`).
        Counts whose multiple exceeds :data:`MAX_REPLICA_PERIOD` use ``L`` = the largest count
        (still a replica of ``e`` for every token, a little less evenly spread)."""
        if not self.num_redundant_experts:
            return torch.tensor(self.slots, dtype=torch.int32, device=device)
        counts = [len(r) for r in self.replicas]
        width = math.lcm(*counts)
        if width > MAX_REPLICA_PERIOD:
            width = max(counts)
        rows = [[r[j % len(r)] for j in range(width)] for r in self.replicas]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    def expert_map(self, device: torch.device | str) -> torch.Tensor:
        """:meth:`slot_map` with slots as this rank's local ids, ``-1`` for other ranks' experts."""
        return slots_to_local(self.slot_map(device), self)

    def fingerprint(self) -> int:
        """A 62-bit digest of the whole table, for checking that every rank built the same one."""
        table = (self.rank_experts, self.num_redundant_experts)
        digest = hashlib.blake2b(repr(table).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2

    def describe(self) -> str:
        mine = self.local_experts
        if self.ep_size == 1 and self.is_contiguous:
            return f"all {self.num_experts} experts on this rank"
        if self.is_contiguous:
            return f"rank {self.ep_rank}/{self.ep_size} holds experts {mine[0]}..{mine[-1]}"
        if self.num_redundant_experts:
            return (
                f"rank {self.ep_rank}/{self.ep_size} holds experts {list(mine)} ({self.num_physical_experts} physical "
                f"experts for {self.num_experts} logical, {self.num_redundant_experts} redundant)"
            )
        return f"rank {self.ep_rank}/{self.ep_size} holds experts {list(mine)} (non-contiguous placement)"

    # --- load balancing (EPLB) ----------------------------------------------------------------

    def check_same_shape(self, other: ExpertPlacement) -> None:
        """Raise ``ValueError`` unless ``other`` can replace this placement in a built layer:
        the same ranks, this rank, physical experts per rank, logical experts and redundancy."""
        if not isinstance(other, ExpertPlacement):
            raise TypeError(f"placement: expected an ExpertPlacement, got {type(other).__name__}")
        names = ("ep_size", "ep_rank", "num_local_experts", "num_experts", "num_redundant_experts")
        differs = [
            f"{n} {getattr(self, n)} -> {getattr(other, n)}" for n in names if getattr(self, n) != getattr(other, n)
        ]
        if differs:
            raise ValueError(f"placement: a new placement must keep the layer's shape; {', '.join(differs)}")

    def logical_load(self, load: torch.Tensor) -> list[int]:
        """Per-physical-expert token counts ``load [P]`` (int32/int64, any device; one host
        sync) summed per logical expert."""
        if not isinstance(load, torch.Tensor):
            raise TypeError(f"load: expected a torch.Tensor [{self.num_physical_experts}], got {type(load).__name__}")
        if load.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"load must have dtype int32 or int64 (token counts), got {load.dtype}")
        if tuple(load.shape) != (self.num_physical_experts,):
            raise ValueError(
                f"load must have shape [{self.num_physical_experts}] (one count per physical expert), "
                f"got {list(load.shape)}"
            )
        counts = load.tolist()
        per_logical = [0] * self.num_experts
        for e, slots in enumerate(self.replicas):
            per_logical[e] = sum(counts[s] for s in slots)
        return per_logical

    def rebalance(self, load: torch.Tensor, *, num_nodes: int = 1, num_groups: int | None = None) -> ExpertPlacement:
        """A placement of the same shape (ranks, physical experts per rank, redundancy) that
        balances ``load [P]`` (the token counts of each physical expert, summed over the ranks:
        e.g. ``FusedMoE.expert_load`` all-reduced) over the ranks (:func:`moe_kernels.core.eplb.balance`;
        with ``num_nodes > 1`` and the router's ``num_groups``, DeepSeek's hierarchical policy,
        :func:`~moe_kernels.core.eplb.balance_hierarchical`). An expert that stays on a rank keeps
        its slot where it can, so that fewer weights move."""
        per_logical = self.logical_load(load)
        redundant = self.num_redundant_experts
        if num_nodes > 1 and num_groups is not None:
            ranks = eplb.balance_hierarchical(per_logical, redundant, self.ep_size, num_nodes, num_groups)
        else:
            ranks = eplb.balance(per_logical, redundant, self.ep_size)
        kept = [_keep_slots(old, new) for old, new in zip(self.rank_experts, ranks, strict=True)]
        return ExpertPlacement.from_rank_experts(kept, self.ep_rank, self.num_redundant_experts)


def _keep_slots(old: Sequence[int], new: Sequence[int]) -> list[int]:
    """``new``'s experts in an order that leaves each one already in ``old`` at its old index."""
    left = list(new)
    order: list[int | None] = []
    for e in old:
        if e in left:
            left.remove(e)
            order.append(e)
        else:
            order.append(None)
    rest = iter(left)
    return [e if e is not None else next(rest) for e in order]


def map_expert_ids(topk_ids: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """``topk_ids [T, K]`` looked up in ``table`` (e.g. :meth:`ExpertPlacement.expert_map`
    or :meth:`~ExpertPlacement.slot_map`), ``-1`` kept; ``None`` means the identity. A table
    ``[E]`` maps each id; a table ``[E, L]`` of replicas maps id ``e`` of token ``t`` to
    ``table[e, t % L]``. No host sync."""
    if table is None:
        return topk_ids
    ids = topk_ids.clamp(min=0)
    if table.dim() == 1:
        mapped = table.to(topk_ids.dtype)[ids]
    else:
        column = torch.arange(ids.shape[0], device=ids.device) % table.shape[1]
        mapped = table.to(topk_ids.dtype)[ids, column.unsqueeze(1)]
    return torch.where(topk_ids >= 0, mapped, torch.full_like(topk_ids, -1))


def choose_slots(topk_ids: torch.Tensor, table: torch.Tensor | None, load: torch.Tensor | None) -> torch.Tensor:
    """:func:`map_expert_ids`, then :func:`record_load` of the result; on a GPU both in one
    Triton launch (:func:`moe_kernels.kernels.replicas.replica_slots`). No host sync."""
    if table is not None and topk_ids.is_cuda:
        from moe_kernels.kernels.replicas import replica_slots

        return replica_slots(topk_ids, table, load)
    slots = map_expert_ids(topk_ids, table)
    record_load(load, slots)
    return slots


def slots_to_local(slots: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """Slots (any shape, ``-1`` kept) -> this rank's local ids, ``-1`` for other ranks' slots."""
    per = placement.num_local_experts
    mine = (slots >= 0) & (torch.div(slots, per, rounding_mode="floor") == placement.ep_rank)
    return torch.where(mine, slots - placement.ep_rank * per, torch.full_like(slots, -1))


def record_load(load: torch.Tensor | None, slots: torch.Tensor) -> None:
    """Add one to ``load [P]`` int32 for each entry of ``slots`` (``-1`` skipped), on the
    device, without a host sync; ``None`` records nothing."""
    if load is None:
        return
    flat = slots.reshape(-1)
    load.index_add_(0, flat.clamp(min=0).long(), (flat >= 0).to(load.dtype))


def _expert_id(value: object, rank: int) -> int:
    """``value`` as an expert id: an ``int`` (a NumPy or 0-d integer tensor too), never a bool or
    a float, which ``int()`` would truncate into another expert's id."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | torch.Tensor):
        raise TypeError(f"rank_experts[{rank}]: expert ids must be integers, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point() or value.is_complex()):
        raise TypeError(f"rank_experts[{rank}]: expert ids must be integers, got a {value.dtype} tensor {value!r}")
    return int(value)
