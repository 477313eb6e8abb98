"""Grouped GEMM over experts, ``out = a @ b[e].T`` per row group, optionally fused with SiLU-and-mul.

One Triton kernel serves both token layouts produced by :mod:`.permute`:

* contiguous: rows of ``a [R, K]`` are expert segments; ``grouped_layout [R]`` names each row's
  expert (``-1`` = padding). The expert is looked up once per BLOCK_M row tile, so every segment
  must start on a multiple of BLOCK_M (``alignment % block_m == 0``).
* masked: ``a [E, M, K]`` holds ``counts[e]`` valid rows per expert.

With ``fuse_silu_and_mul`` the weight ``b [E, 2I, K]`` stacks gate rows over up rows; each program
accumulates the gate and the up tile of the same output columns and writes ``silu(gate) * up``
into ``out [..., I]``, so the ``[R, 2I]`` intermediate never goes to memory.

Rows that are skipped (padding / past ``counts``) are neither computed nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_same_device, check_tensor, interpreting

# Defaults tuned for H100 bf16: 64-row tiles keep padding low at decode sizes, 128x64 weight tiles
# with 3 stages fit in shared memory even when the fused path streams gate and up tiles.
BLOCK_M = 64
BLOCK_N = 128
BLOCK_K = 64
NUM_STAGES = 3


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    group_ptr,
    num_rows,
    rows_per_group,
    n_out,
    k_dim,
    stride_am,
    stride_be,
    stride_bn,
    stride_om,
    up_offset,
    MASKED: tl.constexpr,
    FUSE_SILU: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if MASKED:
        tiles_per_group = tl.cdiv(rows_per_group, BLOCK_M)
        expert = pid_m // tiles_per_group
        tile_start = (pid_m % tiles_per_group) * BLOCK_M
        valid_rows = tl.minimum(tl.load(group_ptr + expert), rows_per_group)
        if tile_start >= valid_rows:
            return
        local = tile_start + tl.arange(0, BLOCK_M)
        row_ok = local < valid_rows
        rows = expert.to(tl.int64) * rows_per_group + local
    else:
        tile_start = pid_m * BLOCK_M
        expert = tl.load(group_ptr + tile_start)
        if expert < 0:
            return
        rows = tile_start.to(tl.int64) + tl.arange(0, BLOCK_M)
        # Padding rows at the segment tail share the tile; they must stay unwritten.
        row_expert = tl.load(group_ptr + rows, mask=rows < num_rows, other=-1)
        row_ok = row_expert == expert

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    # B is [N, K] row-major; reading it as a [BLOCK_K, BLOCK_N] tile gives A @ B^T directly.
    b_expert = b_ptr + expert.to(tl.int64) * stride_be
    b_ptrs = b_expert + cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = offs_k < k_dim - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if FUSE_SILU:
            b_up = tl.load(b_ptrs + up_offset, mask=b_mask, other=0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if FUSE_SILU:
        acc = acc * tl.sigmoid(acc) * acc_up
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check_weights(a: torch.Tensor, b: torch.Tensor, fuse_silu_and_mul: bool) -> int:
    """Validate ``b [E, N, K]`` against ``a``; return the output width (N, or N/2 when fused)."""
    check_tensor("b", b, dtypes=(a.dtype,), ndim=3)
    if b.shape[2] != a.shape[-1]:
        raise ValueError(f"b: expected K = {a.shape[-1]} (a's last dim), got shape {list(b.shape)}")
    if fuse_silu_and_mul and b.shape[1] % 2:
        raise ValueError(f"b: fuse_silu_and_mul needs an even N = 2I, got shape {list(b.shape)}")
    return b.shape[1] // 2 if fuse_silu_and_mul else b.shape[1]


def _launch(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    group: torch.Tensor,
    *,
    masked: bool,
    num_row_tiles: int,
    rows_per_group: int,
    n_out: int,
    fuse_silu_and_mul: bool,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int | None,
    num_stages: int,
) -> None:
    if num_row_tiles == 0 or n_out == 0:
        return
    if num_warps is None:
        # Two fp32 accumulators per program need twice the registers: spread them over 8 warps.
        num_warps = 8 if fuse_silu_and_mul else 4
    k_dim = a.shape[-1]
    _grouped_gemm_kernel[(num_row_tiles, triton.cdiv(n_out, block_n))](
        a,
        b,
        out,
        group,
        a.numel() // max(k_dim, 1),
        rows_per_group,
        n_out,
        k_dim,
        k_dim,
        b.stride(0),
        b.stride(1),
        n_out,
        # Offset of the up rows from the gate rows, precomputed so the product is 64-bit on host.
        n_out * b.stride(1),
        MASKED=masked,
        FUSE_SILU=fuse_silu_and_mul,
        # The CPU interpreter's bf16 tl.dot is wrong (triton 3.9); real GPUs keep bf16 tensor cores.
        UPCAST=interpreting(),
        # fp32 inputs would silently drop to tf32 on tensor cores; keep them exact.
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def grouped_gemm_contiguous(
    a: torch.Tensor,
    b: torch.Tensor,
    grouped_layout: torch.Tensor,
    out: torch.Tensor,
    *,
    fuse_silu_and_mul: bool = False,
    alignment: int | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int | None = None,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: ``out[r] = a[r] @ b[grouped_layout[r]].T``.

    Caller contract: every expert segment starts on a multiple of ``block_m`` (build the layout
    with an alignment that is a multiple of ``block_m``, by default :data:`BLOCK_M`),
    so that each row tile holds rows of one expert. Tiles whose first row is ``-1`` are skipped;
    ``-1`` rows inside a tile are computed but not written.

    Args:
        a: ``[R, K]`` bf16/fp16/fp32, contiguous.
        b: ``[E, N, K]`` same dtype as ``a``, contiguous (nn.Linear weight layout per expert).
        grouped_layout: ``[R] int32``, expert of each row, ``-1`` = skip.
        out: ``[R, N]`` (or ``[R, N/2]`` when fused), bf16/fp16/fp32, contiguous.
        fuse_silu_and_mul: ``b``'s N = 2I rows are gate then up; write
            ``silu(a @ gate.T) * (a @ up.T)``.
        alignment: the layout's alignment, if known; checked to be a multiple of ``block_m``.
        block_m, block_n, block_k, num_warps, num_stages: Triton tiling; ``num_warps=None``
            picks 4 (8 when fused).

    Returns:
        ``out``.
    """
    check_tensor("a", a, dtypes=FLOAT_DTYPES, ndim=2)
    n_out = _check_weights(a, b, fuse_silu_and_mul)
    num_rows = a.shape[0]
    check_tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), shape=(num_rows,))
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(num_rows, n_out))
    check_same_device(a=a, b=b, grouped_layout=grouped_layout, out=out)
    if alignment is not None and alignment % block_m:
        raise ValueError(f"alignment: expected a multiple of block_m = {block_m}, got {alignment}")
    _launch(
        a,
        b,
        out,
        grouped_layout,
        masked=False,
        num_row_tiles=triton.cdiv(num_rows, block_m),
        rows_per_group=num_rows,
        n_out=n_out,
        fuse_silu_and_mul=fuse_silu_and_mul,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def grouped_gemm_masked(
    a: torch.Tensor,
    b: torch.Tensor,
    counts: torch.Tensor,
    out: torch.Tensor,
    *,
    fuse_silu_and_mul: bool = False,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int | None = None,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Masked-layout grouped GEMM: ``out[e, m] = a[e, m] @ b[e].T`` for ``m < counts[e]``.

    Rows ``m >= counts[e]`` are neither computed nor written (counts above M act as M).

    Args:
        a: ``[E, M, K]`` bf16/fp16/fp32, contiguous.
        b: ``[E, N, K]`` same dtype as ``a``, contiguous.
        counts: ``[E] int32`` valid rows per expert (``MaskedLayout.counts``).
        out: ``[E, M, N]`` (or ``[E, M, N/2]`` when fused), bf16/fp16/fp32, contiguous.
        fuse_silu_and_mul, block_m, block_n, block_k, num_warps, num_stages: as in
            :func:`grouped_gemm_contiguous`.

    Returns:
        ``out``.
    """
    check_tensor("a", a, dtypes=FLOAT_DTYPES, ndim=3)
    n_out = _check_weights(a, b, fuse_silu_and_mul)
    num_experts, rows_per_group = a.shape[0], a.shape[1]
    if b.shape[0] != num_experts:
        raise ValueError(f"b: expected E = {num_experts} (a's first dim), got shape {list(b.shape)}")
    check_tensor("counts", counts, dtypes=(torch.int32,), shape=(num_experts,))
    check_tensor("out", out, dtypes=FLOAT_DTYPES, shape=(num_experts, rows_per_group, n_out))
    check_same_device(a=a, b=b, counts=counts, out=out)
    _launch(
        a,
        b,
        out,
        counts,
        masked=True,
        num_row_tiles=num_experts * triton.cdiv(rows_per_group, block_m),
        rows_per_group=rows_per_group,
        n_out=n_out,
        fuse_silu_and_mul=fuse_silu_and_mul,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
