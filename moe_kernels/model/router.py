"""Top-k routing: which experts each token goes to, and with what weight.

``route`` turns router logits into ``(topk_weights [T, K] float32, topk_ids [T, K] int32)``,
the two tensors every kernel of :mod:`moe_kernels.core.contract` takes. It covers the routings of
the model families ``transformers`` ships (docs/configs.md lists them), among them:

- Mixtral / Qwen3-MoE: softmax over all experts, top-k, renormalize over the chosen k;
  Granite, Aria, gpt-oss: top-k of the logits, softmax over those k (``choose_on="logits"``);
- DeepSeek-V3 (``noaux_tc``): sigmoid scores; a per-expert correction bias that only steers
  *which* experts are chosen; experts in ``num_expert_group`` groups of which the best
  ``topk_group`` are kept, a group scored by the sum of its two best biased scores; the
  weights come from the unbiased scores, renormalized, then multiplied by
  ``routed_scaling_factor``; A.X-K2 and Mistral-4 fill the other groups with 0, not -inf;
- DeepSeek-V2 style grouped routing without a bias: a group is scored by its best expert;
- DeepSeek-V4: ``sqrt(softplus(logits))`` scores, and in its first layers experts taken from a
  table by token id (hash routing); Kolibri: the bias added to the logits, not the scores;
  DBRX: weights divided by their p-norm; Phi-3.5-MoE: sparsemixer; Gemma-4: a normalised router
  input and a learned scale per expert; Laguna: soft-capped logits.

Scores are computed in float32 whatever the logits' dtype: bf16 has ~3 significant digits,
enough to swap two close experts' ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.backends.triton import interpreting
from moe_kernels.config import MoEConfig
from moe_kernels.core.placement import choose_slots
from moe_kernels.kernels.routing import FusedRouting, fused_route

GroupScore = Literal["max", "top2_sum"]
Scoring = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class Routing:
    """How logits become experts and weights, beside ``top_k`` (the module docstring maps the options to
    model families). :meth:`of` reads them from a layer's :class:`~moe_kernels.config.MoEConfig`.

    Attributes:
        scoring: ``"softmax"`` over the E experts, or an independent score per expert (``"sigmoid"``:
            ``per_expert_score``, sigmoid or ``"sqrtsoftplus"``).
        choose_on: top-k over the ``"scores"`` or the ``"logits"`` (+ the correction bias either way);
            the weights are the chosen experts' scores.
        renormalize: divide the chosen weights by their sum, or by their ``renormalize_p``-norm.
        num_expert_group, topk_group: the E experts form ``num_expert_group`` equal groups; only experts of
            the best ``topk_group`` groups may be chosen. Both or neither.
        group_score: ``"max"`` (a group's best expert) or ``"top2_sum"``; ``None``: ``top2_sum`` with a
            correction bias, ``max`` without. ``group_fill``: what experts outside kept groups score.
        routed_scaling_factor: multiplies the final weights (after renormalization).
        logit_scale, logit_softcap: logits are multiplied by ``logit_scale``, then capped as
            ``c * tanh(logits / c)``, before scoring.
        sparsemixer_eps: route by Phi-3.5-MoE's sparsemixer instead (softmax scoring, two experts, each
            weighted by a softmax over the experts within ``2 * eps`` of it, relative to their magnitude).
    """

    scoring: Scoring = "softmax"
    per_expert_score: Literal["sigmoid", "sqrtsoftplus"] = "sigmoid"
    choose_on: Literal["scores", "logits"] = "scores"
    renormalize: bool = True
    renormalize_p: float = 1.0
    num_expert_group: int | None = None
    topk_group: int | None = None
    group_score: GroupScore | None = None
    group_fill: Literal["-inf", "zero"] = "-inf"
    routed_scaling_factor: float = 1.0
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    sparsemixer_eps: float | None = None

    @classmethod
    def of(cls, moe: MoEConfig) -> Routing:
        return cls(**{f.name: getattr(moe, f.name) for f in fields(cls)})

    def group_score_with(self, correction_bias: bool) -> GroupScore:
        """The group score in force: ``group_score``, else ``top2_sum`` with a correction bias and
        ``max`` without."""
        return self.group_score or ("top2_sum" if correction_bias else "max")

    def fused(self, num_experts: int, *, correction_bias: bool) -> FusedRouting | None:
        """These options as the one-launch routing kernel takes them
        (:func:`moe_kernels.kernels.routing.fused_route`), or ``None`` where it does not implement
        them: sparsemixer, scaled or capped logits, sqrt-softplus scores, p-norms other than 1, and
        other groups filled with 0 -- those experts then tie, and the model routes to whichever
        ``torch.topk`` happens to return first, an order the kernel cannot reproduce."""
        if (
            self.group_fill == "zero"
            or self.sparsemixer_eps is not None
            or self.logit_scale != 1.0
            or self.logit_softcap is not None
            or (self.scoring == "sigmoid" and self.per_expert_score != "sigmoid")
            or (self.renormalize and self.renormalize_p != 1.0)
        ):
            return None
        groups = self.num_expert_group or 1
        score = self.group_score_with(correction_bias)
        return FusedRouting(
            softmax=self.scoring == "softmax",
            choose_on_logits=self.choose_on == "logits",
            renormalize=self.renormalize,
            num_groups=groups,
            topk_group=self.topk_group or 1,
            top2_sum=score == "top2_sum" and num_experts // groups >= 2,
            scaling=self.routed_scaling_factor,
        )


def route(
    router_logits: torch.Tensor,
    top_k: int,
    routing: Routing | None = None,
    *,
    correction_bias: torch.Tensor | None = None,
    expert_scale: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` distinct experts per token: ``router_logits [T, E]`` (any floating dtype) ->
    ``topk_weights [T, K]`` float32 and ``topk_ids [T, K]`` int32, best expert first (for ``expert_ids``,
    in their order), on the logits' device.

    Args:
        top_k: experts per token, ``1 <= top_k <= E``.
        routing: the options (:class:`Routing`); or give its fields as keywords (``scoring="sigmoid"``).
        correction_bias: ``[E]``, added to what experts and groups are chosen on (DeepSeek-V3's
            ``e_score_correction_bias``); never part of the weights.
        expert_scale: ``[E]``, multiplies each chosen expert's weight after renormalization (Gemma-4).
        expert_ids: ``[T, top_k]`` ids chosen elsewhere (hash routing); weighted by their scores as above.
    """
    if routing is not None and options:
        raise TypeError(f"pass routing= or its fields as keywords, not both (got {sorted(options)})")
    try:
        r = routing if routing is not None else Routing(**options)
    except TypeError:
        unknown = sorted(set(options) - {f.name for f in fields(Routing)})
        raise TypeError(
            f"route() got unknown options {unknown}; Routing has {[f.name for f in fields(Routing)]}"
        ) from None
    num_experts = _check_route_args(
        router_logits, top_k, r.scoring, r.num_expert_group, r.topk_group, r.routed_scaling_factor, correction_bias
    )
    _check_variant_args(num_experts, top_k, r.scoring, expert_scale, r.sparsemixer_eps, expert_ids, router_logits)
    logits = router_logits.float() * r.logit_scale if r.logit_scale != 1.0 else router_logits.float()
    if r.logit_softcap is not None:
        logits = torch.tanh(logits / r.logit_softcap) * r.logit_softcap
    if r.sparsemixer_eps is not None:
        topk_weights, topk_ids = _sparsemixer(logits, r.sparsemixer_eps)
    else:
        scores = _score(logits, r.scoring, r.per_expert_score)
        if expert_ids is not None:
            topk_ids = expert_ids.long()
        else:
            topk_ids = _choose_ids(scores if r.choose_on == "scores" else logits, top_k, correction_bias, r)
        topk_weights = scores.gather(1, topk_ids)
        if r.renormalize:
            # the norm is > 0: softmax, sigmoid and sqrtsoftplus scores are positive
            topk_weights = topk_weights / topk_weights.norm(p=r.renormalize_p, dim=-1, keepdim=True)
    if expert_scale is not None:
        topk_weights = topk_weights * expert_scale.float()[topk_ids]
    if r.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * r.routed_scaling_factor
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()


def _choose_ids(choice: torch.Tensor, top_k: int, correction_bias: torch.Tensor | None, r: Routing) -> torch.Tensor:
    """The ``top_k`` best experts ``[T, K]`` int64 of ``choice [T, E]`` float32 (+ the correction bias),
    within each token's best groups under grouped routing."""
    if correction_bias is not None:
        choice = choice + correction_bias.float()
    if r.num_expert_group is not None:
        assert r.topk_group is not None  # checked together with num_expert_group
        score = r.group_score_with(correction_bias is not None)
        choice = _mask_to_best_groups(choice, choice.shape[1], r.num_expert_group, r.topk_group, score, r.group_fill)
    return choice.topk(top_k, dim=-1).indices


def _score(logits: torch.Tensor, scoring: str, per_expert_score: str) -> torch.Tensor:
    """Scores ``[T, E]`` float32 of float32 logits."""
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    if per_expert_score == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's inference routing: the best expert, then the best of the others; each weighted by
    a softmax over the logits within ``2 * eps`` (relative to their magnitude) of its own logit."""
    weights, ids = [], []
    masked = logits
    for _ in range(2):
        best, best_id = masked.max(dim=-1, keepdim=True)
        # experts too far below this choice leave its softmax (ties to the top keep a share)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        share = masked.masked_fill(far, float("-inf")).softmax(dim=-1)
        weights.append(share.gather(1, best_id))
        ids.append(best_id)
        masked = masked.scatter(1, best_id, float("-inf"))
    return torch.cat(weights, dim=1), torch.cat(ids, dim=1)


def _mask_to_best_groups(
    choice: torch.Tensor,
    num_experts: int,
    num_groups: int,
    topk_group: int,
    group_score: GroupScore,
    fill: Literal["-inf", "zero"],
) -> torch.Tensor:
    """``choice [T, E]`` with every expert outside each token's best ``topk_group`` groups set to
    ``fill``, so the following top-k cannot pick it (with -inf) or picks it only over kept experts
    that score below 0 (with 0, as A.X-K2 and Mistral-4 do)."""
    t = choice.shape[0]
    per_group = num_experts // num_groups
    grouped = choice.view(t, num_groups, per_group)
    if group_score == "top2_sum":
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best_groups = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros(t, num_groups, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, best_groups, True)
    value = float("-inf") if fill == "-inf" else 0.0
    return grouped.masked_fill(~keep.unsqueeze(-1), value).view(t, num_experts)


def _check_route_args(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    num_expert_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
    correction_bias: torch.Tensor | None,
) -> int:
    """Raise TypeError/ValueError naming the bad argument; return E."""
    if not isinstance(router_logits, torch.Tensor) or not router_logits.is_floating_point():
        what = router_logits.dtype if isinstance(router_logits, torch.Tensor) else type(router_logits).__name__
        raise TypeError(f"router_logits must be a floating-point tensor, got {what}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E] (2-D), got shape {list(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}] (E = router_logits.shape[1]), got {top_k!r}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if not routed_scaling_factor > 0:
        raise ValueError(f"routed_scaling_factor must be > 0, got {routed_scaling_factor}")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            f"num_expert_group and topk_group must be given together, got {num_expert_group} and {topk_group}"
        )
    if num_expert_group is not None:
        assert topk_group is not None
        if num_expert_group <= 0 or num_experts % num_expert_group:
            raise ValueError(f"num_expert_group ({num_expert_group}) must be > 0 and divide E ({num_experts})")
        if not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"topk_group must be in [1, num_expert_group={num_expert_group}], got {topk_group}")
        per_group = num_experts // num_expert_group
        if top_k > topk_group * per_group:
            raise ValueError(f"top_k ({top_k}) exceeds the experts of topk_group groups ({topk_group} x {per_group})")
    if correction_bias is not None:
        _check_vector("correction_bias", correction_bias, num_experts, router_logits.device)
    return num_experts


def _check_vector(name: str, t: object, num_experts: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if tuple(t.shape) != (num_experts,):
        raise ValueError(f"{name} must have shape [{num_experts}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (router_logits' device), got {t.device}")


def _check_variant_args(
    num_experts: int,
    top_k: int,
    scoring: str,
    expert_scale: torch.Tensor | None,
    sparsemixer_eps: float | None,
    expert_ids: torch.Tensor | None,
    router_logits: torch.Tensor,
) -> None:
    if sparsemixer_eps is not None and (scoring != "softmax" or top_k != 2 or expert_ids is not None):
        raise ValueError(
            f"sparsemixer_eps: sparsemixer routing softmaxes and picks its own 2 experts; got scoring {scoring!r}, "
            f"top_k {top_k}{', expert_ids' if expert_ids is not None else ''}"
        )
    if expert_scale is not None:
        _check_vector("expert_scale", expert_scale, num_experts, router_logits.device)
    if expert_ids is None:
        return
    expected = (router_logits.shape[0], top_k)
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("expert_ids must be an int32 or int64 tensor")
    if tuple(expert_ids.shape) != expected:
        raise ValueError(f"expert_ids must have shape {list(expected)}, got {list(expert_ids.shape)}")


class Router(nn.Module):
    """The gate of an MoE layer: ``logits = x @ weight.T (+ bias)``, then :func:`route` with the
    layer's routing settings.

    Parameters (inference only, ``requires_grad=False``):
        weight: ``[E, H]`` in ``moe.router_dtype`` (``moe.dtype`` when unset). Uninitialized until loaded.
        bias: ``[E]`` in the same dtype, with ``moe.router_bias`` (gpt-oss). Zeros until loaded.
        e_score_correction_bias: ``[E]`` float32, only when ``moe.correction_bias`` is set
            (DeepSeek-V3's ``noaux_tc`` routing). Zeros until loaded.
        input_scale: ``[H]`` in the weight's dtype, with ``moe.router_input_norm`` (Gemma-4). Ones until loaded.
        expert_scale: ``[E]`` float32, with ``moe.expert_weight_scale`` (Gemma-4). Ones until loaded.
        tid2eid: ``[vocab, K]`` int64, with ``moe.hash_routing``; ``None`` until loaded (its vocabulary
            size comes from the checkpoint).

    The gate GEMM runs in the weight's dtype (fp32 for the DeepSeek family, as ``transformers``
    computes it; the model dtype otherwise, as inference engines run it) and routing in fp32.

    An fp32 gate whose loaded values are all exact in the model dtype (DeepSeek-V3 publishes its
    gate in bf16) keeps a copy in that dtype, ``gate_lowp [E, H]``: on a GPU the GEMM then reads
    bf16 operands and writes fp32 (``torch.mm(..., out_dtype=float32)``). Products of two bf16
    numbers are exact in fp32 and the sum accumulates in fp32, so the logits are the fp32 GEMM's
    up to summation order, at the bf16 GEMM's cost. The copy is refreshed by every load
    (:meth:`load_tensors`, ``load_state_dict``, FusedMoE's loaders through :meth:`weight_loaded`).

    On a GPU (or under the Triton interpreter) the routing after the GEMM is one launch of
    :func:`~moe_kernels.kernels.routing.fused_route` where :meth:`Routing.fused` allows it, and
    :func:`route` otherwise.
    """

    #: the floating-point parameters load_tensors fills by name
    _FLOAT_PARAMS = ("weight", "bias", "e_score_correction_bias", "input_scale", "expert_scale")

    def __init__(self, moe: MoEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.routing = Routing.of(moe)
        e, h = moe.router_width, moe.hidden_size
        wdtype = moe.router_dtype or moe.dtype

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        self.weight = param(torch.empty(e, h, dtype=wdtype, device=device))
        self.bias = param(torch.zeros(e, dtype=wdtype, device=device)) if moe.router_bias else None
        self.e_score_correction_bias = (
            param(torch.zeros(e, dtype=torch.float32, device=device)) if moe.correction_bias else None
        )
        self.input_scale = param(torch.ones(h, dtype=wdtype, device=device)) if moe.router_input_norm else None
        self.expert_scale = (
            param(torch.ones(e, dtype=torch.float32, device=device)) if moe.expert_weight_scale else None
        )
        self.tid2eid: torch.Tensor | None
        self.register_buffer("tid2eid", None)  # sized by the checkpoint's vocabulary when loaded
        self.gate_lowp: torch.Tensor | None
        self.register_buffer("gate_lowp", None, persistent=False)
        # hash routing takes its ids from a table and a per-expert scale multiplies after the
        # choice: both stay with route()
        self._fused = (
            None
            if moe.hash_routing or moe.expert_weight_scale
            else self.routing.fused(e, correction_bias=moe.correction_bias)
        )
        self.register_load_state_dict_post_hook(lambda module, _keys: module.weight_loaded())

    @torch.no_grad()
    def weight_loaded(self) -> None:
        """Refresh ``gate_lowp`` after ``weight`` was written: the weight in ``moe.dtype`` when it is
        an fp32 gate whose every value that dtype holds exactly, else ``None``. Reads the weight
        once (a host sync): call it when loading, never on the call path."""
        w, lowp_dtype = self.weight, self.moe.dtype
        self.gate_lowp = None
        # the normalised input (router_input_norm) is not exact in the low dtype
        low_precision = lowp_dtype in (torch.bfloat16, torch.float16)
        if w.dtype != torch.float32 or not low_precision or self.input_scale is not None:
            return
        lowp = w.to(lowp_dtype)
        if torch.equal(lowp.float(), w):
            self.gate_lowp = lowp

    @torch.no_grad()
    def load_tensors(self, **tensors: torch.Tensor) -> None:
        """Copy checkpoint tensors into the parameters of the same name (``weight``, ``bias``,
        ``e_score_correction_bias``, ``input_scale``, ``expert_scale``, ``tid2eid``; floats are
        converted to the parameter's dtype). Everything is checked before anything is copied.

        Raises:
            ValueError: a name this router's config has no parameter for, or a wrong shape.
            TypeError: a non-floating tensor for a float parameter, or a non-integer ``tid2eid``.
        """
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        table = tensors.pop("tid2eid", None)
        if table is not None:
            if not self.moe.hash_routing:
                raise ValueError("tid2eid: this router's config has moe.hash_routing false")
            if table.dtype not in (torch.int32, torch.int64) or table.dim() != 2 or table.shape[1] != self.moe.top_k:
                raise TypeError(
                    f"tid2eid must be an integer [vocab, {self.moe.top_k}] table, got {table.dtype} {list(table.shape)}"
                )
        for name, t in tensors.items():
            dst = getattr(self, name, None) if name in self._FLOAT_PARAMS else None
            if dst is None:
                raise ValueError(f"{name}: this router's config has no such parameter ({self.extra_repr()})")
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor")
            if t.shape != dst.shape:
                raise ValueError(f"{name} must have shape {list(dst.shape)}, got {list(t.shape)}")
            copies.append((dst, t))
        for dst, src in copies:
            dst.copy_(src)
        if table is not None:
            self.tid2eid = table.to(device=self.weight.device, dtype=torch.int64, copy=True)
        self.weight_loaded()

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]`` -> ``[T, E]`` in the weight's dtype (the gate GEMM, its input norm
        and bias)."""
        if self.gate_lowp is not None and hidden_states.is_cuda and hidden_states.dtype == self.gate_lowp.dtype:
            logits = torch.mm(hidden_states, self.gate_lowp.t(), out_dtype=torch.float32)
            return logits if self.bias is None else logits + self.bias
        x = hidden_states.to(self.weight.dtype)
        if self.input_scale is not None:
            # Gemma-4: RMSNorm without a weight, in fp32, then the learned scale and 1/sqrt(H)
            xf = x.float()
            normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.moe.router_norm_eps, -0.5)
            x = normed.to(x.dtype) * self.input_scale * self.moe.hidden_size**-0.5
        return F.linear(x, self.weight, self.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        slot_table: torch.Tensor | None = None,
        load: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states [T, H]`` (moe.dtype), ``input_ids [T]`` (hash routing only) ->
        ``(topk_weights [T, K] float32, topk_ids [T, K] int32)`` of global expert ids; with a
        ``slot_table`` (:meth:`~moe_kernels.core.placement.ExpertPlacement.slot_map`) the chosen
        experts' physical slots instead, each counted in ``load [P]`` int32 when given (in the
        routing kernel's launch where it runs)."""
        m = self.moe
        expert_ids = None
        if m.hash_routing:
            if input_ids is None:
                raise ValueError("input_ids: this layer routes by token id (moe.hash_routing); pass the tokens' ids")
            if self.tid2eid is None:
                raise RuntimeError("tid2eid not loaded: a hash-routed layer needs its token -> experts table")
            expert_ids = self.tid2eid[input_ids.reshape(-1)]
        logits = self.logits(hidden_states)
        if self._fused is not None and (logits.is_cuda or interpreting()):
            return fused_route(logits, m.top_k, self._fused, self.e_score_correction_bias, slot_table, load)
        weights, ids = route(
            logits,
            m.top_k,
            self.routing,
            correction_bias=self.e_score_correction_bias,
            expert_scale=self.expert_scale,
            expert_ids=expert_ids,
        )
        return weights, ids if slot_table is None else choose_slots(ids, slot_table, load)

    def extra_repr(self) -> str:
        m = self.moe
        scoring = m.per_expert_score if m.scoring == "sigmoid" else m.scoring
        parts = [f"experts={m.num_experts}", f"top_k={m.top_k}", f"scoring={scoring}"]
        if m.choose_on != "scores":
            parts.append(f"choose_on={m.choose_on}")
        if m.sparsemixer_eps is not None:
            parts.append(f"sparsemixer_eps={m.sparsemixer_eps:g}")
        if m.router_dtype is not None:
            parts.append(f"router_dtype={str(m.router_dtype).removeprefix('torch.')}")
        if m.num_expert_group is not None:
            parts.append(f"groups={m.topk_group}/{m.num_expert_group}")
        flags = ("router_bias", "correction_bias", "router_input_norm", "expert_weight_scale", "hash_routing")
        parts += [name for name in flags if getattr(m, name)]
        if m.routed_scaling_factor != 1.0:
            parts.append(f"scale={m.routed_scaling_factor:g}")
        return ", ".join(parts)
