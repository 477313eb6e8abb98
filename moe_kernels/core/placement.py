"""Expert placement: which rank holds each global expert, and at which local index.

Fixed when a kernel is built and shared by every part: prepare/finalize moves a token to the
ranks that own its experts, the experts index their weights by local id, the layer loads the
owned experts' checkpoint tensors. It is the only place the ownership rule is written.

Every rank holds the same number of experts (``E_local = E / ep_size``): weights are
``[E_local, ...]`` tensors on every rank and DeepEP requires it. Within that, any assignment is
allowed; :meth:`ExpertPlacement.contiguous` is the default (rank ``r`` holds
``[r * E_local, (r + 1) * E_local)``).
"""

from __future__ import annotations

import functools
import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """``rank_experts[r]`` lists the global ids rank ``r`` holds, in local order; this process
    is rank ``ep_rank``. Build with :meth:`contiguous`, :meth:`from_rank_experts` or
    :meth:`from_owners`; the constructor checks the table."""

    rank_experts: tuple[tuple[int, ...], ...]
    ep_rank: int

    def __post_init__(self) -> None:
        ranks = self.rank_experts
        if not ranks:
            raise ValueError("rank_experts: expected at least one rank, got none")
        per_rank = {len(r) for r in ranks}
        if len(per_rank) != 1 or 0 in per_rank:
            sizes = [len(r) for r in ranks]
            raise ValueError(f"rank_experts: every rank must hold the same number (> 0) of experts, got {sizes}")
        flat = [e for r in ranks for e in r]
        num_experts = len(flat)
        if sorted(flat) != list(range(num_experts)):
            bad = sorted({e for e in flat if not 0 <= e < num_experts})
            dup = sorted({e for e in flat if flat.count(e) > 1})
            raise ValueError(
                f"rank_experts: each of the {num_experts} global experts must be placed exactly once; "
                f"out of range: {bad or 'none'}, placed twice: {dup or 'none'}"
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
    def from_rank_experts(cls, rank_experts: Sequence[Sequence[int]], ep_rank: int) -> ExpertPlacement:
        """From the global ids each rank holds, in local order. An id that is not an integer
        (``2.5``, ``"3"``, ``True``) is a ``TypeError``, not truncated."""
        return cls(tuple(tuple(_expert_id(e, rank) for e in r) for rank, r in enumerate(rank_experts)), ep_rank)

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
    def num_experts(self) -> int:
        return self.ep_size * self.num_local_experts

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The global ids this rank holds, in local order."""
        return self.rank_experts[self.ep_rank]

    @functools.cached_property
    def is_contiguous(self) -> bool:
        return self == ExpertPlacement.contiguous(self.num_experts, self.ep_size, self.ep_rank)

    @functools.cached_property
    def slots(self) -> tuple[int, ...]:
        """For each global expert, ``owner * E_local + local index``: its id under contiguous
        ownership. Mapping ids through this lets a dispatcher that knows only contiguous
        ownership (DeepEP) honour any placement."""
        slot = [0] * self.num_experts
        for rank, experts in enumerate(self.rank_experts):
            for local, e in enumerate(experts):
                slot[e] = rank * self.num_local_experts + local
        return tuple(slot)

    def expert_map(self, device: torch.device | str) -> torch.Tensor:
        """``[E]`` int32: global id -> this rank's local id, ``-1`` for other ranks' experts."""
        table = torch.full((self.num_experts,), -1, dtype=torch.int32)
        for local, e in enumerate(self.local_experts):
            table[e] = local
        return table.to(device)

    def slot_map(self, device: torch.device | str) -> torch.Tensor:
        """``[E]`` int32 :attr:`slots` as a tensor (see there)."""
        return torch.tensor(self.slots, dtype=torch.int32, device=device)

    def fingerprint(self) -> int:
        """A 62-bit digest of the whole table, for checking that every rank built the same one."""
        digest = hashlib.blake2b(repr(self.rank_experts).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2

    def describe(self) -> str:
        mine = self.local_experts
        if self.ep_size == 1 and self.is_contiguous:
            return f"all {self.num_experts} experts on this rank"
        if self.is_contiguous:
            return f"rank {self.ep_rank}/{self.ep_size} holds experts {mine[0]}..{mine[-1]}"
        return f"rank {self.ep_rank}/{self.ep_size} holds experts {list(mine)} (non-contiguous placement)"


def map_expert_ids(topk_ids: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """``topk_ids [T, K]`` looked up in ``table [E]`` (e.g. :meth:`ExpertPlacement.expert_map`
    or :meth:`~ExpertPlacement.slot_map`), ``-1`` kept; ``None`` means the identity. No host sync."""
    if table is None:
        return topk_ids
    mapped = table.to(topk_ids.dtype)[topk_ids.clamp(min=0)]
    return torch.where(topk_ids >= 0, mapped, torch.full_like(topk_ids, -1))


def _expert_id(value: object, rank: int) -> int:
    """``value`` as an expert id: an ``int`` (a NumPy or 0-d integer tensor too), never a bool or
    a float, which ``int()`` would truncate into another expert's id."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | torch.Tensor):
        raise TypeError(f"rank_experts[{rank}]: expert ids must be integers, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point() or value.is_complex()):
        raise TypeError(f"rank_experts[{rank}]: expert ids must be integers, got a {value.dtype} tensor {value!r}")
    return int(value)
