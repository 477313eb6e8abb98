"""Top-k routing: which experts each token goes to, and with what weight.

``route`` turns router logits into ``(topk_weights [T, K] float32, topk_ids [T, K] int32)``,
the two tensors every kernel of :mod:`moe_kernels.core.contract` takes. It covers the routings of
the models in ``configs/``:

- Mixtral / Qwen3-MoE: softmax over all experts, top-k, renormalize over the chosen k;
- DeepSeek-V3 (``noaux_tc``): sigmoid scores; a per-expert correction bias that only steers
  *which* experts are chosen; experts in ``num_expert_group`` groups of which the best
  ``topk_group`` are kept, a group scored by the sum of its two best biased scores; the
  weights come from the unbiased scores, renormalized, then multiplied by
  ``routed_scaling_factor``;
- DeepSeek-V2 style grouped routing without a bias: a group is scored by its best expert.

Scores are computed in float32 whatever the logits' dtype: bf16 has ~3 significant digits,
enough to swap two close experts' ranking.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.config import MoEConfig

Scoring = Literal["softmax", "sigmoid"]


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: Scoring = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` distinct experts per token.

    Args:
        router_logits: ``[T, E]``, any floating dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        scoring: ``"softmax"`` over the E experts, or an independent ``"sigmoid"`` per expert.
        renormalize: divide the chosen weights by their sum (each token's weights sum to 1
            before scaling).
        num_expert_group, topk_group: grouped routing: the E experts form
            ``num_expert_group`` equal groups; only experts of the best ``topk_group`` groups
            may be chosen. Give both or neither.
        routed_scaling_factor: multiplies the final weights (after renormalization).
        correction_bias: ``[E]`` floating, added to the scores to choose experts and groups
            (DeepSeek-V3's ``e_score_correction_bias``); never part of the weights.

    Returns:
        ``topk_weights [T, K]`` float32 and ``topk_ids [T, K]`` int32, best expert first,
        on the logits' device.
    """
    num_experts = _check_route_args(
        router_logits, top_k, scoring, num_expert_group, topk_group, routed_scaling_factor, correction_bias
    )
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()

    if num_expert_group is not None:
        assert topk_group is not None  # checked together above
        choice = _mask_to_best_groups(choice, num_experts, num_expert_group, topk_group, correction_bias is not None)

    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        # the sum is > 0: softmax and sigmoid scores are positive
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()


def _mask_to_best_groups(
    choice: torch.Tensor, num_experts: int, num_groups: int, topk_group: int, biased: bool
) -> torch.Tensor:
    """``choice [T, E]`` with every expert outside each token's best ``topk_group`` groups
    set to -inf, so the following top-k cannot pick it."""
    t = choice.shape[0]
    per_group = num_experts // num_groups
    grouped = choice.view(t, num_groups, per_group)
    if biased:
        # DeepSeek-V3: a group's score is the sum of its two best (biased) scores
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best_groups = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros(t, num_groups, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, best_groups, True)
    # -inf, not 0: biased scores can be negative, and a masked expert must never win
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, num_experts)


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
        if not isinstance(correction_bias, torch.Tensor) or not correction_bias.is_floating_point():
            raise TypeError("correction_bias must be a floating-point tensor")
        if tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(f"correction_bias must have shape [{num_experts}], got {list(correction_bias.shape)}")
        if correction_bias.device != router_logits.device:
            raise ValueError(
                f"correction_bias must be on {router_logits.device} (router_logits' device), "
                f"got {correction_bias.device}"
            )
    return num_experts


class Router(nn.Module):
    """The gate of an MoE layer: ``logits = x @ weight.T``, then :func:`route` with the
    layer's routing settings.

    Parameters (inference only, ``requires_grad=False``):
        weight: ``[E, H]`` in ``moe.dtype``. Uninitialized until loaded.
        e_score_correction_bias: ``[E]`` float32, only when ``moe.correction_bias`` is set
            (DeepSeek-V3's ``noaux_tc`` routing). Zeros until loaded.

    The gate GEMM runs in the model dtype (as inference engines run it) and routing in fp32.
    """

    def __init__(self, moe: MoEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(
            torch.empty(moe.num_experts, moe.hidden_size, dtype=moe.dtype, device=device), requires_grad=False
        )
        self.e_score_correction_bias: nn.Parameter | None = None
        if moe.correction_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(moe.num_experts, dtype=torch.float32, device=device), requires_grad=False
            )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states [T, H]`` (moe.dtype) -> ``(topk_weights [T, K] float32,
        topk_ids [T, K] int32)`` of global expert ids."""
        m = self.moe
        logits = F.linear(hidden_states, self.weight)
        return route(
            logits,
            m.top_k,
            scoring=m.scoring,
            renormalize=m.renormalize,
            num_expert_group=m.num_expert_group,
            topk_group=m.topk_group,
            routed_scaling_factor=m.routed_scaling_factor,
            correction_bias=self.e_score_correction_bias,
        )

    def extra_repr(self) -> str:
        m = self.moe
        parts = [f"experts={m.num_experts}", f"top_k={m.top_k}", f"scoring={m.scoring}"]
        if m.num_expert_group is not None:
            parts.append(f"groups={m.topk_group}/{m.num_expert_group}")
        if self.e_score_correction_bias is not None:
            parts.append("correction_bias")
        if m.routed_scaling_factor != 1.0:
            parts.append(f"scale={m.routed_scaling_factor:g}")
        return ", ".join(parts)
