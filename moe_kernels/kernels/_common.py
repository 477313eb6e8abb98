"""Helpers shared by the Triton launch wrappers: interpreter detection and argument checks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


# Host-side integer helpers of the launch wrappers. Since Triton 3.7 ``triton.cdiv`` and
# ``triton.next_power_of_2`` are constexpr functions, about 4 us a call on the host (Triton 3.9,
# measured), and an eager layer call makes 15-20 of them; these are the same arithmetic.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_row_block(num_rows: int, num_cols: int) -> tuple[int, int]:
    """Column block and warp count for the row-wise kernels (grid = rows x column blocks).

    Starts from 1024 columns (16-byte accesses per thread for bf16 with 4 warps) and halves the
    block while there are fewer than ~256 programs, so decode-sized batches still spread over
    all SMs of an H100.
    """
    block = min(1024, next_power_of_2(max(num_cols, 1)))
    while block > 128 and num_rows * cdiv(num_cols, block) < 256:
        block //= 2
    return block, max(1, min(4, block // 256))


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    contiguous: bool = True,
    unit_last_stride: bool = False,
) -> torch.Tensor:
    """Validate one wrapper argument; raise naming the argument, the expectation and what was given.

    ``shape`` entries that are ``None`` match any size. ``unit_last_stride``: only the last dim
    needs stride 1 (rows may be views of a wider tensor); it implies ``contiguous=False``. Wrong
    type/dtype raise TypeError, wrong shape/layout raise ValueError.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(dtypes)}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=True))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    elif ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(t.shape)}")
    if unit_last_stride:
        if t.dim() and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected unit stride along the last dim, got strides {t.stride()}")
    elif contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless every non-None tensor lives on the same device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
