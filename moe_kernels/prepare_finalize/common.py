"""Small helpers shared by prepare/finalize implementations."""

from __future__ import annotations

import torch


def to_local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global ids ``[T, K]`` -> local ids via ``expert_map [E]`` (global -> local or -1);
    ``-1`` stays ``-1``. Without a map the ids are already local."""
    if expert_map is None:
        return topk_ids
    mapped = expert_map.to(topk_ids.dtype)[topk_ids.clamp(min=0)]
    return torch.where(topk_ids >= 0, mapped, torch.full_like(topk_ids, -1))
