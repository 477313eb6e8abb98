"""Tensor-parallel shards of the expert MLP's intermediate dimension, as data.

Under tensor parallelism every rank holds every (EP-local) expert with a slice of the
intermediate dimension ``I``: rank ``r`` of ``tp`` holds columns ``[r * I/tp, (r + 1) * I/tp)``
-- the same slice of the gate rows and of the up rows of ``w13`` (not a slice of the stacked
``[2I, H]`` tensor), and the same columns of ``w2``. Each rank computes a partial sum of the
layer output; the partial outputs summed over the tensor-parallel group are the layer output,
because ``w2 @ act(w13 @ x)`` is a sum over the intermediate dimension and a gated activation
pairs gate and up column by column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moe_kernels.mlp.formats import WeightFormat


@dataclass(frozen=True)
class IntermediateShard:
    """Rank ``rank`` of ``size`` holds intermediate columns ``[start, stop)`` of ``total``."""

    total: int
    size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.size <= 0 or not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank ({self.rank}) must be in [0, tp_size ({self.size}))")
        if self.total % self.size:
            raise ValueError(f"intermediate_size ({self.total}) must be divisible by tp_size ({self.size})")

    @property
    def width(self) -> int:
        """``I / tp``: the intermediate width this rank holds."""
        return self.total // self.size

    @property
    def start(self) -> int:
        return self.rank * self.width

    @property
    def stop(self) -> int:
        return self.start + self.width

    @property
    def is_whole(self) -> bool:
        return self.size == 1

    def check_format(self, fmt: WeightFormat, what: str = "intermediate_size") -> None:
        """Raise ``ValueError`` unless the shard's bounds fall on ``fmt``'s shard boundaries
        (gate/up rows and down columns are both cut along the intermediate dimension)."""
        if self.is_whole:
            return
        rows, cols = fmt.shard_multiple
        for multiple in dict.fromkeys((rows, cols)):
            if self.width % multiple:
                raise ValueError(
                    f"{what} ({self.total}) / tp_size ({self.size}) = {self.width} is not a multiple of {multiple} "
                    f"({fmt.describe()}: a shard cannot cut a block)"
                )

    def take(self, fmt: WeightFormat, down: bool, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of one whole projection stored as ``fmt`` (``{"weight": [N, K],
        "scale": ...}``): rows ``[start, stop)`` of a gate or up projection ``[I, H]``, columns of a
        down projection ``[H, I]`` (``down``); scales sliced with their blocks."""
        if self.is_whole:
            return dict(stored)
        if down:
            return {part: t[:, fmt.cols(part, self.start, self.stop)] for part, t in stored.items()}
        return {part: t[fmt.rows(part, self.start, self.stop)] for part, t in stored.items()}

    def describe(self) -> str:
        if self.is_whole:
            return f"I={self.total}"
        return f"I={self.total}, tp rank {self.rank}/{self.size} holds columns {self.start}..{self.stop - 1}"
