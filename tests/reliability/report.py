"""Figures the reliability suite measures, for docs/reliability.md.

Each test calls :func:`record` with what it did (faults injected, events checked, frames
fuzzed, memory before/after...). With ``FEDRELAY_RELIABILITY_REPORT=path`` set, the figures are
appended to that file as JSON lines; ``python -m tests.reliability.report path`` sums them up.
``FEDRELAY_RELIABILITY_SCALE=N`` (default 1) multiplies iterations and durations: the CI run
is scale 1, the documented longer run a larger N.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def scale() -> float:
    """How much longer than the CI run to go: ``FEDRELAY_RELIABILITY_SCALE``, at least 1."""
    raw = os.environ.get("FEDRELAY_RELIABILITY_SCALE", "1")
    try:
        return max(1.0, float(raw))
    except ValueError:
        raise ValueError(f"FEDRELAY_RELIABILITY_SCALE={raw!r} is not a number") from None


def record(test: str, **figures: Any) -> None:
    """Keep one test's figures; printed too, so ``pytest -s`` shows them."""
    line = json.dumps({"test": test, "at": time.time(), **figures}, sort_keys=True)
    print(f"\n[reliability] {line}")
    path = os.environ.get("FEDRELAY_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def main(path: str) -> None:
    """Print every recorded line, grouped by test."""
    with open(path, encoding="utf-8") as src:
        for line in src:
            row = json.loads(line)
            name = row.pop("test")
            row.pop("at", None)
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(row.items())))


if __name__ == "__main__":
    main(sys.argv[1])
