"""Expert MLPs on DeepGEMM's bf16 grouped GEMMs (Hopper SM90, Blackwell SM100).

Three layouts, one class each, all without host synchronisation:

* :class:`DeepGemmExperts` (STANDARD ``x [T, H]`` + top-k ids): Triton permute into DeepGEMM's
  contiguous layout (expert segments aligned to ``get_mk_alignment_for_contiguous_layout()``,
  padding rows marked ``-1``), ``m_grouped_bf16_gemm_nt_contiguous`` x 2 with SiLU-and-mul
  between, weighted gather back to ``[T, H]``.
* :class:`BatchedDeepGemmExperts` (BATCHED ``[E, M, H]`` + counts): ``m_grouped_bf16_gemm_nt_masked``
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

from moe_kernels.config import LayerConfig
from moe_kernels.contract import (
    ActivationFormat,
    BatchedTokens,
    Check,
    ExpandedTokens,
    PermuteExpertsUnpermute,
    StandardTokens,
    WorkspaceSpec,
)
from moe_kernels.experts.tuning import experts_preference
from moe_kernels.platform import triton_check

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
    if not _has_alignment_getter(dg):
        missing.append("get_mk_alignment_for_contiguous_layout")
    version = getattr(dg, "__version__", "?")
    if missing:
        return False, f"deep_gemm {version} lacks the bf16 grouped GEMM symbols {missing}"
    return True, f"deep_gemm {version} with bf16 grouped GEMMs"


@functools.cache
def psum_layout_status() -> tuple[bool, str]:
    """Whether this deep_gemm's contiguous GEMM takes ``use_psum_layout`` (DeepGEMM 2.8.2 does);
    read from the pybind signature in its docstring, so nothing is launched."""
    ok, why = deep_gemm_status()
    if not ok:
        return ok, why
    fn = _deep_gemm().m_grouped_bf16_gemm_nt_contiguous
    doc = getattr(fn, "__doc__", None) or ""
    if "use_psum_layout" in doc and "expected_m_for_psum_layout" in doc:
        return True, f"{why}, psum layout supported"
    return False, f"{why}, but its contiguous GEMM takes no use_psum_layout/expected_m_for_psum_layout"


def _has_alignment_getter(dg: Any) -> bool:
    return hasattr(dg, "get_mk_alignment_for_contiguous_layout") or hasattr(dg, "get_m_alignment_for_contiguous_layout")


def _deep_gemm() -> ModuleType:
    ok, why = deep_gemm_status()
    if not ok:
        raise RuntimeError(why)
    return importlib.import_module("deep_gemm")


def contiguous_alignment() -> int:
    """DeepGEMM's row alignment of expert segments (its contiguous GEMM's BLOCK_M; process-global,
    ``deep_gemm.set_mk_alignment_for_contiguous_layout`` changes it)."""
    dg = _deep_gemm()
    getter = getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or dg.get_m_alignment_for_contiguous_layout
    return int(getter())


def masked_rows_multiple() -> int:
    """``M`` of a masked GEMM must be a multiple of this (see :data:`MASKED_BLOCK_M_MAX`)."""
    return math.lcm(contiguous_alignment(), MASKED_BLOCK_M_MAX)


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


def k_multiple_check(cfg: LayerConfig, backend: str, multiple: int) -> Check:
    """Both GEMMs' contraction dims (H for GEMM1, I for GEMM2) are multiples of ``multiple``."""
    h, i = cfg.moe.hidden_size, cfg.moe.intermediate_size
    bad = [f"{name}={v}" for name, v in (("hidden_size", h), ("intermediate_size", i)) if v % multiple]
    if bad:
        return Check.failed("shape", f"{backend} needs K % {multiple} == 0 for both GEMMs; got {', '.join(bad)}")
    return Check.passed("shape", f"H={h}, I={i} are multiples of {multiple}")


class DeepGemmPart(PermuteExpertsUnpermute):
    """What every DeepGEMM experts class shares: bf16 only, SM90/SM100, deep_gemm importable,
    K % 64 == 0, no host sync (capturable in CUDA graphs)."""

    dtypes = (torch.bfloat16,)
    supports_cuda_graphs = True

    def check_device(self, device: torch.device) -> Check:
        return deep_gemm_device_check(device)

    def checks(self, cfg: LayerConfig, device: torch.device) -> list[Check]:
        return [
            *super().checks(cfg, device),
            deep_gemm_check(),
            k_multiple_check(cfg, "DeepGEMM", K_MULTIPLE),
            # permute, SiLU-and-mul and gather are the Triton kernels of moe_kernels.kernels
            triton_check(device)._replace(name="triton"),
        ]

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        return experts_preference(self.name, cfg, device)


# --- the GEMM pipelines (shared by the classes here and the hybrid) ----------------------


def contiguous_mlp(
    rows: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
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
    dg.m_grouped_bf16_gemm_nt_contiguous(rows, w13, gate_up, grouped_layout)
    silu_and_mul(gate_up, act, grouped_layout=grouped_layout)
    dg.m_grouped_bf16_gemm_nt_contiguous(act, w2, out_rows, grouped_layout)


def masked_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
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
    dg.m_grouped_bf16_gemm_nt_masked(x, w13, gate_up, counts, expected_m)
    silu_and_mul(gate_up, act, counts=counts)
    dg.m_grouped_bf16_gemm_nt_masked(act, w2, out, counts, expected_m)


def contiguous_workspace(tokens: StandardTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
    """Scratch for :func:`contiguous_mlp` on a layout of ``contiguous_rows_bound`` rows."""
    from moe_kernels.kernels import contiguous_rows_bound

    rows = contiguous_rows_bound(tokens.topk_ids.numel(), w13.shape[0], contiguous_alignment())
    hidden, inter, dtype = w2.shape[1], w2.shape[2], tokens.x.dtype
    return {
        # the permuted rows; GEMM2 writes its output over them (they are dead by then)
        "permuted": WorkspaceSpec((rows, hidden), dtype),
        "gate_up": WorkspaceSpec((rows, 2 * inter), dtype),
        "activation": WorkspaceSpec((rows, inter), dtype),
    }


def apply_contiguous(
    tokens: StandardTokens, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor, workspace: dict[str, torch.Tensor]
) -> None:
    """STANDARD tokens through the contiguous layout into ``out [T, H]`` (weighted, reduced)."""
    from moe_kernels.kernels import contiguous_layout, scatter_rows, weighted_gather

    layout = contiguous_layout(tokens.topk_ids, w13.shape[0], contiguous_alignment())
    rows = workspace["permuted"]
    # Rows no slot maps to (padding) keep stale values: they are computed (or skipped per tile)
    # but the gather only reads rows named by dst_row.
    scatter_rows(tokens.x, layout.dst_row, rows)
    contiguous_mlp(rows, w13, w2, layout.grouped_layout, workspace["gate_up"], workspace["activation"], rows)
    weighted_gather(rows, layout.dst_row, tokens.topk_weights, out)


def masked_workspace(
    num_experts: int, rows_per_expert: int, w2: torch.Tensor, dtype: torch.dtype, *, with_rows: bool
) -> dict[str, WorkspaceSpec]:
    """Scratch for :func:`masked_mlp` with ``rows_per_expert`` (already aligned) rows per expert;
    ``with_rows`` adds the ``[E, M, H]`` input/output buffer ("masked_rows")."""
    hidden, inter = w2.shape[1], w2.shape[2]
    specs = {
        "gate_up": WorkspaceSpec((num_experts, rows_per_expert, 2 * inter), dtype),
        "activation": WorkspaceSpec((num_experts, rows_per_expert, inter), dtype),
    }
    if with_rows:
        specs["masked_rows"] = WorkspaceSpec((num_experts, rows_per_expert, hidden), dtype)
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

    input_format = ActivationFormat.STANDARD

    def workspace_shapes(self, tokens: StandardTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        if tokens.x.shape[0] == 0:
            return {}
        return contiguous_workspace(tokens, w13, w2)

    def apply(
        self,
        tokens: StandardTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        if tokens.x.shape[0] == 0:
            return
        apply_contiguous(tokens, w13, w2, out, workspace)


class BatchedDeepGemmExperts(DeepGemmPart):
    """BATCHED in and out: ``x [E, M, H]`` with ``expert_num_tokens [E]`` int32 valid rows per
    expert -> ``out [E, M, H]`` raw (unweighted; finalize weights and sums).

    Two ``m_grouped_bf16_gemm_nt_masked`` calls with the masked SiLU-and-mul between, tuned for
    the host-side ``expected_m``. No host sync and static shapes: capturable in a CUDA graph.
    An empty batch (``M == 0``) launches nothing (DeepGEMM asserts ``M > 0``).

    DeepGEMM writes whole row tiles, so ``M`` must be a multiple of :func:`masked_rows_multiple`
    (128 on H100). When the prepare hands over another ``M`` (e.g. ``M = T``), the rows are
    staged through aligned scratch buffers: one extra copy in and one out. Give prepare a
    capacity that is a multiple of 128 to avoid them.
    """

    input_format = ActivationFormat.BATCHED

    def workspace_shapes(self, tokens: BatchedTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        e, m, _ = tokens.x.shape
        if m == 0:
            return {}
        padded = align_up(m, masked_rows_multiple())
        staged = padded != m or not tokens.x.is_contiguous()
        return masked_workspace(e, padded, w2, tokens.x.dtype, with_rows=staged)

    def apply(
        self,
        tokens: BatchedTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        x = tokens.x
        m = x.shape[1]
        if m == 0:
            return
        gate_up, act = workspace["gate_up"], workspace["activation"]
        if "masked_rows" not in workspace:  # M already tile-aligned and x contiguous: no copies
            masked_mlp(x, w13, w2, tokens.expert_num_tokens, tokens.expected_m, gate_up, act, out)
            return
        rows = workspace["masked_rows"]
        rows[:, :m].copy_(x)
        masked_mlp(rows, w13, w2, tokens.expert_num_tokens, tokens.expected_m, gate_up, act, rows)
        out.copy_(rows[:, :m])


class ExpandedDeepGemmExperts(DeepGemmPart):
    """EXPANDED in and out: ``x [R, H]`` laid out by DeepEP's expanded dispatch -> ``out [R, H]``.

    Expert e owns rows ``[align_up(expert_ends[e-1], alignment), expert_ends[e])`` -- exactly
    DeepGEMM's psum layout, so both GEMMs read the dispatched rows in place
    (``use_psum_layout=True``, ``grouped_layout = expert_ends``, ``expected_m_for_psum_layout =
    expected_m``). SiLU-and-mul runs on valid rows only. The last step writes every row of
    ``out``: valid rows scaled by ``row_weights`` (DeepEP's combine sums without weights), all
    other rows (segment padding, rows past the last expert) as zeros, so a combine that summed
    them would add nothing. No host sync: capturable in a CUDA graph.

    ``alignment`` must equal DeepGEMM's ``get_mk_alignment_for_contiguous_layout()`` (the
    dispatch must be built with it).
    """

    input_format = ActivationFormat.EXPANDED

    def checks(self, cfg: LayerConfig, device: torch.device) -> list[Check]:
        checks = super().checks(cfg, device)
        if deep_gemm_status()[0]:
            ok, why = psum_layout_status()
            checks.append(Check("psum_layout", ok, why))
        return checks

    def workspace_shapes(self, tokens: ExpandedTokens, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, WorkspaceSpec]:
        r = tokens.x.shape[0]
        if r == 0:
            return {}
        hidden, inter, dtype = w2.shape[1], w2.shape[2], tokens.x.dtype
        return {
            "gate_up": WorkspaceSpec((r, 2 * inter), dtype),
            "activation": WorkspaceSpec((r, inter), dtype),
            "expert_rows": WorkspaceSpec((r, hidden), dtype),
        }

    def apply(
        self,
        tokens: ExpandedTokens,
        w13: torch.Tensor,
        w2: torch.Tensor,
        out: torch.Tensor,
        workspace: dict[str, torch.Tensor],
    ) -> None:
        from moe_kernels.kernels import silu_and_mul, weighted_gather

        r = tokens.x.shape[0]
        if r == 0:
            return
        alignment = contiguous_alignment()
        if tokens.alignment != alignment:
            raise ValueError(
                f"expanded tokens are aligned to {tokens.alignment} rows but DeepGEMM's contiguous "
                f"layout uses {alignment}: dispatch with expert_alignment={alignment}"
            )
        ends = tokens.expert_ends
        if ends.dtype != torch.int32 or not ends.is_contiguous():
            raise TypeError(f"expert_ends must be contiguous int32, got {ends.dtype}")
        row_expert, dst_row = expanded_row_map(ends, r, alignment)
        gate_up, act, rows = workspace["gate_up"], workspace["activation"], workspace["expert_rows"]
        expected_m = max(1, int(tokens.expected_m))
        dg = _deep_gemm()
        dg.m_grouped_bf16_gemm_nt_contiguous(
            tokens.x, w13, gate_up, ends, use_psum_layout=True, expected_m_for_psum_layout=expected_m
        )
        silu_and_mul(gate_up, act, grouped_layout=row_expert)
        dg.m_grouped_bf16_gemm_nt_contiguous(
            act, w2, rows, ends, use_psum_layout=True, expected_m_for_psum_layout=expected_m
        )
        # One slot per row: out[r] = row_weights[r] * rows[r] where dst_row[r] = r, zeros where -1.
        weighted_gather(rows, dst_row, tokens.row_weights.reshape(r, 1), out)


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
    "BatchedDeepGemmExperts",
    "DeepGemmExperts",
    "ExpandedDeepGemmExperts",
    "apply_contiguous",
    "contiguous_alignment",
    "deep_gemm_status",
    "masked_rows_multiple",
]
