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
prepare/finalize moves tokens to the ranks that own their experts and back. Under tensor
parallelism (``parallel.tp_size > 1``) it holds its slice of every local expert's (and of the
shared experts') intermediate dimension, and the output is summed over ``tp_group`` once --
or left a partial sum with ``reduce_results=False``, for an engine that reduces it later.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_kernels.config import LayerConfig
from moe_kernels.core.compose import Kernel, WorkspaceCache, layer_context
from moe_kernels.core.contract import LayerContext, Residual
from moe_kernels.core.distributed import check_agreement
from moe_kernels.core.placement import ExpertPlacement, choose_slots
from moe_kernels.core.validate import expect_device, expect_dtype, expect_tensor
from moe_kernels.mlp.weights import PROJECTIONS as WEIGHT_PROJECTIONS
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.expert_moves import move_weights
from moe_kernels.model.loading import ExpertTensors, LayerLoader
from moe_kernels.model.memory import check_layer_fits
from moe_kernels.model.ops import register_layer
from moe_kernels.model.router import Router
from moe_kernels.selection.select import Selection, select


class FusedMoE(nn.Module):
    """An MoE layer: top-k router and expert MLPs (the activation of ``moe.activation``), run by one
    fused kernel, with what some families put around the experts as data (an RMSNorm on the experts'
    input or on the output, an output bias, zero-compute experts, the router weight on the input).

    Parameters (inference only, ``requires_grad=False``; uninitialized until
    :meth:`load_weights`, as in inference engines, so that the weights are written once --
    a forward before everything is loaded raises):
        router.weight: ``[E, H]`` in ``moe.dtype``
        router.e_score_correction_bias: ``[E]`` float32, with ``moe.correction_bias``
        w13: ``[E_local, 2I, H]``: rows ``[0, I)`` gate, ``[I, 2I)`` up (``I``: this rank's
        slice of ``moe.intermediate_size``, ``/ parallel.tp_size``)
        w2: ``[E_local, H, I]``
        stored as ``cfg.mlp.weights`` says (:mod:`moe_kernels.mlp.formats`): in ``moe.dtype``, or
        e.g. float8_e4m3fn with ``w13_scale``/``w2_scale`` float32 block scales under
        ``quant.scheme: fp8_w8a8_block``
        shared_w13: ``[2S, H]``, shared_w2: ``[H, S]`` (``S = moe.shared_width / parallel.tp_size``) in ``moe.dtype``,
        and shared_gate ``[1, H]`` with ``moe.shared_expert_gate``, when the layer has shared experts
        w13_bias ``[E_local, 2I]``, w2_bias ``[E_local, H]`` in ``moe.dtype``, with ``moe.expert_bias``
        input_norm, output_norm, output_bias ``[H]`` in ``moe.dtype``, with ``moe.input_norm_eps``,
        ``moe.output_norm_eps``, ``moe.output_bias`` (:meth:`load_extras`)

    Args:
        cfg: the layer's configuration (e.g. :func:`moe_kernels.load_config`).
        placement: which experts this rank holds (default: contiguous ownership).
        device: where the weights live and the kernel runs (default: the current CUDA
            device if any, else the CPU). A CUDA device on a machine without one is an error.
        group: the expert-parallel process group (needed when ``ep_size > 1``).
        tp_group: the tensor-parallel process group (needed when ``tp_size > 1``).
        reduce_results: sum the output over ``tp_group`` (``False``: return this rank's partial
            sum, shared experts included, for the engine to all-reduce once).
        kernel: use this kernel instead of selecting one; its ``cfg`` must be this layer's.
        workspace_cache: scratch memory shared with other layers (default: the global one).
        memory_budget: most workspace bytes selection may spend (default: see :func:`select`).
        overlap_shared_experts: run the shared experts on a side stream beside the routed path
            (default: on CUDA devices).

    Raises:
        RuntimeError: no registered kernel can run the layer here (the message lists why
            each one was refused).
        LayerMemoryError: the weights and workspaces would not fit the memory available on
            ``device`` less :data:`~moe_kernels.model.memory.MEMORY_MARGIN`, checked before
            anything is allocated.
    """

    # set in __init__ from the weight format (setattr); declared for the type checker
    w13: nn.Parameter
    w2: nn.Parameter

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
        tp_group: dist.ProcessGroup | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        ctx = layer_context(cfg, placement=placement, group=group, device=device, tp_group=tp_group)
        self.reduce_results = reduce_results
        self._whole_output = _adds_whole_output_terms(cfg, tp_group, reduce_results)
        self._group = group
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
                tp_group=tp_group,
            )
            self.kernel: Kernel = self.selection.kernel
        else:
            if workspace_cache is not None or memory_budget is not None:
                raise ValueError("workspace_cache/memory_budget: pass them to the kernel you build, not with kernel=")
            _check_given_kernel(kernel, ctx)
            self.selection = None
            self.kernel = kernel
        # the router chooses the replicas and counts them, in its own launch where it runs fused
        self.kernel.receive_slots()
        self._slot_map = _slot_map(self.placement, dev)
        check_layer_fits(self.cfg, self.selection, dev)  # before the weights are allocated

        moe = cfg.moe
        self.router = Router(moe, device=dev)
        self._allocate_weights(cfg, dev)
        self.overlap_shared_experts = dev.type == "cuda" if overlap_shared_experts is None else overlap_shared_experts
        if self.overlap_shared_experts and dev.type != "cuda":
            raise ValueError(f"overlap_shared_experts needs a CUDA device (a side stream), not {dev}")
        self._side_stream = torch.cuda.Stream(dev) if self.overlap_shared_experts and moe.num_shared_experts else None
        self._loader = LayerLoader(self)
        self._loaded_placement: ExpertPlacement | None = None  # the placement whose weights are all loaded
        self._op_key = register_layer(self)

    def _allocate_weights(self, cfg: LayerConfig, dev: torch.device) -> None:
        """The routed experts' tensors as the weight format stores them (w13, w2, their scales
        and biases) and the shared expert's, uninitialized; :func:`~moe_kernels.model.memory.weight_bytes`
        counts the same tensors before they are made."""
        moe = cfg.moe
        e_local, h = self.placement.num_local_experts, moe.hidden_size
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        self.w13_bias: nn.Parameter | None = None
        self.w2_bias: nn.Parameter | None = None
        self.w13_zero: nn.Parameter | None = None
        self.w2_zero: nn.Parameter | None = None
        for projection, stored in cfg.mlp.stored().items():
            for part, (shape, dtype) in stored.items():
                setattr(self, _parameter_name(projection, part), _parameter((e_local, *shape), dtype, dev))
        self.shared_w13: nn.Parameter | None = None
        self.shared_w2: nn.Parameter | None = None
        self.shared_gate: nn.Parameter | None = None
        if moe.num_shared_experts:
            width = moe.shared_width // cfg.parallel.tp_size
            self.shared_w13 = _parameter((moe.shared_act.gemm1_rows(width), h), moe.dtype, dev)
            self.shared_w2 = _parameter((h, width), moe.dtype, dev)
            if moe.shared_expert_gate:
                self.shared_gate = _parameter((1, h), moe.dtype, dev)
        # the layer's own tensors around the experts (loaded as the checkpoint's layer extras)
        self.input_norm = _parameter((h,), moe.dtype, dev) if moe.input_norm_eps is not None else None
        self.output_norm = _parameter((h,), moe.dtype, dev) if moe.output_norm_eps is not None else None
        self.output_bias = _parameter((h,), moe.dtype, dev) if moe.output_bias else None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, layer: int, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> FusedMoE:
        """Layer ``layer`` of a Hugging Face model directory: its ``config.json`` read by
        :func:`~moe_kernels.model.hf_config.layer_config_from_hf` (which refuses, naming the field,
        what moe_kernels does not compute), the layer built with ``kwargs`` (``device``, ``placement``,
        ``group``, ...), and its weights loaded from the safetensors beside it (:meth:`load_checkpoint`)
        under the family's naming, or the one the keys show when the files use another (``transformers``'
        own save of a family whose hub files are named otherwise). ``dtype`` overrides the file's."""
        from moe_kernels.model.checkpoint import naming_fits
        from moe_kernels.model.hf_config import hf_naming, layer_config_from_hf

        module = cls(layer_config_from_hf(path, layer, dtype=dtype), **kwargs)
        naming = hf_naming(path)
        module.load_checkpoint(path, layer=layer, naming=naming if naming_fits(path, layer, naming) else "auto")
        return module

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The global ids of the experts this rank holds, in local order."""
        return self.placement.local_experts

    @property
    def weights(self) -> ExpertWeights:
        fmt = self.cfg.mlp.weights
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale, fmt, self.w13_bias, self.w2_bias,
                             self.w13_zero, self.w2_zero)  # fmt: skip

    @property
    def expert_load(self) -> torch.Tensor | None:
        """``[P]`` int32 on the layer's device: the tokens this rank routed to each physical
        expert since the caller last zeroed it (``.zero_()``), counted without a host sync;
        ``None`` without redundant experts. Summed over the EP ranks it is what
        :meth:`ExpertPlacement.rebalance` takes."""
        return self.kernel.ctx.expert_load

    @torch.no_grad()
    def apply_placement(self, placement: ExpertPlacement) -> None:
        """Move to ``placement`` (e.g. ``layer.placement.rebalance(load)``): the expert weights
        move between the ranks of ``group`` point to point, the kernel routes by the new table
        from the next call on; nothing else is rebuilt. Collective: every EP rank calls it with
        the same placement (checked: a rank that disagrees raises on every rank)."""
        self.placement.check_same_shape(placement)
        self._check_loaded()  # what moves must be the checkpoint's weights
        if self._group is not None:
            check_agreement(self._group, "apply_placement", {"new placement (fingerprint)": placement.fingerprint()})
        tensors: list[torch.Tensor] = [
            self.parameter(p, part) for p, stored in self.cfg.mlp.stored().items() for part in stored
        ]
        move_weights(tensors, self.placement, placement, self._group)
        self.kernel.rebind_placement(placement)
        self.placement = placement
        self._slot_map = _slot_map(placement, self.kernel.ctx.device)
        self._loader.received(placement.local_experts)

    def parameter(self, projection: str, part: str) -> nn.Parameter:
        """The parameter holding stored tensor ``part`` (``"weight"``, ``"scale"``) of
        ``projection`` (``"w13"``, ``"w2"``)."""
        if projection not in WEIGHT_PROJECTIONS:
            raise ValueError(f"projection must be one of {WEIGHT_PROJECTIONS}, got {projection!r}")
        param = getattr(self, _parameter_name(projection, part), None)
        if param is None:
            raise ValueError(f"{projection}: the layer stores no {part} ({self.cfg.mlp.weights.describe()})")
        return param

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states [T, H]`` in ``moe.dtype`` on the layer's device -> ``[T, H]``; ``input_ids
        [T]``: the tokens' ids, which a layer routed by token id (``moe.hash_routing``) needs. Under
        ``torch.compile`` the call is one registered op (:mod:`moe_kernels.model.ops`); a hash-routed
        call is traced through instead."""
        if torch.compiler.is_compiling() and input_ids is None:
            return torch.ops.moe_kernels.fused_moe_layer(hidden_states, self._op_key)
        return self.forward_eager(hidden_states, input_ids)

    def __setstate__(self, state: dict) -> None:
        # a copy (deepcopy, unpickling) is another layer: its own key for the registered op
        super().__setstate__(state)
        self._op_key = register_layer(self)

    def forward_eager(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` without the op boundary (the op's implementation)."""
        moe = self.cfg.moe
        self._check_loaded()
        hidden_states = expect_tensor("hidden_states", hidden_states)
        if hidden_states.dim() != 2 or hidden_states.shape[1] != moe.hidden_size:
            raise ValueError(f"hidden_states must be [T, {moe.hidden_size}], got shape {list(hidden_states.shape)}")
        expect_dtype("hidden_states", hidden_states, (moe.dtype,))
        expect_device("hidden_states", hidden_states, self.w13.device)
        x = hidden_states.contiguous()
        residual = self._start_shared_experts(x)
        identity = None
        if moe.identity_experts:  # the zero-compute experts' ids are logical: replicas chosen after them
            topk_weights, topk_ids = self.router(x, input_ids)
            identity, topk_weights, topk_ids = _identity_experts(x, topk_weights, topk_ids, moe.num_experts)
            if self._slot_map is not None:
                topk_ids = choose_slots(topk_ids, self._slot_map, self.expert_load)
        else:
            topk_weights, topk_ids = self.router(x, input_ids, self._slot_map, self.expert_load)
        if self.input_norm is not None:  # the routed experts' input only (Gemma-4)
            x = _rms_norm(x, self.input_norm, moe.input_norm_eps)
        if moe.weight_on_input:  # Llama-4: the expert sees x * w (rounded as the model rounds), unweighted out
            x = x * topk_weights.to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)
        # The router's ids are in range by construction (-1 for a zero-compute expert's slot, which
        # every kernel skips): skip the kernel's value check, which costs a host sync per call.
        out = self.kernel(
            x,
            self.weights,
            topk_weights,
            topk_ids,
            residual=residual,
            check_values=False,
            reduce_results=self.reduce_results,
        )
        return self._around_output(out if identity is None or not self._whole_output else out + identity)

    def _around_output(self, out: torch.Tensor) -> torch.Tensor:
        """The MoE output's bias (JetMoE) and RMSNorm (A.X-K1, Gemma-4), on the summed output (a
        partial sum under tensor parallelism takes the bias on one rank; its norm is refused)."""
        if self.output_bias is not None and self._whole_output:
            out = out + self.output_bias
        if self.output_norm is not None:
            out = _rms_norm(out, self.output_norm, self.cfg.moe.output_norm_eps)
        return out

    def shared_experts(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' output ``[T, H]``: ``w2 @ act(w13 @ x)`` with ``moe.shared_act``, scaled
        by ``sigmoid(x @ shared_gate)`` when the layer has that gate (Qwen1.5/2-MoE) and by
        ``moe.shared_scale``."""
        assert self.shared_w13 is not None and self.shared_w2 is not None
        hidden = self.cfg.moe.shared_act.reference(F.linear(x, self.shared_w13)).to(x.dtype)
        y = F.linear(hidden, self.shared_w2)
        if self.shared_gate is not None:
            y = y * torch.sigmoid(F.linear(x, self.shared_gate))
        return y if self.cfg.moe.shared_scale == 1.0 else y * self.cfg.moe.shared_scale

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
        if self._loaded_placement is self.placement:  # loads only add: complete once, complete for good
            return
        missing = self._loader.missing()
        if missing:
            raise RuntimeError(
                f"weights not loaded: {'; '.join(missing)}. Call load_weights(...) for them before the first forward "
                "(the parameters are uninitialized memory until then)"
            )
        self._loaded_placement = self.placement

    @torch.no_grad()
    def load_expert_weights(self, weights: ExpertWeights) -> None:
        """All local experts' tensors stored as the layer's format says (fp8 per tensor, int4,
        mxfp4: from :func:`moe_kernels.model.published.published_expert_weights` or
        :func:`moe_kernels.mlp.weights.quantize_weights`); checked against the layer first."""
        self._loader.load_expert_weights(weights)

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
        gate_proj_bias: ExpertTensors | None = None,
        up_proj_bias: ExpertTensors | None = None,
        down_proj_bias: ExpertTensors | None = None,
    ) -> None:
        """Copy checkpoint tensors into the layer (any device; float tensors are converted).

        Per global expert id e: ``gate_proj[e] [I, H]``, ``up_proj[e] [I, H]``,
        ``down_proj[e] [H, I]`` (nn.Linear layout, as in Mixtral/Qwen/DeepSeek checkpoints).
        Only the experts this rank owns are read: a dict may hold any of them (and others,
        which are ignored), so a checkpoint can be streamed expert by expert; a list or stacked
        tensor must hold all E. ``router_weight [E, H]``, ``e_score_correction_bias [E]``.
        Shared experts: ``shared_gate_proj``/``shared_up_proj [S, H]``, ``shared_down_proj [H, S]``
        (``S = moe.shared_width``; DeepSeek stores its shared experts as one MLP of that width),
        ``shared_expert_gate [1, H]`` (Qwen1.5/2-MoE). Expert biases (``moe.expert_bias``, gpt-oss), per
        global expert id like the projections: ``gate_proj_bias``/``up_proj_bias [I]``, ``down_proj_bias [H]``.
        Everything is checked before anything is copied, so a bad argument leaves the layer
        unchanged; ``forward`` refuses to run until every local expert and the router are loaded.

        FP8 layers (``quant.scheme: fp8_w8a8_block``) take either float8_e4m3fn projections
        with their ``*_scale`` block scales (``[ceil(N/128), ceil(K/128)]`` float32 per expert,
        DeepSeek-V3's ``weight_scale_inv``), or floating-point projections, which are quantized.

        Raises:
            ValueError: a missing expert, a bad key or a shape mismatch (naming the tensor).
            TypeError: a tensor of a dtype the layer cannot take.
        """
        self._loader.load(
            {
                "gate_proj": (gate_proj, gate_proj_scale),
                "up_proj": (up_proj, up_proj_scale),
                "down_proj": (down_proj, down_proj_scale),
                "gate_proj_bias": (gate_proj_bias, None),
                "up_proj_bias": (up_proj_bias, None),
                "down_proj_bias": (down_proj_bias, None),
            },
            router_weight,
            e_score_correction_bias,
            {
                "shared_gate_proj": shared_gate_proj,
                "shared_up_proj": shared_up_proj,
                "shared_down_proj": shared_down_proj,
                "shared_expert_gate": shared_expert_gate,
            },
        )

    def load_extras(self, **tensors: torch.Tensor) -> None:
        """Copy the layer's tensors around the experts, by name: ``input_norm [H]``
        (``moe.input_norm_eps``), ``output_norm [H]`` (``moe.output_norm_eps``), ``output_bias [H]``
        (``moe.output_bias``); all checked before any is copied. The router's own (a bias, a scale)
        go to ``router.load_tensors``."""
        self._loader.load_extras(tensors)

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
        self._loader.load_checkpoint(path, layer, naming, experts_per_read)

    def extra_repr(self) -> str:
        m = self.cfg.moe
        parts = [
            f"experts={m.num_experts}",
            f"top_k={m.top_k}",
            f"hidden={m.hidden_size}",
            f"intermediate={m.intermediate_size}",
            f"dtype={str(m.dtype).removeprefix('torch.')}",
        ]
        if self.cfg.quant.scheme != "none":
            parts.append(f"quant={self.cfg.quant.scheme}")
        if self.placement.ep_size > 1:
            parts.append(self.placement.describe())
        parts.append(f"kernel={self.kernel.name}")
        return ", ".join(parts)


def _identity_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The zero-compute experts' output ``x * (their weights' sum)`` ``[T, H]``, and the routing with
    their slots emptied (id -1, weight 0) for the kernel (LongCat-Flash)."""
    identity = topk_ids >= num_experts
    out = x * topk_weights.masked_fill(~identity, 0.0).sum(dim=-1, keepdim=True).to(x.dtype)
    return out, topk_weights.masked_fill(identity, 0.0), topk_ids.masked_fill(identity, -1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``x / rms(x) * weight`` computed in fp32, rounded to ``x``'s dtype (``[T, H]``, ``weight [H]``)."""
    assert eps is not None
    f = x.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _adds_whole_output_terms(cfg: LayerConfig, tp_group: dist.ProcessGroup | None, reduce_results: bool) -> bool:
    """Whether this rank adds the terms of the whole output (an output bias, the identity experts'
    ``w * x``): every rank when the output is summed before, only TP rank 0 of a partial sum (whose
    RMSNorm cannot be taken: refused)."""
    if reduce_results or cfg.parallel.tp_size == 1:
        return True
    if cfg.moe.output_norm_eps is not None:
        raise ValueError(
            "reduce_results=False: moe.output_norm_eps norms the whole MoE output, which a tensor-parallel rank's "
            "partial sum is not; keep reduce_results=True"
        )
    return dist.get_rank(tp_group) == 0


def _slot_map(placement: ExpertPlacement, device: torch.device) -> torch.Tensor | None:
    """What the router maps global ids through (:meth:`ExpertPlacement.slot_map`); ``None`` where
    slots are the global ids (contiguous ownership, no replicas)."""
    return None if placement.is_contiguous else placement.slot_map(device)


def _check_given_kernel(kernel: Kernel, ctx: LayerContext) -> None:
    """A kernel passed to the layer must have been composed for the same layer, ranks and device."""
    if kernel.cfg.model_copy(update={"name": ctx.cfg.name}) != ctx.cfg:  # the name is only a label
        raise ValueError(f"kernel was composed for {kernel.cfg!r}, but this layer is {ctx.cfg!r}")
    if kernel.ctx.placement != ctx.placement or kernel.ctx.device != ctx.device:
        raise ValueError(
            f"kernel was composed for {kernel.ctx.placement.describe()} on {kernel.ctx.device}, "
            f"but this layer is {ctx.placement.describe()} on {ctx.device}"
        )
    if kernel.ctx.tp_group is not ctx.tp_group:
        raise ValueError("kernel was composed with another tp_group than this layer's")


def _parameter(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _parameter_name(projection: str, part: str) -> str:
    return projection if part == "weight" else f"{projection}_{part}"
