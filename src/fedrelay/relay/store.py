"""The event log on SQLite (WAL), written in batches off the producers' path.

Producers never wait for the disk: events queue in memory and one writer
task commits whatever has accumulated in a single transaction (group
commit). Each commit carries the events, the runs they touched and the
producers' dedup positions together, so a restart finds the three
consistent with each other.

The commit itself runs on the event loop, in one synchronous call: a
WAL append without fsync takes tens of microseconds per event, while
handing each statement to a worker thread (as aiosqlite does) costs a
GIL hand-off per statement, which under a busy loop means milliseconds
of delivery latency (bench/README.md has the measurements). Everything
that can take long runs through aiosqlite, off the loop: catch-up reads and
HTTP API reads on a connection each (store_reads.py), WAL checkpoints (their
fsyncs) on another, so that a long read never delays a checkpoint. The one fsync left on the
loop is the WAL header's, in the first commit after the WAL starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from ..schemas.wire import encode
from .eventlog import RUN_COLUMNS, Restored, StoreError, restored_run
from .hub import Run, Sequenced
from .store_reads import API, CATCH_UP, ReadQueue
from .store_repair import colliding_runs, reconcile_runs, renumber
from .write_queue import QueuedWrites, WriteQueue

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
    info        TEXT NOT NULL DEFAULT '{}',
    ledger      TEXT NOT NULL DEFAULT '{}'
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
CREATE INDEX IF NOT EXISTS producers_by_update ON producers (updated_at);
CREATE INDEX IF NOT EXISTS events_by_producer ON events (producer, producer_id)
    WHERE producer_id IS NOT NULL;
"""

_INSERT_EVENT = (
    "INSERT INTO events (run_id, seq, type, producer, producer_id, received_at, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_RUN = """
INSERT INTO runs (run_id, status, created_at, updated_at, started_at, ended_at, last_seq, info, ledger)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at,
    started_at = excluded.started_at, ended_at = excluded.ended_at,
    last_seq = excluded.last_seq, info = excluded.info, ledger = excluded.ledger
"""
_ADDED_COLUMNS = {"runs": [("ledger", "TEXT NOT NULL DEFAULT '{}'")]}
"""Columns newer than some databases: added at start."""
_READ_PAGE = """
SELECT seq, body FROM (
    SELECT seq, body, length(CAST(body AS BLOB)) AS size,
        sum(length(CAST(body AS BLOB))) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto_here
    FROM events WHERE run_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?
) WHERE upto_here - size < ?
"""
"""A page of a run: the rows whose UTF-8 bytes before them fit the cap (the first always does)."""
_STORED_VERSIONS = """
SELECT producer_id, seq, received_at, body FROM (
    SELECT producer_id, seq, received_at, body, length(CAST(body AS BLOB)) AS size,
        sum(length(CAST(body AS BLOB))) OVER (ORDER BY producer_id ROWS UNBOUNDED PRECEDING) AS upto_here
    FROM events WHERE producer = ? AND producer_id IN ({ids}) ORDER BY producer_id
) WHERE upto_here - size < ?
"""
"""Stored events of one producer by id, as many as fit a byte cap (the first always does)."""
_STORED_VERSIONS_IDS = 500
_STORED_VERSIONS_BYTES = 2 << 20
_READ_TYPES_PAGE = """
SELECT seq, body FROM (
    SELECT seq, body, length(CAST(body AS BLOB)) AS size,
        sum(length(CAST(body AS BLOB))) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto_here
    FROM events WHERE run_id = ? AND seq > ? AND seq <= ? AND type IN ({types}) ORDER BY seq LIMIT ?
) WHERE upto_here - size < ?
"""
"""The same page, only events of some types (the others skipped inside SQLite, never parsed)."""
_CHECKPOINT_EVERY = 1.0
"""Seconds between WAL checkpoints, run off the writer's connection."""
_WAL_RESTART_BYTES = 16 << 20
"""WAL size past which commits pause for a checkpoint that lets the log start over."""
_WAL_KEEP_FACTOR = 4
"""A WAL that starts over keeps its file up to this many times the restart size:
truncating it costs the next commit milliseconds on the loop, so only a WAL that
grew abnormally (a reader held it for long) is cut back."""
_HOLD_COMMITS_AT_MOST = 0.02
"""Seconds commits wait for that checkpoint before going on without it."""
_HOLD_COMMITS_ESCALATED = 1.0
"""...and for the one that runs once the WAL is past ``_WAL_KEEP_FACTOR`` times its restart
size: behind the catch-up reads already queued, on a disk that may be slow."""
_REPAIRS_KEPT = 20
"""Repaired runs /healthz lists, the latest ones."""
_BUSY_PATIENCE = 10.0
"""Seconds of "database is locked" before commits count as failing."""
_INT64_MAX = 2**63 - 1
_UPSERT_PRODUCER = """
INSERT INTO producers (name, last_id, updated_at) VALUES (?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    last_id = max(last_id, excluded.last_id), updated_at = excluded.updated_at
"""
_TOUCH_PRODUCER = "UPDATE producers SET updated_at = ? WHERE name = ? AND updated_at < ?"
_FORGET_PRODUCER = "DELETE FROM producers WHERE rowid = ?"
_IDLE_PRODUCERS = """
SELECT rowid, name, updated_at FROM producers
WHERE updated_at < ? AND (updated_at, rowid) > (?, ?)
ORDER BY updated_at, rowid LIMIT ?
"""
_FORGET_AT_START = """
DELETE FROM producers WHERE rowid IN (SELECT rowid FROM producers WHERE updated_at < ? LIMIT ?)
"""
_FORGET_AT_START_BATCH = 10_000
_FORGET_BATCH = 100
"""Producer rows touched or deleted per transaction: each is one short step on the loop."""
_FORGET_MAX_LAG = 10_000
"""Uncommitted events past which forgetting producers waits for the next pass: each batch
looks through them for the names it must keep."""


class EventStore(QueuedWrites):
    """Batched, ordered writes; reads for catch-up and the HTTP API (an :class:`EventLog`)."""

    shared = False
    """One relay owns the file (a lock file keeps others away): the hub hands out seqs."""

    def __init__(
        self,
        path: str | Path,
        *,
        runs: Mapping[str, Run],
        on_commit: Callable[[list[Sequenced]], None],
        max_batch: int = 2000,
        retain_events: int = 0,
        on_pruned: Callable[[str, int], None] | None = None,
        on_history_changed: Callable[[str, int], None] | None = None,
        wal_restart_bytes: int = _WAL_RESTART_BYTES,
        forget_producers_after: float = 0.0,
    ) -> None:
        self.path = str(path)
        self._runs = runs
        self._on_commit = on_commit
        self._on_pruned = on_pruned
        self._on_history_changed = on_history_changed
        """Called with (run_id, seq) when rows up to seq that this relay did not write were found."""
        self.repaired_runs: list[dict[str, Any]] = []
        """The last runs whose queued events had to move past foreign rows (for /healthz)."""
        self.queue = WriteQueue(max_batch)
        """Events accepted and not committed yet, and who waits for their commit."""
        self.retain_events = retain_events
        self.wal_restart_bytes = wal_restart_bytes
        self.forget_producers_after = forget_producers_after
        """Seconds after which a producer row not updated is deleted (0: never)."""
        self._forgetting_failed = False
        self._db: sqlite3.Connection | None = None
        """The writer's connection, used on the event loop thread only."""
        self.reads = {CATCH_UP: ReadQueue(CATCH_UP), API: ReadQueue(API)}
        """Catch-up reads and HTTP API reads, each on a connection of its own: a long read
        waits neither behind commits nor behind the other kind, nor delays them."""
        self._checkpointer: aiosqlite.Connection | None = None
        """WAL checkpoints: their own connection, so they never queue behind a read."""
        self._checkpoints: asyncio.Task[None] | None = None
        self._commits_open = asyncio.Event()
        self._commits_open.set()
        self._lock_file: int | None = None
        self._writer: asyncio.Task[None] | None = None
        self.failing: str | None = None
        """The last write error while commits are failing, with its likely cause, else None."""
        self._failure: str | None = None
        """The raw text of that error: the cause is looked for again only when it changes."""
        self._checkpoint_failing = False
        self.commits = 0
        self.busy_waits = 0
        """Commits put off because another connection held the write lock."""
        self.escalated_checkpoints = 0
        """WAL checkpoints that had to go through the reader's queue (see ``_checkpoint_loop``)."""
        self.last_commit_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> Restored:
        if self.path != MEMORY:
            try:
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory for {self.path}: {exc}") from exc
        # The resolved path: a symlink, ``..`` or a relative --db must find the same lock.
        target = str(Path(self.path).expanduser().resolve()) if self.path != MEMORY else MEMORY
        if self.path != MEMORY:
            self._lock_file = _lock_exclusively(target + ".lock")
        try:
            # isolation_level=None: BEGIN and COMMIT are explicit in _commit.
            self._db = sqlite3.connect(target, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # None: the writer runs on the loop, where a busy wait would stall
            # delivery; a lock held elsewhere is waited for in _write_loop.
            self._db.execute("PRAGMA busy_timeout=0")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_FACTOR * self.wal_restart_bytes}")
            if self._indexes_missing():
                log.info("store: indexing stored events by producer (once, on a database from before it)")
            self._db.executescript(_SCHEMA)
            if self.path != MEMORY:
                self._probe_write()
            self._add_columns()
            restored = self._restore()
            if self.path != MEMORY:
                # Checkpoints move to their own connection's thread: an automatic
                # one inside a commit stalls delivery for milliseconds.
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                for queue in self.reads.values():
                    queue.conn = await aiosqlite.connect(target)
                    await queue.conn.execute("PRAGMA busy_timeout=5000")
                    await queue.conn.execute("PRAGMA query_only=1")
                self._checkpointer = await aiosqlite.connect(target)
                await self._checkpointer.execute("PRAGMA busy_timeout=5000")
        except Exception as exc:
            await self._close_connections()
            why = diagnose(target) if self.path != MEMORY else ""
            raise StoreError(f"cannot open the event store {self.path}: {exc}{why}") from exc
        self._writer = asyncio.create_task(self._write_loop(), name="fedrelay-store-writer")
        if self._checkpointer is not None:
            self._checkpoints = asyncio.create_task(self._checkpoint_loop(), name="fedrelay-wal-checkpoints")
        return restored

    async def follow(self) -> None:
        """Nothing to catch up: this relay wrote every row (the hub delivers each commit)."""

    def _indexes_missing(self) -> bool:
        """An existing events table without the producer index: creating it reads every event."""
        assert self._db is not None
        names = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        return "events" in names and "events_by_producer" not in names

    def _probe_write(self) -> None:
        """Fail now, not at the first commit, when the database cannot be written.

        An existing database opens and reads fine from a read-only file (SQLite falls back to
        read-only), and needs no write at start: the relay would serve, accept and hold events
        it can never store. A rolled-back insert raises SQLITE_READONLY without touching disk.
        """
        assert self._db is not None
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return  # another process (a backup, the sqlite3 shell) is writing: it is writable
            raise
        try:
            self._db.execute("INSERT OR REPLACE INTO producers (name, last_id, updated_at) VALUES ('', 0, 0)")
        finally:
            self._db.execute("ROLLBACK")

    def _add_columns(self) -> None:
        """Bring a database made by an older relay up to this schema (new columns only)."""
        assert self._db is not None
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns:
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def _restore(self) -> Restored:
        assert self._db is not None
        runs = []
        query = f"SELECT {RUN_COLUMNS.format(seq='last_seq')} FROM runs ORDER BY created_at, rowid"
        for row in self._db.execute(query):
            runs.append(restored_run(row))
        by_id = {run.run_id: run for run in runs}
        reconciled = reconcile_runs(self._db, by_id)
        if reconciled:
            self._write_runs(reconciled)
            log.warning(
                "store: reconciled %d runs with their events (a runs row behind its highest seq, or "
                "missing): %s",
                len(reconciled),
                ", ".join(run.run_id for run in reconciled[:10]) + (" ..." if len(reconciled) > 10 else ""),
            )
            runs = sorted(by_id.values(), key=lambda run: run.created_at)
        forgotten = self._forget_at_start()
        producers = dict(self._db.execute("SELECT name, last_id FROM producers"))
        return Restored(runs, producers, forgotten)

    def _write_runs(self, runs: list[Run]) -> None:
        """Upsert runs rows as they are in memory (with their own ``last_seq``)."""
        assert self._db is not None
        self._db.execute("BEGIN")
        self._db.executemany(_UPSERT_RUN, [_run_row(run, run.last_seq) for run in runs])
        self._db.executemany(
            "UPDATE runs SET first_seq = ? WHERE run_id = ?", [(run.first_seq, run.run_id) for run in runs]
        )
        self._db.execute("COMMIT")

    def _forget_at_start(self) -> int:
        """Delete the producers idle past ``forget_producers_after`` before loading the rest.

        Nothing is connected yet and nothing is pending; the relay is not serving, so this
        delays only the start. In transactions of ``_FORGET_AT_START_BATCH`` rows: one
        transaction over a large table needs a WAL as large as the table, and a disk without
        that room must not keep the relay from starting. Whatever fails (a full disk, a lock
        held by another process) leaves the rest to housekeeping.
        """
        assert self._db is not None
        if not self.forget_producers_after > 0:
            return 0
        cutoff = time.time() - self.forget_producers_after
        forgotten = 0
        try:
            while deleted := self._db.execute(_FORGET_AT_START, (cutoff, _FORGET_AT_START_BATCH)).rowcount:
                forgotten += deleted
        except sqlite3.OperationalError as exc:
            log.warning("store: producers idle too long not all forgotten at start (%s); will retry", exc)
        if forgotten:
            log.info(
                "store: forgot %d producers idle for more than %g s (--forget-producers-after)",
                forgotten,
                self.forget_producers_after,
            )
        return forgotten

    async def close(self, timeout: float = 10.0) -> int:
        """Commit what is pending (within ``timeout``), then close.

        Returns how many accepted events could not be committed.
        """
        left = await self._finish_writes(timeout)
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(BaseException):
                await self._checkpoints
        await self._close_connections()
        return left

    async def _close_connections(self) -> None:
        for queue in self.reads.values():
            with contextlib.suppress(Exception):
                await queue.close()
        if self._checkpointer is not None:
            with contextlib.suppress(Exception):
                await self._checkpointer.close()
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = self._checkpointer = None
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the flock
            self._lock_file = None

    # -- writes ------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = 0.05
        busy_since: float | None = None
        queue = self.queue
        while True:
            if not queue.pending and not queue.runs_to_save:
                if queue.closing:
                    return
                queue.wakeup.clear()
                await queue.wakeup.wait()
                continue
            if not self._commits_open.is_set():
                await self._commits_open.wait()  # a checkpoint is letting the WAL start over
            batch = queue.next_batch()
            size = len(batch)
            try:
                self._commit(batch)
            except (sqlite3.IntegrityError, sqlite3.InterfaceError, ValueError, OverflowError) as exc:
                # A value SQLite cannot bind: retrying would jam every run.
                self._rollback()
                if self._defuse(batch, exc):
                    continue
                if isinstance(exc, sqlite3.IntegrityError) and self._move_past_foreign_rows(batch):
                    continue
                log.error("store: commit refused and no event to blame: %s", exc)
                self.failing = self._failure = str(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as exc:  # disk full, read-only, locked: keep and retry
                self._rollback()
                if _is_busy(exc):
                    # A checkpoint holds the write lock for a moment: wait without
                    # blocking the loop, and only call it failing if it lasts.
                    self.busy_waits += 1
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since < _BUSY_PATIENCE:
                        await asyncio.sleep(0.002)
                        continue
                if str(exc) != self._failure:  # "disk I/O error" alone does not say what to fix
                    self._failure = str(exc)
                    explained = f"{exc}{diagnose(self.path)}" if self.path != MEMORY else str(exc)
                    if self.failing is None:
                        log.error("store: commit failed, will retry: %s", explained)
                    self.failing = explained
                if queue.closing and backoff > 1.0:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            busy_since = None
            if self.failing is not None:
                log.warning("store: commits work again")
                self.failing = self._failure = None
            backoff = 0.05
            queue.committed(size)
            try:
                self._on_commit(batch)
            except Exception:
                log.exception("store: delivering a committed batch failed")
            queue.notify()
            await asyncio.sleep(0)  # let deliveries and producers run between commits

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(Exception):
                self._db.execute("ROLLBACK")

    def _move_past_foreign_rows(self, batch: list[Sequenced]) -> bool:
        """A batch collided with rows this relay did not write: renumber the colliding runs'
        queued events past them, so the batch (every run's part) commits on the next try.

        The foreign rows are committed, so the run's committed seq moves up to them and
        ``on_history_changed`` lets the relay page them to the run's live subscribers.
        Returns False when no run collides (the error has another cause).
        """
        assert self._db is not None
        try:
            taken = colliding_runs(self._db, batch)
        except sqlite3.Error as exc:
            log.error("store: cannot look for colliding seqs: %s", exc)
            return False
        for run_id, top in taken.items():
            run = self._runs[run_id]
            moved, grown = renumber(self.queue.pending, run_id, top + 1)
            self.queue.pending_chars += grown
            old_last = run.last_seq
            run.last_seq = top + moved
            log.error(
                "store: run %s already has seqs up to %d in the database that this relay did not write "
                "(another process, or a restored file); its %d queued events move from seq %d to %d on",
                run_id,
                top,
                moved,
                old_last - moved + 1,
                top + 1,
            )
            self.repaired_runs.append(
                {"run_id": run_id, "at": time.time(), "stored_up_to": top, "events_moved": moved}
            )
            del self.repaired_runs[:-_REPAIRS_KEPT]
            if self._on_history_changed is not None:
                self._on_history_changed(run_id, top)
        return bool(taken)

    def _defuse(self, batch: list[Sequenced], exc: Exception) -> bool:
        """Replace events SQLite cannot store by an ``error`` event at the same seq.

        The seq stays taken (subscribers see no hole) and the run says what
        happened, instead of one bad value blocking every later commit.
        """
        found = False
        for item in batch:
            if _storable(item):
                continue
            found = True
            log.error(
                "store: event %s/%d cannot be stored (%s); keeping an error in its place",
                item.run_id,
                item.seq,
                exc,
            )
            item.type = "error"
            item.producer_id = None
            self.queue.pending_chars -= len(item.body)
            item.body = encode(
                {
                    "type": "error",
                    "run_id": item.run_id,
                    "seq": item.seq,
                    "producer": item.producer,
                    "timestamp": datetime.fromtimestamp(item.received_at, UTC).isoformat(),
                    "data": {"message": "event could not be stored", "detail": str(exc)[:200]},
                }
            )
            item._legacy = None
            self.queue.pending_chars += len(item.body)
        return found

    async def _checkpoint_loop(self) -> None:
        """Fold the WAL back into the database once a second, off the loop's thread.

        A PASSIVE checkpoint never waits for the writer, but while commits keep
        coming it never copies the newest frames, and the WAL starts over only
        after a checkpoint has copied all of them: it would grow for ever. A
        RESTART checkpoint would take the write lock and stall every commit,
        and so delivery, for ~10 ms. Past ``wal_restart_bytes`` of WAL a second
        PASSIVE pass runs instead while commits (not the loop) pause: it copies
        only what was written since the first, ~1 ms, and the next commit
        starts the WAL from the beginning. That pass can fail to catch up: a
        slow disk makes it outlast its hold, a catch-up read in flight keeps
        frames it still needs. Past ``_WAL_KEEP_FACTOR`` times the restart size
        the pass waits for its turn in both read queues (no read in flight on
        either reader) and commits wait up to ``_HOLD_COMMITS_ESCALATED`` for
        it: a rare, longer pause that keeps the WAL bounded whatever the load.
        """
        assert self._checkpointer is not None
        async with self._checkpointer.execute("PRAGMA page_size") as cursor:
            row = await cursor.fetchone()
        frame_bytes = (row[0] if row else 4096) + 24  # each WAL frame: a page and its header
        finishing: asyncio.Future[Any] | None = None
        while True:
            await asyncio.sleep(_CHECKPOINT_EVERY)
            try:
                if finishing is not None:  # the last held pass outlived its hold
                    await finishing
                    finishing = None
                checkpointer = self._checkpointer
                # ``frames`` counts the WAL as the checkpoint found it; commits during it add more.
                frames = await _checkpoint(checkpointer)
                wal_bytes = frames * frame_bytes
                if wal_bytes > _WAL_KEEP_FACTOR * self.wal_restart_bytes:
                    self.escalated_checkpoints += 1
                    finishing = await self._checkpoint_holding_commits(
                        self._checkpoint_between_reads(), _HOLD_COMMITS_ESCALATED
                    )
                elif wal_bytes > self.wal_restart_bytes:
                    finishing = await self._checkpoint_holding_commits(
                        _checkpoint(checkpointer), _HOLD_COMMITS_AT_MOST
                    )
            except Exception as exc:
                finishing = None
                # Once per episode: a read-only or full disk would otherwise log every second.
                if not self._checkpoint_failing:
                    log.warning("store: WAL checkpoint failed, will retry: %s", exc)
                self._checkpoint_failing = True
                continue
            if self._checkpoint_failing:
                log.warning("store: WAL checkpoints work again")
                self._checkpoint_failing = False

    async def _checkpoint_between_reads(self) -> int:
        """A checkpoint once no read is in flight on either reader: a read keeps the WAL
        frames of its snapshot, so a checkpoint beside it cannot let the WAL start over."""
        catch_up, api = self.reads[CATCH_UP], self.reads[API]
        async with api.turn, catch_up.turn:
            assert catch_up.conn is not None
            return await _checkpoint(catch_up.conn)

    async def _checkpoint_holding_commits(
        self, checkpoint_pass: Coroutine[Any, Any, int], hold: float
    ) -> asyncio.Future[Any] | None:
        """A PASSIVE checkpoint with no commit in between; commits wait at most ``hold``
        seconds for it. Returns the checkpoint if it is still running."""
        self._commits_open.clear()
        try:
            # No commit is running: commits run on this loop, in one call.
            checkpoint = asyncio.ensure_future(checkpoint_pass)
            done, _ = await asyncio.wait((checkpoint,), timeout=hold)
        finally:
            self._commits_open.set()
        if done:
            checkpoint.result()
            return None
        return checkpoint

    def _commit(self, batch: list[Sequenced]) -> None:
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
        run_seqs = dict(last_seqs)
        for run_id in self.queue.runs_to_save.difference(last_seqs):
            run = self._runs.get(run_id)
            if run is not None:
                run_seqs[run_id] = run.committed_seq
        db.execute("BEGIN")
        db.executemany(_INSERT_EVENT, rows)
        db.executemany(_UPSERT_RUN, [_run_row(self._runs[run], last) for run, last in run_seqs.items()])
        if positions:
            db.executemany(_UPSERT_PRODUCER, [(name, last, now) for name, last in positions.items()])
        pruned = self._prune(last_seqs) if self.retain_events else []
        db.execute("COMMIT")
        self.queue.runs_to_save.clear()  # only now: a failed commit keeps them for the retry
        self.commits += 1
        self.last_commit_seconds = time.perf_counter() - started
        for run_id, first_seq in pruned:
            if self._on_pruned is not None:
                self._on_pruned(run_id, first_seq)

    def _prune(self, last_seqs: dict[str, int]) -> list[tuple[str, int]]:
        """Keep at most ``retain_events`` per run; prune in chunks, not per event."""
        assert self._db is not None
        pruned = []
        slack = max(1, self.retain_events // 10)
        for run_id, last_seq in last_seqs.items():
            first_seq = self._runs[run_id].first_seq
            if last_seq - first_seq + 1 <= self.retain_events + slack:
                continue
            new_first = last_seq - self.retain_events + 1
            self._db.execute("DELETE FROM events WHERE run_id = ? AND seq < ?", (run_id, new_first))
            self._db.execute("UPDATE runs SET first_seq = ? WHERE run_id = ?", (new_first, run_id))
            pruned.append((run_id, new_first))
        return pruned

    # -- forgetting idle producers -------------------------------------------

    async def forget_producers(
        self,
        *,
        seen: Iterable[str],
        keep: Callable[[str], bool],
        on_forgotten: Callable[[list[str]], None],
    ) -> int | None:
        """Delete the rows of producers idle past ``forget_producers_after``.

        First the rows of ``seen`` (producers connected since the last pass) are marked as
        updated now: a producer counts as idle from its last commit or the last pass that
        saw it connected, and that survives a relay restart. Then rows older than the
        cutoff are deleted, except the names ``keep`` holds (an open connection) and those
        with events waiting in the queue. ``on_forgotten`` gets each batch's names in the
        same step as their deletion, so no ``hello`` can report a position the table no
        longer has.

        Runs on the writer's connection between commits, in transactions of at most
        ``_FORGET_BATCH`` rows, giving the loop back between them: a commit waits for one
        small batch at most (a few milliseconds on a table of a million names). Returns how
        many producers were forgotten, or None when the pass stopped early (commits failing
        or closing, the database locked by another process, too much pending); the next
        pass goes on.
        """
        if not self.forget_producers_after > 0:
            return 0
        now = time.time()
        cutoff = now - self.forget_producers_after
        names = list(seen)
        forgotten = 0
        try:
            for start in range(0, len(names), _FORGET_BATCH):
                touch = [(now, name, now) for name in names[start : start + _FORGET_BATCH]]
                if not await self._between_commits():
                    return None
                self._in_transaction(_TOUCH_PRODUCER, touch)
            after: tuple[float, int] = (float("-inf"), -_INT64_MAX - 1)
            while True:
                if not await self._between_commits():
                    return None
                assert self._db is not None
                rows = self._db.execute(_IDLE_PRODUCERS, (cutoff, *after, _FORGET_BATCH)).fetchall()
                if not rows:
                    if self._forgetting_failed:
                        log.warning("store: forgetting idle producers works again")
                        self._forgetting_failed = False
                    return forgotten
                after = (rows[-1][2], rows[-1][0])
                if self.queue.lag > _FORGET_MAX_LAG:
                    return None
                waiting = self.queued_producers()
                doomed = [(rowid, name) for rowid, name, _ in rows if name not in waiting and not keep(name)]
                if doomed:
                    self._in_transaction(_FORGET_PRODUCER, [(rowid,) for rowid, _ in doomed])
                    on_forgotten([name for _, name in doomed])
                    forgotten += len(doomed)
        except Exception as exc:
            self._rollback()
            if _is_busy(exc):  # another process writes: the next pass tries again
                return None
            if not self._forgetting_failed:  # once per episode, like checkpoint failures
                log.warning("store: forgetting idle producers failed, will retry: %s", exc)
            self._forgetting_failed = True
            return None

    async def _between_commits(self) -> bool:
        """Wait for a moment when the writer's connection may run other statements (commits
        flowing, no checkpoint holding them, no transaction open); False if there is none now."""
        await asyncio.sleep(0)  # a commit that is due goes first
        if not self._commits_open.is_set():
            await self._commits_open.wait()
        return (
            self._db is not None
            and not self.queue.closing
            and self.failing is None
            and not self._db.in_transaction
        )

    def _in_transaction(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        self._db.execute("BEGIN")
        self._db.executemany(statement, rows)
        self._db.execute("COMMIT")

    # -- reads -------------------------------------------------------------

    async def read(
        self,
        run_id: str,
        after: int,
        upto: int,
        limit: int,
        max_bytes: int = 4 << 20,
        *,
        queue: str = CATCH_UP,
        wanted: Callable[[], bool] | None = None,
        types: tuple[str, ...] = (),
    ) -> list[tuple[int, str]] | None:
        """Stored events of a run with ``after < seq <= upto``, oldest first.

        ``upto`` is the run's committed seq: rows past it may belong to a
        commit in flight. At most ``limit`` rows, and no more rows than fit
        in ``max_bytes`` of UTF-8 (but at least one). None when ``wanted()``
        (asked once the read's turn comes in its ``queue``) says the reader is gone.
        ``types``: only events of these types.
        """
        if types:
            sql = _READ_TYPES_PAGE.format(types=", ".join("?" * len(types)))
            params: tuple[Any, ...] = (run_id, after, upto, *types, limit, max(1, max_bytes))
            return await self._fetch(queue, sql, params, wanted)
        return await self._fetch(queue, _READ_PAGE, (run_id, after, upto, limit, max(1, max_bytes)), wanted)

    async def stored_versions(self, producer: str, ids: list[int]) -> dict[int, tuple[int, float, str]]:
        """The stored ``(seq, received_at, body)`` of a producer's events by id; ids with no row
        (refused, pruned, never stored) are absent. Read in pages of at most 2 MiB of bodies, on
        the catch-up reader: the check of a resent frame costs that much memory at most."""
        found: dict[int, tuple[int, float, str]] = {}
        wanted = sorted(set(ids))
        while wanted:
            chunk = wanted[:_STORED_VERSIONS_IDS]
            sql = _STORED_VERSIONS.format(ids=",".join("?" * len(chunk)))
            rows = await self._fetch(CATCH_UP, sql, (producer, *chunk, _STORED_VERSIONS_BYTES))
            assert rows is not None
            for producer_id, seq, received_at, body in rows:
                found[producer_id] = (seq, received_at, body)
            last = rows[-1][0] if rows else chunk[-1]
            wanted = [i for i in wanted if i > last]
        return found

    async def last_seq(self, run_id: str) -> int:
        """The highest seq stored for ``run_id`` (0 for a run with none)."""
        rows = await self._fetch(CATCH_UP, "SELECT last_seq FROM runs WHERE run_id = ?", (run_id,))
        return rows[0][0] if rows else 0

    async def producer_position(self, producer: str) -> int | None:
        """The stored position of ``producer`` (what ``hello.last_id`` reports)."""
        rows = await self._fetch(CATCH_UP, "SELECT last_id FROM producers WHERE name = ?", (producer,))
        return rows[0][0] if rows else None

    async def _fetch(
        self, queue: str, sql: str, params: tuple[Any, ...], wanted: Callable[[], bool] | None = None
    ) -> list[Any] | None:
        reads = self.reads[queue]
        if reads.conn is not None:
            return await reads.fetch(sql, params, wanted)
        if self._db is not None and self.path == MEMORY:  # in memory: no disk to wait for
            if wanted is not None and not wanted():
                reads.skipped += 1
                return None
            reads.done += 1
            return self._db.execute(sql, params).fetchall()
        raise StoreError("the event store is closed")


def _run_row(run: Run, last_seq: int) -> tuple[Any, ...]:
    """A ``runs`` row for ``_UPSERT_RUN``: the run's summary, stored up to ``last_seq``."""
    return (
        run.run_id,
        run.status,
        run.created_at,
        run.updated_at,
        run.started_at,
        run.ended_at,
        last_seq,
        json.dumps(run.info, allow_nan=False, default=str),
        run.ledger.to_json(),
    )


async def _checkpoint(conn: aiosqlite.Connection) -> int:
    """One PASSIVE checkpoint; returns the frames the WAL held when it started."""
    async with conn.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
        row = await cursor.fetchone()
    return int(row[1]) if row else 0


def diagnose(path: str) -> str:
    """Why writes to the database at ``path`` may fail, as a suffix for the error text.

    SQLite reports a full disk, an exceeded file size limit and a read-only file alike as
    "disk I/O error" (or "unable to open database file"); an operator needs to know which. Looks
    at what can be checked without writing: the files' write access (``O_WRONLY`` opens nothing
    new; root is refused too when the file is immutable), whether the directory takes new files
    (``-wal``/``-shm``), the process's RLIMIT_FSIZE and the free space.
    """
    db = Path(path).expanduser()
    causes: list[str] = []
    for file in (db, Path(f"{db}-wal")):
        try:
            os.close(os.open(file, os.O_WRONLY))
        except FileNotFoundError:
            pass
        except OSError as exc:
            causes.append(f"{file.name} is read-only ({exc.strerror})")
    probe = db.parent / f".{db.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            causes.append(
                f"cannot create files in {db.parent} ({exc.strerror}); SQLite needs "
                f"{db.name}-wal and {db.name}-shm next to the database"
            )
    limit = _file_size_limit()
    if limit is not None:
        sizes = []
        for file in (db, Path(f"{db}-wal")):
            with contextlib.suppress(OSError):
                sizes.append(f"{file.name} {file.stat().st_size} bytes")
        causes.append(f"the file size limit (RLIMIT_FSIZE) is {limit} bytes (now {', '.join(sizes)})")
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(db.parent).free
        if free < 16 << 20:
            causes.append(f"the disk is full ({free} bytes free)")
    return f" ({'; '.join(causes)})" if causes else ""


def _file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE soft limit, None when unlimited (or not on POSIX)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - Windows
        return None
    return None if limit == resource.RLIM_INFINITY else limit


def _storable(item: Sequenced) -> bool:
    try:
        item.body.encode("utf-8")
        item.run_id.encode("utf-8")
        item.producer.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return item.producer_id is None or 0 <= item.producer_id <= _INT64_MAX


def _is_busy(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _lock_exclusively(path: str) -> int | None:
    """One relay per database: two would hand out the same seqs."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"another relay is using this database ({path} is locked); give each relay its own --db"
        ) from None
    return fd
