"""A layer's memory, estimated before anything is allocated, and the refusal when it cannot fit.

``FusedMoE`` and ``moe-kernels run`` both ask :func:`layer_memory` and :func:`refusal`, so the
library and the CLI refuse the same layers with the same arithmetic. On a CPU an oversized
layer would otherwise not fail at all: the allocator reserves lazily and the machine swaps or
the process is killed later, far from the cause.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moe_kernels.config import LayerConfig
from moe_kernels.model.router import Router

if TYPE_CHECKING:
    from moe_kernels.selection.select import Selection

log = logging.getLogger("moe_kernels")

#: share of the available memory a layer may not take: the CUDA context, the caching
#: allocator's rounding and other processes need room too. Said in every refusal.
MEMORY_MARGIN = 0.10

#: expert-parallel sizes a refusal suggests, smallest first
EP_SIZES = (2, 4, 8, 16, 32, 64)


class LayerMemoryError(MemoryError):
    """A layer does not fit the memory available; the message gives the arithmetic."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a layer will hold: ``weights`` (router, routed experts of this rank, shared
    experts), ``workspaces`` (the largest of its kernel plan) and ``activations`` (what the
    caller runs on it; 0 for a bare layer)."""

    weights: int
    workspaces: int
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.workspaces + self.activations

    def describe(self) -> str:
        parts = f"weights {format_bytes(self.weights)}"
        if self.workspaces:
            parts += f", workspaces {format_bytes(self.workspaces)}"
        if self.activations:
            parts += f", activations {format_bytes(self.activations)}"
        return f"about {format_bytes(self.total)} ({parts})"

    def ep_share(self, ep_size: int) -> int:
        """Bytes one of ``ep_size`` expert-parallel ranks needs (the weights split, the rest not)."""
        return self.weights // ep_size + self.workspaces + self.activations


def weight_bytes(cfg: LayerConfig) -> int:
    """The layer's parameters as ``FusedMoE`` allocates them, plus the float32 copy of one
    expert that quantizing a checkpoint's expert holds at a time."""
    m, mlp = cfg.moe, cfg.mlp
    router = Router(m, device="meta")  # its tensors' shapes and dtypes, nothing allocated
    total = sum(t.numel() * t.element_size() for t in (*router.parameters(), *router.buffers()))
    total += cfg.num_local_experts * mlp.expert_nbytes()
    if m.num_shared_experts:  # as FusedMoE allocates them: this TP rank's shard, the optional gate
        width = m.shared_width // cfg.parallel.tp_size
        rows = m.shared_act.gemm1_rows(width) + (1 if m.shared_expert_gate else 0)
        total += (rows + width) * m.hidden_size * m.dtype.itemsize
    if mlp.weights.is_quantized:
        total += 3 * m.hidden_size * m.intermediate_size * 4
    return total


def workspace_bytes(cfg: LayerConfig, selection: Selection) -> int:
    """The largest workspace any step of ``selection``'s plan reserves, computed without allocating."""
    from moe_kernels.selection.select import planned_workspace_bytes, with_max_tokens

    most, ctx = 0, selection.ctx
    for choice in selection.steps:
        sized = cfg if choice is selection.steps[-1] else with_max_tokens(cfg, choice.high)
        pair = choice.candidate
        sub = dataclasses.replace(ctx, cfg=sized)  # the same ranks and groups, sized for the step
        most = max(most, planned_workspace_bytes(pair.prepare_finalize, pair.experts, sub))
    return most


def layer_memory(cfg: LayerConfig, selection: Selection | None, activations: int = 0) -> MemoryEstimate:
    """What a layer of ``cfg`` run by ``selection``'s plan holds (no workspaces without one)."""
    workspaces = workspace_bytes(cfg, selection) if selection is not None else 0
    return MemoryEstimate(weight_bytes(cfg), workspaces, activations)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device`` now (None where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def usable_bytes(available: int) -> int:
    """What a layer may take of ``available``: all but :data:`MEMORY_MARGIN`."""
    return int(available * (1 - MEMORY_MARGIN))


def refusal(estimate: MemoryEstimate, device: torch.device, available: int | None) -> str | None:
    """``None`` when ``estimate`` fits ``available`` less the margin, else the sentence saying
    both numbers and the margin: ``needs about 21.4 GiB (...); cpu has 22.7 GiB available,
    of which 10% (2.3 GiB) is kept free, leaving 20.4 GiB``."""
    if available is None:
        return None
    usable = usable_bytes(available)
    if estimate.total <= usable:
        return None
    return (
        f"needs {estimate.describe()}; {device} has {format_bytes(available)} available, of which "
        f"{MEMORY_MARGIN:.0%} ({format_bytes(available - usable)}) is kept free, leaving {format_bytes(usable)}"
    )


def fitting_ep_size(estimate: MemoryEstimate, cfg: LayerConfig, available: int) -> int | None:
    """The smallest expert-parallel size whose per-rank share fits (None: none does, or the
    layer is already split)."""
    if cfg.parallel.ep_size > 1:
        return None
    usable = usable_bytes(available)
    return next((ep for ep in EP_SIZES if cfg.moe.num_experts % ep == 0 and estimate.ep_share(ep) <= usable), None)


def check_layer_fits(cfg: LayerConfig, selection: Selection | None, device: torch.device) -> MemoryEstimate:
    """Raise :class:`LayerMemoryError` when a ``FusedMoE`` of ``cfg`` would not fit ``device``."""
    estimate = layer_memory(cfg, selection)
    available = available_bytes(device)
    log.info("layer %s on %s: %s", cfg.name or "-", device, estimate.describe())
    why = refusal(estimate, device, available)
    if why is None:
        return estimate
    assert available is not None  # refusal() only refuses a known amount
    ep = fitting_ep_size(estimate, cfg, available)
    hint = (
        f"; one rank of parallel.ep_size={ep} (expert parallelism) holds about {format_bytes(estimate.ep_share(ep))}"
        if ep
        else ""
    )
    raise LayerMemoryError(f"FusedMoE({cfg.name or 'layer'}) {why}{hint}")


def format_bytes(n: float) -> str:
    """``1.5 GiB``: binary units, one decimal."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
