"""Federation health for the HTTP API, folded from the store off the event loop.

Nothing here runs per event: a request reads the run's round, client and error events from the
store (the reader connection's thread; other types are skipped inside SQLite), folds them in a
worker thread and judges them there. The last run's fold is kept, so the next page, or the next
look at a live run, reads only what was stored since. One fold at a time (a lock): memory is one
run's :class:`~fedrelay.federation.FederationHealth` (at most ``MAX_CELLS`` cells and
``MAX_DETAIL_TOTAL`` characters of failure detail) plus its last report, kept while nothing new
was stored and the straggler settings are the same, so that the next pages only encode.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from ..federation import FederationHealth, HealthReport
from .health_page import HealthQuery, encode_page
from .store_reads import API

if TYPE_CHECKING:
    from .eventlog import EventLog

FOLDED_TYPES = ("training_end", "round_start", "round_end", "client_progress", "client_complete", "error")
READ_ROWS = 5000
READ_BYTES = 4 << 20


def _fold(health: FederationHealth, rows: list[tuple[int, str]]) -> None:
    for _seq, body in rows:
        health.add(json.loads(body))


class HealthReader:
    """Answers ``/api/runs/{id}/clients`` pages; keeps the fold of the run asked about last."""

    def __init__(self, store: EventLog) -> None:
        self.store = store
        self._lock = asyncio.Lock()
        self._kept: tuple[str, int, FederationHealth] | None = None
        """(run id, seq read up to, fold)."""
        self._report: tuple[tuple[str, int, float, float], HealthReport] | None = None
        """The last report, while its run, position and settings hold: pages after the first
        only encode."""
        self.folds = 0
        """Folds started from seq 0 (for tests: a second page must not start over)."""

    async def page(self, run_id: str, committed_seq: int, query: HealthQuery) -> bytes:
        async with self._lock:
            if self._kept is not None and self._kept[0] == run_id and self._kept[1] <= committed_seq:
                _, position, health = self._kept
            else:
                self._kept = self._report = None  # free the previous run's fold before reading this one
                position, health = 0, FederationHealth()
                self.folds += 1
            while position < committed_seq:
                rows = await self.store.read(
                    run_id, position, committed_seq, READ_ROWS, READ_BYTES, queue=API, types=FOLDED_TYPES
                )
                if not rows:
                    break
                await asyncio.to_thread(_fold, health, rows)
                position = rows[-1][0]
            position = max(position, committed_seq)
            self._kept = (run_id, position, health)
            return await asyncio.to_thread(self._encode, run_id, health, query, position)

    def _encode(self, run_id: str, health: FederationHealth, query: HealthQuery, position: int) -> bytes:
        key = (run_id, position, query.factor, query.min_gap)
        if self._report is None or self._report[0] != key:
            self._report = None  # free the old one first
            self._report = (key, health.report(query.factor, query.min_gap))
        return encode_page(run_id, self._report[1], query, position)
