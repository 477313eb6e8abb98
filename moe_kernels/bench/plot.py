"""Optional PNG plots of benchmark results (only when matplotlib imports; never required)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_kernels.bench.experts import ShapeResult

#: experts-benchmark columns drawn, with their legend labels
SERIES = {
    "deepgemm": "DeepGEMM contiguous",
    "masked": "DeepGEMM masked",
    "grouped_mm": "torch._grouped_mm",
    "triton": "Triton",
    "torch_ops": "torch-ops baseline",
    "loop": "per-expert loop",
}


def plot_experts(results: Sequence[ShapeResult], path: Path) -> bool:
    """One log-log panel per shape: experts time (us) against tokens. Returns False (and draws
    nothing) when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # optional: the markdown tables carry the same numbers
        return False
    drawn = [r for r in results if r.points]
    if not drawn:
        return False
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 4.2), squeeze=False)
    for ax, result in zip(axes[0], drawn, strict=True):
        for column, label in SERIES.items():
            pts = [(p.tokens, p.us[column]) for p in result.points if column in p.us]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        if result.threshold:
            ax.axvline(result.threshold, color="grey", linestyle=":", label=f"hybrid threshold {result.threshold}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T (top-k over the local experts)")
        ax.set_ylabel("time (us)")
        shape = result.shape
        ax.set_title(f"{result.name}: E={shape.num_experts} H={shape.hidden} I={shape.inter}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
