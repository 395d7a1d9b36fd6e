"""Every node's commits, to this node's hub, once each and in seq order per run.

A node learns of other nodes' commits from ``NOTIFY fedrelay_commit, '<run_id>:<last_seq>'``
(sent inside each committing transaction, so it arrives only once the rows are visible) on a
dedicated LISTEN connection, and from a poll of the runs' counters every ``poll_every`` seconds,
which finds what a lost notification (the LISTEN connection down) left behind. Either only
marks the run; a fetcher task reads the rows after the seq this node delivered last and hands
them on. The node's own commits take a shortcut (:meth:`CommitFeed.local`) when they follow
on from what was delivered, which is the usual case, and otherwise go the same way.

Committed seqs of a run are always a prefix (a transaction takes the run's counter row lock
and commits before the next one can read it), so "the rows after the last delivered seq" is
the complete, gap-free continuation: nothing is delivered twice or skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import asyncpg

from ..hub import Run, Sequenced
from .conn import fetch

log = logging.getLogger("fedrelay.store")

CHANNEL = "fedrelay_commit"
POLL_EVERY = 1.0
FETCH_ROWS = 2000
_FETCH = """
SELECT run_id, seq, type, producer, producer_id, received_at, body FROM events
WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3
"""


class CommitFeed:
    """Wake-ups (NOTIFY, poll, local commits) -> reads -> ``deliver`` in seq order per run."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        connect: Callable[[], Any],
        runs: Mapping[str, Run],
        deliver: Callable[[list[Sequenced]], None],
        *,
        poll_every: float = POLL_EVERY,
        own_pids: set[int] | None = None,
        on_pruned: Callable[[str, int], None] | None = None,
    ) -> None:
        self._pool = pool
        self._connect = connect
        self._runs = runs
        """The hub's runs: ``committed_seq`` is what this node has delivered."""
        self._deliver = deliver
        self.poll_every = poll_every
        self._on_pruned = on_pruned
        """Called with (run_id, first_seq) when the poll finds a run pruned (retention)."""
        self._own_pids = own_pids if own_pids is not None else set()
        """Server pids of this node's writer connections: their notifications need no read."""
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.failing: str | None = None
        """Why the last poll failed (the database unreachable), else None."""
        self.listening = False
        self.fetched = 0
        """Events delivered from reads (other nodes' commits, or own ones that raced)."""

    def delivered(self, run_id: str) -> int:
        run = self._runs.get(run_id)
        return run.committed_seq if run is not None else 0

    async def start(self) -> None:
        """Deliver what is committed and not delivered yet, then follow."""
        await self._poll_once()
        await self._drain()
        self._tasks = [
            asyncio.create_task(self._listen(), name="fedrelay-pg-listen"),
            asyncio.create_task(self._poll(), name="fedrelay-pg-poll"),
            asyncio.create_task(self._fetch_loop(), name="fedrelay-pg-fetch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []

    # -- wake-ups ---------------------------------------------------------

    def local(self, items: list[Sequenced]) -> None:
        """This node committed ``items`` (seqs in order per run): deliver those that follow on
        from what was delivered; a run with a gap before them is read from the database."""
        by_run: dict[str, list[Sequenced]] = {}
        for item in items:
            by_run.setdefault(item.run_id, []).append(item)
        now: list[Sequenced] = []
        for run_id, run_items in by_run.items():
            if run_items[0].seq == self.delivered(run_id) + 1:
                now += run_items
            elif run_items[-1].seq > self.delivered(run_id):
                self.mark(run_id)
        if now:
            self._deliver(now)

    def mark(self, run_id: str) -> None:
        self._dirty.add(run_id)
        self._wake.set()

    def _notified(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return  # this node's commit: delivered when it returned (or found by the poll)
        run_id, _, seq = payload.rpartition(":")
        try:
            if int(seq) > self.delivered(run_id):
                self.mark(run_id)
        except ValueError:
            log.warning("store: unexpected %s payload %r", CHANNEL, payload[:200])

    async def _listen(self) -> None:
        """Keep a LISTEN connection; after each (re)connect, poll once for what was missed."""
        backoff = 0.1
        while True:
            conn = None
            try:
                conn = await self._connect()
                lost = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(partial(_settle, lost))
                await conn.add_listener(CHANNEL, self._notified)
                self.listening = True
                backoff = 0.1
                await self._poll_once()
                while not lost.done():  # a cut with no RST: check the connection now and then
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(lost), 5.0)
                    if not lost.done():
                        await conn.execute("SELECT 1", timeout=5.0)
            except asyncio.CancelledError:
                if conn is not None:
                    conn.terminate()
                raise
            except Exception as exc:
                log.debug("store: LISTEN connection lost: %s", exc)
            self.listening = False
            if conn is not None:
                conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_every)
            await self._poll_once()

    async def _poll_once(self) -> None:
        """Mark runs whose counter is past what this node delivered."""
        try:
            rows = await fetch(self._pool, "SELECT run_id, last_seq, first_seq FROM runs WHERE last_seq > 0")
        except Exception as exc:
            if self.failing is None:
                log.error("store: cannot read the database: %s: %s", type(exc).__name__, exc)
            self.failing = f"cannot read the database: {type(exc).__name__}: {exc}"
            return
        if self.failing is not None:
            log.warning("store: the database answers again")
            self.failing = None
        for run_id, last_seq, first_seq in rows:
            if last_seq > self.delivered(run_id):
                self.mark(run_id)
            run = self._runs.get(run_id)
            if first_seq > 1 and run is not None and first_seq > run.first_seq and self._on_pruned:
                self._on_pruned(run_id, first_seq)

    # -- reads ------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._drain()
            except Exception as exc:
                log.debug("store: reading other nodes' commits failed: %s", exc)
                await asyncio.sleep(0.2)
                self._wake.set()  # the dirty runs are still marked

    async def _drain(self) -> None:
        while self._dirty:
            run_id = next(iter(self._dirty))
            # Unmarked before the read: a commit marked while it runs may be past its snapshot.
            self._dirty.discard(run_id)
            after = self.delivered(run_id)
            try:
                rows = await fetch(self._pool, _FETCH, run_id, after, FETCH_ROWS)
            except BaseException:
                self._dirty.add(run_id)
                raise
            after = self.delivered(run_id)  # local commits may have been delivered meanwhile
            batch = [Sequenced(*row) for row in rows if row[1] > after]
            if batch and batch[0].seq != after + 1:
                log.error("store: run %s: expected seq %d next, read %d", run_id, after + 1, batch[0].seq)
            if batch:
                self.fetched += len(batch)
                self._deliver(batch)
            if len(rows) == FETCH_ROWS:
                self.mark(run_id)


def _settle(future: asyncio.Future[None], _conn: Any) -> None:
    if not future.done():
        future.set_result(None)
