"""What alerts were claimed and delivered, and how far the engine got: persisted.

:class:`AlertLog` is the interface; :class:`SqliteAlertLog` keeps it in the relay's
database (tables ``alert_outbox``, ``alert_runs``, ``alert_meta``) and
:class:`MemoryAlertLog` in memory (``--memory``, unit tests); ``pg/alerts.py``'s
``PgAlertLog`` implements the same calls on the same three tables in PostgreSQL, shared by
every relay on the database (there a pending claim also names the relay that sends it).

- ``save(claims, targets, cursors)``: one transaction. Claims are
  ``INSERT ... ON CONFLICT DO NOTHING`` per (alert id, webhook): only rows that were not
  there come back, and only those are sent. With several relays evaluating the same
  committed events on one database, exactly one of them inserts a row, and sends it.
  ``cursors``: per run, the last seq the engine has evaluated and its rule state, so a
  restart re-evaluates only what came after (the claims keep that from sending twice).
- ``pending()`` (in :meth:`open`): claimed, not yet delivered: sent again after a restart.
- ``settle(key, target, state)``: ``delivered`` or ``dropped``.

A send whose answer was lost in a crash (sent, not yet marked delivered) goes once more
after the restart: at-least-once, with the same ``id`` and ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..store import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_outbox (
    key         TEXT NOT NULL,
    target      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending',
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (key, target)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alert_outbox_by_state ON alert_outbox (state, created_at);
CREATE TABLE IF NOT EXISTS alert_runs (
    run_id      TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    state       TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_meta (
    name        TEXT PRIMARY KEY,
    value       REAL NOT NULL
) WITHOUT ROWID;
"""
_CLAIM = (
    "INSERT INTO alert_outbox (key, target, payload, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key, target) DO NOTHING"
)
_CURSOR = (
    "INSERT INTO alert_runs (run_id, seq, state) VALUES (?, ?, ?) "
    "ON CONFLICT (run_id) DO UPDATE SET seq = max(seq, excluded.seq), state = excluded.state"
)
_ALIVE = (
    "INSERT INTO alert_meta (name, value) VALUES ('alive_at', ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
_SETTLE = "UPDATE alert_outbox SET state = ?, updated_at = ? WHERE key = ? AND target = ?"
_PENDING = (
    "SELECT key, target, payload, created_at FROM alert_outbox WHERE state = 'pending' ORDER BY created_at"
)
_PRUNE = "DELETE FROM alert_outbox WHERE state != 'pending' AND updated_at < ?"


@dataclass(frozen=True, slots=True)
class Pending:
    """A claimed delivery: one alert to one webhook (``target``: the webhook's id)."""

    key: str
    target: str
    payload: str
    created_at: float


@dataclass(slots=True)
class Restored:
    """What :meth:`AlertLog.open` reads back."""

    alive_at: float | None
    """When a relay last saved alert state here; None: alerts never ran on this database."""
    cursors: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Run id -> (last seq evaluated, rule state JSON)."""
    pending: list[Pending] = field(default_factory=list)
    """Claimed, not delivered: oldest first."""


class AlertLog(Protocol):
    async def open(self) -> Restored: ...

    async def save(
        self,
        claims: list[tuple[str, str]],
        targets: list[str],
        cursors: dict[str, tuple[int, str]],
        now: float,
    ) -> list[Pending]:
        """Claim ``(key, payload)`` for every target and store the cursors, in one
        transaction; returns the deliveries this call claimed (new rows only)."""
        ...

    async def settle(self, key: str, target: str, state: str, now: float) -> None: ...

    async def prune(self, before: float) -> int:
        """Forget delivered and dropped rows last touched before ``before``."""
        ...

    async def close(self) -> None: ...


class SqliteAlertLog:
    """The alert tables in the relay's SQLite file, on their own connection and thread.

    Each call is one short transaction on a thread of its own, never on the event loop.
    The event writer (``busy_timeout`` 0) retries 2 ms later if it meets this connection's
    write lock; these transactions are a few rows, at most a few a second.
    """

    def __init__(self, path: str) -> None:
        self.path = str(Path(path).expanduser())
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrelay-alerts-db")

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open(self) -> Restored:
        return await self._run(self._open)

    def _open(self) -> Restored:
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the alert tables in {self.path}: {exc}") from exc
        row = self._db.execute("SELECT value FROM alert_meta WHERE name = 'alive_at'").fetchone()
        restored = Restored(row[0] if row else None)
        for run_id, seq, state in self._db.execute("SELECT run_id, seq, state FROM alert_runs"):
            restored.cursors[run_id] = (seq, state)
        restored.pending = [Pending(*row) for row in self._db.execute(_PENDING)]
        return restored

    async def save(
        self,
        claims: list[tuple[str, str]],
        targets: list[str],
        cursors: dict[str, tuple[int, str]],
        now: float,
    ) -> list[Pending]:
        return await self._run(self._save, claims, targets, cursors, now)

    def _save(
        self,
        claims: list[tuple[str, str]],
        targets: list[str],
        cursors: dict[str, tuple[int, str]],
        now: float,
    ) -> list[Pending]:
        db = self._db
        assert db is not None
        claimed: list[Pending] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, payload in claims:
                for target in targets:
                    if db.execute(_CLAIM, (key, target, payload, now, now)).rowcount:
                        claimed.append(Pending(key, target, payload, now))
            db.executemany(_CURSOR, [(run_id, seq, state) for run_id, (seq, state) in cursors.items()])
            db.execute(_ALIVE, (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return claimed

    async def settle(self, key: str, target: str, state: str, now: float) -> None:
        await self._run(self._execute, _SETTLE, (state, now, key, target))

    async def prune(self, before: float) -> int:
        return await self._run(self._execute, _PRUNE, (before,))

    def _execute(self, statement: str, params: tuple[object, ...]) -> int:
        assert self._db is not None
        return self._db.execute(statement, params).rowcount

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)


class MemoryAlertLog:
    """The same in memory: for a relay with ``--memory``, and for tests."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], list[object]] = {}
        """(key, target) -> [payload, state, created_at, updated_at]."""
        self.cursors: dict[str, tuple[int, str]] = {}
        self.alive_at: float | None = None

    async def open(self) -> Restored:
        pending = [
            Pending(key, target, str(row[0]), float(row[2]))  # type: ignore[arg-type]
            for (key, target), row in self.rows.items()
            if row[1] == "pending"
        ]
        return Restored(self.alive_at, dict(self.cursors), sorted(pending, key=lambda p: p.created_at))

    async def save(
        self,
        claims: list[tuple[str, str]],
        targets: list[str],
        cursors: dict[str, tuple[int, str]],
        now: float,
    ) -> list[Pending]:
        claimed = []
        for key, payload in claims:
            for target in targets:
                if (key, target) not in self.rows:
                    self.rows[(key, target)] = [payload, "pending", now, now]
                    claimed.append(Pending(key, target, payload, now))
        for run_id, (seq, state) in cursors.items():
            old = self.cursors.get(run_id, (0, ""))[0]
            self.cursors[run_id] = (max(seq, old), state)
        self.alive_at = now
        return claimed

    async def settle(self, key: str, target: str, state: str, now: float) -> None:
        row = self.rows.get((key, target))
        if row is not None:
            row[1], row[3] = state, now

    async def prune(self, before: float) -> int:
        old = [k for k, row in self.rows.items() if row[1] != "pending" and float(row[3]) < before]  # type: ignore[arg-type]
        for k in old:
            del self.rows[k]
        return len(old)

    async def close(self) -> None:
        return None
