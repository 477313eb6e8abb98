"""The mypy baseline check (.ci/mypy_baseline.py): new errors fail, fixed ones must leave."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mypy_baseline", ROOT / ".ci" / "mypy_baseline.py")
assert spec is not None and spec.loader is not None
baseline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline)

OUTPUT = """\
moe_kernels/a.py:10: error: Incompatible types in assignment  [assignment]
moe_kernels/a.py:12: note: see above
moe_kernels/a.py:40:5: error: Incompatible types in assignment  [assignment]
moe_kernels/b.py:3: error: "object" has no attribute "name"  [attr-defined]
Found 3 errors in 2 files (checked 2 source files)
"""


def test_errors_drop_line_numbers_and_count_repeats() -> None:
    assert baseline.errors(OUTPUT) == Counter(
        {
            "moe_kernels/a.py: Incompatible types in assignment  [assignment]": 2,
            'moe_kernels/b.py: "object" has no attribute "name"  [attr-defined]': 1,
        }
    )


def test_new_errors_and_fixed_ones_are_both_reported() -> None:
    current = baseline.errors(OUTPUT)
    known = Counter({"moe_kernels/a.py: Incompatible types in assignment  [assignment]": 1, "moe_kernels/c.py: x": 1})
    new, fixed = baseline.compare(current, known)
    assert new == [
        "moe_kernels/a.py: Incompatible types in assignment  [assignment]",
        'moe_kernels/b.py: "object" has no attribute "name"  [attr-defined]',
    ]
    assert fixed == ["moe_kernels/c.py: x"]
    assert baseline.compare(current, current) == ([], [])


def test_the_shipped_baseline_is_sorted_and_well_formed() -> None:
    lines = [line for line in baseline.BASELINE.read_text().splitlines() if not line.startswith("#")]
    assert lines == sorted(lines)
    assert all(re.fullmatch(r"moe_kernels/\S+\.py: .+  \[[a-z-]+\]", line) for line in lines)
