"""Statements on the pool that give a broken connection up at once.

After a statement times out, asyncpg sends a cancel request and, when the connection goes back
to the pool, waits for it: through a network cut that is another ``command_timeout``. A
connection that failed other than with an error from the server (a timeout, a reset, a
closed socket) is terminated instead, so the retry starts on a new one without waiting."""

from __future__ import annotations

from typing import Any

import asyncpg


async def fetch(pool: asyncpg.Pool, sql: str, *args: Any, timeout: float | None = None) -> list[Any]:
    async with pool.acquire() as conn:
        try:
            return await conn.fetch(sql, *args, timeout=timeout)
        except asyncpg.PostgresError:
            raise  # the server answered: the connection is fine
        except BaseException:
            conn.terminate()
            raise


async def execute(pool: asyncpg.Pool, sql: str, *args: Any, timeout: float | None = None) -> str:
    async with pool.acquire() as conn:
        try:
            return await conn.execute(sql, *args, timeout=timeout)
        except asyncpg.PostgresError:
            raise
        except BaseException:
            conn.terminate()
            raise
