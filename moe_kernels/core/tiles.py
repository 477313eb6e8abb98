"""Tile policy of the fused Triton path: what the kernels run when nothing was measured, and
the space the tuner (:mod:`moe_kernels.selection.tuner`) searches; measured tiles live in the
tuning tables (:mod:`moe_kernels.core.tuning`) beside this module.
"""

from __future__ import annotations

import functools

from moe_kernels.kernels._common import cdiv, next_power_of_2
from moe_kernels.kernels.fused_moe import FusedConfig

# 227 KB of shared memory per block at most on Hopper; the budget leaves room for the epilogue's
# layout-conversion scratch, which Triton also takes from shared memory.
_SMEM_BUDGET = 200 * 1024
_BLOCK_M_CHOICES = (16, 32, 64, 128)
#: the SMs of an H100 SXM or H200, for a policy asked without a device (the CPU interpreter)
HOPPER_SMS = 132
# fp32 accumulator elements per program (GEMM1 holds two): 128x128 is 64 registers per thread
# at 8 warps, what leaves room for the pipeline without spills.
_ACCUMULATOR_MAX = 128 * 128


def _shared_bytes(config: FusedConfig, weight_tiles: int, elem_bytes: int = 2) -> int:
    """Shared memory of the pipelined K loop: one A tile and ``weight_tiles`` B tiles per stage."""
    per_stage = config.block_k * (config.block_m + weight_tiles * config.block_n)
    return config.num_stages * per_stage * elem_bytes


def _pick_block_m(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, bool]:
    """``(block_m, streaming)``: see :func:`default_configs`."""
    slots = num_tokens * top_k
    mean = slots / max(1, min(num_experts, slots))
    streaming = mean < 128
    # Room for the busier experts of a random routing (about two standard deviations of a
    # Poisson count), so that one block still holds each expert's rows.
    busy = mean + 2 * mean**0.5
    for block_m in _BLOCK_M_CHOICES:
        if block_m >= busy:
            break
    # Measured: 128-row tiles streamed GEMM2's weights ~25 % slower than 64-row ones, and a
    # second block of the same expert runs next to the first (grid order) and hits L2.
    return (min(block_m, 64) if streaming else block_m), streaming


def _warps(block_m: int, block_n: int, weight_tiles: int) -> int:
    return 8 if block_m * block_n * weight_tiles >= _ACCUMULATOR_MAX else 4


def _config_for(
    block_m: int, n_out: int, k_dim: int, blocks: int, weight_tiles: int, streaming: bool, num_sms: int
) -> FusedConfig:
    if streaming:
        # 64 columns, 128-deep K steps (256-byte weight rows: 16-byte loads per thread, whole
        # cache lines), several steps in flight.
        block_n, block_k, num_stages = 64, 128, 4 if block_m <= 32 else 3
    else:
        # 128x128 outputs per program (GEMM1 counts its gate and up tiles).
        block_n, block_k, num_stages = 128 // weight_tiles, 64, 3
    block_n = max(16, min(block_n, next_power_of_2(n_out)))
    block_k = min(block_k, max(16, next_power_of_2(k_dim)))
    # Narrower tiles only when a small N leaves most SMs idle: measured, 96 programs of 64
    # columns streamed faster than 192 of 32 on an H100 (132 SMs), so half of the SMs is the bar.
    while block_n > 16 and 2 * blocks * cdiv(n_out, block_n) < num_sms:
        block_n //= 2
    while (
        num_stages > 2
        and _shared_bytes(FusedConfig(block_m, block_n, block_k, 4, num_stages), weight_tiles) > _SMEM_BUDGET
    ):
        num_stages -= 1
    return FusedConfig(block_m, block_n, block_k, _warps(block_m, block_n, weight_tiles), num_stages)


@functools.lru_cache(maxsize=1024)  # a pure function of ints, asked on every layer call
def default_configs(
    num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, num_sms: int = HOPPER_SMS
) -> tuple[FusedConfig, FusedConfig]:
    """Heuristic tilings ``(gemm1, gemm2)`` for a call shape, without measuring anything.

    * ``block_m``: the smallest of 16/32/64/128 that holds a busy expert's rows
      (``mean + 2 sqrt(mean)``, ``mean = T*K / min(E, T*K)``): each expert's rows then fit one
      row block, so its weights stream once, with little padding.
    * While an expert has fewer than 128 rows on average the GEMMs are bound by reading the
      weights (a bf16 weight byte carries ``rows`` flops; an H100's ridge is ~300): ``block_m``
      at most 64, ``block_n`` 64, ``block_k`` 128 (each weight row segment 256 bytes: 16-byte
      loads, whole cache lines), 4 stages (3 at ``block_m = 64``). ``block_n`` halves while the
      programs would fill fewer than half of the SMs (``num_sms``).
    * Above that (prefill) the GEMMs are compute-bound: 128x128 outputs per program (GEMM1's
      gate and up tiles count twice), ``block_k`` 64, 3 stages.
    * ``num_warps``: 8 for accumulators of 128x128 fp32 or more, else 4; stages are lowered
      until the pipeline fits ~200 KB of shared memory.

    Measured on an H100 (triton 3.6, bf16, CUDA graphs, DeepSeek-V3 at 32 local experts and
    Qwen3-30B-A3B, T = 1..256): ``block_k`` 128 beat 64 by 5-10 % on GEMM1; ``block_n`` 64 was
    within 1 % of the best candidate on GEMM2 and on GEMM1 from T = 16 (and the best at T = 1,
    by 3-6 % over 32); 3-5 stages were within 1-2 %. :func:`candidate_configs` gives the space a
    tuner measures around these.
    """
    block_m, streaming = _pick_block_m(num_tokens, top_k, num_experts)
    slots = num_tokens * top_k
    # Row blocks a routing keeps busy: each active expert opens one, a busy one more.
    blocks = min(num_experts, slots) + slots // block_m
    return (
        _config_for(block_m, inter, hidden, blocks, 2, streaming, num_sms),
        _config_for(block_m, hidden, inter, blocks, 1, streaming, num_sms),
    )


def candidate_configs(
    num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int
) -> tuple[list[FusedConfig], list[FusedConfig]]:
    """Search spaces ``(gemm1 candidates, gemm2 candidates)`` for a tuner measuring on the GPU.

    Both lists cover the same two ``block_m`` values (the default's and the next larger one); a
    tuner times each kernel's candidates on a layout built with that ``block_m`` and keeps the
    pair with the best summed time. For each: ``block_n`` in 32/64/128/256 and ``block_k`` in
    64/128, ``num_warps`` as in :func:`default_configs`; ``num_stages`` in 3/4/5 at the default
    ``block_m``, the default's depth at the other. The search allows accumulators up to twice
    the defaults' cap (128 x 256 fp32 at 8 warps: the tile vLLM's tuned configs use for
    GEMM2-like shapes on Hopper), since a tuner measures whether the registers spill. Tiles
    over that or ~200 KB of shared memory are left out: at most 32 candidates per kernel.
    """
    default_m = _pick_block_m(num_tokens, top_k, num_experts)[0]
    position = min(_BLOCK_M_CHOICES.index(default_m), len(_BLOCK_M_CHOICES) - 2)
    spaces: list[list[FusedConfig]] = []
    for n_out, k_dim, weight_tiles in ((inter, hidden, 2), (hidden, inter, 1)):
        cap_n = max(16, next_power_of_2(n_out))
        cap_k = max(16, next_power_of_2(k_dim))
        space: list[FusedConfig] = []
        for block_m in _BLOCK_M_CHOICES[position : position + 2]:
            stages = (3, 4, 5) if block_m == default_m else (4 if block_m <= 32 else 3,)
            for block_n in sorted({min(n, cap_n) for n in (32, 64, 128, 256)}):
                if block_m * block_n * weight_tiles > 2 * _ACCUMULATOR_MAX:
                    continue
                for block_k in sorted({min(k, cap_k) for k in (64, 128)}):
                    for num_stages in stages:
                        config = FusedConfig(
                            block_m, block_n, block_k, _warps(block_m, block_n, weight_tiles), num_stages
                        )
                        if _shared_bytes(config, weight_tiles) <= _SMEM_BUDGET:
                            space.append(config)
        spaces.append(space)
    return spaces[0], spaces[1]
