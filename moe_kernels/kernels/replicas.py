"""Expert ids to physical slots in one launch: the replica of each routed id (token index modulo
its replica count, through a repeated table) and, optionally, a count per chosen slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv

BLOCK = 256


@triton.jit
def choose_replica(expert, token, table_ptr, width, load_ptr, routed, RECORD: tl.constexpr):
    """The slots of ``expert`` ids chosen by ``token`` indices (same shape): ``table[e, t % width]``
    (the token's index picks the replica), ``-1`` where not ``routed``; with ``RECORD`` each
    chosen slot counted at ``load_ptr``."""
    slot = tl.load(table_ptr + expert.to(tl.int64) * width + token % width, mask=routed, other=-1)
    if RECORD:
        tl.atomic_add(load_ptr + slot, tl.full(slot.shape, 1, tl.int32), mask=routed)
    return slot


@triton.jit
def _choose_slots_kernel(
    ids_ptr, table_ptr, out_ptr, load_ptr, numel, top_k, width, RECORD: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    expert = tl.load(ids_ptr + offs, mask=inside, other=-1)
    slot = choose_replica(expert, offs // top_k, table_ptr, width, load_ptr, inside & (expert >= 0), RECORD)
    tl.store(out_ptr + offs, slot.to(out_ptr.dtype.element_ty), mask=inside)


def replica_slots(topk_ids: torch.Tensor, table: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
    """``topk_ids [T, K]`` (int32/int64, ``-1`` = none) -> slots of the same shape and dtype:
    ``table[e]`` for a table ``[E]``, ``table[e, t % L]`` for a table ``[E, L]`` int32 of
    replicas; adds one to ``load [P]`` int32 per chosen slot when given. One launch, no host sync."""
    ids = topk_ids.contiguous()
    out = torch.empty_like(ids)
    numel = ids.numel()
    if numel == 0:
        return out
    table = table.contiguous()
    width = table.shape[1] if table.dim() == 2 else 1
    grid = (cdiv(numel, BLOCK),)
    record = load is not None
    _choose_slots_kernel[grid](
        ids, table, out, load if record else out, numel, ids.shape[1], width, RECORD=record, BLOCK=BLOCK
    )
    return out
