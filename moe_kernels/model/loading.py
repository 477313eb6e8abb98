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
from typing import Protocol

import torch
from torch import nn

from moe_kernels.config import LayerConfig
from moe_kernels.core.validate import expect_tensor
from moe_kernels.mlp import fp8
from moe_kernels.mlp.formats import Fp8Tensor, Packed4Bit, WeightFormat
from moe_kernels.mlp.weights import ExpertWeights
from moe_kernels.model.router import Router

#: per-expert tensors keyed by global expert id (int or its decimal string, as checkpoint
#: names spell it), a list/tuple indexed by global id, or one stacked ``[E, ...]`` tensor
ExpertTensors = Mapping[int | str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor

#: the expert projections, as load_weights names them
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SHARED = ("shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_expert_gate")

Copy = tuple[torch.Tensor, torch.Tensor]  # (destination, source)


@dataclass
class LoadState:
    """What has been written: global expert ids per projection, the router, the shared tensors."""

    experts: dict[str, set[int]] = field(default_factory=lambda: {name: set() for name in PROJECTIONS})
    router: bool = False
    shared: set[str] = field(default_factory=set)


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
        for name in PROJECTIONS:
            self.state.experts[name] |= set(layer.local_experts)

    # --- what is missing ------------------------------------------------------------------

    def missing(self) -> list[str]:
        """Names of what a forward would read uninitialized, empty when everything is loaded."""
        layer, state = self.layer, self.state
        missing = [] if state.router else ["router_weight"]
        missing += [name for name in self.shared_names() if name not in state.shared]
        gated = layer.cfg.mlp.activation.gated
        for name in PROJECTIONS if gated else ("up_proj", "down_proj"):
            absent = [e for e in layer.local_experts if e not in state.experts[name]]
            if absent:
                shown = absent if len(absent) <= 8 else [*absent[:8], "..."]
                missing.append(f"{name} of expert(s) {shown}")
        return missing

    def shared_names(self) -> list[str]:
        layer = self.layer
        names = ["shared_gate_proj", "shared_up_proj", "shared_down_proj"] if layer.shared_w13 is not None else []
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
            experts, pairs = self._expert_copies(name, tensors, scales)
            copies += pairs
            loaded[name] = experts
        if router_weight is not None:
            router_shape = (moe.num_experts, moe.hidden_size)
            copies.append((layer.router.weight, _float("router_weight", router_weight, router_shape)))
        if e_score_correction_bias is not None:
            bias = layer.router.e_score_correction_bias
            if bias is None:
                raise ValueError("e_score_correction_bias: this layer's config has moe.correction_bias false")
            copies.append((bias, _float("e_score_correction_bias", e_score_correction_bias, (moe.num_experts,))))
        copies += self._shared_copies(shared)
        if not copies:
            raise ValueError("load_weights: nothing to load (pass gate_proj, up_proj, down_proj or router_weight)")
        for dst, src in copies:
            dst.copy_(src)
        for name, experts in loaded.items():
            self.state.experts[name] |= experts
        self.state.router |= router_weight is not None
        self.state.shared |= {name for name, t in shared.items() if t is not None}

    def _expert_copies(
        self, name: str, tensors: ExpertTensors, scales: ExpertTensors | None
    ) -> tuple[set[int], list[Copy]]:
        """The local experts ``tensors`` holds, and (destination, source) pairs for them: each
        projection stored in the layer's format into its rows of ``w13`` (gate, up) or ``w2``."""
        layer = self.layer
        mlp = layer.cfg.mlp
        fmt = mlp.weights
        h, i = mlp.hidden, mlp.inter
        down = name == "down_proj"
        shape = (h, i) if down else (i, h)
        rows = _projection_rows(name, i, h, mlp.activation.gated)
        projection = "w2" if down else "w13"
        owned = self._owned_tensors(name, tensors)
        owned_scales = self._owned_tensors(f"{name}_scale", scales) if scales is not None else None
        local_of = {e: local for local, e in enumerate(layer.local_experts)}
        copies = []
        if owned_scales is not None and not fmt.is_quantized:
            raise ValueError(f"{name}_scale: the layer is unquantized ({fmt.describe()}); pass float weights")
        shared_scale = isinstance(fmt, Fp8Tensor) and not down
        if owned and (shared_scale or (isinstance(fmt, Packed4Bit) and owned_scales is not None)):
            # gate and up share w13's one fp8 scale (requantized together); packed 4-bit tensors
            # come in their checkpoints' packings, repacked whole (float weights are quantized here)
            raise ValueError(
                f"{name}: a {fmt.describe()} layer loads whole experts with load_expert_weights(weights), the "
                "weights from moe_kernels.model.published.published_expert_weights (a published checkpoint) or "
                "moe_kernels.mlp.weights.quantize_weights (float weights)"
            )
        for expert, src in owned.items():
            if owned_scales is None:
                stored = fmt.quantize(_float(f"{name}[{expert}]", src, shape).float())
            else:
                if expert not in owned_scales:
                    raise ValueError(f"{name}_scale: missing expert {expert} (its {name} was given)")
                stored = _stored_as(fmt, name, expert, {"weight": src, "scale": owned_scales[expert]}, shape)
            for part, tensor in stored.items():
                param = layer.parameter(projection, part)
                copies.append((param[local_of[expert], fmt.rows(part, *rows)], tensor))
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
        targets = {}
        if layer.shared_w13 is not None and layer.shared_w2 is not None:
            targets = {
                "shared_gate_proj": (layer.shared_w13[:width], (width, h)),
                "shared_up_proj": (layer.shared_w13[width:], (width, h)),
                "shared_down_proj": (layer.shared_w2, (h, width)),
            }
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
            copies.append((dst, _float(name, tensor, shape)))
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
        mine = list(layer.local_experts)
        if experts_per_read <= 0:
            raise ValueError(f"experts_per_read must be positive, got {experts_per_read}")
        device = layer.w13.device
        shared = bool(layer.cfg.moe.num_shared_experts)
        for start in range(0, len(mine), experts_per_read):
            first = start == 0
            part = read_moe_layer(
                reader, layer_index, mine[start : start + experts_per_read], naming=naming, shared=shared and first,
                device=device,
            )  # fmt: skip
            bias = part.e_score_correction_bias
            if bias is not None and not layer.cfg.moe.correction_bias:
                raise ValueError(
                    f"{path}: layer {layer_index} has an e_score_correction_bias (DeepSeek-V3 noaux_tc routing), but "
                    "the config has moe.correction_bias false: set it to true"
                )
            if bias is None and layer.cfg.moe.correction_bias:
                raise ValueError(
                    f"{path}: layer {layer_index} has no e_score_correction_bias, but moe.correction_bias is true"
                )
            projections = {
                "gate_proj": (part.gate_proj, part.gate_proj_scale),
                "up_proj": (part.up_proj, part.up_proj_scale),
                "down_proj": (part.down_proj, part.down_proj_scale),
            }
            if part.is_fp8 and not layer.cfg.mlp.weights.is_quantized:
                # an fp8 checkpoint into an unquantized layer: the weights it stands for
                projections = {
                    name: ({e: fp8.dequantize_blocks(w, scales[e]) for e, w in tensors.items()}, None)
                    for name, (tensors, scales) in projections.items()
                }
            self.load(
                projections,
                part.router_weight if first else None,
                bias if first else None,
                _checkpoint_shared(part.shared) if shared and first else {},
            )


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


def _stored_as(
    fmt: WeightFormat, name: str, expert: int, given: dict[str, object], shape: tuple[int, int]
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
        if scale is not None:
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
