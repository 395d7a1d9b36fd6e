"""An emitter spool directory as the tests see it from outside."""

from __future__ import annotations

from pathlib import Path


def spooled_count(spool_dir: Path) -> int:
    """Events waiting in a spool dir: segment files are named ``FIRST-LAST-COUNT.seg``."""
    return sum(int(p.stem.rsplit("-", 1)[1]) for p in Path(spool_dir).glob("*/*.seg"))
