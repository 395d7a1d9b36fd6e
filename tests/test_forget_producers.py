"""Producers idle past ``--forget-producers-after`` are forgotten: their row in the
``producers`` table and their dedup position in memory, while the relay runs and at
start-up. Open connections and recent activity keep a producer; 0 keeps every one.

Real relay processes on real SQLite files; the file is read with a read-only
connection of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect

from fedrelay.relay.hub import Run, Sequenced
from fedrelay.relay.store import _FORGET_BATCH, EventStore
from tests.support.clients import ResendingProducer, event
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until, wait_until


def producer_rows(db: Path) -> dict[str, tuple[int, float]]:
    """name -> (last_id, updated_at), read from the file as another process sees it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {name: (last, at) for name, last, at in conn.execute("SELECT * FROM producers")}
    finally:
        conn.close()


async def publish(relay: RelayProcess, name: str, upto: int, run_id: str = "forget") -> None:
    """Ids 1..upto under ``name``, until all are acked; the connection is closed after."""
    await ResendingProducer(relay.url, name).publish_all([event(run_id, i) for i in range(1, upto + 1)])


async def hello(relay: RelayProcess, name: str) -> dict:
    async with connect(f"{relay.url}/publish?producer={name}", open_timeout=5) as conn:
        return json.loads(await asyncio.wait_for(conn.recv(), 5))


def idle_since(db: Path, name: str) -> float:
    """When the producer's row was last updated (``time.time()`` of the relay)."""
    return producer_rows(db)[name][1]


def age(db: Path, name: str, seconds: float) -> None:
    """Make a producer's row ``seconds`` older, as if it had been idle that much longer (only
    while no relay has the file open: it is a write of the test's own)."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE producers SET updated_at = updated_at - ? WHERE name = ?", (seconds, name))
    finally:
        conn.close()


async def test_an_idle_producer_is_forgotten_and_open_or_recent_ones_are_kept(relay_factory, tmp_path):
    db = tmp_path / "relay.db"
    forget_after = 1.0
    relay = relay_factory("--forget-producers-after", str(forget_after), db=db)
    await publish(relay, "idle", 5)
    # "connected" keeps a connection open for the whole test, after storing 3 events.
    async with connect(f"{relay.url}/publish?producer=connected") as held:
        assert json.loads(await held.recv())["last_id"] is None
        await held.send(json.dumps([event("forget", i) for i in range(1, 4)]))
        assert json.loads(await held.recv()) == {"op": "ack", "producer": "connected", "upto": 3}
        assert producer_rows(db)["idle"][0] == 5

        # "busy" stores an event every 0.3 s, each over a connection of its own, until "idle"
        # is gone from the file and a few passes went by. Whether "busy" may be forgotten
        # meanwhile depends on how long a publish takes on this machine, so every look at the
        # file checks it against its own row: gone only once silent for longer than the setting.
        busy_last = 0
        busy_at = 0.0

        def busy_kept_as_due(rows: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
            if "busy" in rows:
                assert rows["busy"][0] == busy_last, rows
            else:
                assert time.time() - busy_at > forget_after, f"'busy' forgotten early: {rows}"
            return rows

        deadline = time.monotonic() + 10
        beats = 6  # at least: ~1.8 s, several housekeeping passes that must all keep "busy"
        while "idle" in busy_kept_as_due(producer_rows(db)) or busy_last < beats:
            assert time.monotonic() < deadline, f"'idle' was never forgotten: {producer_rows(db)}"
            busy_last += 1
            await ResendingProducer(relay.url, "busy").publish_all([event("forget", busy_last)], timeout=5)
            busy_at = idle_since(db, "busy")
            beat = time.monotonic() + 0.3
            await until(lambda b=beat: "idle" not in producer_rows(db) or time.monotonic() > b, timeout=5)

        assert (await hello(relay, "idle"))["last_id"] is None
        # (A second connection under a live name is refused: its position is in the row below.)
        assert (await hello(relay, "connected"))["code"] == "producer_in_use"
        assert producer_rows(db)["connected"][0] == 3
        before = busy_kept_as_due(producer_rows(db))
        metrics = scrape(relay)
        after = busy_kept_as_due(producer_rows(db))
        # "idle", and "busy" too if this machine kept it silent for a second (see above).
        forgotten = metrics["fedrelay_producers_forgotten_total"]
        assert 1 + ("busy" not in before) <= forgotten <= 1 + ("busy" not in after), (forgotten, after)
        assert metrics["fedrelay_producers"] == 3 - forgotten

    # Once its connection is closed, "connected" ages like any other producer.
    await asyncio.to_thread(
        wait_until, lambda: "connected" not in producer_rows(db), 10, what="'connected' forgotten"
    )
    assert (await hello(relay, "connected"))["last_id"] is None
    # A forgotten name is new again: its ids count from scratch.
    await publish(relay, "idle", 2)
    assert producer_rows(db)["idle"][0] == 2


async def test_a_restart_forgets_producers_idle_too_long_and_loads_the_others(relay_factory, tmp_path):
    db = tmp_path / "relay.db"
    keeping = relay_factory("--forget-producers-after", "0", db=db)
    await publish(keeping, "old", 4)
    await publish(keeping, "recent", 7)
    assert keeping.stop() == 0
    assert set(producer_rows(db)) == {"old", "recent"}
    age(db, "old", 2 * 3600)  # idle for two hours; "recent" for seconds, however slow this machine

    relay = relay_factory("--log-level", "info", db=db, env={"FEDRELAY_FORGET_PRODUCERS_AFTER": "3600"})
    # Only the loading at start logs this at info (housekeeping logs at debug).
    assert "forgot 1 producers idle for more than 3600 s" in relay.log()
    assert set(producer_rows(db)) == {"recent"}
    assert (await hello(relay, "old"))["last_id"] is None
    assert (await hello(relay, "recent"))["last_id"] == 7
    metrics = scrape(relay)
    assert metrics["fedrelay_producers_forgotten_total"] == 1 and metrics["fedrelay_producers"] == 1


async def test_zero_keeps_every_producer(relay_factory, tmp_path):
    db = tmp_path / "relay.db"
    relay = relay_factory("--forget-producers-after", "0", db=db)
    await publish(relay, "forever", 3)
    assert relay.stop() == 0
    age(db, "forever", 365 * 86400)
    # 0 is "never", not "after 0 seconds", also when the relay loads the table.
    relay = relay_factory("--forget-producers-after", "0", db=db)
    assert (await hello(relay, "forever"))["last_id"] == 3
    assert producer_rows(db)["forever"][0] == 3
    assert scrape(relay)["fedrelay_producers_forgotten_total"] == 0
    # Resent under the same name, the stored events are still dropped as duplicates.
    await publish(relay, "forever", 3)
    assert scrape(relay)["fedrelay_duplicates_total"] == 3


def test_the_setting_is_validated_like_the_others():
    for value in ("-1", "nan", "soon"):
        out = subprocess.run(
            [sys.executable, "-m", "fedrelay", "serve", "--memory", "--port", "0"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "FEDRELAY_FORGET_PRODUCERS_AFTER": value},
        )
        assert out.returncode == 2, (value, out.stderr)
        assert "FEDRELAY_FORGET_PRODUCERS_AFTER" in out.stderr, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "fedrelay", "serve", "--memory", "--forget-producers-after", "-5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--forget-producers-after / FEDRELAY_FORGET_PRODUCERS_AFTER must be a number >= 0" in out.stderr


async def test_forgetting_runs_in_small_batches_between_commits(tmp_path):
    """Many idle rows are deleted a batch at a time while events keep being committed;
    a name with events still queued, and one the relay says to keep, stay."""
    db = tmp_path / "events.db"
    idle = 3 * _FORGET_BATCH + 17
    setup = sqlite3.connect(db)
    setup.executescript(
        "CREATE TABLE producers (name TEXT PRIMARY KEY, last_id INTEGER NOT NULL, updated_at REAL NOT NULL)"
    )
    fresh_at = time.time()
    setup.executemany(  # "queued" and "kept" first: they are in the first batch
        "INSERT INTO producers VALUES (?, ?, ?)",
        [("queued", 9, fresh_at), ("kept", 9, fresh_at)] + [(f"em-{i}", i, fresh_at) for i in range(idle)],
    )
    setup.commit()
    setup.close()

    runs = {"r": Run("r", time.time())}
    store = EventStore(db, runs=runs, on_commit=lambda _: None, max_batch=1, forget_producers_after=3600)
    restored = await store.open()  # idle for moments only: all loaded
    assert len(restored.producers) == idle + 2 and restored.forgotten == 0
    # Now two hours idle, written by another connection while the store is idle (no commit waits).
    aging = sqlite3.connect(db, timeout=5)
    with aging:
        aging.execute("UPDATE producers SET updated_at = updated_at - 7200")
    aging.close()

    seq = 0
    body = json.dumps({"type": "client_progress", "run_id": "r"})

    def append(producer: str) -> None:
        nonlocal seq
        seq += 1
        store.append([Sequenced("r", seq, "client_progress", producer, seq, time.time(), body)])

    batches: list[list[str]] = []
    commits_before: list[int] = []

    def on_forgotten(names: list[str]) -> None:
        batches.append(names)
        commits_before.append(store.commits)
        append("other")  # events keep arriving while the pass goes on

    for _ in range(20):  # one event per commit: "queued" waits behind these
        append("other")
    append("queued")
    try:
        forgotten = await asyncio.wait_for(
            store.forget_producers(seen=[], keep=lambda name: name == "kept", on_forgotten=on_forgotten), 10
        )
    finally:
        await store.close()
    assert forgotten == idle
    gone = [name for names in batches for name in names]
    assert "queued" not in gone and "kept" not in gone and len(gone) == idle
    assert all(len(names) <= _FORGET_BATCH for names in batches) and len(batches) == 4
    # A commit went in between every two batches: none waited for the whole pass.
    assert commits_before == sorted(set(commits_before)), commits_before
    assert set(producer_rows(db)) == {"queued", "kept", "other"}


async def test_a_name_whose_every_event_was_refused_is_forgotten_too(relay_factory, tmp_path):
    """Refused events advance the name's dedup position in memory but write no row: with no
    row to age, the name stayed in memory for ever, and its ids counted as duplicates."""
    relay = relay_factory("--forget-producers-after", "1", "--max-frame-bytes", "4096", db=tmp_path / "r.db")
    oversize = event("ghost-run", 1)
    oversize["data"]["message"] = "x" * 3500  # fits a frame, not the stored-event limit
    async with connect(f"{relay.url}/publish?producer=ghost") as conn:
        assert json.loads(await conn.recv())["last_id"] is None
        await conn.send(json.dumps(oversize))
        assert json.loads(await conn.recv())["code"] == "too_large"

    async def resend_is_stored() -> bool:
        async with connect(f"{relay.url}/publish?producer=ghost") as conn:
            await conn.recv()  # hello
            await conn.send(json.dumps(event("ghost-run", 1)))
            assert json.loads(await asyncio.wait_for(conn.recv(), 5))["op"] == "ack"
        status, _ = relay.get("/api/runs/ghost-run")
        return status == 200

    # Id 1 again, valid now: dropped as a duplicate until the name is forgotten, then stored.
    deadline = time.monotonic() + 15
    while not await resend_is_stored():
        assert time.monotonic() < deadline, "the refused-only name was never forgotten"
        await asyncio.sleep(0.2)
