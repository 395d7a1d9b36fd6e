"""The event log on PostgreSQL (asyncpg), shared by several relay processes.

Writes are group commits as on SQLite: events queue in memory and one writer task commits
what has accumulated in one transaction. That transaction takes the counter rows of the runs
it touches (``SELECT ... FOR UPDATE``, in run_id order, so two nodes never deadlock), drops
the events whose ``(producer, producer_id)`` is already stored (by any node: the unique index
decides), numbers the rest from the counters, inserts them, moves the counters and the
producers' positions, and sends ``NOTIFY``. Seqs are therefore gap-free and increasing per
run across nodes, and each ``(producer, id)`` is stored once. Acks wait for the commit.

Committed batches reach the hub only through :class:`~.feed.CommitFeed`, this node's and the
others' alike. A batch whose commit failed (the database restarting, a network cut) stays
queued and is retried with backoff; if it had in fact committed, the retry finds its ids
stored and inserts nothing, and the feed delivers the rows from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..eventlog import RUN_COLUMNS, Restored, StoreError, restored_run
from ..hub import Run, Sequenced, with_seq
from ..write_queue import QueuedWrites, WriteQueue
from .conn import ACQUIRE_TIMEOUT, close_pool, execute, fetch, read_rows
from .feed import CHANNEL, CommitFeed
from .schema import HOUSEKEEPING_LOCK, migrate

log = logging.getLogger("fedrelay.store")

COMMAND_TIMEOUT = 10.0
"""Seconds a statement may take: a network cut with no reset shows as a failed commit."""
CONNECT_TIMEOUT = 5.0
SLOW_COMMIT = 5.0
"""Seconds a commit may be in flight before /healthz calls the store failing."""
_BACKOFF_MAX = 2.0
_RACES_RETRIED_AT_ONCE = 3
"""Batches retried at once after a unique violation; past that, with backoff, as a failure."""
_FORGET_BATCH = 100

_COMMIT = f"""
WITH given AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::float8[], $6::text[])
        WITH ORDINALITY AS x(run_id, type, producer, producer_id, received_at, body, ord)
),
input AS (
    SELECT *, row_number() OVER (PARTITION BY producer, producer_id ORDER BY ord) AS nth FROM given
),
fresh AS (
    SELECT i.run_id, i.type, i.producer, i.producer_id, i.received_at, i.body, i.ord FROM input i
    WHERE i.producer_id IS NULL OR (i.nth = 1 AND NOT EXISTS (
        SELECT 1 FROM events e WHERE e.producer = i.producer AND e.producer_id = i.producer_id))
),
counts AS (
    SELECT run_id, count(*) AS n, (array_agg(received_at ORDER BY ord))[1] AS created_at
    FROM fresh GROUP BY run_id
),
bumped AS (
    INSERT INTO runs AS r (run_id, last_seq, created_at, updated_at)
    SELECT run_id, n, created_at, created_at FROM counts ORDER BY run_id
    ON CONFLICT (run_id) DO UPDATE SET last_seq = r.last_seq + excluded.last_seq
    RETURNING run_id, last_seq
),
numbered AS (
    SELECT f.*, b.last_seq - count(*) OVER (PARTITION BY f.run_id)
        + row_number() OVER (PARTITION BY f.run_id ORDER BY f.ord) AS seq
    FROM fresh f JOIN bumped b USING (run_id)
),
stored AS (
    INSERT INTO events (run_id, seq, type, producer, producer_id, received_at, body)
    SELECT run_id, seq, type, producer, producer_id, received_at, left(body, -1) || ',"seq":' || seq || '}}'
    FROM numbered
),
positions AS (
    INSERT INTO producers AS p (name, last_id, updated_at)
    SELECT producer, max(producer_id), $7 FROM numbered WHERE producer_id IS NOT NULL
    GROUP BY producer ORDER BY producer
    ON CONFLICT (name) DO UPDATE SET
        last_id = GREATEST(p.last_id, excluded.last_id), updated_at = excluded.updated_at
),
notified AS (SELECT pg_notify('{CHANNEL}', run_id || ':' || last_seq) FROM bumped)
SELECT ord, seq FROM numbered
UNION ALL SELECT 0, count(*) FROM notified
"""
"""One batch in one statement (one round trip, its own transaction): drop what is stored
(or comes twice in the batch),
take the runs' counter rows (in run_id order: no deadlock between nodes) and move them by
what is new, number the new events from them, store them with their seq spliced into the body,
move the producers' positions, notify. Returns (position in the batch, seq) of what was stored.
Another node storing one of these (producer, id) at the same moment makes the insert fail on
the unique index; the batch is then tried again, and that event is dropped as stored."""
_RETRY = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
_SAVE_SUMMARIES = """
INSERT INTO runs AS r
    (run_id, created_at, summary_seq, status, updated_at, started_at, ended_at, info, ledger)
SELECT * FROM unnest($1::text[], $2::float8[], $3::bigint[], $4::text[], $5::float8[], $6::float8[],
                     $7::float8[], $8::text[], $9::text[])
ORDER BY 1
ON CONFLICT (run_id) DO UPDATE SET
    summary_seq = excluded.summary_seq, status = excluded.status, updated_at = excluded.updated_at,
    started_at = excluded.started_at, ended_at = excluded.ended_at, info = excluded.info,
    ledger = excluded.ledger
WHERE r.summary_seq <= excluded.summary_seq
"""
_PRUNE = """
WITH pruned AS (DELETE FROM events WHERE run_id = $1 AND seq < $2)
UPDATE runs SET first_seq = GREATEST(first_seq, $2) WHERE run_id = $1
"""
SUMMARIES_EVERY = 1.0
"""Seconds between writes of the runs' summaries as this node folded them: a node that starts
folds the events after them (about this long of a busy run's events)."""
_READ_PAGE = """
SELECT seq, body FROM (
    SELECT seq, body, octet_length(body) AS size,
        sum(octet_length(body)) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto_here
    FROM events WHERE run_id = $1 AND seq > $2 AND seq <= $3 {types} ORDER BY seq LIMIT $4
) page WHERE upto_here - size < $5 ORDER BY seq
"""
_STORED_VERSIONS = """
SELECT producer_id, seq, received_at, body FROM (
    SELECT producer_id, seq, received_at, body, octet_length(body) AS size,
        sum(octet_length(body)) OVER (ORDER BY producer_id ROWS UNBOUNDED PRECEDING) AS upto_here
    FROM events WHERE producer = $1 AND producer_id = ANY($2::bigint[]) ORDER BY producer_id
) page WHERE upto_here - size < $3 ORDER BY producer_id
"""
_TOUCH_PRODUCERS = "UPDATE producers SET updated_at = $1 WHERE name = ANY($2::text[]) AND updated_at < $1"
_FORGET_PRODUCERS = "DELETE FROM producers WHERE name = ANY($1::text[]) AND updated_at < $2 RETURNING name"
_STORED_VERSIONS_IDS = 500
_STORED_VERSIONS_BYTES = 2 << 20


def redacted(url: str) -> str:
    """The URL without its password, for logs and /healthz."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class PgEventLog(QueuedWrites):
    """An :class:`~fedrelay.relay.eventlog.EventLog` on PostgreSQL, for several relays."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        runs: Mapping[str, Run],
        on_commit: Callable[[list[Sequenced]], None],
        max_batch: int = 2000,
        forget_producers_after: float = 0.0,
        retain_events: int = 0,
        on_pruned: Callable[[str, int], None] | None = None,
        pool_size: int = 4,
    ) -> None:
        self.url = url
        self.path = redacted(url)
        self._runs = runs
        self._on_commit = on_commit
        self.queue = WriteQueue(max_batch)
        """Events accepted and not committed yet, and who waits for their commit."""
        self.forget_producers_after = forget_producers_after
        self.retain_events = retain_events
        """Events kept per run (0: all): the node that commits to a run prunes it."""
        self._on_pruned = on_pruned
        self.pool_size = pool_size
        self.repaired_runs: list[dict[str, Any]] = []
        self._pool: asyncpg.Pool | None = None
        self.feed: CommitFeed | None = None
        self._summaries_due: set[str] = set()
        """Runs this node committed events to since their summaries were last saved."""
        self._writer: asyncio.Task[None] | None = None
        self._write_failing: str | None = None
        self._own_pids: set[int] = set()
        """Server pids of this node's pool connections."""
        self._commit_since: float | None = None
        """When the commit in flight began (monotonic), else None."""
        self.commits = 0
        self.duplicates = 0
        """Events dropped at commit because another node (or a commit whose answer was lost)
        had stored their (producer, id)."""
        self.last_commit_seconds = 0.0

    @property
    def failing(self) -> str | None:
        """Commits failing, or the database unreachable for reads: /healthz answers 503."""
        if self._write_failing is not None:
            return self._write_failing
        if self._commit_since is not None and time.monotonic() - self._commit_since > SLOW_COMMIT:
            return f"a commit has been waiting for the database for over {SLOW_COMMIT:g} s"
        return self.feed.failing if self.feed is not None else None

    # -- lifecycle ---------------------------------------------------------

    async def _own_connection(self, conn: asyncpg.Connection) -> None:
        """A pool connection: the feed ignores its notifications (this node delivers its own
        commits when they return; a lost answer is found by the poll)."""
        pid = conn.get_server_pid()
        self._own_pids.add(pid)
        conn.add_termination_listener(lambda _conn: self._own_pids.discard(pid))

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url, command_timeout=COMMAND_TIMEOUT, timeout=CONNECT_TIMEOUT)

    async def open(self) -> Restored:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=0,
                max_size=self.pool_size,
                command_timeout=COMMAND_TIMEOUT,
                timeout=CONNECT_TIMEOUT,
                init=self._own_connection,
            )
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                found = await migrate(conn)
                restored = await self._restore(conn)
        except StoreError:
            await self._close_pool()
            raise
        except Exception as exc:
            await self._close_pool()
            raise StoreError(f"cannot open the event log {self.path}: {exc}") from exc
        if found == 0:
            log.info("store: created the schema in %s", self.path)
        assert self._pool is not None
        self.feed = CommitFeed(
            self._pool,
            self._connect,
            self._runs,
            self._on_commit,
            own_pids=self._own_pids,
            on_pruned=self._on_pruned,
        )
        self._writer = asyncio.create_task(self._write_loop(), name="fedrelay-pg-writer")
        return restored

    async def follow(self) -> None:
        """Fold what the restored summaries do not cover yet, then follow every node's commits
        (called once the hub holds the restored runs)."""
        assert self.feed is not None
        await self.feed.start()

    async def _restore(self, conn: asyncpg.Connection) -> Restored:
        runs = []
        rows = await conn.fetch(
            f"SELECT {RUN_COLUMNS.format(seq='summary_seq')} FROM runs ORDER BY created_at, run_id"
        )
        for row in rows:
            runs.append(restored_run(row))  # last_seq: the summary's; the feed folds what follows
        producers = {name: last for name, last in await conn.fetch("SELECT name, last_id FROM producers")}
        return Restored(runs, producers)

    async def close(self, timeout: float = 10.0) -> int:
        left = await self._finish_writes(timeout)
        if self.feed is not None:
            await self.feed.stop()
        await self._close_pool()
        return left

    async def _close_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await close_pool(pool)

    # -- writes ------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = 0.05
        raced = 0
        saved_at = time.monotonic()
        queue = self.queue
        while True:
            due = queue.runs_to_save or (
                self._summaries_due and (queue.closing or time.monotonic() - saved_at >= SUMMARIES_EVERY)
            )
            if not queue.pending and not due:
                if queue.closing:
                    return
                queue.wakeup.clear()
                timeout = SUMMARIES_EVERY if self._summaries_due else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.wakeup.wait(), timeout)
                continue
            try:
                if due:
                    saving = queue.runs_to_save | self._summaries_due
                    await self._save_summaries(saving)
                    queue.runs_to_save -= saving
                    self._summaries_due -= saving
                    saved_at = time.monotonic()
                    continue
                batch = queue.next_batch()
                self._commit_since = time.monotonic()
                try:
                    stored = await self._commit(batch)
                finally:
                    self._commit_since = None
            except _RETRY as exc:
                raced += 1  # another node stored one of these ids meanwhile: dropped on the retry
                if raced <= _RACES_RETRIED_AT_ONCE:
                    continue
                await self._failed(exc, backoff)  # a race that does not go away: not on a busy loop
                if queue.closing and backoff > 1.0:
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            except Exception as exc:  # the database away, a network cut: keep and retry
                await self._failed(exc, backoff)
                if queue.closing and backoff > 1.0:
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            raced = 0
            if self._write_failing is not None:
                log.warning("store: commits work again")
                self._write_failing = None
            backoff = 0.05
            queue.committed(len(batch))
            if self.feed is not None and stored:
                try:
                    self.feed.local(stored)
                except Exception:
                    log.exception("store: delivering a committed batch failed")
            if self.retain_events and stored:
                await self._prune(stored)
            queue.notify()
            await asyncio.sleep(0)

    async def _prune(self, stored: list[Sequenced]) -> None:
        """Keep at most ``retain_events`` per run, pruning in chunks (a tenth of it) after the
        commit that passed the slack. A failure leaves it to the next commit; pruning twice
        (two nodes) is harmless: the delete is idempotent, ``first_seq`` only moves up."""
        assert self._pool is not None
        slack = max(1, self.retain_events // 10)
        last_seqs = {item.run_id: item.seq for item in stored}
        for run_id, last_seq in last_seqs.items():
            run = self._runs.get(run_id)
            first_seq = run.first_seq if run is not None else 1
            if last_seq - first_seq + 1 <= self.retain_events + slack:
                continue
            new_first = last_seq - self.retain_events + 1
            try:
                await execute(self._pool, _PRUNE, run_id, new_first)
            except Exception as exc:
                log.warning(
                    "store: pruning run %s failed, will retry: %s: %s", run_id, type(exc).__name__, exc
                )
                return
            if self._on_pruned is not None:
                self._on_pruned(run_id, new_first)

    async def _failed(self, exc: Exception, backoff: float) -> None:
        """Commits fail (/healthz says so, producers are held past the lag): wait, then retry."""
        if self._write_failing is None:
            log.error("store: commit failed, will retry: %s: %s", type(exc).__name__, exc)
        self._write_failing = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(backoff)

    async def _commit(self, batch: list[Sequenced]) -> list[Sequenced]:
        """Store a batch (:data:`_COMMIT`); returns the events stored, with their seqs."""
        assert self._pool is not None
        started = time.perf_counter()
        rows = await fetch(
            self._pool,
            _COMMIT,
            [i.run_id for i in batch],
            [i.type for i in batch],
            [i.producer for i in batch],
            [i.producer_id for i in batch],
            [i.received_at for i in batch],
            [i.body for i in batch],
            time.time(),
        )
        new: list[Sequenced] = []
        for ord_, seq in sorted(rows):
            if ord_ == 0:
                continue
            item = batch[ord_ - 1]
            new.append(
                Sequenced(
                    item.run_id,
                    seq,
                    item.type,
                    item.producer,
                    item.producer_id,
                    item.received_at,
                    with_seq(item.body, seq),
                )
            )
        self._summaries_due.update(item.run_id for item in new)
        self.duplicates += len(batch) - len(new)
        self.commits += 1
        self.last_commit_seconds = time.perf_counter() - started
        return new

    async def _save_summaries(self, run_ids: set[str]) -> None:
        """The runs' summaries as this node has folded them (up to its committed seq): a node
        that starts folds only the events after the summary. Never moves a summary back."""
        assert self._pool is not None
        runs = sorted(
            (self._runs[run_id] for run_id in run_ids if run_id in self._runs), key=lambda r: r.run_id
        )
        if not runs:
            return
        await execute(
            self._pool,
            _SAVE_SUMMARIES,
            [r.run_id for r in runs],
            [r.created_at for r in runs],
            [r.committed_seq for r in runs],
            [r.status for r in runs],
            [r.updated_at for r in runs],
            [r.started_at for r in runs],
            [r.ended_at for r in runs],
            [json.dumps(r.info, allow_nan=False, default=str) for r in runs],
            [r.ledger.to_json() for r in runs],
        )

    # -- reads -------------------------------------------------------------

    async def read(
        self,
        run_id: str,
        after: int,
        upto: int,
        limit: int,
        max_bytes: int = 4 << 20,
        *,
        queue: str = "",
        wanted: Callable[[], bool] | None = None,
        types: tuple[str, ...] = (),
    ) -> list[tuple[int, str]] | None:
        """Stored events of a run with ``after < seq <= upto``, oldest first, at most ``limit``
        rows and ``max_bytes`` of UTF-8 (one at least). None when ``wanted()`` says no."""
        if wanted is not None and not wanted():
            return None
        pool = self._live_pool()
        if types:
            sql = _READ_PAGE.format(types="AND type = ANY($6::text[])")
            rows = await read_rows(
                pool, f"reading run {run_id}", sql, run_id, after, upto, limit, max(1, max_bytes), list(types)
            )
        else:
            rows = await read_rows(
                pool,
                f"reading run {run_id}",
                _READ_PAGE.format(types=""),
                run_id,
                after,
                upto,
                limit,
                max(1, max_bytes),
            )
        return [(row[0], row[1]) for row in rows]

    async def stored_versions(self, producer: str, ids: list[int]) -> dict[int, tuple[int, float, str]]:
        found: dict[int, tuple[int, float, str]] = {}
        wanted = sorted(set(ids))
        pool = self._live_pool()
        while wanted:
            chunk = wanted[:_STORED_VERSIONS_IDS]
            rows = await read_rows(
                pool,
                f"reading producer {producer}'s events",
                _STORED_VERSIONS,
                producer,
                chunk,
                _STORED_VERSIONS_BYTES,
            )
            for producer_id, seq, received_at, body in rows:
                found[producer_id] = (seq, received_at, body)
            last = rows[-1][0] if rows else chunk[-1]
            wanted = [i for i in wanted if i > last]
        return found

    async def last_seq(self, run_id: str) -> int:
        rows = await read_rows(
            self._live_pool(),
            f"reading run {run_id}'s last seq",
            "SELECT last_seq FROM runs WHERE run_id = $1",
            run_id,
        )
        return int(rows[0][0]) if rows else 0

    async def producer_position(self, producer: str) -> int | None:
        rows = await read_rows(
            self._live_pool(),
            f"reading producer {producer}'s position",
            "SELECT last_id FROM producers WHERE name = $1",
            producer,
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def _live_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the event log is closed")
        return self._pool

    # -- housekeeping --------------------------------------------------------

    async def forget_producers(
        self,
        *,
        seen: Iterable[str],
        keep: Callable[[str], bool],
        on_forgotten: Callable[[list[str]], None],
    ) -> int | None:
        """Forget producers idle past ``forget_producers_after``; one node at a time (an
        advisory lock: a node that finds it taken skips the pass). Other nodes drop a name from
        memory when a hello asks for it; the events table's unique index drops resends anyway."""
        if not self.forget_producers_after > 0 or self._pool is None:
            return 0
        now = time.time()
        cutoff = now - self.forget_producers_after
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", HOUSEKEEPING_LOCK):
                    return 0
                try:
                    await conn.execute(
                        _TOUCH_PRODUCERS,
                        now,
                        list(seen),
                    )
                    idle = [
                        r[0]
                        for r in await conn.fetch("SELECT name FROM producers WHERE updated_at < $1", cutoff)
                    ]
                    waiting = self.queued_producers()
                    doomed = [name for name in idle if name not in waiting and not keep(name)]
                    forgotten = 0
                    for start in range(0, len(doomed), _FORGET_BATCH):
                        rows = await conn.fetch(
                            _FORGET_PRODUCERS,
                            doomed[start : start + _FORGET_BATCH],
                            cutoff,
                        )
                        names = [row[0] for row in rows if not keep(row[0])]
                        if names:
                            on_forgotten(names)
                            forgotten += len(names)
                    return forgotten
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", HOUSEKEEPING_LOCK)
        except Exception as exc:
            log.warning("store: forgetting idle producers failed, will retry: %s", exc)
            return None
