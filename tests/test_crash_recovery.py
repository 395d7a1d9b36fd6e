"""SIGKILL the relay mid-stream: every event ends up stored and delivered once (SQLite and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from tests.support.clients import ResendingProducer, ResumingSubscriber, event
from tests.support.relay_process import RelayProcess
from tests.support.stored import stored_events
from tests.support.waiting import until


async def test_sigkill_and_restart_loses_and_duplicates_nothing(backend_db):
    total = 4000
    relay = RelayProcess(backend_db).start()
    try:
        producer = ResendingProducer(relay.url, "trainer-1", pace=0.002)
        follower = ResumingSubscriber(relay.url, "crash")
        publishing = asyncio.create_task(
            producer.publish_all([event("crash", i) for i in range(1, total + 1)], batch=10, timeout=120)
        )
        following = asyncio.create_task(follower.follow(total, timeout=120))
        for threshold in (total // 4, total // 2):
            await until(lambda t=threshold: producer.acked >= t, timeout=60)
            relay.kill()  # SIGKILL: no flush, no goodbye
            await asyncio.to_thread(relay.start)
        await asyncio.wait_for(publishing, 120)
        await asyncio.wait_for(following, 120)

        # The resumed subscriber saw every seq once, in order, and every id once.
        assert [e["seq"] for e in follower.events] == list(range(1, total + 1))
        assert sorted(e["id"] for e in follower.events) == list(range(1, total + 1))
        assert follower.gaps == []
        # The store holds each event exactly once, with the content that was sent.
        stored = stored_events(relay, "crash")
        assert [e["seq"] for e in stored] == list(range(1, total + 1))
        assert sorted(e["id"] for e in stored) == list(range(1, total + 1))
        by_id = {e["id"]: e for e in stored}
        for i in (1, total // 2, total):
            assert by_id[i]["data"] == event("crash", i)["data"]
        assert producer.connections >= 3 and follower.connections >= 3
    finally:
        relay.stop()


async def test_dedup_positions_survive_a_restart(backend_db):
    relay = RelayProcess(backend_db).start()
    try:
        first = ResendingProducer(relay.url, "again")
        await first.publish_all([event("dup", i) for i in range(1, 101)])
        relay.kill()
        await asyncio.to_thread(relay.start)
        # A producer that lost its acks resends everything: nothing is stored twice,
        # and the relay tells it where its name stands.
        again = ResendingProducer(relay.url, "again")
        await again.publish_all([event("dup", i) for i in range(1, 121)])
        stored = stored_events(relay, "dup")
        assert [e["id"] for e in stored] == list(range(1, 121))
        assert [e["seq"] for e in stored] == list(range(1, 121))
        async with connect(f"{relay.url}/publish?producer=again") as conn:
            hello = json.loads(await conn.recv())
            assert (hello["op"], hello["producer"], hello["last_id"]) == ("hello", "again", 120)
        _status, metrics = relay.get("/metrics")
        assert b"fedrelay_duplicates_total 100.0" in metrics
    finally:
        relay.stop()
