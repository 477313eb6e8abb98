"""Filling a :class:`~moe_kernels.model.layer.FusedMoE` from checkpoint tensors.

:class:`LayerLoader` owns the bookkeeping of what has been written (per projection and global
expert id, the router, the shared experts) and the translation from checkpoint tensors --
per-expert ``gate_proj [I, H]``, ``up_proj [I, H]``, ``down_proj [H, I]`` in any float dtype, or
already stored in a quantized format with their scales -- into the layer's parameters in the
layer's weight format (:mod:`moe_kernels.mlp.formats`): a float source is quantized into it, a
source in another format is dequantized first. Everything is checked before anything is
copied, so a bad argument leaves the layer unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from moe_kernels.config import LayerConfig, MoEConfig
from moe_kernels.core.validate import expect_tensor
from moe_kernels.mlp import fp8
from moe_kernels.mlp.formats import Dense, Packed4Bit, WeightFormat
from moe_kernels.mlp.shard import IntermediateShard
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.router import Router

if TYPE_CHECKING:
    from moe_kernels.model.checkpoint import MoELayerTensors

#: per-expert tensors keyed by global expert id (int or its decimal string, as checkpoint
#: names spell it), a list/tuple indexed by global id, or one stacked ``[E, ...]`` tensor
ExpertTensors = Mapping[int | str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor

#: the expert projections, as load_weights names them
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: their biases (layers with expert biases)
BIASES = ("gate_proj_bias", "up_proj_bias", "down_proj_bias")
#: the layer's tensors around the experts, by parameter name
EXTRAS = ("input_norm", "output_norm", "output_bias")
SHARED = ("shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_expert_gate")

Copy = tuple[torch.Tensor, torch.Tensor]  # (destination, source)


@dataclass
class LoadState:
    """What has been written: global expert ids per projection, the router, the shared tensors."""

    experts: dict[str, set[int]] = field(default_factory=lambda: {name: set() for name in PROJECTIONS + BIASES})
    router: bool = False
    shared: set[str] = field(default_factory=set)
    extras: set[str] = field(default_factory=set)


class LoadTarget(Protocol):
    """What the loader writes into: a :class:`~moe_kernels.model.layer.FusedMoE`."""

    cfg: LayerConfig
    router: Router
    w13: nn.Parameter
    shared_w13: nn.Parameter | None
    shared_w2: nn.Parameter | None
    shared_gate: nn.Parameter | None

    @property
    def local_experts(self) -> tuple[int, ...]: ...

    def parameter(self, projection: str, part: str) -> nn.Parameter: ...


class LayerLoader:
    """Loads one layer's tensors (see :meth:`FusedMoE.load_weights` for the arguments)."""

    def __init__(self, layer: LoadTarget) -> None:
        self.layer = layer
        self.state = LoadState()

    # --- stored tensors as they are -------------------------------------------------------

    def load_expert_weights(self, weights: ExpertWeights) -> None:
        """Every local expert's tensors, already in the layer's format (``weights.check`` names
        any mismatch before anything is written): what a repacked published checkpoint or
        :func:`~moe_kernels.mlp.weights.quantize_weights` gives."""
        layer = self.layer
        weights.check(layer.cfg.mlp, len(layer.local_experts), layer.w13.device)
        for projection in ("w13", "w2"):
            for part, tensor in weights.tensors(projection).items():
                if tensor is not None:
                    layer.parameter(projection, part).copy_(tensor)
        # the check above demands the biases of a biased layer: they were written too
        for name in PROJECTIONS + (BIASES if layer.cfg.mlp.biases else ()):
            self.state.experts[name] |= set(layer.local_experts)

    # --- what is missing ------------------------------------------------------------------

    def missing(self) -> list[str]:
        """Names of what a forward would read uninitialized, empty when everything is loaded."""
        layer, state = self.layer, self.state
        missing = [] if state.router else ["router_weight"]
        missing += [name for name in self.shared_names() if name not in state.shared]
        missing += [name for name in EXTRAS if getattr(layer, name, None) is not None and name not in state.extras]
        mlp = layer.cfg.mlp
        names = PROJECTIONS + (BIASES if mlp.biases else ())
        for name in names if mlp.activation.gated else [n for n in names if not n.startswith("gate_proj")]:
            absent = [e for e in layer.local_experts if e not in state.experts[name]]
            if absent:
                shown = absent if len(absent) <= 8 else [*absent[:8], "..."]
                missing.append(f"{name} of expert(s) {shown}")
        return missing

    def received(self, experts: tuple[int, ...]) -> None:
        """Count ``experts`` as loaded: their weights came from another rank (a new placement)."""
        for name in PROJECTIONS:
            self.state.experts[name] |= set(experts)

    def shared_names(self) -> list[str]:
        layer = self.layer
        names = ["shared_gate_proj", "shared_up_proj", "shared_down_proj"] if layer.shared_w13 is not None else []
        if names and not layer.cfg.moe.shared_act.gated:
            names.remove("shared_gate_proj")
        return names + (["shared_expert_gate"] if layer.shared_gate is not None else [])

    # --- loading --------------------------------------------------------------------------

    @torch.no_grad()
    def load(
        self,
        projections: Mapping[str, tuple[ExpertTensors | None, ExpertTensors | None]],
        router_weight: torch.Tensor | None,
        e_score_correction_bias: torch.Tensor | None,
        shared: Mapping[str, torch.Tensor | None],
    ) -> None:
        """Check every tensor, then copy them all. ``projections``: name -> (tensors, scales)."""
        layer = self.layer
        moe = layer.cfg.moe
        copies: list[Copy] = []
        loaded: dict[str, set[int]] = {}
        for name, (tensors, scales) in projections.items():
            if tensors is None:
                if scales is not None:
                    raise ValueError(f"{name}_scale was given without {name}")
                continue
            experts, pairs = (
                self._bias_copies(name, tensors) if name in BIASES else self._expert_copies(name, tensors, scales)
            )
            copies += pairs
            loaded[name] = experts
        if router_weight is not None:
            router_shape = (moe.router_width, moe.hidden_size)
            copies.append((layer.router.weight, _float("router_weight", router_weight, router_shape)))
        if e_score_correction_bias is not None:
            bias = layer.router.e_score_correction_bias
            if bias is None:
                raise ValueError("e_score_correction_bias: this layer's config has moe.correction_bias false")
            copies.append((bias, _float("e_score_correction_bias", e_score_correction_bias, (moe.router_width,))))
        copies += self._shared_copies(shared)
        if not copies:
            raise ValueError("load_weights: nothing to load (pass gate_proj, up_proj, down_proj or router_weight)")
        for dst, src in copies:
            dst.copy_(src)
        for name, experts in loaded.items():
            self.state.experts[name] |= experts
        if router_weight is not None:
            layer.router.weight_loaded()
        self.state.router |= router_weight is not None
        self.state.shared |= {name for name, t in shared.items() if t is not None}

    def _expert_copies(
        self, name: str, tensors: ExpertTensors, scales: ExpertTensors | None
    ) -> tuple[set[int], list[Copy]]:
        """The local experts ``tensors`` holds, and (destination, source) pairs for them: each
        projection stored in the layer's format into its rows of ``w13`` (gate, up) or ``w2``."""
        layer = self.layer
        mlp, shard = layer.cfg.mlp, layer.cfg.intermediate_shard
        fmt = mlp.weights
        h = mlp.hidden
        down = name == "down_proj"
        rows = _projection_rows(name, mlp.inter, h, mlp.activation.gated)
        projection = "w2" if down else "w13"
        owned = self._owned_tensors(name, tensors)
        owned_scales = self._owned_tensors(f"{name}_scale", scales) if scales is not None else None
        slots_of: dict[int, list[int]] = {}  # an expert replicated on this rank fills each of its slots
        for local, e in enumerate(layer.local_experts):
            slots_of.setdefault(e, []).append(local)
        copies = []
        if owned_scales is not None and not fmt.is_quantized:
            raise ValueError(f"{name}_scale: the layer is unquantized ({fmt.describe()}); pass float weights")
        shared_scale = fmt.gate_and_up_together and not down
        if owned and (shared_scale or (isinstance(fmt, Packed4Bit) and owned_scales is not None)):
            # gate and up share w13's one fp8 scale (requantized together); packed 4-bit tensors
            # come in their checkpoints' packings, repacked whole (float weights are quantized here)
            raise ValueError(
                f"{name}: a {fmt.describe()} layer loads whole experts with load_expert_weights(weights), the "
                "weights from moe_kernels.model.published.published_expert_weights (a published checkpoint) or "
                "moe_kernels.mlp.weights.quantize_weights (float weights)"
            )
        for expert, src in owned.items():
            if owned_scales is not None and expert not in owned_scales:
                raise ValueError(f"{name}_scale: missing expert {expert} (its {name} was given)")
            scale = None if owned_scales is None else owned_scales[expert]
            stored = _rank_slice(fmt, shard, name, expert, src, scale, h)
            for part, tensor in stored.items():
                param = layer.parameter(projection, part)
                copies += [(param[local, fmt.rows(part, *rows)], tensor) for local in slots_of[expert]]
        return set(owned), copies

    @torch.no_grad()
    def load_extras(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The layer's own tensors around the experts (``output_norm [H]``, ``output_bias [H]``), all
        checked before any is copied."""
        layer, copies = self.layer, []
        for name, t in tensors.items():
            dst = getattr(layer, name, None) if name in EXTRAS else None
            if dst is None:
                raise ValueError(
                    f"{name}: the layer has no such tensor (moe.input_norm_eps, output_norm_eps, output_bias)"
                )
            copies.append((dst, _float(name, t, tuple(dst.shape))))
        for dst, src in copies:
            dst.copy_(src)
        self.state.extras |= set(tensors)

    def _bias_copies(self, name: str, tensors: ExpertTensors) -> tuple[set[int], list[Copy]]:
        """The local experts ``tensors`` holds, and (destination, source) pairs for their biases
        (``gate_proj_bias``/``up_proj_bias [I]``, ``down_proj_bias [H]``) into ``w13_bias``/``w2_bias``."""
        layer = self.layer
        mlp = layer.cfg.mlp
        if not mlp.biases:
            raise ValueError(f"{name}: this layer's config has no expert biases (moe.expert_bias false)")
        projection = name.removesuffix("_bias")
        start, stop = _projection_rows(projection, mlp.inter, mlp.hidden, mlp.activation.gated)
        param = layer.parameter("w2" if projection == "down_proj" else "w13", "bias")
        local_of = {e: local for local, e in enumerate(layer.local_experts)}
        owned = self._owned_tensors(name, tensors)
        shard = layer.cfg.intermediate_shard
        copies = []
        for e, t in owned.items():
            if projection == "down_proj":
                # the TP ranks' partial outputs are summed: the output bias joins on one rank only
                bias = _float(f"{name}[{e}]", t, (stop - start,)) * (shard.rank == 0)
            else:
                bias = _float(f"{name}[{e}]", t, (shard.total,))[shard.start : shard.stop]
            copies.append((param[local_of[e], start:stop], bias))
        return set(owned), copies

    def _owned_tensors(self, name: str, tensors: ExpertTensors) -> dict[int, torch.Tensor]:
        """The experts of this rank that ``tensors`` holds, keyed by global id."""
        layer = self.layer
        num_experts = layer.cfg.moe.num_experts
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
        return {e: by_id[e] for e in layer.local_experts if e in by_id}

    def _shared_copies(self, given: Mapping[str, torch.Tensor | None]) -> list[Copy]:
        """(destination, source) pairs for the shared-expert tensors given."""
        layer = self.layer
        h, width = layer.cfg.moe.hidden_size, layer.cfg.moe.shared_width
        par = layer.cfg.parallel
        shard = IntermediateShard(width, par.tp_size, par.tp_rank)  # the shared MLP is split like the experts
        targets = {}
        if layer.shared_w13 is not None and layer.shared_w2 is not None:
            targets = {
                "shared_gate_proj": (layer.shared_w13[: shard.width], (width, h)),
                "shared_up_proj": (layer.shared_w13[shard.width :], (width, h)),
                "shared_down_proj": (layer.shared_w2, (h, width)),
            }
            if not layer.cfg.moe.shared_act.gated:  # one GEMM1 projection: up fills shared_w13
                targets["shared_up_proj"] = (targets.pop("shared_gate_proj")[0], (width, h))
        if layer.shared_gate is not None:
            targets["shared_expert_gate"] = (layer.shared_gate, (1, h))
        copies = []
        for name, tensor in given.items():
            if tensor is None:
                continue
            if name not in targets:
                has_shared = layer.shared_w13 is not None
                why = "no shared expert gate (moe.shared_expert_gate)" if has_shared else "no shared experts"
                raise ValueError(f"{name}: this layer's config has {why}")
            dst, shape = targets[name]
            if name == "shared_expert_gate" or tuple(getattr(tensor, "shape", ())) == tuple(dst.shape):
                copies.append((dst, _float(name, tensor, tuple(dst.shape))))  # the rank's slice already
                continue
            whole = {"weight": _float(name, tensor, shape)}
            copies.append((dst, shard.take(Dense(), name == "shared_down_proj", whole)["weight"]))
        return copies

    # --- from a checkpoint ----------------------------------------------------------------

    @torch.no_grad()
    def load_checkpoint(
        self, path: str | os.PathLike[str], layer_index: int, naming: str, experts_per_read: int
    ) -> None:
        """See :meth:`FusedMoE.load_checkpoint`."""
        from moe_kernels.model.checkpoint import CheckpointReader, read_moe_layer

        layer = self.layer
        reader = CheckpointReader(path)
        mine = list(dict.fromkeys(layer.local_experts))  # a replicated expert is read once
        if experts_per_read <= 0:
            raise ValueError(f"experts_per_read must be positive, got {experts_per_read}")
        device = layer.w13.device
        moe = layer.cfg.moe
        shared = bool(moe.num_shared_experts)
        par = layer.cfg.parallel  # a tensor-parallel rank reads its slices only
        for start in range(0, len(mine), experts_per_read):
            first = start == 0
            part = read_moe_layer(
                reader, layer_index, mine[start : start + experts_per_read], naming=naming, shared=shared and first,
                router_extras=any(_router_extras(moe).values()), expert_biases=moe.expert_bias,
                layer_extras=any(_layer_extras(moe).values()), identity_experts=moe.identity_experts, device=device,
                tensor_parallel=(par.tp_size, par.tp_rank) if par.tp_size > 1 else None,
            )  # fmt: skip
            _check_part(layer.cfg, part, f"{path}: layer {layer_index}")
            if first:
                layer.router.load_tensors(**part.router_extras)
                self.load_extras(part.layer_extras)
            self.load(
                _part_projections(part, layer.cfg.mlp.weights.is_quantized),
                part.router_weight if first else None,
                part.e_score_correction_bias if first else None,
                _checkpoint_shared(part.shared) if shared and first else {},
            )


def _check_part(cfg: LayerConfig, part: MoELayerTensors, where: str) -> None:
    """Refuse a checkpoint layer whose routing or expert MLP is not what ``cfg`` computes (naming the
    tensor and the config field), rather than compute something else."""
    moe, mlp = cfg.moe, cfg.mlp
    has_bias = part.e_score_correction_bias is not None
    if has_bias != moe.correction_bias:
        has = "has an" if has_bias else "has no"
        raise ValueError(
            f"{where} {has} e_score_correction_bias (DeepSeek-V3 noaux_tc routing), but the config has "
            f"moe.correction_bias {str(moe.correction_bias).lower()}"
        )
    if not part.gate_proj and mlp.activation.gated:
        raise ValueError(
            f"{where}: its experts are not gated (no gate projection), but the config's activation is "
            f"{mlp.activation.describe()}"
        )
    if mlp.biases and part.down_proj_bias is None:
        raise ValueError(f"{where} has no expert biases, but the config has moe.expert_bias true")
    for name, wanted in _router_extras(moe).items():
        if wanted and name not in part.router_extras:
            raise ValueError(f"{where} has no router {name}, which the config's routing needs")
    for name, wanted in _layer_extras(moe).items():
        if wanted and name not in part.layer_extras:
            raise ValueError(f"{where} has no {name}, which the config's MoE layer needs")


def _router_extras(moe: MoEConfig) -> dict[str, bool]:
    """Which of the Router's optional tensors the config needs, by parameter name."""
    return {
        "bias": moe.router_bias,
        "tid2eid": moe.hash_routing,
        "input_scale": moe.router_input_norm,
        "expert_scale": moe.expert_weight_scale,
    }


def _layer_extras(moe: MoEConfig) -> dict[str, bool]:
    """Which of the layer's tensors around the experts (:data:`EXTRAS`) the config needs."""
    return {
        "input_norm": moe.input_norm_eps is not None,
        "output_norm": moe.output_norm_eps is not None,
        "output_bias": moe.output_bias,
    }


def _part_projections(part: MoELayerTensors, quantized_layer: bool) -> dict[str, tuple[Any, Any]]:
    """A checkpoint part as ``load`` arguments: the projections (an fp8 checkpoint into an unquantized
    layer dequantized: the weights it stands for) and the expert biases."""
    projections: dict[str, tuple[Any, Any]] = {
        "gate_proj": (part.gate_proj or None, part.gate_proj_scale or None),
        "up_proj": (part.up_proj, part.up_proj_scale),
        "down_proj": (part.down_proj, part.down_proj_scale),
    }
    if part.is_fp8 and not quantized_layer:
        projections = {name: (_dequantized(tensors, scales), None) for name, (tensors, scales) in projections.items()}
    for name in BIASES:
        projections[name] = (getattr(part, name) or None, None)
    return projections


def _dequantized(tensors: object, scales: object) -> dict[int, torch.Tensor] | None:
    """Per-expert fp8 blocks and their scales (dicts by expert id) as the float weights they stand for."""
    if tensors is None:
        return None
    assert isinstance(tensors, dict) and isinstance(scales, dict)
    return {e: fp8.dequantize_blocks(w, scales[e]) for e, w in tensors.items()}


def _projection_rows(name: str, inter: int, hidden: int, gated: bool) -> tuple[int, int]:
    """Rows of ``w13`` (gate, up) or ``w2`` (down) a projection fills. A non-gated MLP has no
    gate: its one GEMM1 projection is ``up_proj`` and fills all of ``w13``."""
    if name == "down_proj":
        return 0, hidden
    if not gated:
        if name == "gate_proj":
            raise ValueError("gate_proj: this layer's activation is not gated (w13 is the up projection alone)")
        return 0, inter
    return (0, inter) if name == "gate_proj" else (inter, 2 * inter)


def _rank_slice(
    fmt: WeightFormat,
    shard: IntermediateShard,
    name: str,
    expert: int,
    src: torch.Tensor,
    scale: torch.Tensor | None,
    hidden: int,
) -> dict[str, torch.Tensor]:
    """The rank's slice of one projection stored in ``fmt``, from the whole projection as
    checkpoints hold it or from the slice alone (as a tensor-parallel read gives it; told apart
    by shape), float (quantized here) or already stored with its ``scale``."""
    down = name == "down_proj"
    whole = (hidden, shard.total) if down else (shard.total, hidden)
    part = (hidden, shard.width) if down else (shard.width, hidden)
    sliced = not shard.is_whole and isinstance(src, torch.Tensor) and tuple(src.shape) == part
    shape = part if sliced else whole
    if scale is None:
        weight = {"weight": _float(f"{name}[{expert}]", src, shape)}
        return fmt.quantize((weight if sliced else shard.take(fmt, down, weight))["weight"].float())
    stored = _stored_as(fmt, name, expert, {"weight": src, "scale": scale}, shape)
    return stored if sliced else shard.take(fmt, down, stored)


def _stored_as(
    fmt: WeightFormat, name: str, expert: int, given: Mapping[str, object], shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """A projection given already stored (``given``: its ``weight`` and ``scale``), checked
    against the layer's format ``fmt`` for an ``[N, K] = shape`` projection."""
    stored = fmt.stored(*shape)
    out = {}
    for part, (want_shape, dtype) in stored.items():
        label = f"{name}[{expert}]" if part == "weight" else f"{name}_{part}[{expert}]"
        out[part] = _checked(label, given.get(part), want_shape, (dtype,))
    return out


def _checkpoint_shared(shared: object) -> dict[str, torch.Tensor | None]:
    """The shared expert of a checkpoint layer as load_weights arguments (fp8 ones dequantized:
    the shared MLP runs in the activation dtype)."""
    assert shared is not None
    out: dict[str, torch.Tensor | None] = {"shared_expert_gate": shared.expert_gate}  # type: ignore[attr-defined]
    for name in ("gate_proj", "up_proj", "down_proj"):
        weight, scale = getattr(shared, name), getattr(shared, f"{name}_scale")
        if weight is not None and scale is not None:
            weight = fp8.dequantize_blocks(weight, scale)
        out[f"shared_{name}"] = weight
    return out


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
    if not t.is_floating_point() or t.dtype == fp8.FP8_DTYPE:
        raise TypeError(f"{name} must be a floating-point tensor (bf16/fp16/fp32), got {t.dtype}")
    return _checked(name, t, shape, (t.dtype,))
