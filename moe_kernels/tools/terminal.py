"""Terminal output of the CLI: wrapping to the terminal, aligned tables, sizes and times."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.1f} us"


def key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def terminal_width() -> int:
    return max(60, shutil.get_terminal_size((80, 24)).columns)


def wrap(text: str) -> str:
    """Each line wrapped to the terminal, continuation lines indented under their first word."""
    width = terminal_width()
    out = []
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        out.append(textwrap.fill(line, width, subsequent_indent=" " * (indent + 4)) if line.strip() else line)
    return "\n".join(out)


def aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is free text, wrapped to the terminal under itself
    (on its own lines below the row when the other columns leave it too little room)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    lead = sum(widths) + 2 * len(widths)
    room = terminal_width() - lead
    out = []
    for cells in [list(headers), ["-" * w for w in widths] + ["-" * len(headers[-1])], *map(list, rows)]:
        left = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
        if room >= 30:
            wrapped = textwrap.wrap(cells[-1], room) or [""]
            out.append(f"{left}  {wrapped[0]}".rstrip())
            out.extend(" " * lead + w for w in wrapped[1:])
        else:
            out.append(left.rstrip())
            out.extend(textwrap.wrap(cells[-1], terminal_width(), initial_indent="    ", subsequent_indent="    "))
    return "\n".join(out)
