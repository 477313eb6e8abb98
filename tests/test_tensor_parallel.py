"""Tensor-parallel experts (each rank holds a slice of every expert's intermediate dimension)
and TP x EP, on CPUs over gloo: every rank builds the sharded layer from the public API
(``FusedMoE(cfg, tp_group=..., group=...)`` + ``load_weights`` with the whole checkpoint) and
compares its output with the one-process layer on the same checkpoint; a plain loop checks the
slicing itself. One launch per world size (process start-up dominates on small machines)."""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

from moe_kernels import LayerConfig, MoEConfig, ParallelConfig, QuantConfig
from moe_kernels.mlp.formats import Fp8Block
from moe_kernels.mlp.shard import IntermediateShard
from moe_kernels.tools.launcher import run_ranks

E, K, H, I, S = 8, 2, 32, 32, 16  # noqa: E741 (S: the shared experts' width)


def layer_cfg(dtype: torch.dtype = torch.float32, *, inter: int = I, **parallel: object) -> LayerConfig:
    moe = MoEConfig(
        num_experts=E, top_k=K, hidden_size=H, intermediate_size=inter, dtype=dtype,
        num_shared_experts=1, shared_intermediate_size=S, shared_expert_gate=True,
    )  # fmt: skip
    return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=64, **parallel))


def checkpoint(inter: int = I, hidden: int = H, experts: int = E, seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        gate_proj={e: torch.randn(inter, hidden, generator=g) * hidden**-0.5 for e in range(experts)},
        up_proj={e: torch.randn(inter, hidden, generator=g) * hidden**-0.5 for e in range(experts)},
        down_proj={e: torch.randn(hidden, inter, generator=g) * inter**-0.5 for e in range(experts)},
        router_weight=torch.randn(experts, hidden, generator=g) * 0.5,
    )


def shared_checkpoint(seed: int = 1) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        shared_gate_proj=torch.randn(S, H, generator=g) * H**-0.5,
        shared_up_proj=torch.randn(S, H, generator=g) * H**-0.5,
        shared_down_proj=torch.randn(H, S, generator=g) * S**-0.5,
        shared_expert_gate=torch.randn(1, H, generator=g) * H**-0.5,
    )


# --- one process: the configuration and the slicing ----------------------------------------


def test_tp_config_errors_name_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"tp_rank \(2\) must be < tp_size \(2\)"):
        ParallelConfig(tp_size=2, tp_rank=2)
    with pytest.raises(ValueError, match=r"intermediate_size \(40\) must be divisible by tp_size \(3\)"):
        layer_cfg(inter=40, tp_size=3)
    with pytest.raises(ValueError, match=r"intermediate_size \(32\) / tp_size \(8\) = 4 must be a multiple of 8"):
        layer_cfg(tp_size=8)
    with pytest.raises(ValueError, match=r"shared experts' width .* = 16\) must be divisible by tp_size \(3\)"):
        layer_cfg(inter=96, tp_size=3)
    moe = MoEConfig(num_experts=E, top_k=K, hidden_size=128, intermediate_size=256)
    fp8 = QuantConfig(scheme="fp8_w8a8_block")
    with pytest.raises(ValueError, match=r"intermediate_size \(256\) / tp_size \(4\) = 64 is not a multiple of 128"):
        LayerConfig(moe=moe, quant=fp8, parallel=ParallelConfig(tp_size=4))
    assert LayerConfig(moe=moe, quant=fp8, parallel=ParallelConfig(tp_size=2, tp_rank=1)).mlp.inter == 128


def test_a_tp_layer_needs_its_group() -> None:
    from moe_kernels import FusedMoE

    with pytest.raises(ValueError, match="tp_group: tp_size is 2: pass the tensor-parallel process group"):
        FusedMoE(layer_cfg(tp_size=2), device="cpu")


@pytest.mark.parametrize("down", [False, True], ids=["gate-or-up rows", "down columns"])
def test_fp8_shard_keeps_its_blocks(down: bool) -> None:
    """A shard of a block-quantized projection is the same projection's rows (columns) with the
    scales of those blocks: dequantizing the shard equals slicing the dequantized whole."""
    fmt = Fp8Block()
    w = torch.randn(256, 384) if not down else torch.randn(384, 256)
    whole = fmt.dequantize(fmt.quantize(w))
    for rank in range(2):
        shard = IntermediateShard(256, 2, rank)
        part = fmt.dequantize(shard.take(fmt, down, fmt.quantize(w)))
        span = slice(128 * rank, 128 * (rank + 1))
        torch.testing.assert_close(part, whole[:, span] if down else whole[span], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cut a 128-wide scale block"):
        IntermediateShard(128, 2, 1).take(fmt, down, fmt.quantize(w))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-block-scales"])
def test_a_tp_read_takes_only_the_ranks_slice_from_disk(tmp_path, fp8: bool) -> None:
    """``read_moe_layer(..., tensor_parallel=(2, r))`` reads rows of gate/up and columns of down
    (and of their block scales) from the file: what it returns equals slicing the whole read."""
    from safetensors.torch import save_file

    from moe_kernels.model.checkpoint import describe_moe_layer, read_moe_layer, slice_intermediate

    inter, hidden, p = 256, 128, "model.layers.0.mlp"
    g = torch.Generator().manual_seed(0)
    tensors = {f"{p}.gate.weight": torch.randn(2, hidden, generator=g)}
    for e in range(2):
        for name, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            w = torch.randn(*shape, generator=g)
            if fp8:
                stored = Fp8Block().quantize(w)
                tensors[f"{p}.experts.{e}.{name}.weight_scale_inv"] = stored["scale"]
                w = stored["weight"]
            tensors[f"{p}.experts.{e}.{name}.weight"] = w.to(torch.bfloat16) if not fp8 else w
    save_file(tensors, str(tmp_path / "model.safetensors"))
    whole = read_moe_layer(tmp_path, 0, [0, 1])
    info = slice_intermediate(describe_moe_layer(tmp_path, 0, [0, 1]), 2, 1)
    assert info.gate_proj[1].shape == (inter // 2, hidden) and info.down_proj[1].shape == (hidden, inter // 2)
    part = read_moe_layer(tmp_path, 0, [0, 1], tensor_parallel=(2, 1))
    rows, blocks = slice(inter // 2, inter), slice(1, 2)
    for e in range(2):
        assert torch.equal(part.gate_proj[e], whole.gate_proj[e][rows])
        assert torch.equal(part.up_proj[e], whole.up_proj[e][rows])
        assert torch.equal(part.down_proj[e], whole.down_proj[e][:, rows])
        if fp8:
            assert torch.equal(part.gate_proj_scale[e], whole.gate_proj_scale[e][blocks])  # type: ignore[index]
            assert torch.equal(part.down_proj_scale[e], whole.down_proj_scale[e][:, blocks])  # type: ignore[index]


# --- the ranks -------------------------------------------------------------------------------


def _experts(name: str):
    from moe_kernels import TorchReferenceExperts

    if name == "reference":
        return TorchReferenceExperts()
    from moe_kernels.experts.triton import TritonExperts

    return TritonExperts()


def _one_process_output(cfg: LayerConfig, ckpt: dict, x: torch.Tensor) -> torch.Tensor:
    """The unsharded layer in this process, on the reference experts."""
    from moe_kernels import FusedMoE, LocalPrepareAndFinalize, TorchReferenceExperts, compose

    whole = cfg.model_copy(update={"parallel": ParallelConfig(max_tokens_per_rank=64)})
    kernel = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), whole, device="cpu")
    layer = FusedMoE(whole, device="cpu", kernel=kernel)
    layer.load_weights(**ckpt)
    return layer(x).float()


def _sharded_layer(cfg: LayerConfig, ckpt: dict, experts: str, tp_group, ep_group=None, reduce: bool = True):
    from moe_kernels import FusedMoE, LocalPrepareAndFinalize, compose
    from moe_kernels.prepare_finalize.torch_a2a import TorchAllToAllPrepareAndFinalize

    pf = TorchAllToAllPrepareAndFinalize() if ep_group is not None else LocalPrepareAndFinalize()
    kernel = compose(pf, _experts(experts), cfg, group=ep_group, tp_group=tp_group, device="cpu")
    layer = FusedMoE(cfg, device="cpu", group=ep_group, tp_group=tp_group, kernel=kernel, reduce_results=reduce)
    layer.load_weights(**ckpt)
    return layer


def _compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    return {"status": "ok" if err <= tol else "wrong", "rel_err": err}


def _tp_run(tp_group, dtype: torch.dtype, experts: str, ep_group=None) -> dict:
    """This rank's sharded layer against the one-process layer on this rank's tokens (the
    tokens are the same within a TP group and differ between EP ranks)."""
    ep_rank = 0 if ep_group is None else ep_group.rank()
    ep_size = 1 if ep_group is None else ep_group.size()
    cfg = layer_cfg(dtype, tp_size=tp_group.size(), tp_rank=tp_group.rank(), ep_size=ep_size, ep_rank=ep_rank)
    ckpt = {**checkpoint(), **shared_checkpoint()}
    x = torch.randn(5 + 2 * ep_rank, H, generator=torch.Generator().manual_seed(10 + ep_rank)).to(dtype)
    layer = _sharded_layer(cfg, ckpt, experts, tp_group, ep_group)
    shapes = [list(layer.w13.shape), list(layer.w2.shape), list(layer.shared_w13.shape), list(layer.shared_w2.shape)]
    return {**_compare(layer(x), _one_process_output(cfg, ckpt, x), dtype), "shapes": shapes}


def _tp_partial_sums(tp_group) -> dict:
    """``reduce_results=False``: each rank's output is a partial sum; summing them by hand (an
    engine's deferred all-reduce) gives the layer."""
    import torch.distributed as dist

    cfg = layer_cfg(tp_size=tp_group.size(), tp_rank=tp_group.rank())
    ckpt = {**checkpoint(), **shared_checkpoint()}
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(3))
    partial = _sharded_layer(cfg, ckpt, "reference", tp_group, reduce=False)(x)
    ref = _one_process_output(cfg, ckpt, x)
    summed = partial.clone()
    dist.all_reduce(summed, group=tp_group)
    return {**_compare(summed, ref, torch.float32), "partial_differs": not torch.allclose(partial, ref, atol=1e-3)}


def _tp_fp8(tp_group) -> dict:
    """An fp8 checkpoint (weights + block scales) loaded sharded equals the one-process fp8 layer."""
    from moe_kernels import FusedMoE, LocalPrepareAndFinalize, TorchReferenceExperts, compose

    moe = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=256)
    fp8 = QuantConfig(scheme="fp8_w8a8_block")
    par = ParallelConfig(max_tokens_per_rank=16, tp_size=tp_group.size(), tp_rank=tp_group.rank())
    cfg = LayerConfig(moe=moe, quant=fp8, parallel=par)
    fmt = cfg.mlp.weights
    ckpt: dict[str, object] = checkpoint(inter=256, hidden=128, experts=4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        stored = {e: fmt.quantize(w) for e, w in ckpt[name].items()}  # type: ignore[union-attr]
        ckpt[name] = {e: s["weight"] for e, s in stored.items()}
        ckpt[f"{name}_scale"] = {e: s["scale"] for e, s in stored.items()}
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    kernel = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, tp_group=tp_group, device="cpu")
    layer = FusedMoE(cfg, device="cpu", tp_group=tp_group, kernel=kernel)
    layer.load_weights(**ckpt)
    return _compare(layer(x), _one_process_output(cfg, ckpt, x), torch.bfloat16)


def _tp_selected(tp_group) -> dict:
    """The layer as the docs build it: ``FusedMoE(cfg, tp_group=...)``, kernel selected."""
    from moe_kernels import FusedMoE

    cfg = layer_cfg(tp_size=tp_group.size(), tp_rank=tp_group.rank())
    ckpt = {**checkpoint(), **shared_checkpoint()}
    layer = FusedMoE(cfg, device="cpu", tp_group=tp_group)
    layer.load_weights(**ckpt)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(6))
    return {**_compare(layer(x), _one_process_output(cfg, ckpt, x), torch.float32), "kernel": layer.kernel.name}


def _tp_biases(tp_group, experts: str) -> dict:
    """Expert biases (gpt-oss): a rank adds its slice of the gate/up biases, and the down bias is
    added once over the group, not once per rank."""
    cfg = layer_cfg(tp_size=tp_group.size(), tp_rank=tp_group.rank())
    cfg = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"expert_bias": True})})
    g = torch.Generator().manual_seed(8)
    biases = {
        name: {e: torch.randn(size, generator=g) for e in range(E)}
        for name, size in (("gate_proj_bias", I), ("up_proj_bias", I), ("down_proj_bias", H))
    }
    ckpt = {**checkpoint(), **shared_checkpoint(), **biases}
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(9))
    layer = _sharded_layer(cfg, ckpt, experts, tp_group)
    return _compare(layer(x), _one_process_output(cfg, ckpt, x), torch.float32)


def _tp_mismatch(tp_group) -> dict:
    """The last rank builds another intermediate size: every rank raises the same error."""
    from moe_kernels import LocalPrepareAndFinalize, TorchReferenceExperts, compose

    odd = tp_group.rank() == tp_group.size() - 1
    cfg = layer_cfg(inter=2 * I if odd else I, tp_size=tp_group.size(), tp_rank=tp_group.rank())
    try:
        compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, tp_group=tp_group, device="cpu")
    except ValueError as exc:
        return {"status": "raised", "message": str(exc)}
    return {"status": "no error"}


def write_qwen2_checkpoint(directory: str) -> str:
    """:func:`checkpoint` and :func:`shared_checkpoint` as a Qwen1.5/2-MoE safetensors file, layer 0."""
    from safetensors.torch import save_file

    ckpt, shared, p = checkpoint(), shared_checkpoint(), "model.layers.0.mlp"
    tensors = {f"{p}.gate.weight": ckpt["router_weight"]}
    for name in ("gate_proj", "up_proj", "down_proj"):
        tensors |= {f"{p}.experts.{e}.{name}.weight": w for e, w in ckpt[name].items()}  # type: ignore[union-attr]
        tensors[f"{p}.shared_expert.{name}.weight"] = shared[f"shared_{name}"]
    tensors[f"{p}.shared_expert_gate.weight"] = shared["shared_expert_gate"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{directory}/model.safetensors")  # type: ignore[union-attr]
    return directory


def _tp_load_checkpoint(tp_group, path: str) -> dict:
    """``load_checkpoint`` on a TP rank takes its slices of the routed and shared experts."""
    from moe_kernels import FusedMoE, LocalPrepareAndFinalize, TorchReferenceExperts, compose

    cfg = layer_cfg(tp_size=tp_group.size(), tp_rank=tp_group.rank())
    kernel = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, tp_group=tp_group, device="cpu")
    layer = FusedMoE(cfg, device="cpu", tp_group=tp_group, kernel=kernel)
    layer.load_checkpoint(path, layer=0, experts_per_read=3)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(4))
    return _compare(layer(x), _one_process_output(cfg, {**checkpoint(), **shared_checkpoint()}, x), torch.float32)


def _record(results: dict, name: str, fn, *args) -> None:
    try:
        results[name] = fn(*args)
    except Exception as exc:  # one scenario failing must not hide the others
        results[name] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}


def tp2_scenarios(group, checkpoint_dir: str) -> dict:
    """TP = 2 over the whole world; scenarios run in the same order on every rank."""
    results: dict[str, dict] = {}
    _record(results, "reference_fp32", _tp_run, group, torch.float32, "reference")
    _record(results, "reference_bf16", _tp_run, group, torch.bfloat16, "reference")
    _record(results, "triton_fp32", _tp_run, group, torch.float32, "triton")
    _record(results, "partial_sums", _tp_partial_sums, group)
    _record(results, "fp8_checkpoint", _tp_fp8, group)
    _record(results, "load_checkpoint", _tp_load_checkpoint, group, checkpoint_dir)
    _record(results, "selected", _tp_selected, group)
    _record(results, "biases_reference", _tp_biases, group, "reference")
    _record(results, "biases_triton", _tp_biases, group, "triton")
    _record(results, "mismatch", _tp_mismatch, group)
    return results


def tp2_ep2_scenarios(group) -> dict:
    """World rank r: EP rank r // 2, TP rank r % 2; TP groups {0,1} {2,3}, EP groups {0,2} {1,3}."""
    import torch.distributed as dist

    rank = group.rank()
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp_group, ep_group = tp_groups[rank // 2], ep_groups[rank % 2]
    results: dict[str, dict] = {}
    _record(results, "reference_fp32", _tp_run, tp_group, torch.float32, "reference", ep_group)
    _record(results, "triton_fp32", _tp_run, tp_group, torch.float32, "triton", ep_group)
    return results


@functools.cache
def launch(world: int) -> list[dict]:
    if world == 4:
        return run_ranks(tp2_ep2_scenarios, world, "gloo", timeout_s=240, collective_timeout_s=60)
    with tempfile.TemporaryDirectory() as directory:
        args = (write_qwen2_checkpoint(directory),)
        return run_ranks(tp2_scenarios, world, "gloo", args=args, timeout_s=240, collective_timeout_s=60)


def _skip_without_interpreter() -> None:
    if torch.cuda.is_available():
        pytest.skip("the ranks run Triton on the CPU, which needs the interpreter (not set on GPU machines)")


TP2_SCENARIOS = [
    "reference_fp32",
    "reference_bf16",
    "triton_fp32",
    "partial_sums",
    "fp8_checkpoint",
    "load_checkpoint",
    "selected",
    "biases_reference",
    "biases_triton",
]


@pytest.mark.parametrize("scenario", TP2_SCENARIOS)
def test_tp2_equals_the_one_process_layer(scenario: str) -> None:
    if scenario.startswith("triton"):
        _skip_without_interpreter()
    for rank, results in enumerate(launch(2)):
        outcome = results[scenario]
        assert outcome["status"] == "ok", f"rank {rank}: {outcome}"
    if scenario == "partial_sums":
        assert all(r["partial_sums"]["partial_differs"] for r in launch(2))
    if scenario == "reference_fp32":  # the rank's slice of every routed and shared projection
        assert launch(2)[0][scenario]["shapes"] == [[E, I, H], [E, H, I // 2], [S, H], [H, S // 2]]


def test_tp_ranks_that_disagree_fail_alike() -> None:
    outcomes = [results["mismatch"] for results in launch(2)]
    assert all(o["status"] == "raised" for o in outcomes), outcomes
    assert len({o["message"] for o in outcomes}) == 1
    assert "intermediate_size: 32 on rank 0; 64 on rank 1" in outcomes[0]["message"]


@pytest.mark.parametrize("scenario", ["reference_fp32", "triton_fp32"])
def test_tp2_by_ep2_equals_the_one_process_layer(scenario: str) -> None:
    if scenario.startswith("triton"):
        _skip_without_interpreter()
    for rank, results in enumerate(launch(4)):
        outcome = results[scenario]
        assert outcome["status"] == "ok", f"rank {rank}: {outcome}"
        assert outcome["shapes"][0] == [E // 2, I, H]
