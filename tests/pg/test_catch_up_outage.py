"""Subscribers that catch up from PostgreSQL while it is down, and resubscribe, are served once
it is back (issue 15): no store read, pool wait or catch-up turn waits without a bound."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.clients import ResendingProducer, ResumingSubscriber, event
from tests.support.postgres import PgServer
from tests.support.relay_process import RelayProcess
from tests.support.waiting import wait_until

SUBSCRIBERS = 10
"""More than the catch-up turns of one address (4), all from 127.0.0.1."""


@pytest.fixture
def own_pg(tmp_path):
    """A server of the test's own: it is stopped mid-test."""
    server = PgServer(tmp_path / "pg").start()
    yield server
    server.remove()


async def test_resubscribing_through_an_outage_gets_backlog_and_live_events(own_pg, tmp_path):
    before, after = 400, 100
    db = own_pg.fresh_db()
    relay = RelayProcess(db, log_dir=tmp_path, args=["--replay-size", "10"]).start()
    try:
        producer = ResendingProducer(relay.url, "trainer")
        events = [event("outage", i) for i in range(1, before + after + 1)]
        await producer.publish_all(events[:before], batch=50, timeout=60)
        await asyncio.to_thread(own_pg.stop)
        # Every subscriber needs the store (the ring holds 10 events): each catch-up fails,
        # the relay closes it, the subscriber comes back, again and again while PostgreSQL is away.
        subscribers = [ResumingSubscriber(relay.url, "outage") for _ in range(SUBSCRIBERS)]
        following = [asyncio.create_task(s.follow(before + after, timeout=90)) for s in subscribers]
        await asyncio.to_thread(
            wait_until, lambda: all(s.connections >= 3 for s in subscribers), 30, what="resubscribes"
        )
        await asyncio.sleep(0.5)  # a few more resubscribes land while the database is away
        await asyncio.to_thread(own_pg.start)
        publishing = asyncio.create_task(producer.publish_all(events[before:], batch=10, timeout=60))
        await asyncio.wait_for(publishing, 60)
        done, _pending = await asyncio.wait(following, timeout=30)
        stuck = [len(s.events) for s in subscribers if len(s.events) < before + after]
        assert not stuck, f"subscribers stuck at {stuck} of {before + after} events 30 s after the restart"
        for task in done:
            task.result()
        for s in subscribers:
            assert [e["seq"] for e in s.events] == list(range(1, before + after + 1))
    finally:
        relay.stop()
