"""Pool statements on a real server: waits are bounded, a connection that failed mid-way is
not handed out again (issue 15)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from fedrelay.relay.eventlog import StoreError
from fedrelay.relay.pg.conn import fetch, read_rows
from tests.support.relay_process import free_port


async def pool_of_one(url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=0, max_size=1, command_timeout=10, timeout=5)


async def test_a_busy_pool_answers_within_the_acquire_bound(pg_server):
    pool = await pool_of_one(pg_server.fresh_db())
    try:
        sleeping = asyncio.create_task(fetch(pool, "SELECT pg_sleep(5)"))
        await asyncio.sleep(0.2)  # it holds the only connection
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await fetch(pool, "SELECT 1", acquire_timeout=0.5)
        assert time.monotonic() - started < 3
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        assert await fetch(pool, "SELECT 1", acquire_timeout=5) == [(1,)]  # the holder came back
    finally:
        pool.terminate()


async def test_a_statement_that_failed_mid_way_leaves_its_connection_out(pg_server):
    pool = await pool_of_one(pg_server.fresh_db())
    try:
        pid = (await fetch(pool, "SELECT pg_backend_pid()"))[0][0]
        with pytest.raises(TimeoutError):
            await fetch(pool, "SELECT pg_sleep(5)", timeout=0.3)
        # Terminated, not handed out again while its cancel is in flight: a new backend.
        assert (await fetch(pool, "SELECT pg_backend_pid()"))[0][0] != pid
        # Cancelled mid-statement (a subscriber left): the next read does not wait for it.
        task = asyncio.create_task(fetch(pool, "SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = time.monotonic()
        assert await fetch(pool, "SELECT 1", acquire_timeout=3) == [(1,)]
        assert time.monotonic() - started < 2
    finally:
        pool.terminate()


async def test_an_error_about_the_statement_keeps_the_connection(pg_server):
    pool = await pool_of_one(pg_server.fresh_db())
    try:
        pid = (await fetch(pool, "SELECT pg_backend_pid()"))[0][0]
        with pytest.raises(asyncpg.UndefinedTableError):
            await fetch(pool, "SELECT * FROM no_such_table")
        assert (await fetch(pool, "SELECT pg_backend_pid()"))[0][0] == pid
    finally:
        pool.terminate()


async def test_reads_fail_as_store_errors_when_the_server_refuses(pg_server):
    """ConnectionRefusedError is an OSError: as such it once passed for the subscriber's socket."""
    pool = await pool_of_one(f"postgresql://{pg_server.user}@127.0.0.1:{free_port()}/postgres")
    try:
        with pytest.raises(StoreError, match="reading x failed: ConnectionRefusedError") as raised:
            await read_rows(pool, "reading x", "SELECT 1")
        assert not isinstance(raised.value, OSError)
    finally:
        pool.terminate()
    pool = await pool_of_one(pg_server.fresh_db())
    try:
        assert await read_rows(pool, "reading x", "SELECT 1") == [(1,)]
        with pytest.raises(StoreError, match="reading x failed: UndefinedTableError"):
            await read_rows(pool, "reading x", "SELECT * FROM no_such_table")
    finally:
        pool.terminate()
