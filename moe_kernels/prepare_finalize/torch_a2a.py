"""Expert parallelism over ``torch.distributed.all_to_all_single`` (gloo on CPUs, NCCL on GPUs).

The fallback where DeepEP cannot run. Each token travels once to every rank that owns at
least one of its top-k experts, with its ids translated to that rank's local ids (``-1`` for
experts elsewhere) and its weights; the receiving rank's STANDARD experts return one
weighted, already-summed partial row per received token; finalize sends those rows back and
each source rank adds the partials of a token in fp32 (in rank order, so the sum is bitwise
reproducible), then casts.

One call = four collectives: the split sizes (``[W]`` counts; ``all_to_all_single`` needs them
on the host, so this part syncs with the host and cannot be captured in a CUDA graph), the
rows, their ids+weights, and the partial rows coming back. Every rank must call
``prepare``/``finalize`` for every layer call, also with zero tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_kernels.config import LayerConfig
from moe_kernels.contract import (
    ActivationFormat,
    Check,
    PrepareAndFinalize,
    PrepareResult,
    StandardTokens,
    check_device_type,
)
from moe_kernels.distributed import check_agreement, check_expert_map, group_backend


class TorchAllToAllPrepareAndFinalize(PrepareAndFinalize):
    """STANDARD prepare/finalize that moves tokens between the ranks of ``group``.

    ``group``: the expert-parallel process group (``None`` builds a part whose checks refuse
    every layer, so registries can build it anywhere). ``max_num_tokens_per_rank``: the most
    tokens one call may pass on one rank (``ParallelConfig.max_tokens_per_rank``), or ``None``.
    """

    output_format = ActivationFormat.STANDARD
    supports_cuda_graphs = False  # the split sizes must reach the host every call
    supports_chunking = False

    def __init__(self, group: dist.ProcessGroup | None, max_num_tokens_per_rank: int | None = None) -> None:
        if max_num_tokens_per_rank is not None and max_num_tokens_per_rank <= 0:
            raise ValueError(f"max_num_tokens_per_rank must be positive, got {max_num_tokens_per_rank}")
        self.group = group
        self._max_tokens = max_num_tokens_per_rank
        self._agreed = False
        self._map_checked = False

    # --- capabilities ---------------------------------------------------------------------

    def check_device(self, device: torch.device) -> Check:
        base = check_device_type("device", device, self.devices)
        if not base.ok or self.group is None:
            return base
        backend = group_backend(self.group)
        needed = "nccl" if device.type == "cuda" else "gloo"
        if needed not in backend:
            return Check.failed(
                "device", f"all_to_all of {device.type} tensors needs a {needed} process group, this one is {backend}"
            )
        return Check.passed("device", f"{device.type} over {backend}")

    def check_parallel(self, cfg: LayerConfig) -> Check:
        par = cfg.parallel
        if self.group is None:
            return Check.failed("parallel", "needs the expert-parallel process group (pass group= to select)")
        if par.ep_size == 1:
            return Check.failed(
                "parallel", "ep_size=1: nothing to exchange; LocalPrepareAndFinalize runs it without communication"
            )
        size, rank = self.group.size(), self.group.rank()
        if size != par.ep_size or rank != par.ep_rank:
            return Check.failed(
                "parallel",
                f"the process group has size {size}, rank {rank}; the config says ep_size={par.ep_size}, "
                f"ep_rank={par.ep_rank}",
            )
        return super().check_parallel(cfg)

    def preference(self, cfg: LayerConfig, device: torch.device) -> tuple[float, str]:
        return 60.0, "torch all_to_all_single: a host sync and four collectives per call (fallback without DeepEP)"

    # --- the chain ------------------------------------------------------------------------

    def num_dispatchers(self) -> int:
        return self._require_group().size()

    def max_num_tokens_per_rank(self) -> int | None:
        return self._max_tokens

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
        """Send each token of ``x [T, H]`` once to every rank owning one of its experts.

        Returns StandardTokens over the received rows ``[R, H]`` (grouped by source rank, in
        source token order), local ids ``[R, K]`` int32 (``-1`` = expert elsewhere) and weights
        ``[R, K]`` float32.
        """
        group = self._require_group()
        world, rank = group.size(), group.rank()
        t, k = topk_ids.shape
        if num_local_experts * world != num_experts:
            raise ValueError(
                f"num_experts ({num_experts}) must equal num_local_experts ({num_local_experts}) x ranks ({world})"
            )
        if not self._agreed:
            check_agreement(
                group,
                "TorchAllToAllPrepareAndFinalize",
                {
                    "hidden_size": x.shape[1],
                    "top_k": k,
                    "num_experts": num_experts,
                    "num_local_experts": num_local_experts,
                    "dtype": x.dtype,
                },
            )
            self._agreed = True
        if expert_map is not None and not self._map_checked:
            check_expert_map(expert_map, rank, num_local_experts)
            self._map_checked = True

        ids = topk_ids.long()
        owner = torch.where(ids >= 0, ids // num_local_experts, torch.full_like(ids, -1))  # [T, K]
        ranks = torch.arange(world, device=x.device)
        goes_to = (owner.unsqueeze(-1) == ranks).any(dim=1)  # [T, W]
        # row-major nonzero of [W, T]: grouped by destination rank, token order inside
        dest, token = goes_to.t().nonzero(as_tuple=True)
        send_counts = goes_to.sum(dim=0)  # [W] int64

        dest_col = dest.unsqueeze(1)
        local_ids = torch.where(owner[token] == dest_col, ids[token] - dest_col * num_local_experts, -1)
        send_meta = torch.empty((token.shape[0], 2 * k), dtype=torch.int32, device=x.device)
        send_meta[:, :k] = local_ids
        send_meta[:, k:] = topk_weights[token].view(torch.int32)  # weights travel bit-exact
        send_x = x[token]

        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()  # the host sync
        num_recv = sum(recv_split)

        recv_x = x.new_empty((num_recv, x.shape[1]))
        recv_meta = send_meta.new_empty((num_recv, 2 * k))
        # as bytes: gloo's all_to_all does not take every float dtype
        dist.all_to_all_single(_bytes(recv_x), _bytes(send_x), recv_split, send_split, group=group)
        dist.all_to_all_single(recv_meta, send_meta, recv_split, send_split, group=group)

        tokens = StandardTokens(
            x=recv_x,
            topk_ids=recv_meta[:, :k].contiguous(),
            topk_weights=recv_meta[:, k:].contiguous().view(torch.float32),
            num_local_experts=num_local_experts,
        )
        return PrepareResult(tokens, handle=_Route(token, send_split, recv_split, t))

    def finalize(self, out: torch.Tensor, expert_output: torch.Tensor, prepared: PrepareResult) -> None:
        """Send the partial rows ``expert_output [R, H]`` back and write ``out [T, H]``: the
        fp32 sum of each token's partials, one per rank it visited (zero for a token routed
        nowhere)."""
        group = self._require_group()
        route: _Route = prepared.handle
        partial = expert_output.contiguous()
        back = partial.new_empty((route.token.shape[0], partial.shape[1]))
        dist.all_to_all_single(_bytes(back), _bytes(partial), route.send_split, route.recv_split, group=group)
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        start = 0
        for n in route.send_split:
            # a token appears at most once per rank's segment: no colliding adds, fixed order
            if n:
                acc.index_add_(0, route.token[start : start + n], back[start : start + n].float())
            start += n
        out.copy_(acc)

    def _require_group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError("TorchAllToAllPrepareAndFinalize was built without a process group")
        return self.group


class _Route:
    """The dispatch bookkeeping finalize reverses: ``token [S]`` int64 (source token of each
    sent row, grouped by destination rank), the split sizes both ways and the source T."""

    __slots__ = ("token", "send_split", "recv_split", "num_tokens")

    def __init__(self, token: torch.Tensor, send_split: list[int], recv_split: list[int], num_tokens: int) -> None:
        self.token = token
        self.send_split = send_split
        self.recv_split = recv_split
        self.num_tokens = num_tokens


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[N, H]`` tensor seen as ``[N, H * itemsize]`` bytes (a view, no copy)."""
    return t.view(torch.uint8)
