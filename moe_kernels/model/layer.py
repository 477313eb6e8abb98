"""``FusedMoE``: one MoE layer as a ``torch.nn.Module`` (router + expert weights + kernel).

The layer owns its weights and routing; the kernel (picked by :func:`moe_kernels.selection.select.select`,
or given) does everything after routing::

    hidden_states [T, H] -> Router -> topk_weights, topk_ids (global ids)
                         -> kernel(x, weights, topk_weights, topk_ids, residual=shared(x)) -> [T, H]

Shared experts (``moe.num_shared_experts``) are one plain MLP every token passes through; on a
GPU they run on a side stream beside the routed path (dispatch and the routed experts), and
their output is added in the routed path's final write (no pass of its own over ``[T, H]``).

Under expert parallelism (``parallel.ep_size > 1``) this rank holds the experts its
:class:`~moe_kernels.core.placement.ExpertPlacement` gives it (contiguous by default); the kernel's
prepare/finalize moves tokens to the ranks that own their experts and back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_kernels.config import LayerConfig
from moe_kernels.core.compose import Kernel, WorkspaceCache, layer_context
from moe_kernels.core.contract import Residual
from moe_kernels.core.placement import ExpertPlacement
from moe_kernels.core.validate import expect_device, expect_dtype, expect_tensor
from moe_kernels.mlp.weights import FP8_DTYPE, ExpertWeights
from moe_kernels.model.router import Router
from moe_kernels.selection.select import Selection, select

#: per-expert tensors keyed by global expert id (int or its decimal string, as checkpoint
#: names spell it), a list/tuple indexed by global id, or one stacked ``[E, ...]`` tensor
ExpertTensors = Mapping[int | str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor

#: the expert projections, as load_weights names them
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class FusedMoE(nn.Module):
    """An MoE layer: top-k router and SiLU-gated expert MLPs, run by one fused kernel.

    Parameters (inference only, ``requires_grad=False``; uninitialized until
    :meth:`load_weights`, as in inference engines, so that the weights are written once --
    a forward before everything is loaded raises):
        router.weight: ``[E, H]`` in ``moe.dtype``
        router.e_score_correction_bias: ``[E]`` float32, with ``moe.correction_bias``
        w13: ``[E_local, 2I, H]``: rows ``[0, I)`` gate, ``[I, 2I)`` up
        w2: ``[E_local, H, I]``
        (``moe.dtype``; float8_e4m3fn with ``w13_scale``/``w2_scale`` float32 block scales
        under ``quant.scheme: fp8_w8a8_block``)
        shared_w13: ``[2S, H]``, shared_w2: ``[H, S]`` (``S = moe.shared_width``) in ``moe.dtype``,
        and shared_gate ``[1, H]`` with ``moe.shared_expert_gate``, when the layer has shared experts

    Args:
        cfg: the layer's configuration (e.g. :func:`moe_kernels.load_config`).
        placement: which experts this rank holds (default: contiguous ownership).
        device: where the weights live and the kernel runs (default: the current CUDA
            device if any, else the CPU). A CUDA device on a machine without one is an error.
        group: the expert-parallel process group (needed when ``ep_size > 1``).
        kernel: use this kernel instead of selecting one; its ``cfg`` must be this layer's.
        workspace_cache: scratch memory shared with other layers (default: the global one).
        memory_budget: most workspace bytes selection may spend (default: see :func:`select`).
        overlap_shared_experts: run the shared experts on a side stream beside the routed path
            (default: on CUDA devices).

    Raises:
        RuntimeError: no registered kernel can run the layer here (the message lists why
            each one was refused).
    """

    def __init__(
        self,
        cfg: LayerConfig,
        *,
        placement: ExpertPlacement | None = None,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
        kernel: Kernel | None = None,
        workspace_cache: WorkspaceCache | None = None,
        memory_budget: int | None = None,
        overlap_shared_experts: bool | None = None,
    ) -> None:
        super().__init__()
        ctx = layer_context(cfg, placement=placement, group=group, device=device)
        self.cfg, self.placement, dev = ctx.cfg, ctx.placement, ctx.device

        self.selection: Selection | None
        if kernel is None:
            self.selection = select(
                cfg,
                placement=self.placement,
                group=group,
                device=dev,
                workspace_cache=workspace_cache,
                memory_budget=memory_budget,
            )
            self.kernel: Kernel = self.selection.kernel
        else:
            if workspace_cache is not None or memory_budget is not None:
                raise ValueError("workspace_cache/memory_budget: pass them to the kernel you build, not with kernel=")
            if kernel.cfg.model_copy(update={"name": cfg.name}) != cfg:  # the name is only a label
                raise ValueError(f"kernel was composed for {kernel.cfg!r}, but this layer is {cfg!r}")
            if kernel.ctx.placement != self.placement or kernel.ctx.device != dev:
                raise ValueError(
                    f"kernel was composed for {kernel.ctx.placement.describe()} on {kernel.ctx.device}, "
                    f"but this layer is {self.placement.describe()} on {dev}"
                )
            self.selection = None
            self.kernel = kernel

        moe = cfg.moe
        e_local, h, i = self.placement.num_local_experts, moe.hidden_size, moe.intermediate_size
        self.router = Router(moe, device=dev)
        wdtype = FP8_DTYPE if cfg.quant.is_fp8 else moe.dtype
        self.w13 = _parameter((e_local, 2 * i, h), wdtype, dev)
        self.w2 = _parameter((e_local, h, i), wdtype, dev)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        if cfg.quant.is_fp8:
            bn, bk = cfg.quant.weight_block
            self.w13_scale = _parameter((e_local, -(-2 * i // bn), -(-h // bk)), torch.float32, dev)
            self.w2_scale = _parameter((e_local, -(-h // bn), -(-i // bk)), torch.float32, dev)
        self.shared_w13: nn.Parameter | None = None
        self.shared_w2: nn.Parameter | None = None
        self.shared_gate: nn.Parameter | None = None
        if moe.num_shared_experts:
            width = moe.shared_width
            self.shared_w13 = _parameter((2 * width, h), moe.dtype, dev)
            self.shared_w2 = _parameter((h, width), moe.dtype, dev)
            if moe.shared_expert_gate:
                self.shared_gate = _parameter((1, h), moe.dtype, dev)
        self.overlap_shared_experts = dev.type == "cuda" if overlap_shared_experts is None else overlap_shared_experts
        if self.overlap_shared_experts and dev.type != "cuda":
            raise ValueError(f"overlap_shared_experts needs a CUDA device (a side stream), not {dev}")
        self._side_stream = torch.cuda.Stream(dev) if self.overlap_shared_experts and moe.num_shared_experts else None
        # what load_weights has written: global expert ids per projection, the router, the shared experts
        self._loaded: dict[str, set[int]] = {name: set() for name in _PROJECTIONS}
        self._router_loaded = False
        self._shared_loaded: set[str] = set()

    @classmethod
    def from_config(cls, cfg: LayerConfig, **kwargs: object) -> FusedMoE:
        """Build from a :class:`LayerConfig` (an alias of the constructor, for symmetry with loaders)."""
        return cls(cfg, **kwargs)  # type: ignore[arg-type]

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The global ids of the experts this rank holds, in local order."""
        return self.placement.local_experts

    @property
    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]`` in ``moe.dtype`` on the layer's device -> ``[T, H]``."""
        moe = self.cfg.moe
        self._check_loaded()
        hidden_states = expect_tensor("hidden_states", hidden_states)
        if hidden_states.dim() != 2 or hidden_states.shape[1] != moe.hidden_size:
            raise ValueError(f"hidden_states must be [T, {moe.hidden_size}], got shape {list(hidden_states.shape)}")
        expect_dtype("hidden_states", hidden_states, (moe.dtype,))
        expect_device("hidden_states", hidden_states, self.w13.device)
        x = hidden_states.contiguous()
        residual = self._start_shared_experts(x)
        topk_weights, topk_ids = self.router(x)
        # The router's ids are in range and distinct by construction: skip the kernel's value
        # check, which costs a host sync per call.
        return self.kernel(x, self.weights, topk_weights, topk_ids, residual=residual, check_values=False)

    def shared_experts(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' output ``[T, H]``: ``w2 @ (silu(gate) * up)``, scaled by
        ``sigmoid(x @ shared_gate)`` when the layer has that gate (Qwen1.5/2-MoE)."""
        assert self.shared_w13 is not None and self.shared_w2 is not None
        width = self.cfg.moe.shared_width
        gate_up = F.linear(x, self.shared_w13)
        y = F.linear(F.silu(gate_up[:, :width]) * gate_up[:, width:], self.shared_w2)
        if self.shared_gate is not None:
            y = y * torch.sigmoid(F.linear(x, self.shared_gate))
        return y

    def _start_shared_experts(self, x: torch.Tensor) -> Residual | None:
        """Start the shared experts: on the side stream when overlapping (forked from the current
        stream; the kernel joins it before its final write and before it returns)."""
        if self.shared_w13 is None:
            return None
        side = self._side_stream
        if side is None:
            return Residual(self.shared_experts(x))
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            y = self.shared_experts(x)
            ready = torch.cuda.Event()
            ready.record(side)
        y.record_stream(main)  # y is read on the main stream: keep the allocator off it until then
        return Residual(y, ready)

    def _check_loaded(self) -> None:
        missing = [] if self._router_loaded else ["router_weight"]
        missing += [name for name in self._shared_names() if name not in self._shared_loaded]
        for name in _PROJECTIONS:
            absent = [e for e in self.local_experts if e not in self._loaded[name]]
            if absent:
                shown = absent if len(absent) <= 8 else [*absent[:8], "..."]
                missing.append(f"{name} of expert(s) {shown}")
        if missing:
            raise RuntimeError(
                f"weights not loaded: {'; '.join(missing)}. Call load_weights(...) for them before the first forward "
                "(the parameters are uninitialized memory until then)"
            )

    @torch.no_grad()
    def load_weights(
        self,
        *,
        gate_proj: ExpertTensors | None = None,
        up_proj: ExpertTensors | None = None,
        down_proj: ExpertTensors | None = None,
        gate_proj_scale: ExpertTensors | None = None,
        up_proj_scale: ExpertTensors | None = None,
        down_proj_scale: ExpertTensors | None = None,
        router_weight: torch.Tensor | None = None,
        e_score_correction_bias: torch.Tensor | None = None,
        shared_gate_proj: torch.Tensor | None = None,
        shared_up_proj: torch.Tensor | None = None,
        shared_down_proj: torch.Tensor | None = None,
        shared_expert_gate: torch.Tensor | None = None,
    ) -> None:
        """Copy checkpoint tensors into the layer (any device; float tensors are converted).

        Per global expert id e: ``gate_proj[e] [I, H]``, ``up_proj[e] [I, H]``,
        ``down_proj[e] [H, I]`` (nn.Linear layout, as in Mixtral/Qwen/DeepSeek checkpoints).
        Only the experts this rank owns are read: a dict may hold any of them (and others,
        which are ignored), so a checkpoint can be streamed expert by expert; a list or stacked
        tensor must hold all E. ``router_weight [E, H]``, ``e_score_correction_bias [E]``.
        Shared experts: ``shared_gate_proj``/``shared_up_proj [S, H]``, ``shared_down_proj [H, S]``
        (``S = moe.shared_width``; DeepSeek stores its shared experts as one MLP of that width),
        ``shared_expert_gate [1, H]`` (Qwen1.5/2-MoE).
        Everything is checked before anything is copied, so a bad argument leaves the layer
        unchanged; ``forward`` refuses to run until every local expert and the router are loaded.

        FP8 layers (``quant.scheme: fp8_w8a8_block``) take either float8_e4m3fn projections
        with their ``*_scale`` block scales (``[ceil(N/128), ceil(K/128)]`` float32 per expert,
        DeepSeek-V3's ``weight_scale_inv``), or floating-point projections, which are quantized.

        Raises:
            ValueError: a missing expert, a bad key or a shape mismatch (naming the tensor).
            TypeError: a tensor of a dtype the layer cannot take.
        """
        moe = self.cfg.moe
        h, i = moe.hidden_size, moe.intermediate_size
        given = {
            "gate_proj": (gate_proj, gate_proj_scale),
            "up_proj": (up_proj, up_proj_scale),
            "down_proj": (down_proj, down_proj_scale),
        }
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, source)
        loaded: dict[str, set[int]] = {}
        for name, (tensors, scales) in given.items():
            if tensors is None:
                if scales is not None:
                    raise ValueError(f"{name}_scale was given without {name}")
                continue
            experts, pairs = self._expert_copies(name, tensors, scales, h, i)
            copies += pairs
            loaded[name] = experts
        if router_weight is not None:
            copies.append((self.router.weight, _float("router_weight", router_weight, (moe.num_experts, h))))
        if e_score_correction_bias is not None:
            bias = self.router.e_score_correction_bias
            if bias is None:
                raise ValueError("e_score_correction_bias: this layer's config has moe.correction_bias false")
            copies.append((bias, _float("e_score_correction_bias", e_score_correction_bias, (moe.num_experts,))))
        shared = {
            "shared_gate_proj": shared_gate_proj,
            "shared_up_proj": shared_up_proj,
            "shared_down_proj": shared_down_proj,
            "shared_expert_gate": shared_expert_gate,
        }
        shared_loaded = {name for name, t in shared.items() if t is not None}
        copies += self._shared_copies(shared)
        if not copies:
            raise ValueError("load_weights: nothing to load (pass gate_proj, up_proj, down_proj or router_weight)")
        for dst, src in copies:
            dst.copy_(src)
        for name, experts in loaded.items():
            self._loaded[name] |= experts
        self._router_loaded |= router_weight is not None
        self._shared_loaded |= shared_loaded

    def _shared_names(self) -> list[str]:
        names = ["shared_gate_proj", "shared_up_proj", "shared_down_proj"] if self.shared_w13 is not None else []
        return names + (["shared_expert_gate"] if self.shared_gate is not None else [])

    def _shared_copies(self, given: dict[str, torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) pairs for the shared-expert tensors given."""
        h, width = self.cfg.moe.hidden_size, self.cfg.moe.shared_width
        targets = {}
        if self.shared_w13 is not None and self.shared_w2 is not None:
            targets = {
                "shared_gate_proj": (self.shared_w13[:width], (width, h)),
                "shared_up_proj": (self.shared_w13[width:], (width, h)),
                "shared_down_proj": (self.shared_w2, (h, width)),
            }
        if self.shared_gate is not None:
            targets["shared_expert_gate"] = (self.shared_gate, (1, h))
        copies = []
        for name, tensor in given.items():
            if tensor is None:
                continue
            if name not in targets:
                why = (
                    "no shared expert gate (moe.shared_expert_gate)"
                    if self.shared_w13 is not None
                    else "no shared experts"
                )
                raise ValueError(f"{name}: this layer's config has {why}")
            dst, shape = targets[name]
            copies.append((dst, _float(name, tensor, shape)))
        return copies

    @torch.no_grad()
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        *,
        layer: int,
        naming: str = "auto",
        experts_per_read: int = 16,
    ) -> None:
        """Load this layer from a Hugging Face style safetensors checkpoint (one file, or a
        directory of shards with ``model.safetensors.index.json``): the router (and DeepSeek-V3's
        ``e_score_correction_bias``), and only this rank's experts, read lazily
        ``experts_per_read`` at a time so a rank never holds more than that many in a second copy.

        ``naming``: ``"auto"`` (detected from the keys), ``"mlp-experts"`` (DeepSeek, Qwen-MoE:
        ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``) or ``"mixtral"``
        (``model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight``). FP8 checkpoints
        (``*_scale_inv``) load into FP8 layers as they are, and into unquantized layers
        dequantized; unquantized checkpoints load into FP8 layers quantized.

        Raises:
            FileNotFoundError, ValueError, TypeError: from the checkpoint (a missing layer,
                expert, shard or scale, a dtype it cannot take, each naming the key) or from
                the layer (a shape that does not match the config, naming the tensor).
        """
        from moe_kernels.model.checkpoint import CheckpointReader, read_moe_layer

        reader = CheckpointReader(path)
        mine = list(self.local_experts)
        if experts_per_read <= 0:
            raise ValueError(f"experts_per_read must be positive, got {experts_per_read}")
        device = self.w13.device
        shared = bool(self.cfg.moe.num_shared_experts)
        for start in range(0, len(mine), experts_per_read):
            first = start == 0
            part = read_moe_layer(
                reader,
                layer,
                mine[start : start + experts_per_read],
                naming=naming,
                shared=shared and first,
                device=device,
            )
            projections = {"gate_proj": part.gate_proj, "up_proj": part.up_proj, "down_proj": part.down_proj}
            scales = {
                "gate_proj": part.gate_proj_scale,
                "up_proj": part.up_proj_scale,
                "down_proj": part.down_proj_scale,
            }
            if part.is_fp8 and not self.cfg.quant.is_fp8:
                from moe_kernels.kernels.quant import dequantize_fp8_blocks

                for name, tensors in projections.items():
                    block_scales = scales[name]
                    assert block_scales is not None
                    projections[name] = {
                        e: dequantize_fp8_blocks(w[None], block_scales[e][None])[0] for e, w in tensors.items()
                    }
                scales = {name: None for name in scales}
            bias = part.e_score_correction_bias
            if bias is not None and not self.cfg.moe.correction_bias:
                raise ValueError(
                    f"{path}: layer {layer} has an e_score_correction_bias (DeepSeek-V3 noaux_tc routing), but the "
                    "config has moe.correction_bias false: set it to true"
                )
            if bias is None and self.cfg.moe.correction_bias:
                raise ValueError(
                    f"{path}: layer {layer} has no e_score_correction_bias, but moe.correction_bias is true"
                )
            self.load_weights(
                **projections,
                **{f"{name}_scale": value for name, value in scales.items()},
                router_weight=part.router_weight if first else None,
                e_score_correction_bias=bias if first else None,
                **(self._checkpoint_shared(part.shared) if shared and first else {}),
            )

    @staticmethod
    def _checkpoint_shared(shared: object) -> dict[str, torch.Tensor | None]:
        """The shared expert of a checkpoint layer as load_weights arguments (fp8 ones dequantized:
        the shared MLP runs in the activation dtype)."""
        assert shared is not None
        out: dict[str, torch.Tensor | None] = {"shared_expert_gate": shared.expert_gate}  # type: ignore[attr-defined]
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight, scale = getattr(shared, name), getattr(shared, f"{name}_scale")
            if scale is not None:
                from moe_kernels.kernels.quant import dequantize_fp8_blocks

                weight = dequantize_fp8_blocks(weight[None], scale[None])[0]
            out[f"shared_{name}"] = weight
        return out

    def _expert_copies(
        self, name: str, tensors: ExpertTensors, scales: ExpertTensors | None, h: int, i: int
    ) -> tuple[set[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The local experts ``tensors`` holds, and (destination, source) pairs for them."""
        down = name == "down_proj"
        shape = (h, i) if down else (i, h)
        rows = {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i), "down_proj": slice(None)}[name]
        weight = self.w2 if down else self.w13
        owned = self._owned_tensors(name, tensors)
        local_of = {e: local for local, e in enumerate(self.local_experts)}
        copies = []
        if not self.cfg.quant.is_fp8:
            if scales is not None:
                raise ValueError(f"{name}_scale: the layer is unquantized (quant.scheme none)")
            for expert, src in owned.items():
                copies.append((weight[local_of[expert], rows], _float(f"{name}[{expert}]", src, shape)))
            return set(owned), copies
        from moe_kernels.kernels.quant import quantize_fp8_blocks

        block_n, block_k = self.cfg.quant.weight_block
        scale_param = self.w2_scale if down else self.w13_scale
        assert scale_param is not None
        scale_rows = slice(None) if down else slice(rows.start // block_n, rows.stop // block_n)
        owned_scales = self._owned_tensors(f"{name}_scale", scales) if scales is not None else None
        scale_shape = (-(-shape[0] // block_n), -(-shape[1] // block_k))
        for expert, src in owned.items():
            what, local = f"{name}[{expert}]", local_of[expert]
            if owned_scales is None:
                q, s = quantize_fp8_blocks(_float(what, src, shape).float().unsqueeze(0), self.cfg.quant.weight_block)
                q, s = q[0], s[0]
            else:
                if expert not in owned_scales:
                    raise ValueError(f"{name}_scale: missing expert {expert} (its {name} was given)")
                q = _checked(what, src, shape, (FP8_DTYPE,))
                s = _checked(f"{name}_scale[{expert}]", owned_scales[expert], scale_shape, (torch.float32,))
            copies += [(weight[local, rows], q), (scale_param[local, scale_rows], s)]
        return set(owned), copies

    def _owned_tensors(self, name: str, tensors: ExpertTensors) -> dict[int, torch.Tensor]:
        """The experts of this rank that ``tensors`` holds, keyed by global id."""
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
        return {e: by_id[e] for e in self.local_experts if e in by_id}

    def extra_repr(self) -> str:
        m = self.cfg.moe
        parts = [
            f"experts={m.num_experts}",
            f"top_k={m.top_k}",
            f"hidden={m.hidden_size}",
            f"intermediate={m.intermediate_size}",
            f"dtype={str(m.dtype).removeprefix('torch.')}",
        ]
        if self.cfg.quant.is_fp8:
            parts.append("quant=fp8_w8a8_block")
        if self.placement.ep_size > 1:
            parts.append(self.placement.describe())
        parts.append(f"kernel={self.kernel.name}")
        return ", ".join(parts)


def _parameter(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _checked(name: str, t: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    t = expect_tensor(name, t)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {str(t.dtype).removeprefix('torch.')}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return t


def _float(name: str, t: object, shape: tuple[int, ...]) -> torch.Tensor:
    t = expect_tensor(name, t)
    if not t.is_floating_point() or t.dtype == FP8_DTYPE:
        raise TypeError(f"{name} must be a floating-point tensor (bf16/fp16/fp32), got {t.dtype}")
    return _checked(name, t, shape, (t.dtype,))
