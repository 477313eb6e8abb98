"""Expert MLPs on DeepGEMM's bf16 grouped GEMMs (Hopper SM90, Blackwell SM100).

Three layouts, one class each, all without host synchronisation:

* :class:`DeepGemmExperts` (STANDARD ``x [T, H]`` + top-k ids): Triton permute into DeepGEMM's
  contiguous layout (expert segments aligned to ``get_mk_alignment_for_contiguous_layout()``,
  padding rows marked ``-1``), ``m_grouped_bf16_gemm_nt_contiguous`` x 2 with SiLU-and-mul
  between, weighted gather back to ``[T, H]``.
* :class:`MaskedDeepGemmExperts` (MASKED ``[E, M, H]`` + counts): ``m_grouped_bf16_gemm_nt_masked``
  x 2; raw rows out (finalize weights them).
* :class:`ExpandedDeepGemmExperts` (EXPANDED: DeepEP's expanded dispatch output): the contiguous
  GEMM with ``use_psum_layout=True`` reads the dispatched rows in place; each row is scaled by
  its router weight, rows outside every expert segment are written as zeros.

``deep_gemm`` is imported lazily inside methods, so this module imports on a bare CPU; whether
it is usable is answered once by :func:`deep_gemm_status` (never raises).

Constraints (DeepGEMM 2.8 source, ``csrc/apis/gemm.hpp`` and
``csrc/jit_kernels/impls/sm90_bf16_gemm.hpp``): bf16 A, B and D; A K-major; int32 layouts;
SM90 asserts ``K % 64 == 0`` (K = H for GEMM1, I for GEMM2); the masked GEMM asserts
``expected_m > 0`` and ``M > 0``; only compute capability 9.x and 10.x are dispatched.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import Any

import torch

from moe_kernels.backends.triton import triton_check
from moe_kernels.core.contract import (
    Check,
    ExpandedTokens,
    LayerContext,
    Layout,
    MaskedTokens,
    PermuteExpertsUnpermute,
    StandardTokens,
    TokenFormat,
    WorkspaceSpec,
)
from moe_kernels.experts.common import write_output
from moe_kernels.mlp.weights import ExpertWeights

#: The bf16 grouped entry points every DeepGEMM experts class calls.
REQUIRED_SYMBOLS = ("m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked")
#: SM90 asserts ``k % 64 == 0`` for the bf16 grouped GEMMs (sm90_bf16_gemm.hpp); applied to SM100 too.
K_MULTIPLE = 64
#: The masked GEMM's largest row tile on SM90: its block_m candidates are {64, 128}
#: (csrc/jit_kernels/heuristics/sm90.hpp); on SM100 block_m is the contiguous alignment. Its
#: output TMA store writes whole tiles into ``[G * M, N]``, so ``M`` must be a multiple of the
#: tile or a group's last tile overwrites the next group's rows.
MASKED_BLOCK_M_MAX = 128
#: DeepGEMM dispatches SM90 and SM100 kernels only (csrc/apis/gemm.hpp).
SUPPORTED_ARCH_MAJORS = (9, 10)


# --- probing ----------------------------------------------------------------------------


@functools.cache
def deep_gemm_status() -> tuple[bool, str]:
    """``(usable, why)`` for ``import deep_gemm`` with the bf16 grouped GEMMs. Probed once per
    process; any failure (absent, broken build, missing symbols) is an answer, never an error."""
    try:
        dg = importlib.import_module("deep_gemm")
    except Exception as e:  # an absent or broken install (ImportError, OSError, RuntimeError...) is an answer
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return False, f"deep_gemm does not import ({type(e).__name__}: {first})"
    missing = [s for s in REQUIRED_SYMBOLS if not hasattr(dg, s)]
    if _alignment_getter(dg) is None:
        missing.append("get_mk_alignment_for_contiguous_layout")
    version = getattr(dg, "__version__", "?")
    if missing:
        return False, f"deep_gemm {version} lacks the bf16 grouped GEMM symbols {missing}"
    return True, f"deep_gemm {version} with bf16 grouped GEMMs"


@functools.cache
def psum_layout_status(gemm: str = "m_grouped_bf16_gemm_nt_contiguous") -> tuple[bool, str]:
    """Whether this deep_gemm's contiguous GEMM ``gemm`` takes ``use_psum_layout`` (DeepGEMM 2.8
    does, for the bf16 one and for ``m_grouped_fp8_gemm_nt_contiguous``); read from the pybind
    signature in its docstring, so nothing is launched."""
    ok, why = deep_gemm_status()
    if not ok:
        return ok, why
    fn = getattr(_deep_gemm(), gemm, None)
    if fn is None:
        return False, f"{why}, but without {gemm}"
    doc = getattr(fn, "__doc__", None) or ""
    if "use_psum_layout" in doc and "expected_m_for_psum_layout" in doc:
        return True, f"{why}, psum layout supported by {gemm}"
    return False, f"{why}, but its {gemm} takes no use_psum_layout/expected_m_for_psum_layout"


def psum_layout_checks(gemm: str) -> list[Check]:
    """The ``psum_layout`` check of an EXPANDED class whose GEMM is ``gemm``; none until DeepGEMM
    imports (the ``deep_gemm`` check says why it does not)."""
    if not deep_gemm_status()[0]:
        return []
    return [Check("psum_layout", *psum_layout_status(gemm))]


def _alignment_getter(dg: Any) -> Any:
    # older DeepGEMM releases name it get_m_alignment_for_contiguous_layout
    return getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or getattr(
        dg, "get_m_alignment_for_contiguous_layout", None
    )


def _deep_gemm() -> ModuleType:
    ok, why = deep_gemm_status()
    if not ok:
        raise RuntimeError(why)
    return importlib.import_module("deep_gemm")


def deep_gemm_alignment() -> int | None:
    """DeepGEMM's row alignment of expert segments (its contiguous GEMM's BLOCK_M; process-global,
    ``deep_gemm.set_mk_alignment_for_contiguous_layout`` changes it); ``None`` without DeepGEMM."""
    if not deep_gemm_status()[0]:
        return None
    return int(_alignment_getter(_deep_gemm())())


def masked_rows_multiple() -> int:
    """``M`` of a masked GEMM must be a multiple of this (see :data:`MASKED_BLOCK_M_MAX`)."""
    return math.lcm(deep_gemm_alignment() or 1, MASKED_BLOCK_M_MAX)


def align_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- capability checks shared by the DeepGEMM experts -----------------------------------


def deep_gemm_device_check(device: torch.device) -> Check:
    """A CUDA GPU whose architecture DeepGEMM dispatches (SM90 or SM100)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return Check.failed("device", f"DeepGEMM needs a CUDA GPU of SM90 or SM100, not {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_ARCH_MAJORS:
        return Check.failed("device", f"DeepGEMM runs on SM90 and SM100 only, this GPU is SM{major}{minor}")
    return Check.passed("device", f"SM{major}{minor}")


def deep_gemm_check() -> Check:
    ok, why = deep_gemm_status()
    return Check("deep_gemm", ok, why)


def k_multiple_check(ctx: LayerContext, backend: str, multiple: int) -> Check:
    """Both GEMMs' contraction dims (H for GEMM1, I for GEMM2) are multiples of ``multiple``."""
    h, i = ctx.cfg.moe.hidden_size, ctx.cfg.moe.intermediate_size
    bad = [f"{name}={v}" for name, v in (("hidden_size", h), ("intermediate_size", i)) if v % multiple]
    if bad:
        return Check.failed("shape", f"{backend} needs K % {multiple} == 0 for both GEMMs; got {', '.join(bad)}")
    return Check.passed("shape", f"H={h}, I={i} are multiples of {multiple}")


def deep_gemm_part_checks(ctx: LayerContext, library: Check) -> list[Check]:
    """What a DeepGEMM experts class checks beyond the shared ones: ``library`` (deep_gemm with the
    entry points it calls), K % 64, and Triton for the permute/SiLU-and-mul/gather glue around
    the GEMMs."""
    return [library, k_multiple_check(ctx, "DeepGEMM", K_MULTIPLE), triton_check(ctx.device)._replace(name="triton")]


class DeepGemmPart(PermuteExpertsUnpermute):
    """What every DeepGEMM experts class shares: bf16 only, SM90/SM100, deep_gemm importable,
    K % 64 == 0, no host sync (capturable in CUDA graphs)."""

    dtypes = (torch.bfloat16,)
    supports_cuda_graphs = True

    def check_device(self, ctx: LayerContext) -> Check:
        return deep_gemm_device_check(ctx.device)

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [*super().checks(ctx), *deep_gemm_part_checks(ctx, deep_gemm_check())]

    def preference(self, ctx: LayerContext) -> tuple[float, str]:
        return 10.0, "DeepGEMM grouped GEMMs (at parity with torch._grouped_mm on prefill, at the HBM limit masked)"


# --- the GEMM pipelines (shared by the classes here and the hybrid) ----------------------


def contiguous_mlp(
    rows: torch.Tensor,
    weights: ExpertWeights,
    grouped_layout: torch.Tensor,
    gate_up: torch.Tensor,
    act: torch.Tensor,
    out_rows: torch.Tensor,
) -> None:
    """``out_rows = w2[e] @ silu_and_mul(w13[e] @ rows)`` per row of DeepGEMM's contiguous layout.

    ``rows [R, H]``, ``gate_up [R, 2I]``, ``act [R, I]``, ``out_rows [R, H]`` bf16 contiguous;
    ``grouped_layout [R]`` int32, each row's expert or ``-1``. DeepGEMM skips whole BLOCK_M tiles
    whose first row is ``-1``; padding rows inside a segment's last tile are computed from
    whatever they hold and must never be read. ``out_rows`` may alias ``rows``.
    """
    from moe_kernels.kernels import silu_and_mul

    dg = _deep_gemm()
    dg.m_grouped_bf16_gemm_nt_contiguous(rows, weights.w13, gate_up, grouped_layout)
    silu_and_mul(gate_up, act, grouped_layout=grouped_layout)
    dg.m_grouped_bf16_gemm_nt_contiguous(act, weights.w2, out_rows, grouped_layout)


def masked_mlp(
    x: torch.Tensor,
    weights: ExpertWeights,
    counts: torch.Tensor,
    expected_m: int,
    gate_up: torch.Tensor,
    act: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``out[e, :counts[e]] = w2[e] @ silu_and_mul(w13[e] @ x[e, :counts[e]])``.

    ``x [E, M, H]``, ``gate_up [E, M, 2I]``, ``act [E, M, I]``, ``out [E, M, H]`` bf16 contiguous
    with ``M`` a multiple of :func:`masked_rows_multiple` and ``M > 0``; ``counts [E]`` int32;
    ``expected_m`` a host estimate of the rows per expert (clamped to ``[1, M]``). Rows past
    ``counts`` are not computed; those inside a partly valid tile get garbage. ``out`` may alias ``x``.
    """
    from moe_kernels.kernels import silu_and_mul

    m = x.shape[1]
    if m % masked_rows_multiple():
        raise ValueError(f"masked GEMM rows per expert ({m}) must be a multiple of {masked_rows_multiple()}")
    expected_m = max(1, min(int(expected_m), m))
    dg = _deep_gemm()
    dg.m_grouped_bf16_gemm_nt_masked(x, weights.w13, gate_up, counts, expected_m)
    silu_and_mul(gate_up, act, counts=counts)
    dg.m_grouped_bf16_gemm_nt_masked(act, weights.w2, out, counts, expected_m)


def contiguous_workspace(ctx: LayerContext, num_tokens: int) -> dict[str, WorkspaceSpec]:
    """Scratch for :func:`apply_contiguous` on ``num_tokens`` tokens (``contiguous_rows_bound`` rows)."""
    from moe_kernels.kernels import contiguous_rows_bound

    if num_tokens == 0:
        return {}
    moe = ctx.cfg.moe
    rows = contiguous_rows_bound(num_tokens * moe.top_k, ctx.placement.num_local_experts, deep_gemm_alignment() or 1)
    return {
        # the permuted rows; GEMM2 writes its output over them (they are dead by then)
        "permuted": WorkspaceSpec((rows, moe.hidden_size), moe.dtype),
        "gate_up": WorkspaceSpec((rows, 2 * moe.intermediate_size), moe.dtype),
        "activation": WorkspaceSpec((rows, moe.intermediate_size), moe.dtype),
    }


def apply_contiguous(
    tokens: StandardTokens, weights: ExpertWeights, out: torch.Tensor, workspace: dict[str, torch.Tensor]
) -> None:
    """STANDARD tokens through the contiguous layout into ``out [T, H]`` (weighted, reduced)."""
    from moe_kernels.kernels import contiguous_layout, scatter_rows

    alignment = deep_gemm_alignment()
    assert alignment is not None  # the deep_gemm check refused the layer otherwise
    layout = contiguous_layout(tokens.topk_ids, weights.num_experts, alignment)
    rows = workspace["permuted"]
    # Rows no slot maps to (padding) keep stale values: they are computed (or skipped per tile)
    # but the gather only reads rows named by dst_row.
    scatter_rows(tokens.x, layout.dst_row, rows)
    contiguous_mlp(rows, weights, layout.grouped_layout, workspace["gate_up"], workspace["activation"], rows)
    write_output(rows, layout.dst_row, tokens, out)


def masked_workspace(ctx: LayerContext, rows_per_expert: int, *, with_rows: bool) -> dict[str, WorkspaceSpec]:
    """Scratch for :func:`masked_mlp` with ``rows_per_expert`` (already aligned) rows per expert;
    ``with_rows`` adds the ``[E, M, H]`` input/output buffer ("masked_rows")."""
    moe, e = ctx.cfg.moe, ctx.placement.num_local_experts
    specs = {
        "gate_up": WorkspaceSpec((e, rows_per_expert, 2 * moe.intermediate_size), moe.dtype),
        "activation": WorkspaceSpec((e, rows_per_expert, moe.intermediate_size), moe.dtype),
    }
    if with_rows:
        specs["masked_rows"] = WorkspaceSpec((e, rows_per_expert, moe.hidden_size), moe.dtype)
    return specs


# --- the classes ------------------------------------------------------------------------


class DeepGemmExperts(DeepGemmPart):
    """STANDARD in, ``[T, H]`` out (weighted and reduced), on DeepGEMM's contiguous layout.

    permute (Triton: histogram, aligned segment starts, scatter ``x`` into ``[R, H]``) ->
    GEMM1 ``[R, H] x [E, 2I, H]`` -> SiLU-and-mul ``[R, I]`` -> GEMM2 ``[R, I] x [E, H, I]`` ->
    weighted gather into ``out [T, H]`` (fp32 accumulation, fixed top-k order).

    ``R = contiguous_rows_bound(T*K, E, alignment)`` is computed on the host from T alone, so no
    value is read back from the GPU; tiles past the real rows are marked ``-1`` and skipped by
    DeepGEMM. Shapes depend only on T, so a CUDA graph per batch size captures it.
    """

    input_layout = Layout.STANDARD

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        return contiguous_workspace(ctx, num_rows)

    def apply(
        self,
        tokens: StandardTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        if tokens.num_rows == 0:
            return
        apply_contiguous(tokens, weights, out, workspace)


class MaskedDeepGemmExperts(DeepGemmPart):
    """MASKED in and out: ``x [E, M, H]`` with ``counts [E]`` int32 valid rows per expert ->
    ``out [E, M, H]`` raw (unweighted; finalize weights and sums).

    Two ``m_grouped_bf16_gemm_nt_masked`` calls with the masked SiLU-and-mul between, tuned for
    the host-side ``expected_m``. Its format asks for ``M`` a multiple of DeepGEMM's tile
    (:func:`masked_rows_multiple`), so the GEMMs read the prepared rows in place. No host sync
    and static shapes: capturable in a CUDA graph.
    """

    input_layout = Layout.MASKED

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        return TokenFormat(Layout.MASKED, alignment=masked_rows_multiple())

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        return masked_workspace(ctx, num_rows, with_rows=False)

    def apply(
        self,
        tokens: MaskedTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        if tokens.num_rows == 0:
            return
        masked_mlp(
            tokens.x, weights, tokens.counts, tokens.expected_m, workspace["gate_up"], workspace["activation"], out
        )


class ExpandedDeepGemmExperts(DeepGemmPart):
    """EXPANDED in and out: ``x [R, H]`` laid out by DeepEP's expanded dispatch -> ``out [R, H]``.

    Expert e owns rows ``[align_up(expert_ends[e-1], alignment), expert_ends[e])`` -- exactly
    DeepGEMM's psum layout, so both GEMMs read the dispatched rows in place
    (``use_psum_layout=True``, ``grouped_layout = expert_ends``, ``expected_m_for_psum_layout =
    expected_m``). SiLU-and-mul runs on valid rows only. The last step writes every row of
    ``out``: valid rows scaled by ``row_weights`` (DeepEP's combine sums without weights), all
    other rows (segment padding, rows past the last expert) as zeros, so a combine that summed
    them would add nothing. No host sync: capturable in a CUDA graph. Its format asks the
    dispatcher for DeepGEMM's contiguous alignment.
    """

    input_layout = Layout.EXPANDED

    def input_format(self, ctx: LayerContext) -> TokenFormat:
        return TokenFormat(Layout.EXPANDED, alignment=deep_gemm_alignment() or 1)

    def checks(self, ctx: LayerContext) -> list[Check]:
        return [*super().checks(ctx), *psum_layout_checks("m_grouped_bf16_gemm_nt_contiguous")]

    def workspace_specs(self, ctx: LayerContext, num_rows: int) -> dict[str, WorkspaceSpec]:
        if num_rows == 0:
            return {}
        moe = ctx.cfg.moe
        return {
            "gate_up": WorkspaceSpec((num_rows, 2 * moe.intermediate_size), moe.dtype),
            "activation": WorkspaceSpec((num_rows, moe.intermediate_size), moe.dtype),
            "expert_rows": WorkspaceSpec((num_rows, moe.hidden_size), moe.dtype),
        }

    def apply(
        self,
        tokens: ExpandedTokens,
        weights: ExpertWeights,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import silu_and_mul

        if tokens.num_rows == 0:
            return
        row_expert, dst_row, expected_m = psum_rows(tokens)
        ends = tokens.expert_ends
        gate_up, act, rows = workspace["gate_up"], workspace["activation"], workspace["expert_rows"]
        dg = _deep_gemm()
        dg.m_grouped_bf16_gemm_nt_contiguous(
            tokens.x, weights.w13, gate_up, ends, use_psum_layout=True, expected_m_for_psum_layout=expected_m
        )
        silu_and_mul(gate_up, act, grouped_layout=row_expert)
        dg.m_grouped_bf16_gemm_nt_contiguous(
            act, weights.w2, rows, ends, use_psum_layout=True, expected_m_for_psum_layout=expected_m
        )
        write_expanded_output(rows, dst_row, tokens, out)


def psum_rows(tokens: ExpandedTokens) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check that ``tokens`` (``num_rows > 0``) are in DeepGEMM's psum layout and map their rows:
    ``(row_expert [R] int32, dst_row [R, 1] int64, expected_m)`` (see :func:`expanded_row_map`;
    ``expected_m`` clamped to >= 1 for ``expected_m_for_psum_layout``). Raises ``ValueError`` when
    the tokens' alignment is not DeepGEMM's and ``TypeError`` when ``expert_ends`` is not
    contiguous int32."""
    alignment = deep_gemm_alignment()
    if tokens.alignment != alignment:
        raise ValueError(
            f"expanded tokens are aligned to {tokens.alignment} rows but DeepGEMM's contiguous "
            f"layout uses {alignment}: dispatch with expert_alignment={alignment}"
        )
    ends = tokens.expert_ends
    if ends.dtype != torch.int32 or not ends.is_contiguous():
        raise TypeError(f"expert_ends must be contiguous int32, got {ends.dtype}")
    row_expert, dst_row = expanded_row_map(ends, tokens.num_rows, alignment)
    return row_expert, dst_row, max(1, int(tokens.expected_m))


def write_expanded_output(rows: torch.Tensor, dst_row: torch.Tensor, tokens: ExpandedTokens, out: torch.Tensor) -> None:
    """The EXPANDED experts' last step: ``out[r] = row_weights[r] * rows[r]`` for the rows
    ``dst_row`` maps to themselves, zeros where it is ``-1`` (segment padding, rows past the last
    expert), so a combine that summed those rows would add nothing. Every row of ``out`` is
    written; ``rows [R, H]`` bf16 may hold garbage outside the segments."""
    from moe_kernels.kernels import weighted_gather

    weighted_gather(rows, dst_row, tokens.row_weights.reshape(tokens.num_rows, 1), out)


def expanded_row_map(expert_ends: torch.Tensor, num_rows: int, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the psum layout of ``expert_ends [E]`` (int32 inclusive prefix sums) over ``num_rows``
    rows: ``row_expert [R]`` int32 (each row's expert, ``-1`` outside every segment) and
    ``dst_row [R, 1]`` int64 (``r`` for valid rows, ``-1`` otherwise). A few small torch ops on
    the device; no host sync."""
    device = expert_ends.device
    num_experts = expert_ends.shape[0]
    ends = expert_ends.to(torch.int64)
    starts = torch.zeros_like(ends)
    starts[1:] = (ends[:-1] + alignment - 1) // alignment * alignment
    r = torch.arange(num_rows, dtype=torch.int64, device=device)
    # first expert whose end lies past r: empty experts (end == previous end) are never chosen
    expert = torch.searchsorted(ends, r, right=True)
    clamped = expert.clamp(max=num_experts - 1)
    valid = (expert < num_experts) & (r >= starts[clamped])
    row_expert = torch.where(valid, clamped, -1).to(torch.int32)
    dst_row = torch.where(valid, r, -1).view(num_rows, 1)
    return row_expert, dst_row


__all__ = [
    "DeepGemmExperts",
    "ExpandedDeepGemmExperts",
    "MaskedDeepGemmExperts",
    "apply_contiguous",
    "deep_gemm_alignment",
    "deep_gemm_status",
    "masked_rows_multiple",
    "psum_rows",
    "write_expanded_output",
]
