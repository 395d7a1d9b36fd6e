"""Honest run state after an outage, end to end: real emitters (one spool dir per host), a real
relay process killed and restarted on its database, `fedrelay sync`, and the `holding` op.

1. The relay goes down after round 1 and stays down until the run ends. The server's spool,
   synced first, says rounds 2 and 3 happened; the clients' reports for them are still on their
   hosts: the run is `incomplete`, naming the rounds, also across a relay restart. Syncing the
   clients' spools makes it `completed`, with start and end times from the events, not from when
   they arrived.
2. A producer's `holding` report marks a run incomplete until that producer is acked that far,
   across its disconnect and relay restarts; garbage reports get an error frame and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest
from websockets.asyncio.client import connect

from fedrelay.emitters import Emitter
from tests.support.clients import event
from tests.support.relay_process import RelayProcess, free_port
from tests.support.waiting import wait_until

RUN = "fl-outage"
CLIENTS = 2


@pytest.fixture(autouse=True)
def _no_relay_from_the_environment(monkeypatch):
    for name in ("FEDRELAY_URL", "FEDRELAY_TOKEN", "FEDRELAY_PUBLISH_TOKEN", "FEDRELAY_SPOOL_DIR"):
        monkeypatch.delenv(name, raising=False)


def sync(url: str, spool_dir: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedrelay", "sync", "--url", url, "--spool-dir", str(spool_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_summary(relay: RelayProcess, run_id: str = RUN) -> dict:
    status, body = relay.get_json(f"/api/runs/{run_id}")
    assert status == 200, body
    return body


def stored(relay: RelayProcess, run_id: str = RUN) -> list[dict]:
    status, body = relay.get_json(f"/api/runs/{run_id}/events?since=0&limit=10000")
    assert status == 200, body
    return body["events"]


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


class Federation:
    """A server and its clients as the Flower emitters stream them, each with its own spool dir."""

    def __init__(self, url: str, root: Path) -> None:
        self.server = Emitter(url, run_id=RUN, role="server", spool_dir=root / "server-host", max_backoff=0.5)
        self.clients = [
            Emitter(url, run_id=RUN, role="client", client_id=c, spool_dir=root / f"client-host-{c}",
                    max_backoff=0.5)
            for c in range(CLIENTS)
        ]  # fmt: skip

    def round(self, number: int) -> None:
        ids = [str(c) for c in range(CLIENTS)]
        self.server.emit("round_start", {"round": number, "total_rounds": 3, "participating_clients": ids})
        for c, client in enumerate(self.clients):
            for phase in ("train", "evaluate"):
                base = {"round": number, "client_id": c, "phase": phase, "node_id": str(9000 + c)}
                client.emit("client_progress", {**base, "status": "started"})
                client.emit("client_complete", {**base, "metrics": {"loss": 1.0 / number}})
        self.server.emit("round_end", {"round": number, "total_rounds": 3, "participating_clients": ids,
                                       "eval_metrics": {"loss": 1.0 / number}})  # fmt: skip

    def everyone(self) -> list[Emitter]:
        return [self.server, *self.clients]


def test_relay_down_until_the_end_then_sync_per_host_turns_incomplete_into_completed(tmp_path, backend_db):
    """On both backends (the old-database test below writes an old SQLite file: SQLite only)."""
    relay = RelayProcess(backend_db, log_dir=tmp_path).start()
    fed = Federation(relay.url, tmp_path)
    try:
        fed.server.emit("training_start", {"training_mode": "federated", "num_rounds": 3,
                                           "num_clients": CLIENTS})  # fmt: skip
        fed.round(1)
        assert all(emitter.flush(20) for emitter in fed.everyone())
        assert run_summary(relay)["status"] == "running"

        relay.kill()  # down from here until after the run
        fed.round(2)
        fed.round(3)
        fed.server.emit("training_end", {"status": "completed", "best_round": 3})
        for emitter in fed.everyone():
            assert emitter.close(timeout=1) is False  # spooled on its own host
        back_at = time.time()
        relay.start()

        # The server's host syncs first: rounds 2 and 3 are known, their client reports are not.
        assert "delivered" in sync(relay.url, tmp_path / "server-host")
        state = run_summary(relay)
        assert state["status"] == "incomplete", state
        assert state["incomplete"]["rounds"] == [2, 3]
        assert state["incomplete"]["reports_missing"] == 2 * CLIENTS
        assert state["incomplete"]["detail"] == (
            "incomplete: events missing for rounds 2-3 (run `fedrelay sync` where the clients ran)"
        )
        server_events = {e["type"]: e for e in stored(relay)}
        started = seconds(server_events["training_start"]["timestamp"])
        ended = seconds(server_events["training_end"]["timestamp"])
        assert state["started_at"] == pytest.approx(started, abs=1e-3)
        assert state["ended_at"] == pytest.approx(ended, abs=1e-3)
        assert started < ended < back_at  # the times it ran at, not when the events arrived

        relay.kill()  # what the relay knows is missing survives a crash
        relay.start()
        assert run_summary(relay)["incomplete"]["rounds"] == [2, 3]

        assert "delivered" in sync(relay.url, tmp_path / "client-host-0")
        assert run_summary(relay)["incomplete"]["reports_missing"] == CLIENTS
        assert "delivered" in sync(relay.url, tmp_path / "client-host-1")
        state = run_summary(relay)
        assert state["status"] == "completed" and state["incomplete"] is None, state
        assert state["started_at"] == pytest.approx(started, abs=1e-3)
        assert state["ended_at"] == pytest.approx(ended, abs=1e-3)
        events = stored(relay)
        assert len(events) == 2 + 3 * (2 + CLIENTS * 4)  # every event once
        assert len({(e["producer"], e["id"]) for e in events}) == len(events)
    finally:
        for emitter in fed.everyone():
            emitter.close(timeout=0.5)
        relay.stop()


def ledger_on_disk(db: str, run_id: str) -> dict:
    """The run's ledger as the relay committed it (read-only: the relay keeps writing)."""
    if db.startswith("postgresql://"):
        with ThreadPoolExecutor(1) as pool:  # its own event loop: the test's is blocked here
            text = pool.submit(asyncio.run, pg_ledger(db, run_id)).result(timeout=30)
    else:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT ledger FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        text = row[0] if row else None
    return json.loads(text) if text else {}


async def pg_ledger(db: str, run_id: str) -> str | None:
    conn = await asyncpg.connect(db, timeout=10)
    try:
        return await conn.fetchval("SELECT ledger FROM runs WHERE run_id = $1", run_id)
    finally:
        await conn.close()


async def test_holding_reports_survive_disconnects_and_crashes_until_the_producer_is_acked(
    tmp_path, backend_db
):
    relay = RelayProcess(backend_db, log_dir=tmp_path).start()
    url = f"{relay.url}/publish?producer=holder"
    try:
        async with connect(url) as conn:
            hello = json.loads(await conn.recv())
            assert hello["accepts"] == ["holding"]
            garbage = [
                ({"op": "holding", "runs": []}, "bad_holding"),
                ({"op": "holding", "runs": {"held": {"count": 0, "upto": 3}}}, "bad_holding"),
                ({"op": "holding", "runs": {"bad run": {"count": 1, "upto": 3}}}, "bad_holding"),
                ({"op": "holding", "runs": {"held": {"count": 1, "upto": 3}}, "more": 1}, "bad_holding"),
                ({"op": "hold"}, "bad_op"),
            ]
            for frame, code in garbage:
                await conn.send(json.dumps(frame))
                reply = json.loads(await conn.recv())
                assert (reply["op"], reply["code"]) == ("error", code), reply
            assert relay.get_json("/api/runs")[1]["runs"] == []  # garbage changed nothing
            await conn.send(json.dumps({"op": "holding", "runs": {"held": {"count": 3, "upto": 3}}}))
            wait_until(lambda: relay.get("/api/runs/held")[0] == 200, what="the held run")
            # One report per session: a second one (it could create 1,000 runs each time) is refused.
            await conn.send(json.dumps({"op": "holding", "runs": {"again": {"count": 1, "upto": 9}}}))
            reply = json.loads(await conn.recv())
            assert (reply["op"], reply["code"]) == ("error", "bad_holding"), reply
            assert "one holding report per session" in reply["detail"]
            assert relay.get("/api/runs/again")[0] == 404
        state = run_summary(relay, "held")  # disconnected: the report stands
        assert state["status"] == "running" and state["last_seq"] == 0
        assert state["incomplete"]["held_events"] == 3

        wait_until(lambda: "holding" in ledger_on_disk(backend_db, "held"), what="the report on disk")
        relay.kill()
        relay.start()
        assert run_summary(relay, "held")["incomplete"]["held_events"] == 3

        async with connect(url) as conn:
            assert json.loads(await conn.recv())["last_id"] is None
            await conn.send(json.dumps([event("held", i) for i in (1, 2, 3)]))
            assert json.loads(await conn.recv()) == {"op": "ack", "producer": "holder", "upto": 3}
        wait_until(lambda: run_summary(relay, "held")["incomplete"] is None, what="the report settled")
        relay.stop()
        relay.start()
        state = run_summary(relay, "held")
        assert state["incomplete"] is None and state["last_seq"] == 3
    finally:
        relay.stop()


def test_a_database_from_an_older_relay_gets_the_new_column(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL,
                updated_at REAL NOT NULL, started_at REAL, ended_at REAL, last_seq INTEGER NOT NULL,
                first_seq INTEGER NOT NULL DEFAULT 1, info TEXT NOT NULL DEFAULT '{}');
            INSERT INTO runs VALUES ('old-run', 'completed', 1.0, 2.0, 1.0, 2.0, 0, 1, '{}');
            """
        )
    relay = RelayProcess(db, port=free_port()).start()
    try:
        state = run_summary(relay, "old-run")
        assert state["status"] == "completed" and state["incomplete"] is None
    finally:
        relay.stop()
