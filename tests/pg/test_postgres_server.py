"""The tests' own PostgreSQL server: found without PATH, never the machine's, stopped and restarted
with its data kept, removed at the end."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support.postgres import PgServer, pg_bin


def test_the_binaries_are_found_in_debians_versioned_directory():
    assert pg_bin().parts[:3] == ("/", "usr", "lib") and (pg_bin() / "initdb").exists()


async def query(url: str, sql: str):
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await (conn.fetchval(sql) if sql.startswith("SELECT") else conn.execute(sql))
    finally:
        await conn.close()


def test_a_server_of_its_own_keeps_its_data_across_a_stop_and_a_start(tmp_path):
    pg = PgServer(tmp_path).start()
    try:
        assert pg.port != 5432 and pg.pids()
        url = pg.fresh_db("kept")
        assert url != pg.fresh_db("kept"), "each call a new database"
        asyncio.run(query(url, "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)"))
        assert asyncio.run(query(url, "SELECT current_setting('data_directory')")) == str(pg.data)
        assert asyncio.run(query(url, "SELECT current_setting('fsync')")) == "off"

        pg.stop()
        assert not pg.pids()
        with pytest.raises(OSError):
            asyncio.run(query(url, "SELECT 1"))
        pg.start()
        assert asyncio.run(query(url, "SELECT sum(x) FROM t")) == 3
    finally:
        pg.remove()
    assert not pg.base.exists()
