"""Pick the fastest valid (prepare/finalize, experts) pair for a layer on a machine, per batch size.

Every registered prepare/finalize is paired with every registered experts class; the
composer's checks decide which pairs are valid (nothing here repeats a capability). At each
token count of a grid, the valid pairs whose workspaces for calls of that size fit the memory
budget compete:

* **measured**: the tuning table of this GPU and layer shape (:mod:`moe_kernels.core.tuning`) gives
  each pair's time; the fastest measured pair wins. A pair the table does not cover never
  outranks a measured one.
* **heuristic** (no table for this GPU or shape): the parts' documented ``preference`` scores,
  asked with the layer limited to that token count.

Without expert parallelism the winners per token range become one
:class:`~moe_kernels.core.compose.TokenRangeKernel` (each member sized for its range); with EP all
ranks must run the same collectives, so one pair is chosen for the largest batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from moe_kernels.config import LayerConfig
from moe_kernels.core import tuning
from moe_kernels.core.compose import (
    Kernel,
    ModularKernel,
    TokenRangeKernel,
    WorkspaceCache,
    check_pair,
    check_tp_agreement,
    layer_context,
    pair_name,
)
from moe_kernels.core.contract import (
    Check,
    LayerContext,
    PermuteExpertsUnpermute,
    PrepareAndFinalize,
    workspace_bytes,
)
from moe_kernels.core.placement import ExpertPlacement
from moe_kernels.core.text import TEXT_WIDTH, wrap_lines

PrepareFinalizeFactory = Callable[[LayerConfig], PrepareAndFinalize]
ExpertsFactory = Callable[[LayerConfig], PermuteExpertsUnpermute]

log = logging.getLogger("moe_kernels")

PartT = TypeVar("PartT")

LAYOUTS_DIFFER = "layout: the prepare/finalize hands out another token layout than the experts take"

#: token counts the heuristic plan is decided at when no table covers the layer
HEURISTIC_GRID = (1, 16, 64, 256, 1024, 4096, 16384)

#: the share of the device memory free when a layer is built that its workspaces may take by
#: default: a policy, not a measurement. A fixed cap does not fit both a 24 GiB card and a
#: 141 GiB H200 (a 4 GiB cap sent DeepSeek-V3 fp8 at T = 16384 to a path 1.8x slower); the
#: workspace cache is shared by all layers of a model, so one layer's share is its peak.
DEFAULT_BUDGET_FRACTION = 0.25


def default_memory_budget(device: torch.device) -> tuple[int, str]:
    """``(bytes, why)``: :data:`DEFAULT_BUDGET_FRACTION` of the memory free on ``device`` now."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    budget = int(DEFAULT_BUDGET_FRACTION * free)
    return budget, f"{DEFAULT_BUDGET_FRACTION:.0%} of the {free / 2**30:.1f} GiB free on {device} at build"


def with_max_tokens(cfg: LayerConfig, max_tokens: int) -> LayerConfig:
    """``cfg`` sized for at most ``max_tokens`` tokens per call."""
    parallel = cfg.parallel.model_copy(update={"max_tokens_per_rank": max_tokens})
    return cfg.model_copy(update={"parallel": parallel})


def planned_workspace_bytes(pf: PrepareAndFinalize, experts: PermuteExpertsUnpermute, ctx: LayerContext) -> int:
    """What composing the pair for ``ctx`` would reserve, computed without allocating."""
    fmt = experts.input_format(ctx)
    rows = pf.max_expert_rows(ctx, fmt)
    return workspace_bytes(pf.workspace_specs(ctx, fmt)) + workspace_bytes(experts.max_workspace_specs(ctx, rows))


@dataclass(frozen=True)
class Candidate:
    """One pair, its checks and its measured times (``{T: us}``, empty when not measured)."""

    prepare_finalize: PrepareAndFinalize
    experts: PermuteExpertsUnpermute
    checks: list[Check]
    times: dict[int, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return pair_name(self.prepare_finalize, self.experts)

    @property
    def valid(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@dataclass(frozen=True)
class Choice:
    """The pair chosen for token counts up to ``high`` (from the previous choice's ``high``)
    and why, one reason per grid point it won."""

    high: int
    candidate: Candidate
    reasons: tuple[str, ...]

    @property
    def why(self) -> str:
        return ", ".join(dict.fromkeys(self.reasons))  # in order, repeats once


@dataclass
class Selection:
    """The outcome of :func:`select`: ``kernel`` is the plan, composed; ``explain()`` says why."""

    ctx: LayerContext
    candidates: list[Candidate]
    steps: list[Choice]
    decided_by: str
    budget: int
    budget_why: str = "given"
    workspace_cache: WorkspaceCache | None = None
    #: pair name -> why it was left out of the larger steps (its workspaces over the budget)
    over_budget: dict[str, str] = field(default_factory=dict)

    @property
    def plan(self) -> list[Choice]:
        """The steps with consecutive wins of one pair merged (what ``explain`` shows)."""
        return _merge(self.steps)

    @property
    def cfg(self) -> LayerConfig:
        return self.ctx.cfg

    @property
    def best(self) -> Candidate:
        """The pair chosen for the largest batch."""
        if not self.plan:
            raise RuntimeError(f"no registered pair can run this layer on {self.ctx.device}:\n{self.explain()}")
        return self.plan[-1].candidate

    @functools.cached_property
    def kernel(self) -> Kernel:
        best = self.best  # raises when nothing is valid
        if len(self.plan) == 1:
            return ModularKernel(best.prepare_finalize, best.experts, self.ctx, self.workspace_cache)
        # one member per grid step, sized for its step's largest T: exactly what was measured
        # there (a masked layout's capacity, for one, costs time even when its rows are empty)
        ranges = []
        for i, choice in enumerate(self.steps):
            last = i == len(self.steps) - 1
            ctx = self.ctx if last else step_context(self.ctx, choice.high)
            pf, ex = choice.candidate.prepare_finalize, choice.candidate.experts
            # each range binds its own instances: a part's bound state is per kernel
            kernel = ModularKernel(_fresh(pf), _fresh(ex), ctx, self.workspace_cache)
            ranges.append((choice.high, kernel))
        return TokenRangeKernel(ranges)

    def explain(self, verbose: bool = False, width: int | None = TEXT_WIDTH) -> str:
        """The plan, then every valid pair with its measured times, then the refused pairs
        grouped by reason (``verbose``: every pair with every failed check); lines wrapped to
        ``width`` columns (``None``: one line per item, for searching)."""
        m, par = self.cfg.moe, self.cfg.parallel
        lines = [
            f"layer: E={m.num_experts} top_k={m.top_k} H={m.hidden_size} I={m.intermediate_size} "
            f"{str(m.dtype).removeprefix('torch.')} {self.cfg.quant.scheme}, ep_size={par.ep_size}, "
            f"max_tokens_per_rank={par.max_tokens_per_rank}, device={self.ctx.device}",
            f"decided by: {self.decided_by}",
            f"memory budget for workspaces: {self.budget / 2**20:.0f} MiB ({self.budget_why})",
        ]
        low = 1
        plan = self.plan
        for i, choice in enumerate(plan):
            span = f"T={low}..{choice.high}" if i < len(plan) - 1 else f"T>={low}"
            lines.append(f"  CHOSEN {span}: {choice.candidate.name}  ({choice.why})")
            low = choice.high + 1
        valid = [c for c in self.candidates if c.valid]
        if valid:
            lines.append("valid pairs:")
        for c in valid:
            times = ", ".join(f"T={t}: {us:.1f} us" for t, us in sorted(c.times.items())) or "not measured"
            lines.append(f"  {c.name}: {times}")
            if c.name in self.over_budget:
                lines.append(f"    - memory: {self.over_budget[c.name]}")
        refused = [c for c in self.candidates if not c.valid]
        if refused:
            lines.append(f"refused ({len(refused)} pairs):")
        if verbose:
            for c in refused:
                lines.append(f"  {c.name}")
                lines.extend(f"    - {f.name}: {f.reason}" for f in c.failures)
        else:
            by_reason: dict[str, list[str]] = {}
            for c in refused:
                first = c.failures[0]
                reason = LAYOUTS_DIFFER if first.name == "layout" else f"{first.name}: {first.reason}"
                by_reason.setdefault(reason, []).append(c.name)
            for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {len(names)} pair{'s' if len(names) > 1 else ''}: {reason}")
            if refused:
                lines.append("  (--verbose / explain(verbose=True) lists every pair and every failed check)")
        text = "\n".join(lines)
        return text if width is None else wrap_lines(text, width)


def _fresh(part: PartT) -> PartT:
    import copy

    return copy.copy(part)


def candidates(
    ctx: LayerContext,
    *,
    prepare_finalize_factories: Sequence[PrepareFinalizeFactory] | None = None,
    experts_factories: Sequence[ExpertsFactory] | None = None,
) -> list[Candidate]:
    """Every registered pair with its checks and its measured times, in registration order."""
    from moe_kernels.selection import registry

    cfg = ctx.cfg
    pfs = [make(cfg) for make in (prepare_finalize_factories or registry.PREPARE_FINALIZE)]
    exs = [make(cfg) for make in (experts_factories or registry.EXPERTS)]
    table = tuning.table_for(ctx.device)
    measured = table.pair_times(tuning.ShapeKey.of(cfg)) if table is not None else {}
    out = []
    for pf in pfs:
        for ex in exs:
            out.append(Candidate(pf, ex, check_pair(pf, ex, ctx), measured.get(pair_name(pf, ex), {})))
    return out


def step_context(ctx: LayerContext, max_tokens: int) -> LayerContext:
    """``ctx`` for the kernel of one grid step: calls of up to ``max_tokens`` tokens."""
    return dataclasses.replace(ctx, cfg=with_max_tokens(ctx.cfg, max_tokens))


def within_budget(
    valid: list[Candidate], ctx: LayerContext, budget: int, grid: list[int]
) -> tuple[dict[int, list[Candidate]], dict[str, str]]:
    """The pairs whose workspaces, sized for each step, fit the budget; and for the others, from
    which step on they do not and why."""
    fits: dict[int, list[Candidate]] = {}
    over: dict[str, str] = {}
    for t in grid:
        fits[t] = []
        for c in valid:
            need = planned_workspace_bytes(c.prepare_finalize, c.experts, step_context(ctx, t))
            if need <= budget:
                fits[t].append(c)
            elif c.name not in over:
                over[c.name] = (
                    f"left out from T={t} on: workspaces {need / 2**20:.0f} MiB, over the budget of "
                    f"{budget / 2**20:.0f} MiB"
                )
    return fits, over


def _plan_measured(fits: dict[int, list[Candidate]], valid: list[Candidate], grid: list[int]) -> list[Choice]:
    plan: list[Choice] = []
    for t in grid:
        timed = [(tuning.point_for(c.times, t), c) for c in fits[t] if c.times]
        if not timed:
            return []
        (point, us), best = min(timed, key=lambda pc: pc[0][1])
        why = f"{us:.1f} us at T={point}"
        (_, fastest_us), fastest = min(
            ((tuning.point_for(c.times, t), c) for c in valid if c.times), key=lambda pc: pc[0][1]
        )
        if fastest is not best:
            why += f"; the memory budget left out {fastest.name} ({fastest_us:.1f} us)"
        plan.append(Choice(t, best, (why,)))
    return plan


def _plan_heuristic(fits: dict[int, list[Candidate]], ctx: LayerContext, grid: list[int]) -> list[Choice]:
    plan: list[Choice] = []
    for t in grid:
        sub = step_context(ctx, t)
        scored = []
        for c in fits[t]:
            pf_score, pf_why = c.prepare_finalize.preference(sub)
            ex_score, ex_why = c.experts.preference(sub)
            scored.append((pf_score + ex_score, f"score {pf_score + ex_score:g}: {pf_why}; {ex_why}", c))
        if not scored:
            return []
        score, why, best = min(scored, key=lambda s: s[0])  # stable: ties keep registration order
        plan.append(Choice(t, best, (why,)))
    return plan


def _merge(plan: list[Choice]) -> list[Choice]:
    """Consecutive grid points won by the same pair become one range."""
    merged: list[Choice] = []
    for choice in plan:
        if merged and merged[-1].candidate is choice.candidate:
            merged[-1] = Choice(choice.high, choice.candidate, merged[-1].reasons + choice.reasons)
        else:
            merged.append(choice)
    return merged


@functools.cache
def _log_once(message: str) -> None:
    """Log a fallback once per process: a model's 60 layers of one shape say it once."""
    log.info(message)


def selection_grid(ctx: LayerContext, valid: list[Candidate]) -> list[int]:
    """The token counts a plan is decided at: every measured one and the heuristic grid, up to the
    layer's largest call, which closes it. Under expert parallelism all ranks must run the same
    collectives: one pair, decided for the largest call."""
    max_tokens = ctx.max_tokens
    if ctx.placement.ep_size > 1:
        return [max_tokens]
    measured = {t for c in valid for t in c.times}
    return sorted({t for t in (*HEURISTIC_GRID, *measured) if t < max_tokens} | {max_tokens})


def _tune_missing(ctx: LayerContext, grid: list[int], tune: bool) -> str:
    """Measure the grid points no table covers (tuning on first use), when allowed; the note
    ``decided_by`` gets."""
    from moe_kernels.selection import autotune

    missing = autotune.missing_points(ctx, grid)
    if not missing:
        return ""
    reason = "tune=False" if not tune else autotune.why_not(ctx)
    if reason is not None:
        key = tuning.ShapeKey.of(ctx.cfg)
        _log_once(f"no measurement covers T={missing} of {key}; not tuning on first use: {reason}")
        return ""
    done = autotune.tune_points(ctx, missing)
    return f"; T={done} tuned on first use" if done else ""


def select(
    cfg: LayerConfig,
    *,
    placement: ExpertPlacement | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    workspace_cache: WorkspaceCache | None = None,
    memory_budget: int | None = None,
    tune: bool = True,
    prepare_finalize_factories: Sequence[PrepareFinalizeFactory] | None = None,
    experts_factories: Sequence[ExpertsFactory] | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> Selection:
    """Rank every registered pair for the layer; ``.kernel`` is the plan, composed, and
    ``.explain()`` says why. Takes the configuration as :func:`~moe_kernels.core.compose.compose`
    does (``tp_group``: the tensor-parallel process group). ``memory_budget``: most workspace
    bytes (default :func:`default_memory_budget`).
    ``tune``: measure the grid points no table covers on first use
    (:mod:`moe_kernels.selection.autotune`; ``MOE_KERNELS_TUNE=0`` turns it off everywhere)."""
    ctx = layer_context(cfg, placement=placement, group=group, device=device, tp_group=tp_group)
    check_tp_agreement(ctx)
    if memory_budget is None:
        budget, budget_why = default_memory_budget(ctx.device)
    else:
        budget, budget_why = memory_budget, "given"
    list_candidates = functools.partial(
        candidates, prepare_finalize_factories=prepare_finalize_factories, experts_factories=experts_factories
    )
    found = list_candidates(ctx)
    valid = [c for c in found if c.valid]
    grid = selection_grid(ctx, valid)
    tuned = _tune_missing(ctx, grid, tune) if valid else ""
    if tuned:
        found = list_candidates(ctx)
        valid = [c for c in found if c.valid]
    table = tuning.table_for(ctx.device)
    fits, over = within_budget(valid, ctx, budget, grid)
    plan: list[Choice] = []
    decided_by = "nothing: no valid pair fits"
    if valid and table is not None and any(c.times for c in valid):
        plan = _plan_measured(fits, valid, grid)
        decided_by = f"measured table {table.path} ({table.gpu}; {table.source}){tuned}"
    if valid and not plan:
        plan = _plan_heuristic(fits, ctx, grid)
        reason = "no tuning table for this GPU" if table is None else f"table {table.path} has no times for this shape"
        decided_by = f"the parts' documented heuristics ({reason})"
        _log_once(f"{tuning.ShapeKey.of(ctx.cfg)}: {decided_by}")
    return Selection(ctx, found, plan, decided_by, budget, budget_why, workspace_cache, over)
