"""Route tokens and run a (prepare/finalize, experts) pair composed by hand.

Shows what ``FusedMoE`` does inside: ``route`` picks the experts, ``compose`` checks that the
two halves fit the layer on this device (listing every reason when they do not), binds them
and chains them.

    python examples/compose_by_hand.py
"""

from __future__ import annotations

import torch

from moe_kernels import (
    ExpertWeights,
    IncompatibleKernelsError,
    LayerConfig,
    LocalMaskedPrepareAndFinalize,
    LocalPrepareAndFinalize,
    MoEConfig,
    ParallelConfig,
    TorchReferenceExperts,
    compose,
    route,
)


def main() -> None:
    moe = MoEConfig(num_experts=16, top_k=4, hidden_size=64, intermediate_size=32, dtype=torch.float32)
    cfg = LayerConfig(name="by-hand", moe=moe, parallel=ParallelConfig(max_tokens_per_rank=256))
    e, h, i = moe.num_experts, moe.hidden_size, moe.intermediate_size

    # A pair whose halves disagree: the masked prepare hands out [E, M, H] rows, the
    # reference experts take [T, H]. compose() refuses it and says why.
    try:
        compose(LocalMaskedPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")
    except IncompatibleKernelsError as err:
        print(err)

    kernel = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, h, generator=gen)
    weights = ExpertWeights(
        w13=torch.randn(e, 2 * i, h, generator=gen) * h**-0.5,  # [gate; up] rows per expert
        w2=torch.randn(e, h, i, generator=gen) * i**-0.5,
    )
    router_logits = torch.randn(8, e, generator=gen)

    topk_weights, topk_ids = route(router_logits, moe.top_k, scoring="softmax", renormalize=True)
    out = kernel(x, weights, topk_weights, topk_ids)
    weights0 = [round(w, 4) for w in topk_weights[0].tolist()]
    print(f"{kernel.name}: token 0 -> experts {topk_ids[0].tolist()} weights {weights0}")
    print(f"out: {list(out.shape)}, mean |out| = {out.abs().mean().item():.4f}")


if __name__ == "__main__":
    main()
