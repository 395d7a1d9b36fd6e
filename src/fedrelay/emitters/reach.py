"""A mark in the spool directory saying that a relay was found unreachable, for fresh processes.

Under Flower's Deployment Engine every train/evaluate message runs in a new ``flwr-clientapp``
process, whose emitter would otherwise learn the relay is down only by trying, and waiting,
every time. ``<spool dir>/.reach-<relay key>`` holds the wall-clock time of the latest failure
to connect (or of a first connection that took longer than ``reach_timeout``, or whose TCP
connect nothing answered within ``connect_budget``, with one address); it is removed
when a connection succeeds. An emitter that starts while the mark is younger than
``MARK_TTL`` does not wait for acks (it spools instead) until it connects itself; it still
tries to connect at once, so a relay that is back is noticed by the first process that gets
through. Reading the mark costs one ``open()``; it is a hint, never a reason to lose events.

With several addresses the mark is about the list (``.reach-<first>+<hash of all>``): it is
written only when every address failed, so it never tells a process given two nodes that the
relay is down because one node is, nor a process given one node that it is up.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .config import relays_key

MARK_TTL = 600.0
"""Seconds a mark is trusted: one process per this period pays the connect budget when the
relay drops packets (no process then lives long enough to see its connect fail)."""


class ReachMark:
    """The mark file of one relay (its list of addresses) in one spool directory."""

    def __init__(self, spool_dir: Path, urls: Sequence[str]) -> None:
        self.path = spool_dir / f".reach-{relays_key(urls).lstrip('@')}"

    def down_recently(self, now: float | None = None) -> bool:
        """True when someone found the relay unreachable less than ``MARK_TTL`` seconds ago."""
        try:
            with open(self.path, encoding="ascii") as fh:
                since = float(fh.read(64) or "nan")
        except (OSError, ValueError):
            return False
        age = (time.time() if now is None else now) - since
        return 0 <= age < MARK_TTL

    def set(self, up: bool) -> None:
        """Record a failure now (written to a temporary name and renamed: readers never see half
        a mark; not fsynced, a lost mark only costs one wait), or remove the mark."""
        if up:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{time.time():.3f}", encoding="ascii")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
