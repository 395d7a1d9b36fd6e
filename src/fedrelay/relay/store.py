"""The event log on SQLite (aiosqlite, WAL), written in batches off the hot path.

Producers never wait for the disk: events queue in memory and one writer
task commits whatever has accumulated in a single transaction (group
commit). Each commit carries the events, the runs they touched and the
producers' dedup positions together, so a restart finds the three
consistent with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from .hub import Run, Sequenced

log = logging.getLogger("fedrelay.store")

MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    started_at  REAL,
    ended_at    REAL,
    last_seq    INTEGER NOT NULL,
    first_seq   INTEGER NOT NULL DEFAULT 1,
    info        TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    run_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    type        TEXT NOT NULL,
    producer    TEXT NOT NULL,
    producer_id INTEGER,
    received_at REAL NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producers (
    name        TEXT PRIMARY KEY,
    last_id     INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
"""

_INSERT_EVENT = (
    "INSERT INTO events (run_id, seq, type, producer, producer_id, received_at, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_RUN = """
INSERT INTO runs (run_id, status, created_at, updated_at, started_at, ended_at, last_seq, info)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at,
    started_at = excluded.started_at, ended_at = excluded.ended_at,
    last_seq = excluded.last_seq, info = excluded.info
"""
_UPSERT_PRODUCER = """
INSERT INTO producers (name, last_id, updated_at) VALUES (?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    last_id = max(last_id, excluded.last_id), updated_at = excluded.updated_at
"""


@dataclass(slots=True)
class Restored:
    """What a relay restart reads back: runs and dedup positions."""

    runs: list[Run]
    producers: dict[str, int]


class StoreError(RuntimeError):
    """The database cannot be opened or used."""


class EventStore:
    """Batched, ordered writes; reads for catch-up and the HTTP API."""

    def __init__(
        self,
        path: str | Path,
        *,
        runs: Mapping[str, Run],
        on_commit: Callable[[list[Sequenced]], None],
        max_batch: int = 5000,
        retain_events: int = 0,
        on_pruned: Callable[[str, int], None] | None = None,
    ) -> None:
        self.path = str(path)
        self._runs = runs
        self._on_commit = on_commit
        self._on_pruned = on_pruned
        self.max_batch = max_batch
        self.retain_events = retain_events
        self._db: aiosqlite.Connection | None = None
        self._pending: deque[Sequenced] = deque()
        self._appended = 0
        self._committed = 0
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.failing: str | None = None
        """The last write error while commits are failing, else None."""
        self.commits = 0
        self.last_commit_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> Restored:
        if self.path != MEMORY:
            try:
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory for {self.path}: {exc}") from exc
        try:
            self._db = await aiosqlite.connect(
                str(Path(self.path).expanduser()) if self.path != MEMORY else MEMORY
            )
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA busy_timeout=5000")
            await self._db.executescript(_SCHEMA)
            await self._db.commit()
            restored = await self._restore()
        except Exception as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            raise StoreError(f"cannot open the event store {self.path}: {exc}") from exc
        self._writer = asyncio.create_task(self._write_loop(), name="fedrelay-store-writer")
        return restored

    async def _restore(self) -> Restored:
        assert self._db is not None
        runs = []
        query = (
            "SELECT run_id, status, created_at, updated_at, started_at, ended_at,"
            " last_seq, first_seq, info FROM runs"
        )
        async with self._db.execute(query) as cursor:
            async for row in cursor:
                run = Run(
                    run_id=row[0],
                    status=row[1],
                    created_at=row[2],
                    updated_at=row[3],
                    started_at=row[4],
                    ended_at=row[5],
                    info=json.loads(row[8]),
                )
                run.last_seq = row[6]
                run.first_seq = row[7]
                runs.append(run)
        async with self._db.execute("SELECT name, last_id FROM producers") as cursor:
            producers = {row[0]: row[1] async for row in cursor}
        return Restored(runs, producers)

    async def close(self, timeout: float = 10.0) -> None:
        """Commit what is pending (within ``timeout``), then close."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, timeout)
            except (TimeoutError, asyncio.CancelledError):
                log.error("store: %d events not committed at shutdown", len(self._pending))
        if self._db is not None:
            await self._db.close()
            self._db = None

    # -- writes ------------------------------------------------------------

    @property
    def lag(self) -> int:
        """Events accepted but not yet committed."""
        return len(self._pending)

    def append(self, items: list[Sequenced]) -> None:
        if not items:
            return
        self._pending.extend(items)
        self._appended += len(items)
        self._wakeup.set()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything appended so far is committed."""
        if self._appended == self._committed:
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._waiters.append((self._appended, callback))

    async def wait_for_room(self, limit: int) -> None:
        """Hold a producer while more than ``limit`` events wait for the disk."""
        while len(self._pending) > limit and self._writer is not None and not self._writer.done():
            self._progress.clear()
            await self._progress.wait()

    async def _write_loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            size = min(len(self._pending), self.max_batch)
            batch = [self._pending[i] for i in range(size)]
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disk full, read-only, locked: keep and retry
                if self.failing is None:
                    log.error("store: commit failed, will retry: %s", exc)
                self.failing = str(exc)
                if self._db is not None:
                    with contextlib.suppress(Exception):
                        await self._db.rollback()
                if self._closing and backoff > 1.0:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if self.failing is not None:
                log.warning("store: commits work again")
                self.failing = None
            backoff = 0.05
            for _ in range(size):
                self._pending.popleft()
            self._committed += size
            self._progress.set()
            try:
                self._on_commit(batch)
            except Exception:
                log.exception("store: delivering a committed batch failed")
            while self._waiters and self._waiters[0][0] <= self._committed:
                self._waiters.popleft()[1]()

    async def _commit(self, batch: list[Sequenced]) -> None:
        db = self._db
        assert db is not None
        started = time.perf_counter()
        now = time.time()
        last_seqs: dict[str, int] = {}
        positions: dict[str, int] = {}
        rows = []
        for item in batch:
            rows.append(
                (
                    item.run_id,
                    item.seq,
                    item.type,
                    item.producer,
                    item.producer_id,
                    item.received_at,
                    item.body,
                )
            )
            last_seqs[item.run_id] = item.seq
            if item.producer_id is not None:
                positions[item.producer] = item.producer_id
        await db.executemany(_INSERT_EVENT, rows)
        run_rows = []
        for run_id, last_seq in last_seqs.items():
            run = self._runs[run_id]
            run_rows.append(
                (
                    run_id,
                    run.status,
                    run.created_at,
                    run.updated_at,
                    run.started_at,
                    run.ended_at,
                    last_seq,
                    json.dumps(run.info, allow_nan=False, default=str),
                )
            )
        await db.executemany(_UPSERT_RUN, run_rows)
        if positions:
            await db.executemany(
                _UPSERT_PRODUCER, [(name, last, now) for name, last in positions.items()]
            )
        pruned = await self._prune(last_seqs) if self.retain_events else []
        await db.commit()
        self.commits += 1
        self.last_commit_seconds = time.perf_counter() - started
        for run_id, first_seq in pruned:
            if self._on_pruned is not None:
                self._on_pruned(run_id, first_seq)

    async def _prune(self, last_seqs: dict[str, int]) -> list[tuple[str, int]]:
        """Keep at most ``retain_events`` per run; prune in chunks, not per event."""
        assert self._db is not None
        pruned = []
        slack = max(1, self.retain_events // 10)
        for run_id, last_seq in last_seqs.items():
            first_seq = self._runs[run_id].first_seq
            if last_seq - first_seq + 1 <= self.retain_events + slack:
                continue
            new_first = last_seq - self.retain_events + 1
            await self._db.execute(
                "DELETE FROM events WHERE run_id = ? AND seq < ?", (run_id, new_first)
            )
            await self._db.execute(
                "UPDATE runs SET first_seq = ? WHERE run_id = ?", (new_first, run_id)
            )
            pruned.append((run_id, new_first))
        return pruned

    # -- reads -------------------------------------------------------------

    async def read(self, run_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        """Stored events of a run with seq > ``after``, oldest first."""
        assert self._db is not None
        async with self._db.execute(
            "SELECT seq, body FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (run_id, after, limit),
        ) as cursor:
            return list(await cursor.fetchall())  # type: ignore[arg-type]
