"""What one rank's expert MLPs are, as data: :class:`ExpertMLP`.

Everything a kernel, a loader or a test needs to know about the expert MLP -- its sizes, the
activation dtype, how the weights are stored, how GEMM inputs are quantized, the activation
function -- in one frozen value. ``LayerConfig.mlp`` builds it from a configuration; the
weights (:class:`~moe_kernels.mlp.weights.ExpertWeights`) are checked against it; experts
classes declare which formats and activations they implement and refuse the rest with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_kernels.mlp.act_quant import ActQuant
from moe_kernels.mlp.activations import Activation
from moe_kernels.mlp.formats import Dense, StoredSpec, WeightFormat

#: largest ``max|out - ref| / max|ref|`` of a layer in an unquantized dtype against the fp32
#: reference. bf16: vLLM's combination tester uses 3e-2 against a torch reference; fp32 leaves
#: room for TF32 tensor-core GEMMs.
DTYPE_TOLERANCE: dict[torch.dtype, float] = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 5e-3}


@dataclass(frozen=True)
class ExpertMLP:
    """Each local expert computes ``w2 @ act(w13 @ x)`` on rows of ``x [*, hidden]``.

    ``w13 [activation.gemm1_rows(inter), hidden]``, ``w2 [hidden, inter]``, stored as ``weights``
    says; activations are ``dtype`` and enter the GEMMs quantized as ``act_quant`` says (``None``:
    in ``dtype``). ``biases``: each GEMM adds a per-expert bias to its fp32 result, ``w13_bias
    [gemm1_rows]`` before the activation and ``w2_bias [hidden]`` before the router weight (gpt-oss:
    ``w2 @ act(w13 @ x + b13) + b2``), both in ``dtype``.
    """

    hidden: int
    inter: int
    dtype: torch.dtype = torch.bfloat16
    weights: WeightFormat = Dense()
    act_quant: ActQuant | None = None
    activation: Activation = Activation()
    biases: bool = False

    @property
    def w13_shape(self) -> tuple[int, int]:
        return self.activation.gemm1_rows(self.inter), self.hidden

    @property
    def w2_shape(self) -> tuple[int, int]:
        return self.hidden, self.inter

    def stored(self) -> dict[str, StoredSpec]:
        """Per projection (``"w13"``, ``"w2"``), the tensors one expert stores (its bias, ``"bias"``,
        with ``biases``)."""
        stored = {"w13": self.weights.stored(*self.w13_shape), "w2": self.weights.stored(*self.w2_shape)}
        if self.biases:
            stored["w13"]["bias"] = ((self.w13_shape[0],), self.dtype)
            stored["w2"]["bias"] = ((self.hidden,), self.dtype)
        return stored

    def expert_nbytes(self) -> int:
        """Bytes one expert's stored tensors take."""
        total = 0
        for stored in self.stored().values():
            for shape, dtype in stored.values():
                total += math.prod(shape) * dtype.itemsize
        return total

    @property
    def tolerance(self) -> float:
        """The relative error budget of a layer on this MLP against the fp32 reference."""
        return max(DTYPE_TOLERANCE.get(self.dtype, 3e-2), self.weights.tolerance)

    def describe(self) -> str:
        parts = [f"H={self.hidden}", f"I={self.inter}", str(self.dtype).removeprefix("torch."), self.weights.describe()]
        if self.act_quant is not None:
            parts.append(self.act_quant.describe())
        parts.append(self.activation.kind)
        if self.biases:
            parts.append("expert biases")
        return ", ".join(parts)
