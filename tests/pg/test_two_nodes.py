"""Two relay processes on one PostgreSQL database behave as one relay."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from tests.support.clients import Collector, ResendingProducer, event
from tests.support.relay_process import RelayProcess
from tests.support.stored import stored_events
from tests.support.waiting import until


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
        for relay in (a, b):
            stored = stored_events(relay, "race")
            assert [e["seq"] for e in stored] == list(range(1, total + 501))
            twin = [e["id"] for e in stored if e["producer"] == "twin"]
            assert sorted(twin) == list(range(1, total + 1))
    finally:
        a.stop()
        b.stop()
