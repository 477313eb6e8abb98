"""Terminal output of the CLI: wrapping to the terminal, aligned tables, sizes and times."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence

import torch

from moe_kernels.core.text import wrap_lines


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.1f} us"


def key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    """``  key  value`` lines, values wrapped to the terminal under themselves."""
    width = max(len(k) for k, _ in rows)
    room = max(terminal_width() - width - 4, 20)
    indent = " " * (width + 4)
    lines = []
    for k, v in rows:
        wrapped = textwrap.wrap(v, room, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"  {k:<{width}}  {wrapped[0]}")
        lines.extend(indent + w for w in wrapped[1:])
    return "\n".join(lines)


def terminal_width() -> int:
    return max(60, shutil.get_terminal_size((80, 24)).columns)


def wrap(text: str) -> str:
    """Each line wrapped to the terminal, continuation lines indented under their first word."""
    return wrap_lines(text, terminal_width())


def aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last column is free text, wrapped to the terminal under itself
    or, when the other columns leave it too little room, indented on the lines below its row
    (its header then says so instead of taking a line of its own)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    lead = sum(widths) + 2 * len(widths)
    room = terminal_width() - lead
    below = room < 30
    head = [*headers[:-1], f"({headers[-1]}: below)" if below else headers[-1]]
    if below and lead + len(head[-1]) > terminal_width():
        head[-1] = ""
    out = [
        _table_row(head, widths, room, below=False),
        _table_row(["-" * w for w in widths] + ["-" * len(head[-1]) * (not below)], widths, room, below=False),
    ]
    out.extend(_table_row(list(cells), widths, room, below=below) for cells in rows)
    return "\n".join(out)


def _table_row(cells: list[str], widths: Sequence[int], room: int, *, below: bool) -> str:
    left = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
    if below:
        indented = textwrap.wrap(cells[-1], terminal_width(), initial_indent="    ", subsequent_indent="    ")
        return "\n".join([left.rstrip(), *indented])
    wrapped = textwrap.wrap(cells[-1], max(room, 1)) or [""]
    lead = sum(widths) + 2 * len(widths)
    return "\n".join([f"{left}  {wrapped[0]}".rstrip(), *(" " * lead + w for w in wrapped[1:])])
