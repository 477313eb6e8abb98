"""Prepare/finalize without expert parallelism: every expert is on this device."""

from __future__ import annotations

import torch

from moe_kernels.config import LayerConfig
from moe_kernels.contract import (
    ActivationFormat,
    BatchedTokens,
    Check,
    PrepareAndFinalize,
    PrepareResult,
    StandardTokens,
)
from moe_kernels.platform import triton_check
from moe_kernels.prepare_finalize.common import to_local_ids


class LocalPrepareAndFinalize(PrepareAndFinalize):
    """No dispatch: the tokens stay on this device.

    ``batched=False`` (STANDARD): hands ``x [T, H]`` and the local ids through; the experts
    write the layer output directly, so finalize has nothing to do.

    ``batched=True`` (BATCHED): scatters the tokens into ``[E_local, M, H]`` (Triton) with
    ``M = capacity`` or T; finalize weights and sums each token's rows back into ``[T, H]``.
    A token's top-k experts are distinct, so an expert receives at most T rows and a capacity
    of T never overflows; a fixed ``capacity`` (the most tokens a call may pass) keeps the
    shapes static for CUDA graphs.
    """

    supports_chunking = True
    supports_cuda_graphs = True

    def __init__(self, batched: bool = False, capacity: int | None = None) -> None:
        if capacity is not None and not batched:
            raise ValueError("capacity only applies to batched=True")
        if capacity is not None and capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.batched = batched
        self.capacity = capacity
        self.output_format = ActivationFormat.BATCHED if batched else ActivationFormat.STANDARD

    @property
    def name(self) -> str:
        return "LocalPrepareAndFinalize(batched)" if self.batched else "LocalPrepareAndFinalize"

    def check_device(self, device: torch.device) -> Check:
        if self.batched:
            return triton_check(device)
        return super().check_device(device)

    def check_parallel(self, cfg: LayerConfig) -> Check:
        if cfg.parallel.ep_size > 1:
            return Check.failed(
                "parallel", f"moves no tokens between ranks; ep_size={cfg.parallel.ep_size} needs an EP dispatcher"
            )
        if cfg.parallel.cuda_graphs and self.batched and self.capacity is None:
            return Check.failed("cuda_graphs", "batched without a fixed capacity changes shape with T")
        return super().check_parallel(cfg)

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        if self.batched:
            if cfg.parallel.cuda_graphs:
                return 0.0, "no dispatch; batched shapes are static under CUDA graphs"
            return 10.0, "no dispatch; batched memory grows as E x T x H, so standard ranks first"
        return 0.0, "no dispatch; the experts write the output in place"

    def num_dispatchers(self) -> int:
        return 1

    def max_num_tokens_per_rank(self) -> int | None:
        return self.capacity

    def prepare(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        num_experts: int,
        num_local_experts: int,
        expert_map: torch.Tensor | None,
    ) -> PrepareResult:
        ids = to_local_ids(topk_ids, expert_map)
        if not self.batched:
            return PrepareResult(StandardTokens(x, ids, topk_weights, num_local_experts))

        from moe_kernels.kernels.permute import masked_layout, scatter_rows

        t, k = ids.shape
        e, h = num_local_experts, x.shape[1]
        capacity = self.capacity or max(t, 1)
        layout = masked_layout(ids, e, capacity)
        batched = x.new_empty((e, capacity, h))
        scatter_rows(x, layout.dst_row, batched.view(e * capacity, h))
        expected_m = max(1, min(capacity, -(-t * k // e)))
        tokens = BatchedTokens(batched, layout.counts, expected_m)
        return PrepareResult(tokens, handle=(layout.dst_row, topk_weights))

    def expert_output(self, prepared: PrepareResult, out: torch.Tensor) -> torch.Tensor | None:
        return None if self.batched else out

    def finalize(self, out: torch.Tensor, expert_output: torch.Tensor, prepared: PrepareResult) -> None:
        if not self.batched:
            if expert_output.data_ptr() != out.data_ptr():
                out.copy_(expert_output)
            return

        from moe_kernels.kernels.gather import weighted_gather

        dst_row, topk_weights = prepared.handle
        e, m, h = expert_output.shape
        weighted_gather(expert_output.view(e * m, h), dst_row, topk_weights, out)
