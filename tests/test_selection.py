"""Selection logic on the CPU with tables of made-up measurements: the grid it decides at, the
memory budget and what it says when the budget decided, tuning on first use (when it runs, what it
measures, that its times are then read), the versioned first-use cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_kernels import LayerConfig, MoEConfig, ParallelConfig, select
from moe_kernels.core import tuning
from moe_kernels.core.compose import layer_context
from moe_kernels.selection import autotune
from moe_kernels.selection import select as select_module
from moe_kernels.selection.select import default_memory_budget, planned_workspace_bytes, step_context
from moe_kernels.selection.tuner import write_table

GPU = "Test GPU 80GB"
MASKED = "LocalMaskedPrepareAndFinalize + MaskedTritonExperts"
TRITON = "LocalPrepareAndFinalize + TritonExperts"
FUSED = "LocalPrepareAndFinalize + FusedTritonExperts"


def layer(max_tokens: int = 4096) -> LayerConfig:
    moe = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=128)
    return LayerConfig(name="tiny", moe=moe, parallel=ParallelConfig(max_tokens_per_rank=max_tokens))


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Selection reads tables for a GPU named GPU (the CPU device stands in); tables written to
    the returned directory are the ones it reads; the first-use cache is a fresh directory."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path / "tables"))
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "gpu_name", lambda device: GPU)
    tuning.forget_tables()
    yield tmp_path / "tables"
    tuning.forget_tables()


def write_times(directory: Path, cfg: LayerConfig, pairs: dict[str, dict[int, float]]) -> None:
    write_table(directory, str(tuning.ShapeKey.of(cfg)), {"pairs": pairs}, "made-up times", gpu=GPU)
    tuning.forget_tables()


def test_the_grid_covers_the_heuristic_points_between_measured_ones(fake_gpu: Path) -> None:
    cfg = layer()
    write_times(fake_gpu, cfg, {TRITON: {1: 10.0, 4096: 50.0}, FUSED: {1: 5.0, 4096: 90.0}})
    selection = select(cfg, device="cpu")
    assert [c.high for c in selection.steps] == [1, 16, 64, 256, 1024, 4096]
    # an unmeasured point takes the next larger measurement: T=16..4096 all stand for T=4096
    assert [c.candidate.name for c in selection.steps] == [FUSED] + [TRITON] * 5


def test_the_budget_decision_is_said(fake_gpu: Path) -> None:
    cfg = layer(max_tokens=256)
    write_times(fake_gpu, cfg, {MASKED: {256: 10.0}, TRITON: {256: 20.0}})
    ctx = layer_context(cfg, device="cpu")
    by_name = {c.name: c for c in select_module.candidates(ctx)}
    need = {n: planned_workspace_bytes(by_name[n].prepare_finalize, by_name[n].experts, step_context(ctx, 256))
            for n in (MASKED, TRITON)}  # fmt: skip
    assert need[MASKED] > need[TRITON], need  # the masked layout is sized for capacity, not routed rows
    free = select(cfg, device="cpu", memory_budget=need[MASKED])
    assert free.steps[-1].candidate.name == MASKED and "memory budget" not in free.steps[-1].why
    tight = select(cfg, device="cpu", memory_budget=need[TRITON])
    assert tight.steps[-1].candidate.name == TRITON
    assert f"the memory budget left out {MASKED} (10.0 us)" in tight.steps[-1].why
    assert f"memory budget for workspaces: {need[TRITON] / 2**20:.0f} MiB (given)" in tight.explain()


def test_the_default_budget_is_a_share_of_free_memory() -> None:
    budget, why = default_memory_budget(torch.device("cpu"))
    assert budget > 0 and "25% of the" in why and "GiB free on cpu" in why
    assert "GiB free on cpu at build" in select(layer(), device="cpu").explain(width=None)


def test_first_use_tuning_measures_the_missing_points_and_selection_reads_them(
    fake_gpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = layer(max_tokens=64)
    write_times(fake_gpu, cfg, {TRITON: {1: 10.0}, FUSED: {1: 5.0}})
    asked: list[list[int]] = []

    def measure(ctx, points, seconds=None):  # what the tuner would write
        asked.append(points)
        times = {TRITON: dict.fromkeys(points, 1.0), FUSED: dict.fromkeys(points, 9.0)}
        write_times(tuning.cache_dir(), ctx.cfg, times)
        return points

    monkeypatch.setattr(autotune, "why_not", lambda ctx: None)
    monkeypatch.setattr(autotune, "tune_points", measure)
    selection = select(cfg, device="cpu")
    assert asked == [[16, 64]]  # T=1 was measured already
    assert "T=[16, 64] tuned on first use" in selection.decided_by
    assert [(c.high, c.candidate.name) for c in selection.steps] == [(1, FUSED), (16, TRITON), (64, TRITON)]
    # the next selection finds the points in the cache: nothing is measured again
    select(cfg, device="cpu")
    assert asked == [[16, 64]]
    # tune=False keeps it from running (MOE_KERNELS_TUNE=0: the next test)
    select(layer(max_tokens=32), device="cpu", tune=False)
    assert asked == [[16, 64]]


def test_first_use_tuning_runs_only_where_it_measures_honestly(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = layer_context(layer(), device="cpu")
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    assert autotune.why_not(ctx) == "MOE_KERNELS_TUNE=0"
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    assert "CUDA GPU, not cpu" in autotune.why_not(ctx)
    ep = layer_context(layer().model_copy(update={"parallel": ParallelConfig(ep_size=2)}), device="cpu")
    assert "every rank must choose alike" in autotune.why_not(ep)
    monkeypatch.setenv(autotune.ENV_SWITCH, "5")
    assert autotune.budget_s() == 5.0 and autotune.why_not(ctx) is not None  # a budget, still not on a CPU
    monkeypatch.setenv(autotune.ENV_SWITCH, "soon")
    assert autotune.budget_s() == autotune.DEFAULT_BUDGET_S


def test_a_fallback_to_the_heuristics_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    moe = MoEConfig(num_experts=4, top_k=2, hidden_size=80, intermediate_size=96)  # a shape no other test uses
    cfg = LayerConfig(name="once", moe=moe, parallel=ParallelConfig(max_tokens_per_rank=48))
    with caplog.at_level("INFO", logger="moe_kernels"):
        select(cfg, device="cpu")
        select(cfg, device="cpu")
    said = [r.getMessage() for r in caplog.records if "heuristics" in r.getMessage()]
    assert len(said) == 1 and str(tuning.ShapeKey.of(cfg)) in said[0], said


def test_the_first_use_cache_is_per_library_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path))
    first = tuning.cache_dir()
    monkeypatch.setattr(tuning, "library_versions", lambda: "moe-kernels 9.9.9, triton 0.0")
    second = tuning.cache_dir()
    assert first != second and first.parent == second.parent == tmp_path / "tables"
    assert second in tuning.table_dirs()


def test_tables_of_one_gpu_merge_point_by_point(fake_gpu: Path) -> None:
    cfg = layer()
    key = tuning.ShapeKey.of(cfg)
    write_times(tuning.cache_dir(), cfg, {TRITON: {1: 10.0, 1024: 30.0}, FUSED: {1: 5.0}})
    write_times(fake_gpu, cfg, {TRITON: {1: 8.0}})  # your own tuning run measured T=1 again
    table = tuning.table_for(torch.device("cpu"))
    assert table is not None and str(fake_gpu) in table.path and str(tuning.cache_dir()) in table.path
    assert table.pair_times(key) == {TRITON: {1: 8.0, 1024: 30.0}, FUSED: {1: 5.0}}


def test_an_unmeasured_shape_is_ranked_by_the_nearest_measured_one(fake_gpu: Path) -> None:
    """E=4, K=2 gives each expert T/2 rows; a measured shape with E=8, K=2 gives T/4, so its T=64
    stands for our T=32. The nearest by GEMM sizes wins over a farther one that ranks otherwise."""
    cfg = layer(max_tokens=256)

    def shape(experts: int, hidden: int, inter: int) -> LayerConfig:
        moe = MoEConfig(num_experts=experts, top_k=2, hidden_size=hidden, intermediate_size=inter)
        return LayerConfig(moe=moe, parallel=ParallelConfig(max_tokens_per_rank=256))

    write_times(fake_gpu, shape(8, 64, 256), {FUSED: {1: 1.0, 64: 1.0, 512: 9.0}, TRITON: {1: 2.0, 64: 2.0, 512: 3.0}})
    write_times(fake_gpu, shape(8, 4096, 8192), {FUSED: {1: 9.0, 512: 9.0}, TRITON: {1: 1.0, 512: 1.0}})
    selection = select(cfg, device="cpu", tune=False)
    # the near shape's points move to T = 1, 32, 256: FUSED up to T=32, TRITON above
    expected = [(1, FUSED), (16, FUSED), (64, TRITON), (256, TRITON)]
    assert [(c.high, c.candidate.name) for c in selection.steps] == expected
    assert "ranks in E=8,K=2,H=64,I=256" in selection.decided_by
    # a measurement of this shape itself outranks the estimate where it covers T
    write_times(fake_gpu, cfg, {FUSED: {256: 5.0}, TRITON: {256: 6.0}})
    assert select(cfg, device="cpu", tune=False).steps[-1].candidate.name == FUSED


def _tiles_entry(block_n: int) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    tile = {"block_m": 16, "block_n": block_n, "block_k": 32, "num_warps": 4, "num_stages": 2}
    return {"kernels": {"FusedTritonExperts": {"1": {"gemm1": tile, "gemm2": tile}}}}


def test_a_new_table_reaches_the_parts_that_read_the_old_one(fake_gpu: Path) -> None:
    """Parts work out their tiles once per table; a table written later (a tuning run) must still
    reach a part that read the earlier one."""
    from moe_kernels import FusedTritonExperts

    cfg = layer()
    ctx = layer_context(cfg, device="cpu")
    part = FusedTritonExperts()
    write_table(fake_gpu, str(tuning.ShapeKey.of(cfg)), _tiles_entry(32), "made-up tiles", gpu=GPU)
    tuning.forget_tables()
    assert part.configs_for(ctx, 1)[0].block_n == 32
    write_table(fake_gpu, str(tuning.ShapeKey.of(cfg)), _tiles_entry(64), "made-up tiles", gpu=GPU)
    assert part.configs_for(ctx, 1)[0].block_n == 64


def test_a_layer_call_reads_no_file_and_no_package_metadata(fake_gpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call asks for this GPU's tiles: past the first call, asking must not touch the disk
    or the installed packages' metadata. Before the lookups were cached each call read the
    metadata of five packages, and an H100 spent 4-10 ms of host time per layer call on it."""
    import builtins
    import importlib.metadata
    import os

    from moe_kernels import FusedTritonExperts, LocalPrepareAndFinalize, compose
    from moe_kernels.tools.harness import random_layer

    cfg = layer()
    write_table(fake_gpu, str(tuning.ShapeKey.of(cfg)), _tiles_entry(32), "made-up tiles", gpu=GPU)
    tuning.forget_tables()
    kernel = compose(LocalPrepareAndFinalize(), FusedTritonExperts(), cfg, device="cpu")
    module = random_layer(cfg, torch.device("cpu"), kernel=kernel)
    x = torch.randn(3, cfg.moe.hidden_size, dtype=cfg.moe.dtype)
    module(x)  # the first call reads the tables
    touched: list[str] = []

    def recording(name: str, fn):  # noqa: ANN001, ANN202 - a pass-through wrapper
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            touched.append(f"{name}{args[:1]}")
            return fn(*args, **kwargs)

        return wrapper

    watched = [(os, "stat"), (os, "listdir"), (os, "scandir"), (builtins, "open"), (importlib.metadata, "version")]
    for owner, name in watched:
        monkeypatch.setattr(owner, name, recording(name, getattr(owner, name)))
    module(x)
    monkeypatch.undo()
    assert touched == []
