"""DeepGEMM (``deep_gemm``, registry package ``deepinfer-gemm``): the probe, its constraints,
its process-wide settings, and the grouped GEMM calls in one place.

``deep_gemm`` is imported lazily, so this module imports on a bare CPU; whether it is usable is
answered once by :func:`status` (never raises). Constraints (DeepGEMM 2.8 source,
``csrc/apis/gemm.hpp`` and ``csrc/jit_kernels/impls/sm90_bf16_gemm.hpp``): bf16 or fp8 A and B,
bf16 D; A K-major; int32 layouts; SM90 asserts ``K % 64 == 0`` (K = H for GEMM1, I for GEMM2);
the masked GEMM asserts ``expected_m > 0`` and ``M > 0``; only compute capability 9.x and 10.x
are dispatched, and its fp8 kernels on SM100 keep only the exponent of float32 scales (they want
UE8M0, powers of two), which checkpoint scales are not -- so fp8 is SM90 only here.

The GEMM calls take an operand's scale or ``None``: ``(tensor, scale)`` pairs go to DeepGEMM's
fp8 entry points, plain tensors to the bf16 ones.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import Any

import torch

from moe_kernels.backends.cuda import sm_check
from moe_kernels.core.contract import Check, Operand

#: the bf16 grouped entry points the experts call
BF16_SYMBOLS = ("m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked")
#: the fp8 grouped entry points
FP8_SYMBOLS = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked")
#: SM90 asserts ``k % 64 == 0`` for the grouped GEMMs (sm90_bf16_gemm.hpp); applied to SM100 too.
K_MULTIPLE = 64
#: The masked GEMM's largest row tile on SM90: its block_m candidates are {64, 128}
#: (csrc/jit_kernels/heuristics/sm90.hpp); on SM100 block_m is the contiguous alignment. Its
#: output TMA store writes whole tiles into ``[G * M, N]``, so ``M`` must be a multiple of the
#: tile or a group's last tile overwrites the next group's rows.
MASKED_BLOCK_M_MAX = 128
#: DeepGEMM dispatches SM90 and SM100 kernels only (csrc/apis/gemm.hpp); fp32 fp8 scales: SM90.
ARCH_MAJORS = (9, 10)
FP8_ARCH_MAJORS = (9,)


@functools.cache
def status() -> tuple[bool, str]:
    """``(usable, why)`` for ``import deep_gemm`` with the bf16 grouped GEMMs. Probed once per
    process; any failure (absent, broken build, missing symbols) is an answer, never an error."""
    try:
        dg = importlib.import_module("deep_gemm")
    except Exception as e:  # an absent or broken install (ImportError, OSError, RuntimeError...) is an answer
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return False, f"deep_gemm does not import ({type(e).__name__}: {first})"
    missing = [s for s in BF16_SYMBOLS if not hasattr(dg, s)]
    if _alignment_getter(dg) is None:
        missing.append("get_mk_alignment_for_contiguous_layout")
    version = getattr(dg, "__version__", "?")
    if missing:
        return False, f"deep_gemm {version} lacks the bf16 grouped GEMM symbols {missing}"
    return True, f"deep_gemm {version} with bf16 grouped GEMMs"


def module() -> ModuleType:
    """``deep_gemm`` itself; ``RuntimeError`` with the probe's answer when it is not usable."""
    ok, why = status()
    if not ok:
        raise RuntimeError(why)
    return importlib.import_module("deep_gemm")


def library_check(*, fp8: bool) -> Check:
    """deep_gemm imports with the grouped GEMMs a part calls (the fp8 ones too when ``fp8``)."""
    ok, why = status()
    if not ok or not fp8:
        return Check("deep_gemm", ok, why)
    missing = [s for s in FP8_SYMBOLS if not hasattr(module(), s)]
    if missing:
        return Check.failed("deep_gemm", f"{why}, but without the fp8 grouped GEMMs {missing}")
    return Check.passed("deep_gemm", f"{why}, fp8 grouped GEMMs")


def device_check(device: torch.device, *, fp8: bool) -> Check:
    """A GPU whose architecture DeepGEMM dispatches (SM90/SM100; fp8 with float32 scales: SM90)."""
    if fp8:
        return sm_check(device, FP8_ARCH_MAJORS, "DeepGEMM's fp8 GEMMs with float32 scales (SM100 wants UE8M0)")
    return sm_check(device, ARCH_MAJORS, "DeepGEMM")


def k_multiple_check(hidden: int, inter: int) -> Check:
    """Both GEMMs' contraction dims (H for GEMM1, I for GEMM2) are multiples of :data:`K_MULTIPLE`."""
    bad = [f"{name}={v}" for name, v in (("hidden_size", hidden), ("intermediate_size", inter)) if v % K_MULTIPLE]
    if bad:
        return Check.failed("shape", f"DeepGEMM needs K % {K_MULTIPLE} == 0 for both GEMMs; got {', '.join(bad)}")
    return Check.passed("shape", f"H={hidden}, I={inter} are multiples of {K_MULTIPLE}")


@functools.cache
def psum_layout_status(fp8: bool) -> tuple[bool, str]:
    """Whether this deep_gemm's contiguous GEMM takes ``use_psum_layout`` (DeepGEMM 2.8 does, for
    the bf16 and the fp8 one); read from the pybind signature in its docstring, so nothing is
    launched."""
    ok, why = status()
    if not ok:
        return ok, why
    gemm = "m_grouped_fp8_gemm_nt_contiguous" if fp8 else "m_grouped_bf16_gemm_nt_contiguous"
    fn = getattr(module(), gemm, None)
    if fn is None:
        return False, f"{why}, but without {gemm}"
    doc = getattr(fn, "__doc__", None) or ""
    if "use_psum_layout" in doc and "expected_m_for_psum_layout" in doc:
        return True, f"{why}, psum layout supported by {gemm}"
    return False, f"{why}, but its {gemm} takes no use_psum_layout/expected_m_for_psum_layout"


def psum_layout_checks(*, fp8: bool) -> list[Check]:
    """The ``psum_layout`` check of a part that reads DeepEP's expanded rows in place; none until
    DeepGEMM imports (the ``deep_gemm`` check says why it does not)."""
    if not status()[0]:
        return []
    return [Check("psum_layout", *psum_layout_status(fp8))]


def _alignment_getter(dg: Any) -> Any:
    # older DeepGEMM releases name it get_m_alignment_for_contiguous_layout
    return getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or getattr(
        dg, "get_m_alignment_for_contiguous_layout", None
    )


def alignment() -> int | None:
    """DeepGEMM's row alignment of expert segments (its contiguous GEMM's BLOCK_M; process-global,
    ``deep_gemm.set_mk_alignment_for_contiguous_layout`` changes it); ``None`` without DeepGEMM."""
    if not status()[0]:
        return None
    return int(_alignment_getter(module())())


def masked_rows_multiple() -> int:
    """``M`` of a masked GEMM must be a multiple of this (see :data:`MASKED_BLOCK_M_MAX`)."""
    return math.lcm(alignment() or 1, MASKED_BLOCK_M_MAX)


def set_num_sms(num_sms: int) -> None:
    """Limit DeepGEMM's persistent kernels to ``num_sms`` SMs (process-wide: every later GEMM)."""
    module().set_num_sms(num_sms)


def num_sms() -> int:
    return int(module().get_num_sms())


# --- the GEMMs ------------------------------------------------------------------------------


def contiguous(
    a: Operand, w: Operand, out: torch.Tensor, layout: torch.Tensor, *, psum_expected_m: int | None = None
) -> None:
    """``out[r] = a[r] @ w[e].T`` for the rows of expert ``e`` (fp8: both operands scaled).

    Contiguous layout (``psum_expected_m`` None): ``layout [R]`` int32 names each row's expert or
    ``-1`` (whole tiles of ``-1`` are skipped). Psum layout: ``layout [E]`` int32 are DeepEP's
    ``psum_num_recv_tokens_per_expert`` and ``psum_expected_m`` DeepGEMM's tuning hint (>= 1).
    ``a = (values [R, K], scale)``: bf16 without a scale, or float8_e4m3fn with ``[R, K/128]``;
    ``w = ([E, N, K], scale)`` likewise with ``[E, N/128, K/128]``; ``out [R, N]`` bf16.
    """
    dg = module()
    psum = {} if psum_expected_m is None else dict(use_psum_layout=True, expected_m_for_psum_layout=psum_expected_m)
    if a[1] is None:
        dg.m_grouped_bf16_gemm_nt_contiguous(a[0], w[0], out, layout, **psum)
    else:
        dg.m_grouped_fp8_gemm_nt_contiguous(a, w, out, layout, **psum)


def masked(a: Operand, w: Operand, out: torch.Tensor, counts: torch.Tensor, expected_m: int) -> None:
    """``out[e, m] = a[e, m] @ w[e].T`` for ``m < counts[e]``: ``a = (values [E, M, K], scale)``
    (fp8: ``[E, M, K/128]``), ``w`` as :func:`contiguous` takes it, ``counts [E]`` int32, ``out
    [E, M, N]`` bf16, ``expected_m`` a host estimate of the rows per expert (clamped to ``[1, M]``)."""
    expected_m = max(1, min(int(expected_m), a[0].shape[1]))
    dg = module()
    if a[1] is None:
        dg.m_grouped_bf16_gemm_nt_masked(a[0], w[0], out, counts, expected_m)
    else:
        dg.m_grouped_fp8_gemm_nt_masked(a, w, out, counts, expected_m)
