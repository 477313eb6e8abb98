"""The MoE calls as registered ``torch.library`` ops, so ``torch.compile`` sees one opaque node.

A layer call routes, runs the shared experts (on a side stream on a GPU), dispatches, computes
and combines: host-side decisions (which kernel for this token count, chunking, CUDA streams
and events, a workspace cache keyed by Python objects) that the compiler must not trace into.
Like vLLM's ``moe_forward``, the call is therefore one custom op whose fake implementation
states the output's shape and dtype, and the op finds its layer (or kernel) by a string key
that is a constant of the compiled graph:

* ``moe_kernels::fused_moe_layer(Tensor hidden_states, str layer) -> Tensor`` -- the whole
  :class:`~moe_kernels.model.layer.FusedMoE` forward (router, shared experts, routed experts).
  ``FusedMoE.forward`` calls it while compiling; eager calls go straight in.
* ``moe_kernels::moe_kernel(...) -> Tensor`` -- a composed kernel's call after routing
  (``x``, ``topk_weights``, ``topk_ids``, the expert weights and scales, an optional residual):
  for callers that route in their own compiled code (the vLLM-style ``fused_experts``).

Both return a new tensor and write none of their arguments (``mutates_args=()``), so the
compiler needs no functionalization around them; each allocates its output inside, which the
compiled graph reads as a fresh buffer. Keys are held weakly: a layer or kernel that is
garbage-collected drops out of the registry.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from moe_kernels.core.compose import Kernel
from moe_kernels.mlp.weights import ExpertWeights

_layers: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_kernels: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_serial = itertools.count()


def register_layer(layer: object) -> str:
    """Give ``layer`` (an object with ``forward_eager(hidden_states) -> Tensor``) a key for
    :func:`fused_moe_layer`; the registry holds it weakly."""
    key = f"layer{next(_serial)}"
    _layers[key] = layer
    return key


def register_kernel(kernel: Kernel) -> str:
    """Give ``kernel`` a key for :func:`moe_kernel`; the registry holds it weakly."""
    key = f"kernel{next(_serial)}"
    _kernels[key] = kernel
    return key


def _lookup(registry: weakref.WeakValueDictionary[str, Any], key: str, what: str) -> Any:
    found = registry.get(key)
    if found is None:
        raise KeyError(f"{what} {key!r} is not registered (garbage-collected, or from another process)")
    return found


@torch.library.custom_op("moe_kernels::fused_moe_layer", mutates_args=())
def fused_moe_layer(hidden_states: torch.Tensor, layer: str) -> torch.Tensor:
    """``hidden_states [T, H]`` -> ``[T, H]`` through the registered layer ``layer``."""
    return _lookup(_layers, layer, "layer").forward_eager(hidden_states)


@fused_moe_layer.register_fake
def _fused_moe_layer_fake(hidden_states: torch.Tensor, layer: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


@torch.library.custom_op("moe_kernels::moe_kernel", mutates_args=())
def moe_kernel(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    residual: torch.Tensor | None,
    kernel: str,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """``x [T, H]``, ``topk_weights [T, K]`` float32, ``topk_ids [T, K]`` global ids, the local
    experts' stored tensors (as :class:`~moe_kernels.mlp.weights.ExpertWeights`), ``residual
    [T, H]`` or ``None`` -> ``[T, H]`` through the registered kernel ``kernel``."""
    composed = _lookup(_kernels, kernel, "kernel")
    weights = ExpertWeights(w13, w2, w13_scale, w2_scale, format=composed.cfg.mlp.weights)
    return composed(
        x,
        weights,
        topk_weights,
        topk_ids,
        residual=residual,
        apply_router_weight_on_input=apply_router_weight_on_input,
        check_values=False,
    )


@moe_kernel.register_fake
def _moe_kernel_fake(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(x)


def call_kernel(
    key: str,
    x: torch.Tensor,
    weights: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """Call the kernel registered as ``key`` through :func:`moe_kernel` (what a compiled caller
    sees as one node)."""
    op: Callable[..., torch.Tensor] = torch.ops.moe_kernels.moe_kernel
    return op(
        x,
        topk_weights,
        topk_ids,
        weights.w13,
        weights.w2,
        weights.w13_scale,
        weights.w2_scale,
        residual,
        key,
        apply_router_weight_on_input,
    )
