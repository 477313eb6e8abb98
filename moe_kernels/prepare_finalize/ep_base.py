"""What every expert-parallel prepare/finalize shares: the process group comes from the layer
context, the ranks agree on the layer when the kernel is built, never on the hot path."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_kernels.core.contract import Check, H, LayerContext, PrepareAndFinalize, TokenFormat
from moe_kernels.core.distributed import check_agreement
from moe_kernels.core.placement import choose_slots


class ExpertParallelPrepareAndFinalize(PrepareAndFinalize[H]):
    """A prepare/finalize that exchanges tokens between the ranks of ``ctx.group``.

    ``bind`` gathers the layer's parameters from every rank once (one small all_gather) and
    raises the same ``ValueError`` on every rank when they differ -- a mismatched collective
    would otherwise hang or write through a peer's buffer. Every rank must call
    ``prepare``/``finalize`` for every layer call, also with zero tokens.
    """

    supports_chunking = False  # every rank would have to agree on the chunk count

    def check_parallel(self, ctx: LayerContext) -> Check:
        par, group = ctx.cfg.parallel, ctx.group
        if group is None:
            return Check.failed("parallel", "needs the expert-parallel process group (pass group=)")
        if par.ep_size == 1:
            return Check.failed(
                "parallel", "ep_size=1: nothing to exchange; LocalPrepareAndFinalize runs it without communication"
            )
        size, rank = group.size(), group.rank()
        if size != par.ep_size or rank != par.ep_rank:
            return Check.failed(
                "parallel",
                f"the process group has size {size}, rank {rank}; the config says ep_size={par.ep_size}, "
                f"ep_rank={par.ep_rank}",
            )
        return super().check_parallel(ctx)

    def agreement(self, ctx: LayerContext, fmt: TokenFormat) -> dict[str, int | bool | torch.dtype]:
        """The values every rank must share; subclasses add their own."""
        moe = ctx.cfg.moe
        return {
            "hidden_size": moe.hidden_size,
            "top_k": moe.top_k,
            "num_experts": moe.num_experts,
            "dtype": moe.dtype,
            "max_tokens_per_rank": ctx.cfg.parallel.max_tokens_per_rank,
            "expert placement (fingerprint)": ctx.placement.fingerprint(),
            "token alignment": fmt.alignment,
            "fp8 dispatch": fmt.act_quant is not None,
        }

    def bind(self, ctx: LayerContext, fmt: TokenFormat) -> None:
        super().bind(ctx, fmt)
        check_agreement(self.group, self.name, self.agreement(ctx, fmt))

    def bind_placement(self, ctx: LayerContext) -> None:
        super().bind_placement(ctx)
        # contiguous placement needs no translation: skip the gather per call; slots need none
        identity = ctx.placement.is_contiguous or ctx.ids_are_slots
        self._slot_map = None if identity else ctx.placement.slot_map(ctx.device)

    @property
    def group(self) -> dist.ProcessGroup:
        group = self.ctx.group
        if group is None:  # the composer's checks refuse this before bind
            raise RuntimeError(f"{self.name} is bound without a process group")
        return group

    def slots(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global ids ``[T, K]`` -> physical expert ids under contiguous ownership
        (``owner * P_local + local``; with redundant experts a replica chosen per token), ``-1``
        kept: what a dispatcher that knows only contiguous ownership routes by. The chosen
        replicas are counted in ``ctx.expert_load``. Slots (``ctx.ids_are_slots``) pass as they are."""
        if self.ctx.ids_are_slots:
            return topk_ids
        return choose_slots(topk_ids, self._slot_map, self.ctx.expert_load)
