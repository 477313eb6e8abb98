"""PNG plots of benchmark results as speed-ups over a reference (matplotlib, the ``bench`` extra).

The text around the benchmarks is about ratios of 1.0-1.3x, which absolute log-log time axes
hide; so each panel plots, per token count T, ``reference time / series time`` (above 1: the
series is faster than the reference, usually the peer), one line per series, each with its own
colour and marker so that no two series look alike, a line at 1.0 and the legend below the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: markers cycled beside the colours (shifted by one on every pass through the colours)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">")


@dataclass
class Panel:
    """One shape: ``series`` maps a legend label to ``(tokens, microseconds)`` points; the
    ``reference`` series is what the others are divided by."""

    title: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    reference: str = "peer"
    emphasis: tuple[str, ...] = ("select",)  # labels drawn thicker (what select() picks)


def speedups(panel: Panel) -> dict[str, list[tuple[int, float]]]:
    """``label -> [(T, reference us / label us)]`` at every T both were measured, the
    reference itself left out (empty when the panel has no reference)."""
    ref = dict(panel.series.get(panel.reference, []))
    out: dict[str, list[tuple[int, float]]] = {}
    for label, points in panel.series.items():
        ratios = sorted((t, ref[t] / us) for t, us in points if label != panel.reference and t in ref and us > 0)
        if ratios:
            out[label] = ratios
    return out


def styles(count: int) -> list[tuple[tuple[float, float, float, float], str]]:
    """``count`` distinct (colour, marker) pairs: matplotlib's 20-colour qualitative map, and
    a marker that changes with every colour."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    n = 10 if count <= 10 else 20
    return [(cmap(i % n), MARKERS[(i + i // n) % len(MARKERS)]) for i in range(count)]


def plot_panels(panels: Sequence[Panel], path: Path) -> str | None:
    """Draw ``panels`` side by side into ``path``; ``None`` when drawn, else why not
    (matplotlib missing, no reference measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    drawn = [(p, speedups(p)) for p in panels if speedups(p)]
    if not drawn:
        return "no panel has both a reference and another series"
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 5.5), squeeze=False)
    for ax, (panel, ratios) in zip(axes[0], drawn, strict=True):
        for (label, points), (colour, marker) in zip(ratios.items(), styles(len(ratios)), strict=True):
            width = 2.5 if label in panel.emphasis else 1.2
            ax.plot(*zip(*points, strict=True), color=colour, marker=marker, linewidth=width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel(f"speed-up over {panel.reference} ({panel.reference} time / time)")
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
