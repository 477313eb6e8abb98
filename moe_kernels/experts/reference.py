"""The plain torch experts: the yardstick every other implementation is tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.core.contract import LayerContext, Layout, PermuteExpertsUnpermute, StandardTokens, Workspace
from moe_kernels.mlp import fp8
from moe_kernels.mlp.formats import FP8_FORMATS, PACKED_FORMATS, Dense
from moe_kernels.mlp.weights import ExpertWeights


class TorchReferenceExperts(PermuteExpertsUnpermute):
    """For each local expert: select its tokens, run the MLP in fp32, add the weighted result.

    Slow (one small GEMM pair per expert, boolean indexing syncs with the host) and meant as
    the yardstick the other experts are tested against, and the CPU fallback. Quantized layers
    are computed from the dequantized weights (and dequantized activations when they arrive
    quantized), so the difference to a quantized kernel is that kernel's quantization error.
    Every weight format, activation and expert bias of :mod:`moe_kernels.mlp` is computed from its
    definition there.
    """

    input_layout = Layout.STANDARD
    weight_formats = (Dense, *FP8_FORMATS, *PACKED_FORMATS)
    expert_biases = True

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 1000.0, "plain per-expert torch loop: the yardstick, chosen only when nothing else runs"

    def apply(self, tokens: StandardTokens, weights: ExpertWeights, out: Tensor, workspace: Workspace) -> None:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        if tokens.residual is not None:
            tokens.residual.wait()
            acc += tokens.residual.tensor.float()
        x = tokens.x.float()
        if tokens.x_scale is not None:
            x = fp8.dequantize_groups(tokens.x, tokens.x_scale)
        activation = self.ctx.mlp.activation
        for e in range(weights.num_experts):
            token_idx, slot = torch.nonzero(tokens.topk_ids == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            w13, w2 = weights.dequantized(e)
            b13, b2 = weights.biases(e)
            h = x[token_idx] @ w13.t()
            y = activation.reference(h if b13 is None else h + b13) @ w2.t()
            y = y if b2 is None else y + b2
            weight = tokens.topk_weights[token_idx, slot].unsqueeze(1)
            acc.index_add_(0, token_idx, y * weight)
        out.copy_(acc)
