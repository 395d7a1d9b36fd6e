"""``--db postgresql://...``: the schema, a newer schema refused, no password in the output."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg

from tests.support.clients import ResendingProducer, event
from tests.support.relay_process import RelayProcess, free_port
from tests.support.stored import stored_events


def serve_from_env(db: str) -> subprocess.CompletedProcess[str]:
    """``fedrelay serve`` with the database named by FEDRELAY_DB alone."""
    command = [sys.executable, "-m", "fedrelay", "serve", "--port", str(free_port())]
    env = {**os.environ, "FEDRELAY_DB": db}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


async def test_a_schema_newer_than_the_relay_is_refused_at_start(pg_server):
    db = pg_server.fresh_db()
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version VALUES (99)")
    finally:
        await conn.close()
    done = await asyncio.to_thread(serve_from_env, db)
    assert done.returncode == 1
    assert "schema is version 99, newer than this relay's" in done.stderr


async def test_the_password_never_reaches_logs_or_healthz(pg_server, tmp_path):
    db = pg_server.fresh_db().replace("@", ":hunter2-secret@", 1)  # trust auth ignores it
    relay = RelayProcess(db, log_dir=tmp_path, args=["--log-level", "info"]).start()
    try:
        await ResendingProducer(relay.url, "p").publish_all([event("pw", i) for i in range(1, 11)])
        assert [e["seq"] for e in stored_events(relay, "pw")] == list(range(1, 11))
        status, health = relay.get_json("/healthz")
        assert status == 200 and health["store"]["path"].count(":***@") == 1
    finally:
        relay.stop()
    text = relay.log()
    assert "relay listening" in text and ":***@" in text
    assert "hunter2" not in text


async def test_a_relay_restarted_on_the_database_folds_the_runs_back(pg_server, tmp_path):
    db = pg_server.fresh_db()
    relay = RelayProcess(db, log_dir=tmp_path).start()
    try:
        events = [event("again", i) for i in range(1, 51)]
        events.append({"type": "training_end", "run_id": "again", "id": 51, "data": {"status": "failed"}})
        await ResendingProducer(relay.url, "p").publish_all(events)
        before = relay.get_json("/api/runs/again")[1]
        relay.kill()
        await asyncio.to_thread(relay.start)
        after = relay.get_json("/api/runs/again")[1]
        assert (after["status"], after["last_seq"]) == ("failed", 51)
        assert after == before
    finally:
        relay.stop()
