"""Read queues in front of the store's reader connections.

aiosqlite runs one statement at a time per connection, in order, and a statement
handed to it runs even when whoever asked has gone: a catch-up cancelled because
its subscriber left, an HTTP client that closed its socket. 300 such requests
once made a new subscriber wait 10 s for its first page. Here at most one
statement per connection is inside aiosqlite; the others wait in an
``asyncio.Lock`` (first come, first served; a cancelled waiter leaves the line),
and a read whose requester is gone when its turn comes is skipped. Catch-up
and the HTTP API each have their own connection and queue, so one never waits
behind the other.

:func:`bounded` puts a bound on a read whatever the store: a catch-up holds its
subscriber's place (and one of its address's turns) while it reads, so a read that
never returned left that subscriber with nothing, no error and no close, for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from .eventlog import StoreError

CATCH_UP = "catch_up"
API = "api"
READ_BOUND = 30.0
"""Seconds a catch-up read may take, its wait in line included, before it counts as failed."""

T = TypeVar("T")


async def bounded(read: Awaitable[T], what: str, seconds: float = READ_BOUND) -> T:
    """``read``'s result within ``seconds``; any failure, the timeout included, as StoreError.

    A store's socket errors (``OSError``, ``TimeoutError``, PostgreSQL refusing connections)
    would otherwise look like the subscriber's own socket failing, which ends a catch-up
    quietly; as StoreError the subscriber is closed (1011) and resubscribes."""
    try:
        async with asyncio.timeout(seconds):
            return await read
    except StoreError:
        raise
    except TimeoutError as exc:
        raise StoreError(f"{what}: no answer within {seconds:g} s") from exc
    except Exception as exc:
        raise StoreError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


class ReadQueue:
    """One reader connection and the line in front of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: aiosqlite.Connection | None = None
        self.turn = asyncio.Lock()
        """Held while a statement of this queue is inside aiosqlite (or the queue is paused)."""
        self.done = 0
        self.skipped = 0

    async def fetch(
        self, sql: str, params: Sequence[Any], wanted: Callable[[], bool] | None = None
    ) -> list[Any] | None:
        """Rows of one statement, or None when ``wanted()`` said no once it was its turn."""
        async with self.turn:
            if wanted is not None and not wanted():
                self.skipped += 1
                return None
            assert self.conn is not None
            async with self.conn.execute(sql, params) as cursor:
                rows = list(await cursor.fetchall())
            self.done += 1
            return rows

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()
