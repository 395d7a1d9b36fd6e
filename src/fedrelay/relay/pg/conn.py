"""Statements on the pool that give a broken connection up at once, and wait with a bound.

After a statement times out, asyncpg sends a cancel request and, when the connection goes back
to the pool, waits for it: through a network cut that is another ``command_timeout``. A
connection that failed other than with an error from the server about the statement (a
timeout, a reset, a closed socket, a cancellation, asyncpg's ``another operation is in
progress``, the server shutting down) is terminated instead, so the retry starts on a new one
without waiting and no connection left mid-operation goes back to the pool.

Taking a connection from the pool waits at most ``ACQUIRE_TIMEOUT``: with every connection
busy or the server unreachable, the caller gets an error it can act on instead of a wait
without end (a catch-up that waited so held its turn, and its subscriber got nothing, for ever).
:func:`read_rows` also turns every failure into :class:`~..eventlog.StoreError`, the error readers
document: a socket error (``OSError``, ``TimeoutError``) from the database must not look like
one from the client's socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ..eventlog import StoreError

ACQUIRE_TIMEOUT = 10.0
"""Seconds to wait for a pool connection (queueing for one and connecting included)."""
_CONNECTION_GONE = ("08", "57")
"""SQLSTATE classes after which the server side of the connection is gone or going: connection
exceptions and operator intervention (shutdown, ``cannot connect now``)."""


def _reusable(exc: BaseException) -> bool:
    """An error the server answered about the statement: the connection is idle and fine."""
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    return not str(getattr(exc, "sqlstate", "") or "").startswith(_CONNECTION_GONE)


async def fetch(
    pool: asyncpg.Pool,
    sql: str,
    *args: Any,
    timeout: float | None = None,
    acquire_timeout: float = ACQUIRE_TIMEOUT,
) -> list[Any]:
    async with pool.acquire(timeout=acquire_timeout) as conn:
        try:
            return await conn.fetch(sql, *args, timeout=timeout)
        except BaseException as exc:
            if not _reusable(exc):
                conn.terminate()
            raise


async def execute(
    pool: asyncpg.Pool,
    sql: str,
    *args: Any,
    timeout: float | None = None,
    acquire_timeout: float = ACQUIRE_TIMEOUT,
) -> str:
    async with pool.acquire(timeout=acquire_timeout) as conn:
        try:
            return await conn.execute(sql, *args, timeout=timeout)
        except BaseException as exc:
            if not _reusable(exc):
                conn.terminate()
            raise


async def read_rows(pool: asyncpg.Pool, what: str, sql: str, *args: Any) -> list[Any]:
    """Rows of a read, or :class:`StoreError` saying ``what`` failed and why."""
    try:
        return await fetch(pool, sql, *args)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise StoreError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close a pool, waiting at most 5 s for its connections to be given back, then cut them."""
    try:
        await asyncio.wait_for(pool.close(), 5.0)
    except Exception:
        pool.terminate()
