"""The function between the two expert GEMMs, as data.

An expert computes ``w2 @ act(w13 @ x)``. A *gated* activation reads the two halves of GEMM1's
output, gate rows ``[0, I)`` then up rows ``[I, 2I)`` (``w13 [2I, H]``), and returns ``[I]``:
SiLU-and-mul is ``silu(gate) * up``. A non-gated one maps GEMM1's ``[I]`` outputs element by
element (``w13 [I, H]``).

Each kind has a plain-torch definition here (:meth:`Activation.reference`, what the reference
experts and the tests compute) and an integer code the Triton kernels switch on as a
``tl.constexpr`` (:func:`moe_kernels.kernels.activation.activate`). Adding a kind: its entry
in :data:`KINDS` below, its branch in that Triton function, and a test -- three files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _Kind:
    code: int
    gated: bool
    #: fp32 ``(gate, up) -> out``; ``up`` is None for non-gated kinds
    torch_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    description: str


def _silu_and_mul(gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    assert up is not None
    return F.silu(gate) * up


#: every activation the library implements, by its config name
KINDS: dict[str, _Kind] = {
    "silu": _Kind(0, True, _silu_and_mul, "SwiGLU: silu(gate) * up"),
}


@dataclass(frozen=True)
class Activation:
    """One activation of :data:`KINDS` (``kind`` is its config name)."""

    kind: str = "silu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"activation {self.kind!r} is not implemented; known: {', '.join(KINDS)}")

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

    def reference(self, h: torch.Tensor) -> torch.Tensor:
        """GEMM1's output ``h [..., 2I]`` (gated) or ``[..., I]`` -> ``[..., I]``, in float32."""
        h = h.float()
        if not self.gated:
            return KINDS[self.kind].torch_fn(h, None)
        inter = h.shape[-1] // 2
        return KINDS[self.kind].torch_fn(h[..., :inter], h[..., inter:])

    def describe(self) -> str:
        return KINDS[self.kind].description


#: the default: SwiGLU, what most MoE models use
SILU = Activation("silu")
