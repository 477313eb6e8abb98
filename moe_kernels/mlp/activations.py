"""The function between the two expert GEMMs, as data.

An expert computes ``w2 @ act(w13 @ x)``. A *gated* activation reads the two halves of GEMM1's
output, gate rows ``[0, I)`` then up rows ``[I, 2I)`` (``w13 [2I, H]``), and returns ``[I]``:
``f(gate) * up``. A non-gated one maps GEMM1's ``[I]`` outputs element by element
(``w13 [I, H]``). The variants real models ship, as parameters of one value:

==============================  ==========================================================
``silu``                        ``silu(gate) * up`` (SwiGLU; most MoE models)
``silu, alpha, limit,``         gpt-oss, MiniMax-M3: ``gate = min(gate, limit)``,
``up_offset``                   ``up = clamp(up, +-limit)``, ``gate * sigmoid(alpha * gate)
                                * (up + up_offset)`` (alpha 1.702, limit 7, offset 1)
``silu, limit``                 DeepSeek-V4, GLM-5-Next, HY-V4: the same clamps, plain SiLU
``silu, limit, clamp: output``  Ling, Step-3.7: ``min(silu(gate), limit) * clamp(up, +-limit)``
``silu, gate_softcap,``         Inkling-2: ``cap(gate) * sigmoid(gate) * cap(up)``,
``up_softcap``                  ``cap(v) = c * tanh(v / c)``
``gelu_tanh``, ``gelu``         ``gelu(gate) * up`` (tanh approximation or erf)
``relu2``                       non-gated: ``relu(x)^2`` (Nemotron-H)
==============================  ==========================================================

Each kind has a plain-torch definition here (:meth:`Activation.reference`, what the reference
experts and the tests compute) and a branch of the Triton device function every kernel applies
(:func:`moe_kernels.kernels.activation.apply_activation`, switched on the constants of
:meth:`Activation.kernel_constants`). Adding a kind: its entry in :data:`KINDS`, its branch in that
Triton function, and a test -- three files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _Kind:
    code: int
    gated: bool
    #: fp32 ``x -> f(x)`` of the gate (gated kinds) or of GEMM1's output (non-gated), before clamps
    torch_fn: Callable[[torch.Tensor, float], torch.Tensor]
    description: str


def _silu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * torch.sigmoid(alpha * x)


def _gelu_tanh(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.gelu(x)


def _relu2(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.relu(x).square()


#: every activation the library implements, by its config name
KINDS: dict[str, _Kind] = {
    "silu": _Kind(0, True, _silu, "SwiGLU: silu(gate) * up"),
    "gelu_tanh": _Kind(1, True, _gelu_tanh, "GeGLU (tanh approximation): gelu(gate) * up"),
    "gelu": _Kind(2, True, _gelu, "GeGLU (erf): gelu(gate) * up"),
    "relu2": _Kind(3, False, _relu2, "relu(x)^2, not gated"),
}


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


@dataclass(frozen=True)
class Activation:
    """One activation: a kind of :data:`KINDS` and the parameters its model uses (see the module
    docstring for the formulas). ``limit`` clamps the gate from above and up to ``[-limit,
    limit]``, before the activation (``clamp="input"``) or after it (``"output"``)."""

    kind: str = "silu"
    alpha: float = 1.0
    limit: float | None = None
    clamp: Literal["input", "output"] = "input"
    up_offset: float = 0.0
    gate_softcap: float | None = None
    up_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"activation {self.kind!r} is not implemented; known: {', '.join(KINDS)}")
        problems = []
        if self.kind != "silu":
            given = [n for n in ("alpha", "gate_softcap", "up_softcap") if getattr(self, n) != _DEFAULTS[n]]
            problems += [f"{n} applies to silu only" for n in given]
        if not self.gated:
            given = [n for n in ("limit", "up_offset") if getattr(self, n) != _DEFAULTS[n]]
            problems += [f"{n} applies to gated activations only ({self.kind} is not gated)" for n in given]
        for name in ("alpha", "limit", "gate_softcap", "up_softcap"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0, got {value}")
        if self.clamp not in ("input", "output"):
            problems.append(f"clamp must be 'input' or 'output', got {self.clamp!r}")
        if (self.gate_softcap is not None or self.up_softcap is not None) and self.alpha != 1.0:
            problems.append("alpha and the softcaps do not combine (no model uses both)")
        if problems:
            raise ValueError(f"activation {self.kind}: " + "; ".join(problems))

    @property
    def gated(self) -> bool:
        """Whether GEMM1 produces gate and up halves (``w13`` has ``2I`` rows) or ``I`` rows."""
        return KINDS[self.kind].gated

    @property
    def code(self) -> int:
        """The integer the Triton kernels switch on."""
        return KINDS[self.kind].code

    def gemm1_rows(self, inter: int) -> int:
        """Rows of ``w13`` for an intermediate size ``I``."""
        return 2 * inter if self.gated else inter

    def kernel_constants(self) -> dict[str, tuple[int | float | bool, ...]]:
        """The ``ACT`` ``tl.constexpr`` argument of :func:`moe_kernels.kernels.activation.apply_activation`
        and of every kernel that calls it: ``(kind code, alpha, limit, clamp output?, up offset, gate
        softcap, up softcap)``, 0 standing for "none" where a parameter is unset."""
        return {
            "ACT": (
                self.code,
                float(self.alpha),
                float(self.limit or 0.0),
                self.clamp == "output",
                float(self.up_offset),
                float(self.gate_softcap or 0.0),
                float(self.up_softcap or 0.0),
            )
        }

    def reference(self, h: torch.Tensor) -> torch.Tensor:
        """GEMM1's output ``h [..., 2I]`` (gated) or ``[..., I]`` -> ``[..., I]``, in float32."""
        h = h.float()
        fn = KINDS[self.kind].torch_fn
        if not self.gated:
            return fn(h, self.alpha)
        inter = h.shape[-1] // 2
        gate, up = h[..., :inter], h[..., inter:]
        limit = self.limit
        if limit is not None and self.clamp == "input":
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        if self.gate_softcap is not None:
            g = _softcap(gate, self.gate_softcap) * torch.sigmoid(gate)
        else:
            g = fn(gate, self.alpha)
        if limit is not None and self.clamp == "output":
            g, up = g.clamp(max=limit), up.clamp(-limit, limit)
        return g * (_softcap(up, self.up_softcap) + self.up_offset)

    def describe(self) -> str:
        extras = [
            f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
            for name, value in (
                ("alpha", self.alpha),
                ("limit", self.limit),
                ("up_offset", self.up_offset),
                ("gate_softcap", self.gate_softcap),
                ("up_softcap", self.up_softcap),
            )
            if value != _DEFAULTS[name]
        ]
        if self.limit is not None:
            extras.append(f"clamp={self.clamp}")
        return KINDS[self.kind].description + (f" ({', '.join(extras)})" if extras else "")


_DEFAULTS = {"alpha": 1.0, "limit": None, "up_offset": 0.0, "gate_softcap": None, "up_softcap": None}

#: the default: SwiGLU, what most MoE models use
SILU = Activation("silu")
