"""What a new user meets first: the README's snippet, --version, exit codes, one-line errors,
the memory refusal's arithmetic, 80-column output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import moe_kernels
from moe_kernels import ExpertPlacement, FusedMoE, LayerMemoryError, load_config
from moe_kernels.model import memory
from moe_kernels.tools import cli

ROOT = Path(__file__).resolve().parents[1]

#: a Qwen3-MoE layer small enough for a test: plain softmax top-k, renormalized
TINY_QWEN3 = """\
name: tiny-qwen3
moe: {num_experts: 8, top_k: 2, hidden_size: 64, intermediate_size: 32, dtype: float32,
      scoring: softmax, renormalize: true}
"""


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (snippet,) = [b for b in blocks if "FusedMoE(cfg)" in b]
    return snippet


def write_qwen3_checkpoint(directory: Path, layer: int, e: int, h: int, i: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    prefix = f"model.layers.{layer}.mlp"
    tensors = {f"{prefix}.gate.weight": torch.randn(e, h, generator=gen)}
    for x in range(e):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            tensors[f"{prefix}.experts.{x}.{proj}.weight"] = torch.randn(*shape, generator=gen) * shape[1] ** -0.5
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def plain_moe(x: torch.Tensor, tensors: dict[str, torch.Tensor], layer: int, top_k: int) -> torch.Tensor:
    """The MoE layer written out: softmax over the router logits, top-k, renormalize, and the
    weighted sum of each chosen expert's SiLU-gated MLP."""
    p = f"model.layers.{layer}.mlp"
    probs = torch.softmax(x @ tensors[f"{p}.gate.weight"].T, dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t].tolist(), strict=True):
            g, u, d = (tensors[f"{p}.experts.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            out[t] += w * (d @ (F.silu(g @ x[t]) * (u @ x[t])))
    return out


def test_readme_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = readme_snippet()
    config = re.search(r'load_config\("([^"]+)"\)', snippet).group(1)  # type: ignore[union-attr]
    checkpoint, layer = re.search(r'load_checkpoint\("([^"]+)", layer=(\d+)\)', snippet).groups()  # type: ignore[union-attr]
    monkeypatch.chdir(tmp_path)
    (tmp_path / config).parent.mkdir(parents=True)
    (tmp_path / config).write_text(TINY_QWEN3)
    tensors = write_qwen3_checkpoint(tmp_path / checkpoint, int(layer), 8, 64, 32)
    scope: dict[str, object] = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    x, out = scope["hidden_states"], scope["out"]
    assert isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
    assert out.shape == x.shape
    torch.testing.assert_close(out, plain_moe(x, tensors, int(layer), top_k=2), rtol=1e-4, atol=1e-4)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", moe_kernels.__version__)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-kernels {moe_kernels.__version__}"


def test_bad_dtype_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--config", str(ROOT / "configs/tiny-test.yaml"), "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--dtype 'fp8'" in err and "'fp8'" in err and "http" not in err
    assert "quant.scheme" in err  # fp8 is a scheme, not a dtype: the message says where it goes


@pytest.mark.parametrize(
    "argv",
    [
        ["tune", "--config", "configs/tiny-test.yaml"],
        ["bench", "experts"],
        ["bench", "layer", "--config", "configs/tiny-test.yaml"],
        ["bench", "shared"],
        ["bench", "profile"],
        ["bench", "ep"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_gpu_commands_fail_without_a_gpu(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert len(out.err.strip().splitlines()) == 1 and "CUDA GPU" in out.err and "nothing was run" in out.err


def _numbers_gib(text: str) -> list[float]:
    units = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0}
    return [float(v) * units[u] for v, u in re.findall(r"([\d.]+) (B|KiB|MiB|GiB)\b", text)]


def test_memory_refusal_says_the_margin_and_adds_up() -> None:
    gib = 2**30
    estimate = memory.MemoryEstimate(weights=int(21.1 * gib), workspaces=0, activations=int(0.3 * gib))
    why = memory.refusal(estimate, torch.device("cpu"), int(22.7 * gib))
    assert why is not None
    needs, _weights, _activations, available, kept, usable = _numbers_gib(why)
    assert f"{memory.MEMORY_MARGIN:.0%}" in why
    assert available == pytest.approx(22.7, abs=0.05)
    assert kept == pytest.approx(available * memory.MEMORY_MARGIN, abs=0.05)
    assert usable == pytest.approx(available - kept, abs=0.1)
    assert needs > usable  # the message no longer contradicts itself
    assert memory.refusal(estimate, torch.device("cpu"), int(24 * gib)) is None


def test_fused_moe_refuses_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(ROOT / "configs/deepseek-v3.yaml")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 2**30)
    allocated: list[tuple[int, ...]] = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    with pytest.raises(LayerMemoryError, match=r"DeepSeek-V3\) needs about .* GiB.*leaving 7\.2 GiB.*ep_size=4"):
        FusedMoE(cfg, device="cpu")
    assert not any(len(shape) == 3 for shape in allocated)  # no [E, ., .] expert tensor was made


def test_explain_without_a_valid_pair_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_kernels.selection import registry

    monkeypatch.setattr(registry, "EXPERTS", [])
    assert cli.main(["explain", "--config", str(ROOT / "configs/tiny-test.yaml"), "--device", "cpu"]) == 1
    assert "no registered kernel can run" in capsys.readouterr().err


def test_explain_an_expert_parallel_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ep.yaml"
    path.write_text(TINY_QWEN3 + "parallel: {ep_size: 4}\n")
    assert cli.main(["explain", "--config", str(path), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "one process: rank 0 of ep_size=4's experts" in " ".join(captured.err.split())
    assert "ep_size=4" in captured.out and "CHOSEN" in captured.out
    assert cli.main(["explain", "--config", str(path), "--device", "cpu", "--ep-size", "2", "--ep-rank", "1"]) == 0
    assert "ep_size=2" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [2.5, 3.0, "3", True])
def test_placement_refuses_non_integer_ids(bad: object) -> None:
    with pytest.raises(TypeError, match=r"rank_experts\[1\]: expert ids must be integers"):
        ExpertPlacement.from_rank_experts([[0, 1], [bad, 2]], ep_rank=0)  # type: ignore[list-item]
    assert ExpertPlacement.from_rank_experts([[0, torch.tensor(3)], [1, 2]], 0).rank_experts == ((0, 3), (1, 2))


def test_output_fits_80_columns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    tiny = str(ROOT / "configs/tiny-test.yaml")
    for argv in (["list"], ["explain", "--config", tiny], ["run", "--config", tiny]):
        cli.main([*argv, "--device", "cpu"])
        captured = capsys.readouterr()
        for line in (captured.out + captured.err).splitlines():
            assert len(line) <= 80, line
    selection = FusedMoE(load_config(tiny), device="cpu").selection
    assert selection is not None
    assert max(map(len, selection.explain(verbose=True).splitlines())) <= 80


def test_list_header_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    cli.main(["list", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["kind", "name", "layout", "runs"]
    assert set(lines[2].replace(" ", "")) == {"-"}


def test_one_nccl_minimum() -> None:
    """The minimum is NCCL_MIN; the docs and doctor's fix say it, and no other minimum."""
    from moe_kernels.backends.deep_ep import NCCL_MIN, format_version
    from moe_kernels.tools import doctor

    minimum = format_version(NCCL_MIN)
    setup = (ROOT / "docs/gpu-setup.md").read_text()
    assert f"older than {minimum}" in setup
    for text in ((ROOT / "pyproject.toml").read_text(), setup, (ROOT / "README.md").read_text()):
        assert not set(re.findall(r"NCCL >= ?(\d+\.\d+\.\d+)", text)) - {minimum}
    (nccl,) = [f for f in doctor.findings() if f.label == "NCCL"]
    assert minimum in nccl.fix or "nvidia-nccl" in nccl.fix


def test_doctor_says_gin_on_only_with_an_rdma_nic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_kernels.backends import deep_ep
    from moe_kernels.tools import doctor

    monkeypatch.delenv("EP_DISABLE_GIN", raising=False)
    monkeypatch.setattr(deep_ep, "RDMA_DEVICES", tmp_path / "infiniband")
    (gin,) = [f for f in doctor.findings() if f.label == "GIN"]
    assert not gin.ok and "no RDMA device" in gin.found
    (tmp_path / "infiniband" / "mlx5_0").mkdir(parents=True)
    (gin,) = [f for f in doctor.findings() if f.label == "GIN"]
    assert gin.ok and "mlx5_0" in gin.found


@pytest.mark.parametrize("doc", ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))])
def test_relative_links_resolve(doc: str) -> None:
    path = ROOT / doc
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_plot_shows_speedups_with_distinct_styles(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from moe_kernels.tools.bench.plot import Panel, plot_panels, speedups, styles

    panel = Panel("shape", {"peer": [(1, 10.0), (16, 20.0)], "select": [(1, 8.0), (16, 25.0), (64, 5.0)]})
    for i in range(10):
        panel.series[f"pair{i}"] = [(1, 10.0 + i)]
    ratios = speedups(panel)
    assert "peer" not in ratios
    assert ratios["select"] == [(1, 10.0 / 8.0), (16, 20.0 / 25.0)]  # only where the peer was measured
    assert len(set(styles(len(ratios)))) == len(ratios) == 11
    assert len({marker for _, marker in styles(11)}) > 1 and len({colour for colour, _ in styles(11)}) == 11
    assert len(set(styles(45))) == 45
    assert plot_panels([panel], tmp_path / "p.png") is None
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_panels([Panel("no peer", {"select": [(1, 1.0)]})], tmp_path / "q.png") is not None


def test_progress_counts_and_estimates(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_kernels.tools.progress import Progress

    with Progress(4, "tune") as progress:
        progress.say("measured T=1")
        progress.advance(3)
    err = capsys.readouterr().err
    assert "measured T=1" in err and "3/4" in err and "<" in err  # done/total and elapsed<remaining


@pytest.mark.gpu
def test_gpu_timer_is_do_bench_median_of_graph_replays() -> None:
    """A kernel that sleeps a known number of cycles: the graph-replay median scales with it."""
    from moe_kernels.selection.timing import Timer, time_cuda

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    short = time_cuda(lambda: torch.cuda._sleep(100_000))
    long = time_cuda(lambda: torch.cuda._sleep(400_000))
    assert 3.0 < long / short < 5.0
    graphed = Timer(max_runs=50, target_s=0.05).graphed(lambda: torch.cuda._sleep(100_000), "sleep")
    assert graphed == pytest.approx(short, rel=0.25)


@pytest.mark.gpu
def test_host_time_is_the_hosts_alone_and_a_sync_is_refused() -> None:
    """A call that busy-waits 200 us on the host and launches a long kernel: its host time is the
    wait, not the kernel's 2 ms (the GPU runs behind); a call that syncs cannot be told apart."""
    import time

    from moe_kernels.selection.timing import host_us

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def busy_host() -> None:
        end = time.perf_counter() + 200e-6
        while time.perf_counter() < end:
            pass
        torch.cuda._sleep(4_000_000)

    assert 200 <= host_us(busy_host, calls=20) < 400
    with pytest.raises(RuntimeError, match="host sync"):
        host_us(lambda: torch.cuda._sleep(1000) or torch.cuda.synchronize(), calls=5)


def test_the_package_logger_is_silent_by_default() -> None:
    import logging

    logger = logging.getLogger("moe_kernels")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


def test_the_memory_estimate_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="moe_kernels"):
        FusedMoE(load_config(ROOT / "configs/tiny-test.yaml"), device="cpu")
    assert any("layer tiny-test on cpu: about" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_a_kernels_first_call_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layer = FusedMoE(load_config(ROOT / "configs/tiny-test.yaml"), device="cuda")
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    layer.load_weights(router_weight=torch.randn(8, 64, device="cuda"))
    for e in range(8):
        layer.load_weights(
            gate_proj={e: torch.randn(128, 64)}, up_proj={e: torch.randn(128, 64)}, down_proj={e: torch.randn(64, 128)}
        )
    with caplog.at_level("INFO", logger="moe_kernels"):
        layer(x)
        layer(x)
    first = [r.getMessage() for r in caplog.records if "first call" in r.getMessage()]
    assert len(first) == 1 and "JIT compiles included" in first[0]


def test_a_closed_pipe_is_not_a_traceback() -> None:
    """``moe-kernels ... | head``: the reader is gone before the command writes (``true`` reads
    nothing), so every write fails with EPIPE."""
    import subprocess
    import sys

    command = f"{sys.executable} -m moe_kernels explain --config {ROOT / 'configs/tiny-test.yaml'} --device cpu"
    proc = subprocess.run(
        ["bash", "-c", f"{command} | (sleep 0; true); echo status=${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "status=141"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "  num_shared_experts: 1\n  shared_intermediate_size: 96\n  shared_expert_gate: true\n",
        "  router_dtype: float32\n  correction_bias: true\n  scoring: sigmoid\n",
    ],
    ids=["plain", "shared+gate", "fp32-router"],
)
def test_the_weight_estimate_is_what_the_layer_allocates(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "layer.yaml"
    base = "moe:\n  num_experts: 8\n  top_k: 2\n  hidden_size: 64\n  intermediate_size: 32\n"
    path.write_text(base + extra)
    cfg = load_config(path)
    layer = FusedMoE(cfg, device="cpu")
    allocated = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    assert memory.weight_bytes(cfg) == allocated
