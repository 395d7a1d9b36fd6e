"""Two relay processes on one PostgreSQL database behave as one relay."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from tests.support.clients import Collector, ResendingProducer, event, wait_for_control
from tests.support.relay_process import RelayProcess
from tests.support.stored import stored_events
from tests.support.waiting import until, wait_until


async def hello_last_id(relay: RelayProcess, producer: str) -> int | None:
    async with connect(f"{relay.url}/publish?producer={producer}") as conn:
        hello = json.loads(await asyncio.wait_for(conn.recv(), 10))
        assert hello["op"] == "hello"
        return hello["last_id"]


def runs_listing(relay: RelayProcess) -> list[tuple[str, int, str]]:
    status, body = relay.get_json("/api/runs")
    assert status == 200, body
    return sorted((run["run_id"], run["last_seq"], run["status"]) for run in body["runs"])


async def test_resend_through_another_node_is_stored_once_and_seen_live_everywhere(pg_server, tmp_path):
    db = pg_server.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        async with Collector(b.url, "run_id=r1") as on_b, Collector(a.url, "run_id=r1") as on_a:
            first = ResendingProducer(a.url, "trainer")
            await first.publish_all([event("r1", i) for i in range(1, 101)])
            # The same emitter lost its acks and comes back through the other node.
            again = ResendingProducer(b.url, "trainer")
            await again.publish_all([event("r1", i) for i in range(1, 151)])
            end = {"type": "training_end", "run_id": "r1", "id": 151, "data": {"status": "completed"}}
            await ResendingProducer(a.url, "trainer").publish_all([end])
            await on_b.wait_for(151)
            await on_a.wait_for(151)
            for collector in (on_a, on_b):
                assert collector.seqs("r1") == list(range(1, 152))
                assert [e["id"] for e in collector.events] == list(range(1, 152))
        for relay in (a, b):
            stored = stored_events(relay, "r1")
            assert [e["seq"] for e in stored] == list(range(1, 152))
            assert [e["id"] for e in stored] == list(range(1, 152))
            assert await hello_last_id(relay, "trainer") == 151
        await until(lambda: runs_listing(a) == runs_listing(b) == [("r1", 151, "completed")], timeout=10)
    finally:
        a.stop()
        b.stop()


async def test_the_same_events_through_both_nodes_at_once_are_stored_once_gap_free(pg_server, tmp_path):
    """Two connections under one name on two nodes, racing with the same ids: the database
    decides, whichever node's transaction stores an id first."""
    total = 3000
    db = pg_server.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        events = [event("race", i) for i in range(1, total + 1)]
        async with Collector(a.url, "run_id=race") as on_a:
            await asyncio.gather(
                ResendingProducer(a.url, "twin").publish_all([dict(e) for e in events], batch=20),
                ResendingProducer(b.url, "twin").publish_all([dict(e) for e in events], batch=20),
                ResendingProducer(b.url, "other").publish_all([event("race", i) for i in range(1, 501)]),
            )
            await on_a.wait_for(total + 500)
            assert on_a.seqs("race") == list(range(1, total + 501))
        # B has read every commit too (within milliseconds: its notifications, then one read).
        await until(lambda: b.get_json("/api/runs/race")[1].get("last_seq") == total + 500, timeout=5)
        for relay in (a, b):
            stored = stored_events(relay, "race")
            assert [e["seq"] for e in stored] == list(range(1, total + 501))
            twin = [e["id"] for e in stored if e["producer"] == "twin"]
            assert sorted(twin) == list(range(1, total + 1))
    finally:
        a.stop()
        b.stop()


async def test_a_producer_forgotten_by_one_node_is_forgotten_on_every_node(pg_server, tmp_path):
    db = pg_server.fresh_db()
    a, b = (RelayProcess(db, log_dir=tmp_path, args=["--forget-producers-after", "1"]).start() for _ in "ab")
    try:
        await ResendingProducer(a.url, "gone").publish_all([event("old", i) for i in range(1, 6)])
        assert await hello_last_id(b, "gone") == 5

        def forgotten() -> bool:
            total = 0.0
            for relay in (a, b):
                for line in relay.get("/metrics")[1].decode().splitlines():
                    if line.startswith("fedrelay_producers_forgotten_total "):
                        total += float(line.split()[1])
            return total >= 1

        await asyncio.to_thread(wait_until, forgotten, 30, interval=0.2, what="the producer forgotten")
        assert await hello_last_id(a, "gone") is None
        assert await hello_last_id(b, "gone") is None
    finally:
        a.stop()
        b.stop()


async def test_another_emitter_under_the_name_on_another_node_is_a_conflict(pg_server, tmp_path):
    """The check of reused ids reads the stored bodies from the database: a second emitter
    under a name is caught on a node that never saw the first one's events arrive."""
    db = pg_server.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        await ResendingProducer(a.url, "twin").publish_all([event("twins", i) for i in range(1, 11)])
        other = ResendingProducer(b.url, "twin")
        mixed = [event("twins", 9), event("twins", 10, note="other"), event("twins", 11)]
        with pytest.raises(TimeoutError):  # 10 and 11 are never acked: B refuses them
            await other.publish_all(mixed, timeout=5)
        assert other.acked == 9
        assert {e["code"] for e in other.errors} == {"producer_conflict"}
        stored = stored_events(b, "twins")
        assert [e["id"] for e in stored] == list(range(1, 11)) and "note" not in stored[-1]["data"]
    finally:
        a.stop()
        b.stop()


async def test_a_since_no_node_handed_out_is_refused_one_some_node_did_waits(pg_server, tmp_path):
    db = pg_server.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        await ResendingProducer(a.url, "p").publish_all([event("far", i) for i in range(1, 11)])
        past, head = Collector(b.url, "run_id=far&since=50"), Collector(b.url, "run_id=far&since=10")
        async with past as refused, head as ok:
            error = await wait_for_control(refused, "error")
            assert (error["code"], error["run_id"]) == ("bad_since", "far")
            await ResendingProducer(a.url, "p").publish_all([event("far", 11)])
            await ok.wait_for(1)
            assert ok.seqs("far") == [11]
            assert not [c for c in ok.controls if c["op"] == "error"]
    finally:
        a.stop()
        b.stop()


async def test_retention_prunes_the_run_for_every_node(pg_server, tmp_path):
    db = pg_server.fresh_db()
    a, b = (RelayProcess(db, log_dir=tmp_path, args=["--retain-events", "100"]).start() for _ in "ab")
    try:
        await ResendingProducer(a.url, "p").publish_all([event("kept", i) for i in range(1, 1001)], batch=20)

        def first_seq_on_b() -> int:
            run = b.get_json("/api/runs/kept")[1]
            return run["first_seq"] if run.get("last_seq") == 1000 and run["first_seq"] >= 891 else 0

        first = await asyncio.to_thread(wait_until, first_seq_on_b, 10, what="pruned on B")
        assert first <= 901 and a.get_json("/api/runs/kept")[1]["first_seq"] == first
        for relay in (a, b):
            assert [e["seq"] for e in stored_events(relay, "kept")] == list(range(first, 1001))
        async with Collector(b.url, "run_id=kept&since=0") as late:
            await late.wait_for(1001 - first)
            gap = await wait_for_control(late, "gap")
            assert (gap["since"], gap["resume_from"]) == (0, first)
            assert late.seqs("kept") == list(range(first, 1001))
    finally:
        a.stop()
        b.stop()
