"""The ``moe-kernels`` command: run, list, explain, bench (in-process through ``main(argv)``,
plus one real ``python -m moe_kernels`` process)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_kernels.tools.bench.layer as bench_layer_cli
import moe_kernels.tools.harness as bench_layer
from moe_kernels.config import LayerConfig, load_config
from moe_kernels.core.compose import ModularKernel, layer_context
from moe_kernels.experts.reference import TorchReferenceExperts
from moe_kernels.prepare_finalize.local import LocalPrepareAndFinalize
from moe_kernels.selection import registry
from moe_kernels.tools.cli import BENCH_MODULES, DEFAULT_LIST_CONFIG, build_parser, main, mount_bench

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-test.yaml")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_run_checks_and_times_the_tiny_layer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", TINY, "--tokens", "8", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    for field in ("config", "kernel", "max abs err", "rel err", "time"):
        assert f"  {field} " in out
    assert "tiny-test" in out and re.search(r"result +OK", out)
    assert "per forward" in out and "perf_counter" in out
    assert "layer forward on 8 tokens" in err  # progress goes to stderr


def test_run_dtype_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", TINY, "--tokens", "3", "--dtype", "float32", "--device", "cpu"]) == 0
    assert "I=128 float32" in capsys.readouterr().out


class ZeroExperts(TorchReferenceExperts):
    """A wrong kernel: writes zeros."""

    def apply(self, tokens, weights, out, workspace) -> None:  # type: ignore[no-untyped-def]
        out.zero_()


def test_run_fails_on_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make = bench_layer.random_layer

    def broken_layer(cfg: LayerConfig, device: torch.device, **kwargs: object) -> object:
        kwargs["kernel"] = ModularKernel(LocalPrepareAndFinalize(), ZeroExperts(), layer_context(cfg, device=device))
        return make(cfg, device, **kwargs)

    monkeypatch.setattr(bench_layer, "random_layer", broken_layer)
    assert main(["run", "--config", TINY, "--tokens", "4", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: the error exceeds the tolerance" in out and re.search(r"rel err +1.000e\+00", out)


@pytest.mark.parametrize(
    "extra",
    [
        "  expert_bias: true\n",
        "  expert_bias: true\nquant: {scheme: fp8_w8a8_tensor}\n",
        "quant: {scheme: fp8_w8a8_channel}\n",
        "quant: {scheme: int4_w4a16, group_size: 32}\n",
        "quant: {scheme: mxfp4}\n",
    ],
)
def test_run_draws_every_weight_format_and_bias(extra: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fp8 per-tensor layers load whole experts, never one projection at a time; biases are drawn too
    config = tmp_path / "layer.yaml"
    config.write_text(Path(TINY).read_text() + extra)
    assert main(["run", "--config", str(config), "--tokens", "5", "--device", "cpu"]) == 0
    assert re.search(r"result +OK", capsys.readouterr().out)
    layer = bench_layer.random_layer(load_config(config), torch.device("cpu"))
    if "expert_bias" in extra:
        assert layer.w13_bias is not None and layer.w2_bias is not None
        assert layer.w13_bias.abs().min() > 0 and layer.w2_bias.abs().min() > 0
        # one expert's biases are not another's
        assert not torch.equal(layer.w13_bias[0], layer.w13_bias[1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["run", "--config", TINY, "--dtype", "int8"], "--dtype 'int8'"),
        (["explain", "--config", TINY, "--device", "tpu"], "--device"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-kernels: error: ") and message in err
    assert "Traceback" not in err


def test_bad_yaml_names_the_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe: {num_experts: 8, top_k: 0, hidden_size: 64, intermediate_size: 128}\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "top_k" in err


def test_run_takes_one_ranks_share_of_expert_parallel_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ep = tmp_path / "ep.yaml"
    ep.write_text(Path(TINY).read_text() + "parallel: {ep_size: 2, ep_rank: 1}\n")
    assert main(["run", "--config", str(ep), "--device", "cpu", "--tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "one process: rank 1 of ep_size=2's experts" in " ".join(captured.err.split())
    assert "rank 1/2 holds experts 4..7" in captured.out


def test_run_one_ranks_share(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", TINY, "--tokens", "6", "--device", "cpu", "--ep-size", "4", "--ep-rank", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank 3/4 holds experts 6..7" in out and "LocalPrepareAndFinalize(partial)" in out and "OK" in out
    assert main(["run", "--config", TINY, "--ep-size", "4", "--ep-rank", "4"]) == 2
    assert "--ep-rank 4 must be < --ep-size 4" in capsys.readouterr().err
    assert main(["run", "--config", TINY, "--ep-size", "3"]) == 2
    assert "num_experts (8) must be divisible by ep_size (3)" in capsys.readouterr().err


def test_run_refuses_a_layer_that_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DeepSeek-V3's 21 GiB of weights on a small machine: refused before anything is
    allocated, with the number and the one-rank alternative that fits."""
    import moe_kernels.tools.cli as cli

    monkeypatch.setattr(cli.memory, "available_bytes", lambda device: 22 * 2**30)  # a 24 GiB machine
    monkeypatch.setattr(bench_layer, "random_layer", lambda *a, **k: pytest.fail("allocated anyway"))
    deepseek = str(ROOT / "configs" / "deepseek-v3.yaml")
    assert main(["run", "--config", deepseek, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "DeepSeek-V3 needs about 2" in err and "weights 21.1 GiB" in err and "has 22.0 GiB available" in err
    assert "--ep-size 2 --ep-rank 0 needs about 1" in err
    assert "of which 10% (2.2 GiB) is kept free, leaving 19.8 GiB" in err  # the margin said, not hidden


def test_run_without_any_valid_kernel_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # without the Triton interpreter no capturable pair runs on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    graphs = tmp_path / "graphs.yaml"
    graphs.write_text(Path(TINY).read_text() + "parallel: {cuda_graphs: true}\n")
    assert main(["run", "--config", str(graphs), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no registered kernel can run tiny-test here" in err and "experts.cuda_graphs" in err


@no_cuda
def test_cuda_request_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", TINY, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_list_shows_every_registered_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    names = [make(DEFAULT_LIST_CONFIG).name for make in registry.PREPARE_FINALIZE]
    names += [make(DEFAULT_LIST_CONFIG).name for make in registry.EXPERTS]
    for name in names:
        assert any(line.split()[1:2] == [name] for line in out.splitlines()), name


def test_list_says_why_a_part_cannot_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list", "--device", "cpu", "--config", TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    # a row may continue its why on the lines below it
    rows: dict[str, str] = {}
    for line in lines:
        if line.startswith("experts "):
            name = line.split()[1]
            rows[name] = line
        elif line.startswith(" ") and rows:
            rows[name] += " " + line.strip()
    assert " yes " in rows["TorchReferenceExperts"] + " "
    assert " no " in rows["TritonExperts"] and "TRITON_INTERPRET=1" in rows["TritonExperts"]
    assert max(len(line) for line in lines) <= 80  # readable in an 80-column terminal


def test_explain_prints_the_selection(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["explain", "--config", TINY, "--device", "cpu", "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-test\nlayer: E=8 top_k=2 H=64 I=128 bfloat16")
    assert "CHOSEN" in out and "refused" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert main(["explain", "--config", TINY, "--device", "cpu", "--verbose"]) == 0
    assert "DeepEPLowLatencyPrepareAndFinalize + ExpandedDeepGemmExperts" in capsys.readouterr().out


def test_every_bench_subcommand_is_mounted() -> None:
    parser = build_parser()
    for name in BENCH_MODULES:
        args, _ = parser.parse_known_args(["bench", name])
        assert callable(args.func)


def test_missing_bench_module_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    mount_bench(sub, "nope", "moe_kernels.tools.bench.does_not_exist", "a benchmark not written yet")
    args, _ = parser.parse_known_args(["nope", "--tokens", "4"])
    from moe_kernels.tools.harness import CliError

    with pytest.raises(CliError, match="moe_kernels.tools.bench.does_not_exist is not available"):
        args.func(args)


def test_check_and_time_measures_error_and_time() -> None:
    cfg = load_config(TINY)
    layer = bench_layer.random_layer(cfg, torch.device("cpu"), seed=1)
    results = bench_layer_cli.measure(layer, [1, 5], timer=bench_layer.cpu_timer)
    assert [r.tokens for r in results] == [1, 5]
    for r in results:
        assert 0 <= r.rel_err <= cfg.mlp.tolerance
        assert r.layer_us > 0 and r.reference_us is not None and r.reference_us > 0
        assert r.flops == 6 * r.tokens * 2 * 64 * 128
    table = bench_layer_cli.format_results(results, 3e-2)
    assert table.splitlines()[0].startswith("| tokens |") and len(table.splitlines()) == 4
    # more timers (bench layer's host and graph times on a GPU) add a column each, in order
    calls = []
    more = {"a us": lambda fn: calls.append(fn()) or 1.0, "b us": lambda fn: 2.0}
    timed = bench_layer_cli.measure(layer, [2], timer=bench_layer.cpu_timer, more_timers=more)
    assert timed[0].more_us == {"a us": 1.0, "b us": 2.0} and len(calls) == 1 and calls[0].shape == (2, 64)
    header = bench_layer_cli.format_results(timed, 3e-2).splitlines()[0]
    assert header.index("layer us") < header.index("a us") < header.index("b us") < header.index("TFLOP/s")

    broken = ModularKernel(LocalPrepareAndFinalize(), ZeroExperts(), layer_context(cfg, device="cpu"))
    wrong = bench_layer.random_layer(cfg, torch.device("cpu"), kernel=broken)
    assert bench_layer.check_and_time(wrong, 4, timer=bench_layer.cpu_timer).rel_err == 1.0


def test_python_dash_m_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_kernels", "run", "--config", TINY, "--tokens", "4", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"result +OK", proc.stdout)


#: what each example prints when it ran to the end (default: a layer's output shape, "out: [")
EXAMPLE_DONE = {
    "compile_layer.py": "compilations over T in",
    "from_pretrained.py": "output: [",
    "weight_formats.py": "max diff to bf16",
}


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_run(example: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(example)])  # as `python examples/X.py` runs it, not pytest's
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(example), run_name="__main__")
    assert EXAMPLE_DONE.get(example.name, "out: [") in capsys.readouterr().out
