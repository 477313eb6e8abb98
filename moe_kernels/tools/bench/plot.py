"""Optional PNG plots of benchmark results (only when matplotlib imports; never required)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Panel:
    """One log-log panel: ``series`` maps a legend label to ``(tokens, microseconds)`` points."""

    title: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    emphasis: tuple[str, ...] = ()  # labels drawn thicker (e.g. what select() picks and the peer)


def plot_panels(panels: Sequence[Panel], path: Path, *, ylabel: str = "time (us)") -> bool:
    """Draw ``panels`` side by side into ``path``. Returns False (and draws nothing) when
    matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # optional: the markdown tables carry the same numbers
        return False
    drawn = [p for p in panels if any(p.series.values())]
    if not drawn:
        return False
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.0 * len(drawn), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], drawn, strict=True):
        for label, points in panel.series.items():
            if points:
                thick = label in panel.emphasis
                ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label, linewidth=2.5 if thick else 1.0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel(ylabel)
        ax.set_title(panel.title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
