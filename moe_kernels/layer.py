"""``FusedMoE``: one MoE layer as a ``torch.nn.Module`` (router + expert weights + kernel).

The layer owns its weights and routing; the kernel (a :class:`~moe_kernels.compose.ModularKernel`
picked by :func:`moe_kernels.select.select`, or given) does everything after routing::

    hidden_states [T, H] -> Router -> topk_weights, topk_ids (global ids)
                         -> kernel(x, w13, w2, topk_weights, topk_ids, expert_map) -> [T, H]

Under expert parallelism (``parallel.ep_size > 1``) rank r holds the experts
``[r * E_local, (r + 1) * E_local)`` (``E_local = E / ep_size``); the layer passes the
global -> local ``expert_map`` and the kernel's prepare/finalize moves tokens to the ranks
that own their experts and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moe_kernels.compose import ModularKernel, WorkspaceCache, default_device
from moe_kernels.config import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
from moe_kernels.router import Router
from moe_kernels.select import Selection, select
from moe_kernels.validate import expect_device, expect_dtype

#: per-expert tensors keyed by global expert id (int or its decimal string, as checkpoint
#: names spell it), a list/tuple indexed by global id, or one stacked ``[E, ...]`` tensor
ExpertTensors = Mapping[int | str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor


class FusedMoE(nn.Module):
    """An MoE layer: top-k router and SiLU-gated expert MLPs, run by one fused kernel.

    Parameters (inference only, ``requires_grad=False``; uninitialized until
    :meth:`load_weights`, as in inference engines, so that the weights are written once):
        router.weight: ``[E, H]`` in ``moe.dtype``
        router.e_score_correction_bias: ``[E]`` float32, with ``correction_bias=True``
        w13: ``[E_local, 2I, H]`` in ``moe.dtype``: rows ``[0, I)`` gate, ``[I, 2I)`` up
        w2: ``[E_local, H, I]`` in ``moe.dtype``

    Args:
        moe, parallel, quant: the layer's configuration.
        device: where the weights live and the kernel runs (default: the current CUDA
            device if any, else the CPU).
        group: the expert-parallel process group (needed by EP dispatchers when ep_size > 1).
        kernel: use this kernel instead of selecting one; its ``cfg`` must be this layer's.
        workspace_cache: scratch memory shared with other layers (default: the global one).
        correction_bias: the router has DeepSeek-V3's ``e_score_correction_bias``.
        name: a label for the layer's config (e.g. the model's name).

    Raises:
        RuntimeError: no registered kernel can run the layer here (the message lists why
            each one was refused).
    """

    def __init__(
        self,
        moe: MoEConfig,
        parallel: ParallelConfig = ParallelConfig(),  # noqa: B008 (frozen pydantic model: safe default)
        quant: QuantConfig = QuantConfig(),  # noqa: B008
        *,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
        kernel: ModularKernel | None = None,
        workspace_cache: WorkspaceCache | None = None,
        correction_bias: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = LayerConfig(name=name, moe=moe, parallel=parallel, quant=quant)
        dev = torch.device(device) if device is not None else default_device()

        self.selection: Selection | None
        if kernel is None:
            self.selection = select(
                moe=moe, parallel=parallel, quant=quant, device=dev, group=group, workspace_cache=workspace_cache
            )
            self.kernel = self.selection.kernel
        else:
            if workspace_cache is not None:
                raise ValueError("workspace_cache: pass it to the kernel you build, not to FusedMoE with kernel=")
            if kernel.cfg.model_copy(update={"name": name}) != self.cfg:  # the name is only a label
                raise ValueError(f"kernel was composed for {kernel.cfg!r}, but this layer is {self.cfg!r}")
            self.selection = None
            self.kernel = kernel

        e_local, h, i = self.cfg.num_local_experts, moe.hidden_size, moe.intermediate_size
        self.first_expert = parallel.ep_rank * e_local
        self.router = Router(moe, correction_bias=correction_bias, device=dev)
        self.w13 = nn.Parameter(torch.empty(e_local, 2 * i, h, dtype=moe.dtype, device=dev), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e_local, h, i, dtype=moe.dtype, device=dev), requires_grad=False)

        # Without EP the router's global ids are the local ids: no map, no gather per call.
        expert_map = None
        if parallel.ep_size > 1:
            expert_map = torch.full((moe.num_experts,), -1, dtype=torch.int32, device=dev)
            expert_map[self.first_expert : self.first_expert + e_local] = torch.arange(
                e_local, dtype=torch.int32, device=dev
            )
        self.expert_map: torch.Tensor | None
        self.register_buffer("expert_map", expert_map, persistent=False)

    @classmethod
    def from_config(cls, cfg: LayerConfig, **kwargs: object) -> FusedMoE:
        """Build from a :class:`LayerConfig` (e.g. :func:`moe_kernels.load_config`)."""
        return cls(cfg.moe, cfg.parallel, cfg.quant, name=cfg.name, **kwargs)  # type: ignore[arg-type]

    @property
    def local_experts(self) -> range:
        """The global ids of the experts this rank holds, in local order."""
        return range(self.first_expert, self.first_expert + self.cfg.num_local_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]`` in ``moe.dtype`` on the layer's device -> ``[T, H]``."""
        moe = self.cfg.moe
        if hidden_states.dim() != 2 or hidden_states.shape[1] != moe.hidden_size:
            raise ValueError(f"hidden_states must be [T, {moe.hidden_size}], got shape {list(hidden_states.shape)}")
        expect_dtype("hidden_states", hidden_states, (moe.dtype,))
        expect_device("hidden_states", hidden_states, self.w13.device)
        x = hidden_states.contiguous()
        topk_weights, topk_ids = self.router(x)
        # The router's ids are in range and distinct by construction: skip the kernel's value
        # check, which costs a host sync per call.
        return self.kernel(x, self.w13, self.w2, topk_weights, topk_ids, expert_map=self.expert_map, check_values=False)

    @torch.no_grad()
    def load_weights(
        self,
        *,
        gate_proj: ExpertTensors | None = None,
        up_proj: ExpertTensors | None = None,
        down_proj: ExpertTensors | None = None,
        router_weight: torch.Tensor | None = None,
        e_score_correction_bias: torch.Tensor | None = None,
    ) -> None:
        """Copy checkpoint tensors into the layer (any float dtype or device; converted).

        Per global expert id e: ``gate_proj[e] [I, H]``, ``up_proj[e] [I, H]``,
        ``down_proj[e] [H, I]`` (nn.Linear layout, as in Mixtral/Qwen/DeepSeek checkpoints).
        Only the experts this rank owns are read; each given projection must hold all of
        them. ``router_weight [E, H]``, ``e_score_correction_bias [E]``. Everything is checked
        before anything is copied, so a bad argument leaves the layer unchanged.

        Raises:
            ValueError: a missing expert, a bad key or a shape mismatch (naming the tensor).
        """
        moe = self.cfg.moe
        h, i = moe.hidden_size, moe.intermediate_size
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, source)
        targets = [
            ("gate_proj", gate_proj, (i, h), lambda local: self.w13[local, :i]),
            ("up_proj", up_proj, (i, h), lambda local: self.w13[local, i:]),
            ("down_proj", down_proj, (h, i), lambda local: self.w2[local]),
        ]
        for name, tensors, shape, dest in targets:
            if tensors is None:
                continue
            owned = self._owned_tensors(name, tensors)
            for local, expert in enumerate(self.local_experts):
                copies.append((dest(local), _checked(f"{name}[{expert}]", owned[expert], shape)))
        if router_weight is not None:
            copies.append((self.router.weight, _checked("router_weight", router_weight, (moe.num_experts, h))))
        if e_score_correction_bias is not None:
            bias = self.router.e_score_correction_bias
            if bias is None:
                raise ValueError("e_score_correction_bias: this layer was built without correction_bias=True")
            copies.append((bias, _checked("e_score_correction_bias", e_score_correction_bias, (moe.num_experts,))))
        if not copies:
            raise ValueError("load_weights: nothing to load (pass gate_proj, up_proj, down_proj or router_weight)")
        for dst, src in copies:
            dst.copy_(src)

    def _owned_tensors(self, name: str, tensors: ExpertTensors) -> dict[int, torch.Tensor]:
        """This rank's experts from ``tensors``, keyed by global id."""
        num_experts = self.cfg.moe.num_experts
        if isinstance(tensors, Mapping):
            by_id: dict[int, torch.Tensor] = {}
            for key, value in tensors.items():
                try:
                    expert = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"{name}: keys must be expert ids (int or decimal str), got {key!r}") from None
                if not 0 <= expert < num_experts:
                    raise ValueError(f"{name}: expert id {expert} is outside [0, {num_experts})")
                by_id[expert] = value
        elif isinstance(tensors, torch.Tensor | Sequence) and not isinstance(tensors, str | bytes):
            if len(tensors) != num_experts:
                raise ValueError(
                    f"{name}: a list or stacked tensor must hold all {num_experts} experts (indexed by global id), "
                    f"got {len(tensors)}; pass a dict to give only this rank's experts"
                )
            by_id = dict(enumerate(tensors))
        else:
            raise TypeError(f"{name}: expected a dict, list or stacked tensor, got {type(tensors).__name__}")
        missing = [e for e in self.local_experts if e not in by_id]
        if missing:
            raise ValueError(f"{name}: missing expert(s) {missing} of this rank (it owns {self._owned_str()})")
        return by_id

    def _owned_str(self) -> str:
        experts = self.local_experts
        return f"experts {experts.start}..{experts.stop - 1}"

    def extra_repr(self) -> str:
        m, p = self.cfg.moe, self.cfg.parallel
        parts = [
            f"experts={m.num_experts}",
            f"top_k={m.top_k}",
            f"hidden={m.hidden_size}",
            f"intermediate={m.intermediate_size}",
            f"dtype={str(m.dtype).removeprefix('torch.')}",
        ]
        if p.ep_size > 1:
            parts.append(f"ep_rank={p.ep_rank}/{p.ep_size} ({self._owned_str()})")
        parts.append(f"kernel={self.kernel.name}")
        return ", ".join(parts)


def _checked(name: str, t: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {what}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return t
