"""Deliver what emitters left in a spool dir: ``fedrelay sync`` and emitter start-up.

Each producer directory is sent under its own producer name and ids, so the
relay drops whatever it had already stored: syncing twice, or syncing a
spool that was half delivered, stores every event exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .client import Emitter
from .config import resolve_spool_dir
from .spool import Spool, producer_dirs, spooled_events


@dataclass
class SyncReport:
    spool_dir: Path
    delivered: int = 0
    """Events the relay acked (stored now, or found already stored)."""
    producers: int = 0
    """Producer spools delivered in full and removed."""
    remaining: int = 0
    """Events still in the spool dir."""
    busy: int = 0
    """Producer spools locked by a running emitter, left alone."""
    bad_segments: int = 0
    """Unreadable segments set aside as ``*.seg.bad`` (their events were skipped)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.remaining == 0 and self.busy == 0


def sync_spool(
    url: str | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    timeout: float = 60.0,
    connect_attempts: int = 3,
) -> SyncReport:
    """Send every unlocked producer spool under ``spool_dir`` to the relay at ``url``."""
    root = resolve_spool_dir(spool_dir)
    report = SyncReport(root)
    paths = list(producer_dirs(root))
    for index, path in enumerate(paths):
        spool = Spool.adopt(path)
        if spool is None:  # a running emitter owns it; only its spilled events count
            waiting = spooled_events(path)
            report.busy += bool(waiting)
            report.remaining += waiting
            continue
        if not spool.segments:
            spool.release()
            continue
        emitter = Emitter._adopt(spool, url, token, spool_dir=root, give_up_after=connect_attempts)
        done = emitter.flush(timeout)
        emitter.close(timeout=1.0)
        report.delivered += emitter.stats["acked"]
        report.bad_segments += emitter.stats["bad_segments"]
        if done:
            report.producers += 1
            continue
        report.remaining += spool.count
        if not emitter._ever_connected:
            report.error = emitter.last_error or f"cannot connect to {emitter.url}"
            report.remaining += sum(spooled_events(p) for p in paths[index + 1 :])
            break
        report.error = emitter.last_error or f"{spool.count} events not acked within {timeout:g}s"
    return report
