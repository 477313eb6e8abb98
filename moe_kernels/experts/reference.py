"""A plain, obviously-correct torch implementation of the expert MLPs (STANDARD layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.config import LayerConfig
from moe_kernels.contract import ActivationFormat, PermuteExpertsUnpermute, StandardTokens


class TorchReferenceExperts(PermuteExpertsUnpermute):
    """For each local expert: select its tokens, run the MLP in fp32, add the weighted result.

    Slow (one small GEMM pair per expert, boolean indexing syncs with the host) and meant as
    the yardstick the other experts are tested against, and the CPU fallback.
    """

    input_format = ActivationFormat.STANDARD

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        return 1000.0, "plain per-expert torch loop: the yardstick, chosen only when nothing else runs"

    def apply(
        self,
        tokens: StandardTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        x = tokens.x.float()
        inter = w2.shape[-1]
        for e in range(w13.shape[0]):
            token_idx, slot = torch.nonzero(tokens.topk_ids == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            gate_up = x[token_idx] @ w13[e].float().t()
            h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            y = h @ w2[e].float().t()
            weight = tokens.topk_weights[token_idx, slot].unsqueeze(1)
            acc.index_add_(0, token_idx, y * weight)
        out.copy_(acc)
