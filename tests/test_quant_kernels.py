"""Tests of the fp8 quantization fused into the Triton kernels (scatter, activation, plain
cast) and of the block-scaled fp8 path of the grouped GEMM.

References are plain torch, written for clarity: per-group loops, float64 matmuls. Without a GPU the
kernels run in the Triton interpreter, so shapes stay small; K and N are chosen both as multiples of
128 and not. GPU tests use DeepSeek-V3 EP8-local shapes (E=32, H=7168, I=2048, top-8).

Error bounds used below (e4m3: 3 mantissa bits, smallest normal 2^-6, subnormal spacing 2^-9):

* Quantization. ``y = x / s`` is rounded to nearest e4m3. For normal ``|y|`` the rounding error is at
  most half a spacing, ``<= 2^-4 |y|``; for subnormal ``|y| < 2^-6`` it is at most ``2^-10``.
  Dequantizing multiplies by ``s``, so ``|q*s - x| <= 2^-4 |x| + 2^-10 s`` (the fp32 rounding of
  ``x / s`` and the clamp at 448 move ``y`` by a few fp32 ulps, covered by a 2^-20 relative slack).
  Since ``|x| <= amax`` this implies the coarser ``<= 2^-4 amax`` per group.
* fp8 GEMM. Products of e4m3 values are exact in fp32, so kernel and reference compute the same
  real sum and differ only by fp32 rounding: ``K + 3 * ceil(K/128)`` roundings (accumulation and
  the scale multiplications), each ``<= 2^-24`` of the running sum of ``|terms|``, hence
  ``<= 2K * 2^-24 * (|A| @ |B|^T)`` for ``K >= 3``. On Hopper, wgmma accumulates fp8 products with
  only ~14 bits (DeepSeek-V3 report, sec. 3.3.2); the kernel promotes into fp32 once per 128-wide
  K block (4 wgmma k-steps), so a block's error is about 4 * 2^-13 of its sum of ``|products|``:
  ``GPU_ACC_REL = 2^-11`` times ``|A| @ |B|^T`` overall. Storing the output rounds once more: half
  an ulp on GPUs (``2^-8 |ref|`` for bf16), a full ulp in the interpreter, whose fp32 -> bf16/fp16
  cast truncates (triton 3.9).
* References divide in float64 and round to fp32: that is the correctly rounded fp32 quotient the
  kernels' IEEE divisions give (double rounding is harmless for division), whereas CUDA torch
  turns ``tensor / python_scalar`` into a reciprocal multiply.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_kernels.kernels import activate, grouped_gemm_contiguous, grouped_gemm_masked, quantize_rows, scatter_rows
from moe_kernels.mlp.act_quant import ActQuant, scale_view
from moe_kernels.mlp.fp8 import EPS, FP8_MAX, dequantize_blocks, dequantize_groups, quantize_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn
POISON_BYTE = 0x7F  # NaN in e4m3fn: any byte a kernel writes differs from it
SMALL_TILES = {"block_m": 16, "block_n": 32, "block_k": 64}
QUANT_REL = 2.0**-4
GPU_ACC_REL = 2.0**-11
ON_GPU = torch.cuda.is_available()
QUANT_SUBNORMAL = 2.0**-10
FP32_SLACK = 2.0**-20


# ----------------------------------------------------------------------------- references


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def ref_quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group cast of ``x [..., K]``, one group at a time."""
    x = x.float()
    n_cols = x.shape[-1]
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = []
    for start in range(0, n_cols, group):
        part = x[..., start : start + group]
        scale = (part.abs().amax(dim=-1).clamp_min(EPS).double() / FP8_MAX).float()
        y = (part.double() / scale.double()[..., None]).float()
        q[..., start : start + group] = y.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        scales.append(scale)
    return q, torch.stack(scales, dim=-1)


def ref_dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    out = q.double()
    for g in range(scale.shape[-1]):
        out[..., g * group : (g + 1) * group] *= scale[..., g : g + 1].double()
    return out


def ref_dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = q.double()
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            out[..., i * block : (i + 1) * block, j * block : (j + 1) * block] *= scale[
                ..., i : i + 1, j : j + 1
            ].double()
    return out


def assert_same_fp8(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


def assert_quant_bound(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, group: int) -> None:
    """``|q*s - x| <= 2^-4 |x| + 2^-10 s`` elementwise (module docstring)."""
    deq = ref_dequantize_groups(q, scale, group)
    s_full = scale.double().repeat_interleave(group, dim=-1)[..., : x.shape[-1]]
    bound = (QUANT_REL * x.double().abs() + QUANT_SUBNORMAL * s_full) * (1 + FP32_SLACK)
    assert ((deq - x.double()).abs() <= bound).all()


def mn_major_scales(shape: tuple[int, ...]) -> torch.Tensor:
    """Scales for fp8 rows ``[M, K]`` / ``[E, M, K]`` in the layout DeepGEMM reads as it is: the
    token dim contiguous, its stride padded to 4 floats (the workspaces' layout)."""
    quant = ActQuant()
    *lead, k = shape
    rows = -(-lead[-1] // 4) * 4
    if len(lead) == 1:
        storage_shape, _ = quant.scale_storage(rows, k)
    else:
        storage_shape, _ = quant.masked_scale_storage(lead[0], rows, k)
    return scale_view(torch.empty(storage_shape, device=DEVICE))[..., : lead[-1], :]


def poisoned_fp8(*shape: int) -> torch.Tensor:
    return torch.full(shape, POISON_BYTE, dtype=torch.uint8, device=DEVICE).view(FP8)


def contiguous_routing(ids: torch.Tensor, num_experts: int, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst_row [T, K] int64, grouped_layout [R] int32): slots sorted by expert, segments aligned."""
    flat = ids.flatten().tolist()
    dst = [-1] * len(flat)
    layout: list[int] = []
    for e in range(num_experts):
        slots = [s for s, x in enumerate(flat) if x == e]
        for s in slots:
            dst[s] = len(layout)
            layout.append(e)
        layout += [-1] * (-len(slots) % alignment)
    layout += [-1] * alignment  # trailing rows past the last segment, as real layouts have
    dst_row = torch.tensor(dst, dtype=torch.int64, device=DEVICE).view(ids.shape)
    return dst_row, torch.tensor(layout, dtype=torch.int32, device=DEVICE)


def routing(num_tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    ids[::3, -1] = -1
    return ids.to(DEVICE)


def gemm_tolerance(a_deq: torch.Tensor, b_deq: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Accumulation bound on ``|A| @ |B|^T`` plus the output rounding (module docstring)."""
    k_dim = a_deq.shape[-1]
    abs_ref = a_deq.abs() @ b_deq.abs().transpose(-1, -2)
    acc_rel = 2 * k_dim * 2.0**-24 + (GPU_ACC_REL if ON_GPU else 0.0)
    out_unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[out_dtype]
    if not ON_GPU:
        out_unit *= 2  # the interpreter truncates instead of rounding to nearest
    return acc_rel * abs_ref + out_unit * ref.abs() + 1e-30


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize(
    ("shape", "dtype", "group"),
    [
        ((5, 256), torch.bfloat16, 128),
        ((5, 200), torch.float32, 128),
        ((4, 72), torch.bfloat16, 32),
        ((2, 3, 130), torch.float16, 128),
    ],
)
def test_quantize_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, group: int) -> None:
    # Columns of very different magnitude so that groups differ and small values hit subnormals.
    x = (randn(*shape) * torch.logspace(-3, 2, shape[-1], device=DEVICE)).to(dtype)
    q = poisoned_fp8(*shape)
    scale = torch.full((*shape[:-1], math.ceil(shape[-1] / group)), float("nan"), device=DEVICE)
    quantize_rows(x, q, scale, group=group)
    q_ref, scale_ref = ref_quantize(x, group)
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)
    assert_quant_bound(q, scale, x, group)


def test_quantize_error_bound_and_amax_maps_to_448() -> None:
    x = randn(16, 384, seed=1) * torch.logspace(-4, 3, 16, device=DEVICE)[:, None]
    q = torch.empty(16, 384, dtype=FP8, device=DEVICE)
    scale = torch.empty(16, 3, device=DEVICE)
    quantize_rows(x, q, scale)
    assert_quant_bound(q, scale, x, 128)
    # The coarser per-group statement: error <= 2^-4 of the group's amax.
    deq = ref_dequantize_groups(q, scale, 128).view(16, 3, 128)
    amax = x.view(16, 3, 128).abs().amax(-1, keepdim=True).double()
    assert ((deq - x.view(16, 3, 128).double()).abs() <= QUANT_REL * amax * (1 + FP32_SLACK)).all()
    # amax / (amax / 448) is within an fp32 ulp of 448, which rounds (or clamps) to 448 exactly.
    big = x.view(16, 3, 128).abs().argmax(-1, keepdim=True)
    assert (q.float().view(16, 3, 128).gather(-1, big).abs() == FP8_MAX).all()


def test_zero_and_tiny_groups_use_the_eps_floor() -> None:
    x = randn(3, 256, seed=2)
    x[0] = 0.0
    x[1, :128] = 1e-7  # amax below EPS: scale floored, values land in the subnormal range
    q = torch.empty(3, 256, dtype=FP8, device=DEVICE)
    scale = torch.empty(3, 2, device=DEVICE)
    quantize_rows(x, q, scale)
    floor = (torch.tensor(EPS, dtype=torch.float32).double() / FP8_MAX).float()
    assert (scale[0] == floor.to(DEVICE)).all() and scale[1, 0] == floor.to(DEVICE)
    assert (q[0].float() == 0).all()
    assert torch.isfinite(scale).all()
    assert_quant_bound(q, scale, x, 128)


def test_mn_major_scale_layout_matches_deepgemm_and_row_major_values() -> None:
    scale_2d = mn_major_scales((6, 300))
    assert scale_2d.shape == (6, 3) and scale_2d.stride() == (1, 8)  # align(6, 4) = 8
    scale_3d = mn_major_scales((2, 5, 256))
    assert scale_3d.shape == (2, 5, 2) and scale_3d.stride() == (16, 1, 8)

    x = randn(2, 5, 256, seed=4)
    q = torch.empty(2, 5, 256, dtype=FP8, device=DEVICE)
    quantize_rows(x, q, scale_3d)
    q_ref, scale_ref = ref_quantize(x, 128)
    assert torch.equal(scale_3d, scale_ref)
    assert_same_fp8(q, q_ref)
    x2 = randn(6, 300, seed=5)
    quantize_rows(x2, torch.empty(6, 300, dtype=FP8, device=DEVICE), scale_2d)
    assert torch.equal(scale_2d, ref_quantize(x2, 128)[1])


def test_quantize_accepts_a_row_slice() -> None:
    x = randn(4, 512, seed=6)[:, :256]
    q = torch.empty(4, 256, dtype=FP8, device=DEVICE)
    scale = torch.empty(4, 2, device=DEVICE)
    quantize_rows(x, q, scale)
    q_ref, scale_ref = ref_quantize(x, 128)
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)


# ----------------------------------------------------------------------------- fused scatter / activation


def test_scatter_rows_quant_contiguous_layout() -> None:
    ids = routing(num_tokens=6, top_k=3, num_experts=4, seed=7)
    dst_row, grouped_layout = contiguous_routing(ids, 4, alignment=8)
    x = randn(6, 200, dtype=torch.bfloat16, seed=8)
    rows = grouped_layout.numel()
    q = poisoned_fp8(rows, 200)
    scale = torch.full((rows, 2), float("nan"), device=DEVICE)
    scatter_rows(x, dst_row, q, scale_out=scale)

    q_tok, scale_tok = ref_quantize(x, 128)
    written = torch.zeros(rows, dtype=torch.bool)
    for t in range(6):
        for k in range(3):
            r = int(dst_row[t, k])
            if r >= 0:
                written[r] = True
                assert_same_fp8(q[r], q_tok[t])
                assert torch.equal(scale[r], scale_tok[t])
    untouched = ~written.to(DEVICE)
    assert (q.view(torch.uint8)[untouched] == POISON_BYTE).all()
    assert scale[untouched].isnan().all()


def test_scatter_rows_quant_masked_layout_with_mn_major_scales() -> None:
    num_experts, capacity, hidden = 3, 5, 256
    ids = routing(num_tokens=5, top_k=2, num_experts=num_experts, seed=9)
    # Masked-layout rows e * capacity + rank, built directly.
    dst = torch.full(ids.shape, -1, dtype=torch.int64)
    fill = [0] * num_experts
    for t in range(5):
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                dst[t, k] = e * capacity + fill[e]
                fill[e] += 1
    x = randn(5, hidden, dtype=torch.bfloat16, seed=10)
    q = poisoned_fp8(num_experts, capacity, hidden)
    scale = mn_major_scales(q.shape).fill_(float("nan"))
    scatter_rows(x, dst.to(DEVICE), q, scale_out=scale)

    q_tok, scale_tok = ref_quantize(x, 128)
    for e in range(num_experts):
        for m in range(capacity):
            hits = (dst == e * capacity + m).nonzero().tolist()
            if hits:
                t = hits[0][0]
                assert_same_fp8(q[e, m], q_tok[t])
                assert torch.equal(scale[e, m], scale_tok[t])
            else:
                assert (q[e, m].view(torch.uint8) == POISON_BYTE).all()
                assert scale[e, m].isnan().all()


def test_silu_and_mul_quant_grouped_layout_matches_unfused() -> None:
    rows, inter = 7, 200
    gate_up = randn(rows, 2 * inter, dtype=torch.bfloat16, seed=11, scale=3.0)
    grouped_layout = torch.tensor([0, 0, -1, 1, -1, 2, 2], dtype=torch.int32, device=DEVICE)
    q = poisoned_fp8(rows, inter)
    scale = mn_major_scales((rows, inter)).fill_(float("nan"))
    activate(gate_up, q, scale_out=scale, grouped_layout=grouped_layout)

    # Unfused: the repo's activation into fp32, then the plain cast.
    act = activate(gate_up, torch.empty(rows, inter, device=DEVICE))
    q_ref = torch.empty(rows, inter, dtype=FP8, device=DEVICE)
    scale_ref = torch.empty(rows, 2, device=DEVICE)
    quantize_rows(act, q_ref, scale_ref)
    # Against an independent torch SiLU the fp8 rounding may differ by one step, within the bound.
    gate, up = gate_up.float().chunk(2, dim=-1)
    act_torch = gate * torch.sigmoid(gate) * up
    live = grouped_layout >= 0
    for r in range(rows):
        if live[r]:
            assert_same_fp8(q[r], q_ref[r])
            assert torch.equal(scale[r], scale_ref[r])
        else:
            assert (q[r].view(torch.uint8) == POISON_BYTE).all() and scale[r].isnan().all()
    assert_quant_bound(q[live], scale[live], act_torch[live], 128)


def test_silu_and_mul_quant_masked_counts_matches_unfused() -> None:
    num_experts, capacity, inter = 3, 4, 256
    gate_up = randn(num_experts, capacity, 2 * inter, dtype=torch.bfloat16, seed=12, scale=2.0)
    counts = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    q = poisoned_fp8(num_experts, capacity, inter)
    scale = torch.full((num_experts, capacity, 2), float("nan"), device=DEVICE)
    activate(gate_up, q, scale_out=scale, counts=counts)

    act = activate(gate_up, torch.empty(num_experts, capacity, inter, device=DEVICE))
    q_ref = torch.empty(num_experts, capacity, inter, dtype=FP8, device=DEVICE)
    scale_ref = torch.empty(num_experts, capacity, 2, device=DEVICE)
    quantize_rows(act, q_ref, scale_ref)
    for e in range(num_experts):
        live = int(counts[e])
        assert_same_fp8(q[e, :live], q_ref[e, :live])
        assert torch.equal(scale[e, :live], scale_ref[e, :live])
        assert (q[e, live:].view(torch.uint8) == POISON_BYTE).all()
        assert scale[e, live:].isnan().all()


# ----------------------------------------------------------------------------- fp8 grouped GEMMs


def quantized_weights(num_experts: int, n_out: int, k_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = randn(num_experts, n_out, k_dim, seed=seed) * torch.logspace(-1, 1, k_dim, device=DEVICE)
    return quantize_blocks(w)


@pytest.mark.parametrize(
    ("k_dim", "n_out", "out_dtype", "mn_major"),
    [(200, 160, torch.bfloat16, False), (256, 128, torch.float32, True)],
)
def test_grouped_gemm_fp8_contiguous(k_dim: int, n_out: int, out_dtype: torch.dtype, mn_major: bool) -> None:
    num_experts = 3
    ids = routing(num_tokens=7, top_k=2, num_experts=num_experts, seed=13)
    dst_row, grouped_layout = contiguous_routing(ids, num_experts, alignment=16)
    rows = grouped_layout.numel()
    x = randn(7, k_dim, dtype=torch.bfloat16, seed=14)
    # Padding rows of a and its scales hold NaNs: the kernel must not let them into valid rows.
    a = poisoned_fp8(rows, k_dim)
    a_scale = mn_major_scales((rows, k_dim)) if mn_major else torch.empty(rows, -(-k_dim // 128), device=DEVICE)
    a_scale.fill_(float("nan"))
    scatter_rows(x, dst_row, a, scale_out=a_scale)
    b, b_scale = quantized_weights(num_experts, n_out, k_dim, seed=15)
    out = torch.full((rows, n_out), 7.0, dtype=out_dtype, device=DEVICE)
    grouped_gemm_contiguous(a, b, grouped_layout, out, a_scale=a_scale, b_scale=b_scale, alignment=16, **SMALL_TILES)

    b_deq = ref_dequantize_blocks(b, b_scale)
    for r in range(rows):
        e = int(grouped_layout[r])
        if e < 0:
            assert (out[r] == 7.0).all()
            continue
        a_deq = ref_dequantize_groups(a[r : r + 1], a_scale[r : r + 1], 128)
        ref = a_deq @ b_deq[e].T
        err = (out[r : r + 1].double() - ref).abs()
        assert (err <= gemm_tolerance(a_deq, b_deq[e], ref, out_dtype)).all()


def test_grouped_gemm_fp8_masked() -> None:
    num_experts, capacity, k_dim, n_out = 3, 20, 200, 96
    a_src = randn(num_experts, capacity, k_dim, dtype=torch.bfloat16, seed=16)
    a = torch.empty(num_experts, capacity, k_dim, dtype=FP8, device=DEVICE)
    a_scale = mn_major_scales(a.shape)
    quantize_rows(a_src, a, a_scale)
    b, b_scale = quantized_weights(num_experts, n_out, k_dim, seed=17)
    counts = torch.tensor([17, 0, 30], dtype=torch.int32, device=DEVICE)  # 30 > capacity acts as 20
    out = torch.full((num_experts, capacity, n_out), 7.0, dtype=torch.bfloat16, device=DEVICE)
    grouped_gemm_masked(a, b, counts, out, a_scale=a_scale, b_scale=b_scale, **SMALL_TILES)

    b_deq = ref_dequantize_blocks(b, b_scale)
    for e, live in enumerate([17, 0, 20]):
        a_deq = ref_dequantize_groups(a[e, :live], a_scale[e, :live], 128)
        ref = a_deq @ b_deq[e].T
        err = (out[e, :live].double() - ref).abs()
        assert (err <= gemm_tolerance(a_deq, b_deq[e], ref, torch.bfloat16)).all()
        assert (out[e, live:] == 7.0).all()


def test_grouped_gemm_fp8_default_tiles() -> None:
    num_experts, k_dim, n_out = 2, 256, 256
    grouped_layout = torch.tensor([0] * 40 + [-1] * 24 + [1] * 64, dtype=torch.int32, device=DEVICE)
    rows = grouped_layout.numel()
    a = torch.empty(rows, k_dim, dtype=FP8, device=DEVICE)
    a_scale = torch.empty((*a.shape[:-1], -(-a.shape[-1] // 128)), device=DEVICE)
    quantize_rows(randn(rows, k_dim, seed=18), a, a_scale)
    b, b_scale = quantized_weights(num_experts, n_out, k_dim, seed=19)
    out = torch.full((rows, n_out), 7.0, dtype=torch.float32, device=DEVICE)
    grouped_gemm_contiguous(a, b, grouped_layout, out, a_scale=a_scale, b_scale=b_scale, alignment=64)

    a_deq = ref_dequantize_groups(a, a_scale, 128)
    b_deq = ref_dequantize_blocks(b, b_scale)
    for e, rows_e in ((0, slice(0, 40)), (1, slice(64, 128))):
        ref = a_deq[rows_e] @ b_deq[e].T
        err = (out[rows_e].double() - ref).abs()
        assert (err <= gemm_tolerance(a_deq[rows_e], b_deq[e], ref, torch.float32)).all()
    assert (out[40:64] == 7.0).all()


# ----------------------------------------------------------------------------- plain-torch helpers


def test_quantize_blocks() -> None:
    w = randn(2, 200, 300, seed=20) * torch.logspace(-2, 2, 300, device=DEVICE)
    q, scale = quantize_blocks(w)
    assert q.shape == (2, 200, 300) and q.dtype == FP8 and scale.shape == (2, 2, 3)
    for i in range(2):
        for j in range(3):
            tile = w[:, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            exact = (tile.abs().amax(dim=(-2, -1)).clamp_min(EPS).double() / FP8_MAX).float()
            assert torch.equal(scale[:, i, j], exact)
    deq = dequantize_blocks(q, scale)
    # q * s is exact in float64; the helper's fp32 product is that value rounded once.
    assert torch.equal(deq, ref_dequantize_blocks(q, scale).float())
    s_full = scale.double().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :200, :300]
    bound = (QUANT_REL * w.double().abs() + QUANT_SUBNORMAL * s_full) * (1 + FP32_SLACK)
    assert ((deq.double() - w.double()).abs() <= bound).all()


def test_token_row_blocks_match_the_kernel() -> None:
    """(1, 128) blocks are per-token groups: torch helper and Triton kernel agree bit for bit."""
    x = randn(6, 300, dtype=torch.bfloat16, seed=21)
    q_torch, scale_torch = quantize_blocks(x, block=(1, 128))
    q = torch.empty(6, 300, dtype=FP8, device=DEVICE)
    scale = torch.empty(6, 3, device=DEVICE)
    quantize_rows(x, q, scale)
    assert_same_fp8(q, q_torch)
    assert torch.equal(scale, scale_torch)
    assert torch.equal(dequantize_groups(q, scale), ref_dequantize_groups(q, scale, 128).float())


# ----------------------------------------------------------------------------- argument checks


def test_bad_inputs_raise_with_argument_names() -> None:
    x = randn(4, 256)
    q = torch.empty(4, 256, dtype=FP8, device=DEVICE)
    scale = torch.empty(4, 2, device=DEVICE)
    with pytest.raises(TypeError, match="q_out"):
        quantize_rows(x, torch.empty(4, 256, device=DEVICE), scale)
    with pytest.raises(ValueError, match="scale_out"):
        quantize_rows(x, q, torch.empty(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="group"):
        quantize_rows(x, q, scale, group=96)
    with pytest.raises(ValueError, match="out: expected shape"):
        dst_row = torch.zeros(4, 1, dtype=torch.int64, device=DEVICE)
        scatter_rows(x, dst_row, torch.empty(4, 128, dtype=FP8, device=DEVICE), scale_out=scale)
    with pytest.raises(ValueError, match="pass at most one"):
        activate(
            randn(4, 512),
            q,
            scale_out=scale,
            grouped_layout=torch.zeros(4, dtype=torch.int32, device=DEVICE),
            counts=torch.zeros(4, dtype=torch.int32, device=DEVICE),
        )
    b, b_scale = quantized_weights(2, 128, 256, seed=0)
    layout = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    out = torch.empty(4, 128, device=DEVICE)
    with pytest.raises(ValueError, match="b_scale"):
        grouped_gemm_contiguous(q, b, layout, out, a_scale=scale, b_scale=b_scale[:, :, :1])
    with pytest.raises(ValueError, match="a_scale"):
        grouped_gemm_contiguous(q, b, layout, out, a_scale=scale[:, :1], b_scale=b_scale)
    with pytest.raises(ValueError, match="block_n"):
        grouped_gemm_contiguous(q, b, layout, out, a_scale=scale, b_scale=b_scale, block_n=96)
    with pytest.raises(ValueError, match="alignment"):
        grouped_gemm_contiguous(q, b, layout, out, a_scale=scale, b_scale=b_scale, alignment=8)
    with pytest.raises(ValueError, match="b:"):
        grouped_gemm_masked(
            q.view(1, 4, 256), b, layout[:1], out.view(1, 4, 128), a_scale=scale.view(1, 4, 2), b_scale=b_scale
        )


# ----------------------------------------------------------------------------- GPU (DeepSeek-V3 EP8-local)

E, H, INTER, TOP_K = 32, 7168, 2048, 8


def gpu_gemm_tolerance(a_deq: torch.Tensor, b_deq: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return gemm_tolerance(a_deq, b_deq, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_quantize_bitwise_deepseek_shapes() -> None:
    x = randn(512, H, dtype=torch.bfloat16, seed=30, scale=4.0)
    q = torch.empty(512, H, dtype=FP8, device=DEVICE)
    scale = mn_major_scales(q.shape)
    quantize_rows(x, q, scale)
    q_ref, scale_ref = ref_quantize(x, 128)
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.gpu
def test_gpu_fp8_moe_pipeline_deepseek_shapes() -> None:
    """scatter+quant -> GEMM1 -> silu+quant -> GEMM2 on EP8-local DeepSeek-V3 shapes, stage by stage."""
    num_tokens = 96
    ids = routing(num_tokens, TOP_K, E, seed=31)
    dst_row, grouped_layout = contiguous_routing(ids, E, alignment=128)
    rows = grouped_layout.numel()
    x = randn(num_tokens, H, dtype=torch.bfloat16, seed=32)
    a1 = poisoned_fp8(rows, H)
    a1_scale = mn_major_scales(a1.shape).fill_(float("nan"))
    scatter_rows(x, dst_row, a1, scale_out=a1_scale)
    w13, w13_scale = quantize_blocks(randn(E, 2 * INTER, H, seed=33, scale=0.02))
    w2, w2_scale = quantize_blocks(randn(E, H, INTER, seed=34, scale=0.02))

    h = torch.empty(rows, 2 * INTER, dtype=torch.bfloat16, device=DEVICE)
    grouped_gemm_contiguous(a1, w13, grouped_layout, h, a_scale=a1_scale, b_scale=w13_scale, alignment=128)
    a2 = poisoned_fp8(rows, INTER)
    a2_scale = mn_major_scales(a2.shape).fill_(float("nan"))
    activate(h, a2, scale_out=a2_scale, grouped_layout=grouped_layout)
    y = torch.empty(rows, H, dtype=torch.bfloat16, device=DEVICE)
    grouped_gemm_contiguous(a2, w2, grouped_layout, y, a_scale=a2_scale, b_scale=w2_scale, alignment=128)

    live = grouped_layout >= 0
    a1_deq = dequantize_groups(a1[live], a1_scale[live])
    a2_deq = dequantize_groups(a2[live], a2_scale[live])
    assert torch.isfinite(a1_deq).all() and torch.isfinite(a2_deq).all()
    w13_deq, w2_deq = dequantize_blocks(w13, w13_scale), dequantize_blocks(w2, w2_scale)
    experts = grouped_layout[live].long()
    for e in range(E):
        sel = experts == e
        if not sel.any():
            continue
        ref1 = a1_deq[sel] @ w13_deq[e].T
        assert ((h[live][sel].float() - ref1).abs() <= gpu_gemm_tolerance(a1_deq[sel], w13_deq[e], ref1)).all()
        ref2 = a2_deq[sel] @ w2_deq[e].T
        assert ((y[live][sel].float() - ref2).abs() <= gpu_gemm_tolerance(a2_deq[sel], w2_deq[e], ref2)).all()
    # The activation quantization itself: fused == unfused on the real GEMM1 output.
    act = activate(h, torch.empty(rows, INTER, device=DEVICE), grouped_layout=grouped_layout)
    q_ref, scale_ref = ref_quantize(act[live], 128)
    assert_same_fp8(a2[live], q_ref)
    assert torch.equal(a2_scale[live], scale_ref)


@pytest.mark.gpu
def test_gpu_deepgemm_reads_our_scale_layout_untouched() -> None:
    deep_gemm = pytest.importorskip("deep_gemm")
    alignment = deep_gemm.get_mk_alignment_for_contiguous_layout()
    ids = routing(64, TOP_K, E, seed=35)
    dst_row, grouped_layout = contiguous_routing(ids, E, alignment=alignment)
    rows = grouped_layout.numel()
    x = randn(64, H, dtype=torch.bfloat16, seed=36)
    a = torch.zeros(rows, H, dtype=FP8, device=DEVICE)
    a_scale = mn_major_scales(a.shape).fill_(1.0)
    scatter_rows(x, dst_row, a, scale_out=a_scale)
    # No transpose launch: DeepGEMM's own layout helper hands our tensor back as is.
    same = deep_gemm.get_mn_major_tma_aligned_tensor(a_scale)
    assert same.data_ptr() == a_scale.data_ptr() and same.stride() == a_scale.stride()

    w, w_scale = quantize_blocks(randn(E, 2 * INTER, H, seed=37, scale=0.02))
    out_dg = torch.empty(rows, 2 * INTER, dtype=torch.bfloat16, device=DEVICE)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (w, w_scale), out_dg, grouped_layout)
    out_tr = torch.empty_like(out_dg)
    grouped_gemm_contiguous(a, w, grouped_layout, out_tr, a_scale=a_scale, b_scale=w_scale, alignment=alignment)
    live = grouped_layout >= 0
    a_deq = dequantize_groups(a[live], a_scale[live])
    w_deq = dequantize_blocks(w, w_scale)
    experts = grouped_layout[live].long()
    for e in range(E):
        sel = experts == e
        if sel.any():
            ref = a_deq[sel] @ w_deq[e].T
            tol = gpu_gemm_tolerance(a_deq[sel], w_deq[e], ref)
            assert ((out_dg[live][sel].float() - ref).abs() <= tol).all()
            assert ((out_tr[live][sel].float() - ref).abs() <= tol).all()

    # Masked layout: 3-D MN-major scales, counts as masked_m.
    capacity = 64
    am = torch.empty(E, capacity, H, dtype=FP8, device=DEVICE)
    am_scale = mn_major_scales(am.shape)
    quantize_rows(randn(E, capacity, H, dtype=torch.bfloat16, seed=38), am, am_scale)
    assert deep_gemm.get_mn_major_tma_aligned_tensor(am_scale).data_ptr() == am_scale.data_ptr()
    counts = torch.randint(0, capacity + 1, (E,), generator=torch.Generator().manual_seed(39)).int().to(DEVICE)
    out_m = torch.empty(E, capacity, 2 * INTER, dtype=torch.bfloat16, device=DEVICE)
    deep_gemm.m_grouped_fp8_gemm_nt_masked((am, am_scale), (w, w_scale), out_m, counts, capacity)
    out_mt = torch.empty_like(out_m)
    grouped_gemm_masked(am, w, counts, out_mt, a_scale=am_scale, b_scale=w_scale)
    for e in range(E):
        live_e = int(counts[e])
        a_deq = dequantize_groups(am[e, :live_e], am_scale[e, :live_e])
        ref = a_deq @ w_deq[e].T
        tol = gpu_gemm_tolerance(a_deq, w_deq[e], ref)
        assert ((out_m[e, :live_e].float() - ref).abs() <= tol).all()
        assert ((out_mt[e, :live_e].float() - ref).abs() <= tol).all()
