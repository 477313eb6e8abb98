"""Plain-text layout shared by the messages the library returns and the CLI that prints them."""

from __future__ import annotations

import textwrap

#: width of the text the library returns (``Selection.explain()``): a terminal's default
TEXT_WIDTH = 80


def wrap_lines(text: str, width: int = TEXT_WIDTH) -> str:
    """Each line of ``text`` wrapped to ``width``, continuation lines indented four columns
    under the line's own indent; words longer than ``width`` (paths) are not broken."""
    out = []
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        fill = textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
        out.append(fill if line.strip() else line)
    return "\n".join(out)
