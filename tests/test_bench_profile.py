"""The kernel-profile summary of ``moe-kernels bench profile`` (pure bookkeeping, CPU)."""

from __future__ import annotations

import pytest

from moe_kernels.tools.bench.profile import KernelRecord, short, split_calls, summarize
from moe_kernels.tools.cli import main


def calls_of(starts_and_names: list[tuple[float, float, str]]) -> list[KernelRecord]:
    return [KernelRecord(name, start, end) for start, end, name in starts_and_names]


def test_calls_split_at_each_separator_and_averaged_per_call() -> None:
    records = calls_of(
        [
            (0, 1, "spin_kernel"),
            (2, 5, "gemm1"),  # call 1: gemm1 3 us, act 1 us twice, span 2..10
            (5, 6, "act"),
            (7, 8, "act"),
            (8, 10, "gemm2"),
            (20, 21, "spin_kernel"),
            (22, 27, "gemm1"),  # call 2: gemm1 5 us, act 1 us twice, gemm2 4 us, span 22..36
            (27, 28, "act"),
            (29, 30, "act"),
            (32, 36, "gemm2"),
        ]
    )
    # shuffled: the split must sort by start time itself
    calls = split_calls(list(reversed(records)), 2, "spin_kernel")
    assert [[r.name for r in call] for call in calls] == [["gemm1", "act", "act", "gemm2"]] * 2
    prof = summarize(calls)
    by_name = {k.name: k for k in prof.kernels}
    assert [k.name for k in prof.kernels] == ["gemm1", "act", "gemm2"]  # first-launch order
    assert by_name["gemm1"].total_us == pytest.approx(4.0) and by_name["gemm1"].launches == 1
    assert by_name["act"].total_us == pytest.approx(2.0) and by_name["act"].launches == 2
    assert by_name["gemm2"].total_us == pytest.approx(3.0)
    assert prof.kernel_sum_us == pytest.approx(9.0)
    assert prof.span_us == pytest.approx((8 + 14) / 2)


def test_a_missing_separator_is_an_error_not_a_misattribution() -> None:
    records = calls_of([(0, 1, "spin_kernel"), (2, 3, "gemm")])
    with pytest.raises(RuntimeError, match="expected 2 calls"):
        split_calls(records, 2, "spin_kernel")


def test_long_kernel_names_lose_their_template_arguments_first() -> None:
    name = "void deep_gemm::sm90_bf16_gemm_impl<128u, 256u, 64u>(int, int, CUtensorMap)"
    assert short(name, 40) == "void deep_gemm::sm90_bf16_gemm_impl"
    assert short("plain", 40) == "plain"
    assert short("x" * 50, 10) == "xxxxxxx..."


def test_profile_fails_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "profile", "--tokens", "1"]) == 2  # nothing measured must not look like success
    assert "bench profile: it profiles CUDA kernels, so it needs a CUDA GPU" in capsys.readouterr().err
