"""Deliver what emitters left in a spool dir: ``fedrelay sync`` and emitter start-up.

Each producer directory is sent under its own producer name and ids, so the
relay drops whatever it had already stored: syncing twice, or syncing a
spool that was half delivered, stores every event exactly once.

Without an explicit spool directory, ``sync`` looks in the relay's own directory
(``<data>/fedrelay/spool/@ws-host-port``, after the first address), in the directories
of its other addresses and in the shared directory of the old layout, where it takes
only spools written for this relay (an address in common).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .client import Emitter
from .config import orphan_roots, resolve_spool_dir, resolve_urls, share_a_node, spool_urls
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


def _written_for(path: Path, urls: Sequence[str]) -> bool:
    """Whether a producer directory outside the relay's own holds events for the relay at ``urls``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and share_a_node(spool_urls(meta, ()), urls)


def spool_dirs(urls: Sequence[str], spool_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Producer directories to deliver to the relay at ``urls``: every one in the chosen (or the
    relay's own) directory, then those in its other addresses' directories and in the old shared
    directory that were written for this relay."""
    own, *others = orphan_roots(spool_dir, urls)
    paths = list(producer_dirs(own))
    for root in others:
        paths.extend(p for p in producer_dirs(root) if _written_for(p, urls))
    return paths


def sync_spool(
    url: str | Sequence[str] | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    *,
    timeout: float = 60.0,
    connect_attempts: int = 3,
    ca_file: str | os.PathLike[str] | None = None,
) -> SyncReport:
    """Send every unlocked producer spool for the relay at ``url`` (one address or several) to it."""
    target = resolve_urls(url)
    report = SyncReport(resolve_spool_dir(spool_dir, target[0]))
    paths = spool_dirs(target, spool_dir)
    for index, path in enumerate(paths):
        spool = Spool.adopt(path)
        if spool is None:  # a running emitter owns it; only its spilled events count
            waiting = spooled_events(path)
            report.busy += bool(waiting)
            report.remaining += waiting
            continue
        if not spool.found:
            spool.release()
            continue
        emitter = Emitter._adopt(
            spool, list(target), token, spool_dir=path.parent, give_up_after=connect_attempts, ca_file=ca_file
        )
        done = emitter.flush(timeout)
        emitter.close(timeout=1.0)
        stats = emitter.stats
        report.delivered += stats["acked"]
        report.bad_segments += stats["bad_segments"]
        if done:
            report.producers += 1
            continue
        left = spooled_events(spool.path)
        report.remaining += left
        if not emitter._ever_connected:
            report.error = emitter.last_error or f"cannot connect to {', '.join(emitter.urls)}"
            report.remaining += sum(spooled_events(p) for p in paths[index + 1 :])
            break
        report.error = emitter.last_error or f"{left} events not acked within {timeout:g}s"
    return report
