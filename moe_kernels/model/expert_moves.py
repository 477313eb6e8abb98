"""Moving a layer's expert weights to a new placement (EPLB): which physical slot of which rank
fills each slot, and the point-to-point exchange that does it.

Every rank computes the same plan from the old and the new placement: a slot whose logical
expert was already on its rank copies it locally; any other slot receives it from the first
rank that held that expert (its first replica). Sends and receives go out as one batch of
``torch.distributed`` point-to-point operations over the expert-parallel group, each message
tagged with its destination slot so that pairs match whatever the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_kernels.core.placement import ExpertPlacement


@dataclass(frozen=True)
class Move:
    """Slot ``dst_slot`` of rank ``dst`` gets the weights in slot ``src_slot`` of rank ``src``."""

    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_moves(old: ExpertPlacement, new: ExpertPlacement) -> list[Move]:
    """Where every slot of ``new`` takes its weights from (a slot of ``old``)."""
    moves = []
    for rank, experts in enumerate(new.rank_experts):
        before = old.rank_experts[rank]
        for slot, e in enumerate(experts):
            if e in before:
                moves.append(Move(rank, before.index(e), rank, slot))
            else:
                first = old.replicas[e][0]
                moves.append(Move(first // old.num_local_experts, first % old.num_local_experts, rank, slot))
    return moves


def move_weights(
    tensors: list[torch.Tensor], old: ExpertPlacement, new: ExpertPlacement, group: dist.ProcessGroup | None
) -> None:
    """Rewrite each ``[P_local, ...]`` tensor of this rank (in place) so that slot ``j`` holds the
    weights of logical expert ``new.local_experts[j]``, receiving from the other ranks of
    ``group`` what this rank did not hold. Every rank of the group must call it with the same
    placements and tensors of the same shapes."""
    me = old.ep_rank
    moves = plan_moves(old, new)
    fresh = [torch.empty_like(t) for t in tensors]
    ops = []
    for move in moves:
        if move.src == me and move.dst == me:
            for t, f in zip(tensors, fresh, strict=True):
                f[move.dst_slot].copy_(t[move.src_slot])
        elif move.src == me or move.dst == me:
            assert group is not None  # a single rank has no other rank to move from
            send = move.src == me
            peer = dist.get_global_rank(group, move.dst if send else move.src)
            for i, (t, f) in enumerate(zip(tensors, fresh, strict=True)):
                tag = (move.dst * new.num_local_experts + move.dst_slot) * len(tensors) + i
                if send:
                    ops.append(dist.P2POp(dist.isend, t[move.src_slot].contiguous(), peer, group, tag))
                else:
                    ops.append(dist.P2POp(dist.irecv, f[move.dst_slot], peer, group, tag))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for t, f in zip(tensors, fresh, strict=True):
        t.copy_(f)
