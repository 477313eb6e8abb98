"""The composer: checks a (PrepareAndFinalize, experts) pair against a layer and chains them."""

from __future__ import annotations

import math

import torch

from moe_kernels.config import LayerConfig
from moe_kernels.contract import (
    Check,
    PermuteExpertsUnpermute,
    PrepareAndFinalize,
    WorkspaceSpec,
)
from moe_kernels.validate import check_call, check_weights


class IncompatibleKernelsError(ValueError):
    """A pair cannot run a layer; ``failures`` holds every failed check."""

    def __init__(self, pair: str, failures: list[Check]) -> None:
        self.failures = failures
        lines = "\n".join(f"  - {c.name}: {c.reason}" for c in failures)
        super().__init__(f"{pair} cannot run this layer:\n{lines}")


def pair_name(prepare_finalize: PrepareAndFinalize, experts: PermuteExpertsUnpermute) -> str:
    return f"{prepare_finalize.name} + {experts.name}"


def check_pair(
    prepare_finalize: PrepareAndFinalize,
    experts: PermuteExpertsUnpermute,
    cfg: LayerConfig,
    device: torch.device,
) -> list[Check]:
    """Every check of the pair, the format match first, each prefixed with its side."""
    pf_format, ex_format = prepare_finalize.output_format, experts.input_format
    if pf_format is ex_format:
        fmt = Check.passed("format", f"both {pf_format.value}")
    else:
        fmt = Check.failed(
            "format",
            f"prepare/finalize hands out {pf_format.value} tokens, the experts take {ex_format.value}",
        )
    prefixed = [c._replace(name=f"prepare_finalize.{c.name}") for c in prepare_finalize.checks(cfg, device)]
    prefixed += [c._replace(name=f"experts.{c.name}") for c in experts.checks(cfg, device)]
    return [fmt, *prefixed]


class WorkspaceCache:
    """Scratch memory shared by every kernel that uses the cache (all layers of a model).

    Each named workspace is one flat byte buffer per device that only grows, so after the
    first call of the largest shape no call allocates. Views of one name must not be alive
    in two calls at once (calls on one stream are sequential, so layers can share).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, specs: dict[str, WorkspaceSpec], device: torch.device) -> dict[str, torch.Tensor]:
        return {name: self.view(name, spec, device) for name, spec in specs.items()}

    def view(self, name: str, spec: WorkspaceSpec, device: torch.device) -> torch.Tensor:
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        key = (name, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"workspace {name!r} must grow to {nbytes} bytes during CUDA-graph capture: "
                    "run the layer once with the largest batch before capturing"
                )
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buffers[key] = buf
        return buf[:nbytes].view(spec.dtype).view(spec.shape)

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


#: the cache layers share unless given their own
default_workspace_cache = WorkspaceCache()


class ModularKernel:
    """A checked prepare -> experts -> finalize chain for one layer configuration.

    Call it as ``kernel(x, w13, w2, topk_weights, topk_ids)`` -> ``[T, H]``.
    """

    def __init__(
        self,
        prepare_finalize: PrepareAndFinalize,
        experts: PermuteExpertsUnpermute,
        cfg: LayerConfig,
        workspace_cache: WorkspaceCache | None = None,
    ) -> None:
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.cfg = cfg
        self.workspaces = workspace_cache or default_workspace_cache
        chunk = cfg.moe.max_tokens_per_chunk
        can_chunk = prepare_finalize.supports_chunking and experts.supports_chunking
        self.chunk_size: int | None = chunk if can_chunk else None

    @property
    def name(self) -> str:
        return pair_name(self.prepare_finalize, self.experts)

    def __repr__(self) -> str:
        return f"ModularKernel({self.name})"

    def __call__(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        apply_router_weight_on_input: bool = False,
        expert_map: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> torch.Tensor:
        """``x [T, H]``, ``w13 [E_local, 2I, H]``, ``w2 [E_local, H, I]``, ``topk_weights
        [T, K]`` float32, ``topk_ids [T, K]`` int32/int64 global ids (``-1`` = none),
        ``expert_map [E]`` int32 global -> local id or ``-1``. ``check_values`` checks the
        ids' range and distinctness (one host sync; it is skipped during graph capture)."""
        cfg = self.cfg
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        check_call(
            cfg,
            x,
            topk_weights,
            topk_ids,
            max_tokens=self.prepare_finalize.max_num_tokens_per_rank(),
            check_values=check_values and not capturing,
        )
        check_weights(cfg, w13, w2)
        self._check_expert_map(expert_map, x.device)
        if apply_router_weight_on_input:
            if cfg.moe.top_k != 1:
                raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got top_k={cfg.moe.top_k}")
            x = (x.float() * topk_weights).to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)

        out = torch.empty_like(x)
        step = self.chunk_size or max(x.shape[0], 1)
        for start in range(0, max(x.shape[0], 1), step):
            end = min(start + step, x.shape[0])
            self._run(out[start:end], x[start:end], w13, w2, topk_weights[start:end], topk_ids[start:end], expert_map)
        return out

    def _run(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
    ) -> None:
        pf = self.prepare_finalize
        prepared = pf.prepare(
            x,
            topk_ids,
            topk_weights,
            num_experts=self.cfg.moe.num_experts,
            num_local_experts=w13.shape[0],
            expert_map=expert_map,
        )
        tokens = prepared.tokens
        expert_out = pf.expert_output(prepared, out)
        if expert_out is None:
            spec = WorkspaceSpec(tuple(tokens.x.shape), tokens.x.dtype)
            expert_out = self.workspaces.view("expert_output", spec, x.device)
        workspace = self.workspaces.get(self.experts.workspace_shapes(tokens, w13, w2), x.device)
        self.experts.apply(tokens, w13, w2, expert_out, workspace)
        pf.finalize(out, expert_out, prepared)

    def _check_expert_map(self, expert_map: torch.Tensor | None, device: torch.device) -> None:
        if expert_map is None:
            return
        if expert_map.shape != (self.cfg.moe.num_experts,):
            raise ValueError(
                f"expert_map must have shape [{self.cfg.moe.num_experts}] (global -> local id), "
                f"got {list(expert_map.shape)}"
            )
        if expert_map.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"expert_map must be int32 or int64, got {expert_map.dtype}")
        if expert_map.device != device:
            raise ValueError(f"expert_map must be on {device}, got {expert_map.device}")


def compose(
    prepare_finalize: PrepareAndFinalize,
    experts: PermuteExpertsUnpermute,
    cfg: LayerConfig,
    *,
    device: torch.device | str | None = None,
    workspace_cache: WorkspaceCache | None = None,
) -> ModularKernel:
    """Check the pair against ``cfg`` on ``device`` (default: the current CUDA device if any,
    else CPU) and chain it. Raises :class:`IncompatibleKernelsError` listing every failure."""
    dev = torch.device(device) if device is not None else default_device()
    failures = [c for c in check_pair(prepare_finalize, experts, cfg, dev) if not c.ok]
    if failures:
        raise IncompatibleKernelsError(pair_name(prepare_finalize, experts), failures)
    return ModularKernel(prepare_finalize, experts, cfg, workspace_cache)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
