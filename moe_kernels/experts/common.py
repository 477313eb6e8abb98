"""What the experts implementations share: GEMM-input buffers (quantized or not), the two GEMM
pipelines (contiguous and masked) with the grouped GEMM as a parameter, and the final write.

A pipeline runs ``GEMM1 -> activation -> GEMM2`` for one layout; which grouped GEMM runs it
(DeepGEMM, the Triton kernel) and whether the operands are fp8 follow from the weights' format
and the MLP's activation quantization, the way DeepGEMM takes ``(tensor, scale)`` operands: a
GEMM callable receives each operand's scale or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_kernels.core.contract import ExpandedTokens, MaskedTokens, Operand, StandardTokens, WorkspaceSpec, align_up
from moe_kernels.mlp.act_quant import scale_view
from moe_kernels.mlp.spec import ExpertMLP
from moe_kernels.mlp.weights import ExpertWeights

#: ``gemm((a, a_scale), (w, w_scale), out, rows)``: ``out = a @ w[e].T`` per expert, ``rows`` the
#: layout (contiguous: ``grouped_layout [R]`` int32; masked: ``counts [E]`` int32). Experts
#: classes that add expert biases pass ``bias=`` ``[E, N]`` too (:func:`bias_kwargs`); the others
#: refuse biased MLPs in their checks and are never given one.
GroupedGemm = Callable[[Operand, Operand, torch.Tensor, torch.Tensor], None]

#: the row count of a scale storage is padded to a multiple of this (TMA asks 16-byte strides)
SCALE_ROWS_MULTIPLE = 4


def check_token_quant(part: str, tokens: MaskedTokens | ExpandedTokens, mlp: ExpertMLP) -> None:
    """Tokens quantized (``x_scale`` given) exactly when the layer quantizes activations: a
    prepare/finalize bound to another format would hand the GEMMs the wrong dtype."""
    if (tokens.x_scale is None) != (mlp.act_quant is None):
        raise ValueError(f"{part}: the layer wants {mlp.describe()}; got {tokens.x.dtype} tokens")


def bias_kwargs(bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"bias": bias}`` for a GEMM of an MLP with expert biases, nothing without (see :data:`GroupedGemm`)."""
    return {} if bias is None else {"bias": bias}


def gemm_input_specs(name: str, lead: tuple[int, ...], cols: int, mlp: ExpertMLP) -> dict[str, WorkspaceSpec]:
    """A buffer of GEMM-input rows ``[*lead, cols]``: in ``mlp.dtype``, or quantized as
    ``mlp.act_quant`` says (``name`` the values, ``name + "_scale"`` the scale storage)."""
    quant = mlp.act_quant
    if quant is None:
        return {name: WorkspaceSpec((*lead, cols), mlp.dtype)}
    if len(lead) == 1:
        scale = quant.scale_storage(align_up(lead[0], SCALE_ROWS_MULTIPLE), cols)
    else:
        scale = quant.masked_scale_storage(lead[0], align_up(lead[1], SCALE_ROWS_MULTIPLE), cols)
    return {name: WorkspaceSpec(*quant.rows(lead, cols)), f"{name}_scale": WorkspaceSpec(*scale)}


def gemm_input(workspace: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values and scales (``None`` unquantized) of a buffer made by :func:`gemm_input_specs`."""
    values = workspace[name]
    storage = workspace.get(f"{name}_scale")
    if storage is None:
        return values, None
    rows = values.shape[-2]
    return values, scale_view(storage)[..., :rows, :]


def contiguous_workspace(
    mlp: ExpertMLP, num_tokens: int, top_k: int, num_experts: int, alignment: int, *, fused_gemm1: bool = False
) -> dict[str, WorkspaceSpec]:
    """Scratch of :func:`run_contiguous` for ``num_tokens > 0`` tokens (``fused_gemm1``: GEMM1
    writes the activation itself, no ``gate_up``)."""
    from moe_kernels.kernels import contiguous_rows_bound

    rows = contiguous_rows_bound(num_tokens * top_k, num_experts, alignment)
    specs = gemm_input_specs("permuted", (rows,), mlp.hidden, mlp)
    if not fused_gemm1:
        specs["gate_up"] = WorkspaceSpec((rows, mlp.activation.gemm1_rows(mlp.inter)), mlp.dtype)
    specs |= gemm_input_specs("activation", (rows,), mlp.inter, mlp)
    if mlp.act_quant is not None:
        # unquantized, GEMM2 writes its output over the permuted rows (dead by then)
        specs["expert_rows"] = WorkspaceSpec((rows, mlp.hidden), mlp.dtype)
    return specs


def run_contiguous(
    tokens: StandardTokens,
    weights: ExpertWeights,
    out: torch.Tensor,
    workspace: dict[str, torch.Tensor],
    mlp: ExpertMLP,
    alignment: int,
    gemm: GroupedGemm,
    fused_gemm1: GroupedGemm | None = None,
) -> None:
    """STANDARD tokens through the contiguous layout into ``out [T, H]`` (weighted, reduced):
    scatter (quantizing on the way when the MLP says so) into expert segments aligned to
    ``alignment``, GEMM1, the activation (quantized for GEMM2 when the MLP says so), GEMM2,
    weighted gather. ``fused_gemm1`` (unquantized only) computes GEMM1 and the activation in one."""
    from moe_kernels.kernels import activate, contiguous_layout, scatter_rows

    layout = contiguous_layout(tokens.topk_ids, weights.num_experts, alignment)
    group = mlp.act_quant.group if mlp.act_quant is not None else 1
    permuted, permuted_scale = gemm_input(workspace, "permuted")
    act, act_scale = gemm_input(workspace, "activation")
    # Rows no slot maps to (padding) keep stale values: they are computed (or skipped per tile)
    # but the gather only reads rows named by dst_row.
    scatter_rows(tokens.x, layout.dst_row, permuted, scale_out=permuted_scale, group=group)
    b13 = bias_kwargs(weights.w13_bias)
    if fused_gemm1 is not None:
        fused_gemm1((permuted, permuted_scale), (weights.w13, weights.w13_scale), act, layout.grouped_layout, **b13)
    else:
        gate_up = workspace["gate_up"]
        gemm((permuted, permuted_scale), (weights.w13, weights.w13_scale), gate_up, layout.grouped_layout, **b13)
        activate(
            gate_up,
            act,
            activation=mlp.activation,
            scale_out=act_scale,
            group=group,
            grouped_layout=layout.grouped_layout,
        )
    rows = workspace.get("expert_rows", permuted)
    w2 = (weights.w2, weights.w2_scale)
    gemm((act, act_scale), w2, rows, layout.grouped_layout, **bias_kwargs(weights.w2_bias))
    write_output(rows, layout.dst_row, tokens, out)


def masked_workspace(mlp: ExpertMLP, num_experts: int, rows_per_expert: int) -> dict[str, WorkspaceSpec]:
    """Scratch of :func:`run_masked` with ``rows_per_expert`` (already aligned) rows per expert."""
    lead = (num_experts, rows_per_expert)
    specs = {"gate_up": WorkspaceSpec((*lead, mlp.activation.gemm1_rows(mlp.inter)), mlp.dtype)}
    return specs | gemm_input_specs("activation", lead, mlp.inter, mlp)


def run_masked(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    counts: torch.Tensor,
    weights: ExpertWeights,
    out: torch.Tensor,
    workspace: dict[str, torch.Tensor],
    mlp: ExpertMLP,
    gemm: GroupedGemm,
) -> None:
    """``out[e, :counts[e]] = w2[e] @ act(w13[e] @ x[e, :counts[e]])`` on ``x [E, M, H]`` (fp8
    with ``x_scale [E, M, H/128]`` when the MLP quantizes); ``out [E, M, H]`` in ``mlp.dtype``.
    Rows past ``counts`` are not computed. ``out`` may alias ``x`` when unquantized."""
    from moe_kernels.kernels import activate

    gate_up = workspace["gate_up"]
    act, act_scale = gemm_input(workspace, "activation")
    group = mlp.act_quant.group if mlp.act_quant is not None else 1
    gemm((x, x_scale), (weights.w13, weights.w13_scale), gate_up, counts, **bias_kwargs(weights.w13_bias))
    activate(gate_up, act, activation=mlp.activation, scale_out=act_scale, group=group, counts=counts)
    gemm((act, act_scale), (weights.w2, weights.w2_scale), out, counts, **bias_kwargs(weights.w2_bias))


def write_output(rows: torch.Tensor, dst_row: torch.Tensor, tokens: StandardTokens, out: torch.Tensor) -> None:
    """``out[t] = residual[t] + sum_k topk_weights[t, k] * rows[dst_row[t, k]]``: the weighted
    gather back to token order, with the residual (the shared experts' output) added in the same
    pass when the tokens carry one."""
    from moe_kernels.kernels import weighted_gather

    residual = tokens.residual
    if residual is not None:
        residual.wait()
    weighted_gather(rows, dst_row, tokens.topk_weights, out, residual=None if residual is None else residual.tensor)
