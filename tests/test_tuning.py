"""The tuner and selection from a measured table, on the CPU (Triton under the interpreter).

The tuner's measuring code runs for real (every candidate tiling and every valid pair is built
and called once); only the clock is replaced by a fixed cost model, so the table's contents are
known: the fused path is fastest up to 8 tokens, the contiguous Triton path above. Selection
must then switch pairs at that point, cite the table, give unmeasured pairs no say, and the
switching kernel must compute the layer right on both sides of the switch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_kernels.selection.problems as bench_problems
from moe_kernels import ExpertWeights, FusedTritonExperts, TokenRangeKernel, select
from moe_kernels.core import tuning
from moe_kernels.core.compose import layer_context
from moe_kernels.selection.problems import BenchShape
from moe_kernels.selection.tuner import tune_shape, write_table

GPU = "Test GPU 80GB"
SHAPE = BenchShape("tiny", 4, 2, 64, 128)
GRID = [1, 8, 64]
FUSED = "LocalPrepareAndFinalize + FusedTritonExperts"
TRITON = "LocalPrepareAndFinalize + TritonExperts"


def cost_model(fn, what: str) -> float:
    """Run ``fn`` once (the code path is real) and return a made-up time in microseconds."""
    fn()
    tokens = int(what.rsplit("T=", 1)[1]) if "T=" in what else 1
    if what.startswith(FUSED):
        return 10.0 + 2.0 * tokens
    if what.startswith(TRITON):
        return 20.0 + 1.0 * tokens
    if what.startswith("tiles"):
        return 5.0 + (1.0 if "num_stages=5" in what else 0.0)
    return 1000.0  # every other pair: valid, measured, never the fastest


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tuning run for the module (each pair and tiling runs under the interpreter)."""
    directory = tmp_path_factory.mktemp("tables")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv(tuning.ENV_DIR, str(directory))  # the tuner points it at its table; restored after
        mp.setattr(bench_problems, "DEVICE", "cpu")
        mp.setattr(tuning, "gpu_name", lambda device: GPU)
        tune_shape(
            SHAPE, GRID, cost_model, tile_candidates=2, progress=lambda msg: None, tables_dir=directory,
            source="test cost model", gpu=GPU,
        )  # fmt: skip
    tuning.forget_tables()
    return directory


@pytest.fixture
def tuned_table(tuned_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tuned table, the one selection reads for the fake GPU."""
    name = f"{tuning.slug(GPU)}.json"
    (tmp_path / name).write_text((tuned_dir / name).read_text())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(tuning, "gpu_name", lambda device: GPU)
    tuning.forget_tables()
    yield tmp_path / name
    tuning.forget_tables()


def test_the_tuner_writes_a_table_of_every_valid_pair_and_the_tiles(tuned_table: Path) -> None:
    data = json.loads(tuned_table.read_text())
    assert data["format"] == tuning.FORMAT and data["gpu"] == GPU and data["source"] == "test cost model"
    key = str(tuning.ShapeKey.of(SHAPE.layer(64)))
    assert key == "E=4,K=2,H=64,I=128,bfloat16,none"
    entry = data["shapes"][key]
    pairs = entry["pairs"]
    assert {FUSED, TRITON} <= set(pairs) and all(set(t) == {"1", "8", "64"} for t in pairs.values())
    assert "LocalPrepareAndFinalize + TorchReferenceExperts" not in pairs  # the yardstick is not a contender
    tiles = entry["kernels"]["FusedTritonExperts"]
    assert set(tiles) == {"1", "8", "64"}
    for per_t in tiles.values():
        assert set(per_t) == {"gemm1", "gemm2"} and per_t["gemm1"]["block_m"] == per_t["gemm2"]["block_m"]
        assert per_t["gemm1"]["num_stages"] != 5  # the cost model made those slower
    table = tuning.load_table(tuned_table)
    assert table.pair_times(tuning.ShapeKey.of(SHAPE.layer(1)))[FUSED] == {1: 12.0, 8: 26.0, 64: 138.0}


def test_selection_switches_pairs_where_the_table_says(tuned_table: Path) -> None:
    cfg = SHAPE.layer(64)
    selection = select(cfg, device="cpu")
    assert [(c.high, c.candidate.name) for c in selection.plan] == [(8, FUSED), (64, TRITON)]
    assert selection.decided_by.startswith(f"measured table {tuned_table}")
    text = selection.explain()
    assert "CHOSEN T=1..8: " + FUSED in text and "CHOSEN T>=9: " + TRITON in text
    assert "10.0" not in text and "12.0 us at T=1" in text  # cites the measured times
    kernel = selection.kernel
    assert isinstance(kernel, TokenRangeKernel)
    assert kernel.kernel_for(8).name == FUSED and kernel.kernel_for(9).name == TRITON

    # the switching kernel computes the layer on both sides of the switch
    gen = torch.Generator().manual_seed(0)
    w = ExpertWeights(
        (torch.randn(4, 256, 64, generator=gen) * 0.125).bfloat16(),
        (torch.randn(4, 64, 128, generator=gen) * 0.09).bfloat16(),
    )
    from moe_kernels import LocalPrepareAndFinalize, TorchReferenceExperts, compose

    reference = compose(LocalPrepareAndFinalize(), TorchReferenceExperts(), cfg, device="cpu")
    for t in (1, 8, 30):
        x = torch.randn(t, 64, generator=gen).bfloat16()
        ids = torch.rand(t, 4, generator=gen).argsort(dim=1)[:, :2].to(torch.int32)
        tw = torch.rand(t, 2, generator=gen)
        ref = reference(x, w, tw, ids).float()
        err = (kernel(x, w, tw, ids).float() - ref).abs().max() / ref.abs().max()
        assert err < 3e-2, (t, err)


def test_a_pair_the_table_lacks_never_outranks_measured_ones(tuned_table: Path) -> None:
    data = json.loads(tuned_table.read_text())
    key = str(tuning.ShapeKey.of(SHAPE.layer(64)))
    del data["shapes"][key]["pairs"][FUSED]
    tuned_table.write_text(json.dumps(data))
    tuning.forget_tables()
    selection = select(SHAPE.layer(64), device="cpu")
    assert [c.candidate.name for c in selection.plan] == [TRITON]
    assert "LocalPrepareAndFinalize + FusedTritonExperts: not measured" in selection.explain()


def test_the_fused_experts_read_their_tiles_from_the_table(tuned_table: Path) -> None:
    experts = FusedTritonExperts()
    ctx = layer_context(SHAPE.layer(64), device="cpu")
    assert experts.tiles_source(ctx) == "tuning table"
    table = json.loads(tuned_table.read_text())["shapes"][str(tuning.ShapeKey.of(SHAPE.layer(64)))]
    gemm1, gemm2 = experts.configs_for(ctx, 5)  # 5 tokens take the T=8 entry
    assert vars(gemm1) == table["kernels"]["FusedTritonExperts"]["8"]["gemm1"]
    assert vars(gemm2) == table["kernels"]["FusedTritonExperts"]["8"]["gemm2"]


def test_without_a_table_the_heuristics_decide_and_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "A GPU nobody tuned")
    tuning.forget_tables()
    selection = select(SHAPE.layer(64), device="cpu")
    assert "the parts' documented heuristics (no tuning table for this GPU)" == selection.decided_by
    assert FusedTritonExperts().tiles_source(layer_context(SHAPE.layer(64), device="cpu")) == "heuristic"


def test_point_for_takes_the_next_measured_token_count() -> None:
    points = {1: "a", 16: "b", 256: "c"}
    assert [tuning.point_for(points, t)[1] for t in (1, 2, 16, 17, 256, 10**6)] == ["a", "b", "b", "c", "c", "c"]
    with pytest.raises(ValueError, match="no measured points"):
        tuning.point_for({}, 3)


def test_a_tuning_run_over_part_of_the_grid_keeps_the_other_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))  # write_table points it at its table: restored after
    key = "E=4,K=2,H=64,I=128,bfloat16,none"
    write_table(tmp_path, key, {"pairs": {FUSED: {1: 12.0, 64: 138.0}, TRITON: {1: 21.0}}}, "first run", GPU)
    path = write_table(tmp_path, key, {"pairs": {FUSED: {64: 100.0, 256: 400.0}}}, "second run", GPU)
    data = json.loads(path.read_text())
    assert data["source"] == "second run"
    assert data["shapes"][key]["pairs"] == {FUSED: {"1": 12.0, "64": 100.0, "256": 400.0}, TRITON: {"1": 21.0}}
    tuning.forget_tables()
