"""Pick the best valid (prepare/finalize, experts) pair for a layer on a machine.

Every registered prepare/finalize is paired with every registered experts class; the
composer's checks decide which pairs are valid, and each valid pair is ranked by the parts'
own ``preference`` (lower is better; the parts base it on measured speed). Nothing here
repeats a capability: refusals come from the checks the parts declare.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_kernels.compose import ModularKernel, WorkspaceCache, check_pair, default_device, pair_name
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
from moe_kernels.contract import Check, PermuteExpertsUnpermute, PrepareAndFinalize

PrepareFinalizeFactory = Callable[[LayerConfig, "dist.ProcessGroup | None"], PrepareAndFinalize]
ExpertsFactory = Callable[[LayerConfig], PermuteExpertsUnpermute]


@dataclass(frozen=True)
class Candidate:
    """One pair, its checks and (when valid) its rank."""

    prepare_finalize: PrepareAndFinalize
    experts: PermuteExpertsUnpermute
    checks: list[Check]
    score: float = float("inf")
    why: str = ""

    @property
    def name(self) -> str:
        return pair_name(self.prepare_finalize, self.experts)

    @property
    def valid(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@dataclass
class Selection:
    """The outcome of :func:`select`: ``kernel`` is the best valid pair, composed."""

    cfg: LayerConfig
    device: torch.device
    candidates: list[Candidate] = field(default_factory=list)
    workspace_cache: WorkspaceCache | None = None

    @property
    def best(self) -> Candidate:
        valid = [c for c in self.candidates if c.valid]
        if not valid:
            raise RuntimeError(f"no registered pair can run this layer on {self.device}:\n{self.explain()}")
        return valid[0]

    @functools.cached_property
    def kernel(self) -> ModularKernel:
        best = self.best
        return ModularKernel(best.prepare_finalize, best.experts, self.cfg, self.workspace_cache)

    def explain(self) -> str:
        """Every pair, the chosen one first: why each valid one ranks where it does and why
        each refused one was refused."""
        m = self.cfg.moe
        lines = [
            f"layer: E={m.num_experts} top_k={m.top_k} H={m.hidden_size} I={m.intermediate_size} "
            f"{str(m.dtype).removeprefix('torch.')}, ep_size={self.cfg.parallel.ep_size}, device={self.device}"
        ]
        valid = [c for c in self.candidates if c.valid]
        for i, c in enumerate(valid):
            tag = "CHOSEN" if i == 0 else f"#{i + 1}"
            lines.append(f"  {tag:<7} {c.name}  (score {c.score:g}: {c.why})")
        for c in self.candidates:
            if not c.valid:
                lines.append(f"  refused {c.name}")
                lines.extend(f"            - {f.name}: {f.reason}" for f in c.failures)
        return "\n".join(lines)


def rank(
    pf: PrepareAndFinalize, experts: PermuteExpertsUnpermute, cfg: LayerConfig, device: torch.device
) -> tuple[float, str]:
    pf_score, pf_why = pf.preference(cfg, device)
    ex_score, ex_why = experts.preference(cfg, device)
    return pf_score + ex_score, f"{pf_why}; {ex_why}"


def candidates(
    cfg: LayerConfig,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    prepare_finalize_factories: Sequence[PrepareFinalizeFactory] | None = None,
    experts_factories: Sequence[ExpertsFactory] | None = None,
) -> list[Candidate]:
    """Every registered pair with its checks, valid ones first in rank order."""
    from moe_kernels import registry

    pfs = [make(cfg, group) for make in (prepare_finalize_factories or registry.PREPARE_FINALIZE)]
    exs = [make(cfg) for make in (experts_factories or registry.EXPERTS)]
    out: list[Candidate] = []
    for pf in pfs:
        for ex in exs:
            checks = check_pair(pf, ex, cfg, device)
            if all(c.ok for c in checks):
                score, why = rank(pf, ex, cfg, device)
                out.append(Candidate(pf, ex, checks, score, why))
            else:
                out.append(Candidate(pf, ex, checks))
    # stable: equal scores keep registration order
    return sorted(out, key=lambda c: (not c.valid, c.score))


def select(
    *,
    moe: MoEConfig,
    parallel: ParallelConfig | None = None,
    quant: QuantConfig | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    workspace_cache: WorkspaceCache | None = None,
) -> Selection:
    """Rank every registered pair for this layer; ``.kernel`` is the best one, composed,
    ``.explain()`` says why. ``group`` is the expert-parallel process group (EP > 1)."""
    cfg = LayerConfig(moe=moe, parallel=parallel or ParallelConfig(), quant=quant or QuantConfig())
    dev = torch.device(device) if device is not None else default_device()
    return Selection(cfg, dev, candidates(cfg, dev, group), workspace_cache)
