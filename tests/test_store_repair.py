"""A store that one bad row used to wedge, and a lock a symlink used to dodge.

- A ``runs`` row behind ``max(seq)`` (or missing) made the next commit of that
  run collide with a stored seq; the ``IntegrityError`` retried the same batch
  for ever: no run stored anything again, ``/healthz`` said 503 and SIGTERM
  exited 1. At start the relay now reconciles ``runs`` with the events table.
- Rows written by another process while the relay runs collide the same way:
  the colliding run's queued events move past the stored ones, the batch
  commits, subscribers page the rows they did not see from the store, and
  ``/healthz`` names the run.
- The one-relay lock was taken on ``--db`` as given: a second relay reached
  the same file through a symlink, ``..`` or a relative path and handed out
  the same seqs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from tests.support.clients import Collector, ResendingProducer, event
from tests.support.relay_process import RelayProcess


async def publish(relay: RelayProcess, producer: str, events: list[dict]) -> ResendingProducer:
    sender = ResendingProducer(relay.url, producer)
    await sender.publish_all(events, timeout=20)  # a wedged store never acks: this times out
    return sender


def stored_seqs(relay: RelayProcess, run_id: str) -> list[int]:
    status, page = relay.get_json(f"/api/runs/{run_id}/events?since=0&limit=10000")
    assert status == 200, page
    return [e["seq"] for e in page["events"]]


async def test_runs_rows_behind_or_missing_are_reconciled_at_start(tmp_path):
    db = tmp_path / "relay.db"
    relay = RelayProcess(db).start()
    try:
        first = [event(run, n * 10 + i) for n, run in enumerate(("behind", "missing")) for i in range(1, 11)]
        await publish(relay, "first", first)
    finally:
        assert relay.stop() == 0
    with sqlite3.connect(db) as outside:  # as a restored backup or a hand edit can leave it
        outside.execute("UPDATE runs SET last_seq = 4 WHERE run_id = 'behind'")
        outside.execute("DELETE FROM runs WHERE run_id = 'missing'")
    outside.close()

    relay.start()
    try:
        runs = ("behind", "missing", "fresh")
        later = [event(run, 100 + n * 10 + i) for n, run in enumerate(runs) for i in range(1, 6)]
        await publish(relay, "second", later)
        assert relay.get("/healthz")[0] == 200
        assert stored_seqs(relay, "behind") == list(range(1, 16))
        assert stored_seqs(relay, "missing") == list(range(1, 16))
        assert stored_seqs(relay, "fresh") == list(range(1, 6))
        listed = {r["run_id"]: r for r in relay.get_json("/api/runs")[1]["runs"]}
        assert listed["missing"]["last_seq"] == 15
        assert "reconciled 2 runs" in relay.log()
    finally:
        assert relay.stop() == 0


async def test_rows_written_by_another_process_move_the_runs_queued_events_past_them(relay):
    await publish(relay, "p1", [event("shared", i) for i in range(1, 11)])
    async with Collector(relay.url, "run_id=shared&since=0") as live:
        await live.wait_for(10)
        foreign = {"type": "status", "run_id": "shared", "data": {"message": "written by a tool"}}
        with sqlite3.connect(relay.db, timeout=10) as outside:
            for seq in (11, 12):
                stamped = {**foreign, "seq": seq, "producer": "tool", "timestamp": "2026-01-01T00:00:00Z"}
                body = json.dumps(stamped)
                outside.execute(
                    "INSERT INTO events (run_id, seq, type, producer, producer_id, received_at, body)"
                    " VALUES ('shared', ?, 'status', 'tool', NULL, 0, ?)",
                    (seq, body),
                )
        outside.close()
        # One frame with events of the colliding run and of another: both must be stored.
        await publish(relay, "p2", [event("shared", 1), event("other", 2), event("shared", 3)])
        await live.wait_for(14)
        assert live.seqs() == list(range(1, 15))  # the tool's rows too, from the store, no gap
        assert live.closed is None
    assert stored_seqs(relay, "shared") == list(range(1, 15))
    assert stored_seqs(relay, "other") == [1]
    status, health = relay.get_json("/healthz")
    assert status == 200, health
    assert [r["run_id"] for r in health["store"]["repaired_runs"]] == ["shared"]
    assert "shared" in relay.log()


def second_relay(db: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", "serve", "--port", "0", "--db", db],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_the_one_relay_lock_holds_through_symlinks_dotdot_and_relative_paths(tmp_path):
    real = tmp_path / "data" / "relay.db"
    real.parent.mkdir()
    (tmp_path / "sub").mkdir()
    os.symlink(real, tmp_path / "link.db")
    os.symlink(real.parent, tmp_path / "linkdir")
    relay = RelayProcess(real).start()
    try:
        for db, cwd in [
            (str(tmp_path / "link.db"), tmp_path),
            (str(tmp_path / "linkdir" / "relay.db"), tmp_path),
            (str(tmp_path / "sub" / ".." / "data" / "relay.db"), tmp_path),
            ("relay.db", real.parent),
        ]:
            out = second_relay(db, str(cwd))
            assert out.returncode == 1, (db, out.stderr[-2000:])
            assert "another relay is using this database" in out.stderr, (db, out.stderr[-2000:])
        assert relay.get("/healthz")[0] == 200
    finally:
        relay.stop()
