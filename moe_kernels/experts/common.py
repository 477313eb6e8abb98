"""The final write every STANDARD experts implementation shares."""

from __future__ import annotations

import torch

from moe_kernels.core.contract import StandardTokens


def write_output(rows: torch.Tensor, dst_row: torch.Tensor, tokens: StandardTokens, out: torch.Tensor) -> None:
    """``out[t] = residual[t] + sum_k topk_weights[t, k] * rows[dst_row[t, k]]``: the weighted
    gather back to token order, with the residual (the shared experts' output) added in the same
    pass when the tokens carry one."""
    from moe_kernels.kernels import weighted_gather

    residual = tokens.residual
    if residual is not None:
        residual.wait()
    weighted_gather(rows, dst_row, tokens.topk_weights, out, residual=None if residual is None else residual.tensor)
