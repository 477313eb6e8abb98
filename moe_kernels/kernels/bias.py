"""Per-expert biases in the GEMM epilogues (gpt-oss): one Triton helper every grouped GEMM calls on
its fp32 accumulator, and the wrappers' argument check.

A GEMM of expert ``e`` with a bias computes ``a @ w[e].T + bias[e]`` in fp32 before anything else
of its epilogue (the activation, the router weight, the rounding to the output dtype), as
``transformers`` adds the bias to the matmul result.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_tensor


@triton.jit
def bias_row(bias_ptr, expert, cols, col_ok, stride_e):
    """``bias[expert, cols]`` as fp32 ``[BLOCK_N]`` (0 outside ``col_ok``), to broadcast over a tile's rows."""
    return tl.load(bias_ptr + expert.to(tl.int64) * stride_e + cols, mask=col_ok, other=0.0).to(tl.float32)


def bias_args(bias: torch.Tensor | None, num_experts: int, width: int) -> dict[str, Any]:
    """Validate an optional ``bias [E, N]`` (bf16/fp16/fp32, unit stride along N); return the kernel
    arguments every biased GEMM takes: ``bias_ptr``, ``stride_bias_e`` (0 without a bias), ``HAS_BIAS``."""
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(num_experts, width), unit_last_stride=True)
    return {"bias_ptr": bias, "stride_bias_e": 0 if bias is None else bias.stride(0), "HAS_BIAS": bias is not None}


__all__ = ["bias_args", "bias_row"]
