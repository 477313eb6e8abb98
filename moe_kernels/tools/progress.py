"""Progress of long commands (``tune``, ``bench``) on stderr: done/total, elapsed, ETA (tqdm).

Messages go above the bar (``say``), so the log of what was measured stays readable and the bar
stays one line at the bottom; on a stream that is not a terminal (CI logs) tqdm prints the bar
only as it advances.
"""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm

from moe_kernels.core.text import TEXT_WIDTH


class Progress:
    """A bar over ``total`` units (measured points, experts) named ``what``, with ``say(msg)``
    for lines above it."""

    def __init__(self, total: int, what: str, unit: str = "point") -> None:
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, ncols=TEXT_WIDTH, leave=True)

    def say(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def advance(self, points: int = 1) -> None:
        self.bar.update(points)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.bar.close()
