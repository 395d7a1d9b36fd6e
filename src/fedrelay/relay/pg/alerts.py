"""The alert outbox on PostgreSQL: every relay evaluates the same commits, one sends each alert.

The same three tables as on SQLite (schema version 2, ``pg/schema.py``), and the same calls
(:class:`~fedrelay.relay.alerts.outbox.AlertLog`):

- **Claims.** ``save`` inserts ``(alert id, webhook)`` rows with ``ON CONFLICT DO NOTHING
  RETURNING``, in one transaction with the runs' cursors. A node inserting a key that
  another node's open transaction has just inserted waits for that transaction and then
  inserts nothing, so exactly one node gets each row back, and only that node sends it. Rows
  are inserted in (key, webhook) order and cursors in run order, so two nodes' saves take
  their row locks in the same order and never deadlock.
- **Who sends a pending claim after a crash: any node, after a lease.** Each row names its
  owner, this process's node id (random per start: nothing ties a restarted process to
  the one before it). Every save refreshes the node's heartbeat ``alive:<node>`` in
  ``alert_meta`` with the database's clock. A pending row whose owner has not refreshed it
  for ``claim_lease`` seconds (killed, cut off from the database, or stopped: a clean stop
  deletes the heartbeat, so its rows go at once) is taken by the first node that looks, at
  start or at one of its saves (every 2 s), one node at a time (an advisory lock), and sent
  from there. A node cut off from the database for longer than the lease while it holds a
  claim it is still trying to send may therefore send it as well as the node that took it:
  at least once, with the same ``id``, as after any crash.
- **Cursors** are shared: the highest seq any node evaluated per run, with the rule state
  saved at that seq, so a node that starts evaluates only what came after.

This log has a small pool of its own (two connections): at shutdown it saves the alerts of
the last commits after the event log has closed its pool.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..alerts.outbox import Pending, Restored
from ..eventlog import StoreError
from .conn import close_pool, execute
from .log import COMMAND_TIMEOUT, CONNECT_TIMEOUT, redacted
from .schema import ADOPT_LOCK, migrate

log = logging.getLogger("fedrelay.alerts")

T = TypeVar("T")

_CLAIM = """
INSERT INTO alert_outbox (key, target, payload, owner, created_at, updated_at)
SELECT k, t, p, $4, $5, $5 FROM unnest($1::text[], $2::text[], $3::text[]) AS c(k, t, p) ORDER BY k, t
ON CONFLICT (key, target) DO NOTHING
RETURNING key, target, payload
"""
_CURSORS = """
INSERT INTO alert_runs AS a (run_id, seq, state)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) ORDER BY 1
ON CONFLICT (run_id) DO UPDATE SET
    state = CASE WHEN excluded.seq >= a.seq THEN excluded.state ELSE a.state END,
    seq = GREATEST(a.seq, excluded.seq)
"""
_ALIVE = """
INSERT INTO alert_meta AS m (name, value) VALUES ('alive_at', $1)
ON CONFLICT (name) DO UPDATE SET value = GREATEST(m.value, excluded.value)
"""
_HEARTBEAT = """
INSERT INTO alert_meta (name, value) VALUES ('alive:' || $1, extract(epoch FROM clock_timestamp()))
ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
_ADOPT = """
UPDATE alert_outbox o SET owner = $1
WHERE o.state = 'pending' AND o.owner <> $1 AND o.target = ANY($3::text[]) AND NOT EXISTS (
    SELECT 1 FROM alert_meta m
    WHERE m.name = 'alive:' || o.owner AND m.value > extract(epoch FROM clock_timestamp()) - $2)
RETURNING key, target, payload, created_at
"""
_SETTLE = "UPDATE alert_outbox SET state = $1, updated_at = $2 WHERE key = $3 AND target = $4"
_PRUNE = "DELETE FROM alert_outbox WHERE state <> 'pending' AND updated_at < $1"
_GONE = "DELETE FROM alert_meta WHERE name = 'alive:' || $1"
_PRUNE_HEARTBEATS = "DELETE FROM alert_meta WHERE name LIKE 'alive:%' AND value < $1"


class PgAlertLog:
    """:class:`~fedrelay.relay.alerts.outbox.AlertLog` on the relays' PostgreSQL database."""

    def __init__(self, url: str, *, lease: float, targets: list[str]) -> None:
        self.url = url
        self.lease = lease
        """Seconds without a heartbeat after which a node's pending claims go to another."""
        self.targets = list(targets)
        """This relay's webhooks (their ids): it takes over only claims it can send."""
        self.node = uuid.uuid4().hex
        self._pool: asyncpg.Pool | None = None
        self._adopt_failed = False

    def _live(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the alert log is closed")
        return self._pool

    async def _transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``work`` in one transaction; a connection that failed other than with an answer
        from the server is dropped (as in ``pg/conn.py``), so the retry starts afresh."""
        async with self._live().acquire() as conn:
            try:
                async with conn.transaction():
                    return await work(conn)
            except asyncpg.PostgresError:
                raise
            except BaseException:
                conn.terminate()
                raise

    async def open(self) -> Restored:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=0,
                max_size=2,
                command_timeout=COMMAND_TIMEOUT,
                timeout=CONNECT_TIMEOUT,
            )
            async with self._pool.acquire() as conn:
                await migrate(conn)  # done by the event log already: here it only checks
                await conn.execute(_HEARTBEAT, self.node)
                alive_at = await conn.fetchval("SELECT value FROM alert_meta WHERE name = 'alive_at'")
                rows = await conn.fetch("SELECT run_id, seq, state FROM alert_runs")
        except StoreError:
            await self._close_pool()
            raise
        except Exception as exc:
            await self._close_pool()
            raise StoreError(f"cannot open the alert tables in {redacted(self.url)}: {exc}") from exc
        restored = Restored(alive_at, {run_id: (seq, state) for run_id, seq, state in rows})
        restored.pending = await self._adopt()
        return restored

    async def save(
        self,
        claims: list[tuple[str, str]],
        targets: list[str],
        cursors: dict[str, tuple[int, str]],
        now: float,
    ) -> list[Pending]:
        given = [(key, target, payload) for key, payload in claims for target in targets]
        order = {(key, target): i for i, (key, target, _) in enumerate(given)}
        rows = sorted(given)
        runs = sorted(cursors.items())

        async def work(conn: asyncpg.Connection) -> list[Any]:
            inserted: list[Any] = []
            if rows:
                inserted = await conn.fetch(
                    _CLAIM, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], self.node, now
                )
            if runs:
                await conn.execute(
                    _CURSORS,
                    [run_id for run_id, _ in runs],
                    [seq for _, (seq, _) in runs],
                    [state for _, (_, state) in runs],
                )
            await conn.execute(_ALIVE, now)
            await conn.execute(_HEARTBEAT, self.node)
            return inserted

        inserted = await self._transaction(work)
        claimed = [Pending(key, target, payload, now) for key, target, payload in inserted]
        claimed.sort(key=lambda p: order.get((p.key, p.target), 0))
        return claimed + await self._adopt()

    async def _adopt(self) -> list[Pending]:
        """Take the pending claims of nodes whose heartbeat is older than the lease (one node
        at a time: the others skip). A failure leaves them to the next save."""

        async def work(conn: asyncpg.Connection) -> list[Any]:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", ADOPT_LOCK):
                return []
            return await conn.fetch(_ADOPT, self.node, self.lease, self.targets)

        try:
            rows = await self._transaction(work)
        except Exception as exc:
            if not self._adopt_failed:
                log.warning("alerts: looking for claims of stopped relays failed, will retry: %s", exc)
            self._adopt_failed = True
            return []
        self._adopt_failed = False
        if rows:
            log.warning("alerts: %d undelivered alerts of a relay that stopped are sent from here", len(rows))
        return sorted((Pending(*row) for row in rows), key=lambda p: p.created_at)

    async def settle(self, key: str, target: str, state: str, now: float) -> None:
        await execute(self._live(), _SETTLE, state, now, key, target)

    async def prune(self, before: float) -> int:
        done = await execute(self._live(), _PRUNE, before)
        await execute(self._live(), _PRUNE_HEARTBEATS, before)
        return int(done.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        """Delete this node's heartbeat, so another node sends its pending claims at once."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await execute(self._pool, _GONE, self.node, timeout=2)
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await close_pool(pool)
