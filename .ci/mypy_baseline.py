"""mypy on the package against a baseline that may only shrink.

``python .ci/mypy_baseline.py`` runs mypy (configured in pyproject.toml) and compares its errors
with ``.ci/mypy-baseline.txt``, one ``path: message  [code]`` per line (line numbers left out,
so that an edit above an error does not move it). It fails on an error the baseline does not
list (new code must type-check) and on a baseline entry mypy no longer reports (a fixed error
is taken out of the baseline in the same commit). ``--write`` rewrites the baseline, refusing
while there are new errors (it writes the first one from scratch).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

BASELINE = Path(__file__).with_name("mypy-baseline.txt")
ERROR = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<message>.*)$")


def errors(mypy_output: str) -> Counter[str]:
    """The errors of ``mypy_output`` as ``path: message  [code]`` keys, counted."""
    found: Counter[str] = Counter()
    for line in mypy_output.splitlines():
        match = ERROR.match(line)
        if match:
            found[f"{match['path']}: {match['message']}"] += 1
    return found


def compare(current: Counter[str], baseline: Counter[str]) -> tuple[list[str], list[str]]:
    """``(new, fixed)``: errors not in the baseline, and baseline entries no longer reported."""
    return sorted((current - baseline).elements()), sorted((baseline - current).elements())


def read_baseline() -> Counter[str]:
    lines = BASELINE.read_text().splitlines() if BASELINE.exists() else []
    return Counter(line for line in lines if line and not line.startswith("#"))


def main(argv: list[str]) -> int:
    if importlib.util.find_spec("mypy") is None:  # `python -m mypy` would exit 1, as if it found errors
        print("mypy is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    run = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True)
    if run.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash)
        print(run.stdout + run.stderr, file=sys.stderr)
        return 2
    current, baseline = errors(run.stdout), read_baseline()
    new, fixed = compare(current, baseline)
    if new and (BASELINE.exists() or "--write" not in argv):
        print("mypy: errors the baseline does not list (fix them):", *new, sep="\n  ", file=sys.stderr)
        return 1
    if "--write" in argv:
        header = "# mypy errors not yet fixed; may only shrink (.ci/mypy_baseline.py)\n"
        BASELINE.write_text(header + "".join(f"{line}\n" for line in sorted(current.elements())))
        print(f"mypy: wrote {sum(current.values())} entries to {BASELINE}")
        return 0
    if fixed:
        print("mypy: fixed, take them out of the baseline (--write):", *fixed, sep="\n  ", file=sys.stderr)
        return 1
    print(f"mypy: clean but for the {sum(baseline.values())} baselined errors in {BASELINE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
