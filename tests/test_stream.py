"""Subscribers get backlog then live events, gap-free, while producers publish."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from tests.support.clients import Collector, ResendingProducer, event, wait_for_control
from tests.support.waiting import until


@pytest.fixture
def relay(backend_relay):
    """Each test on both backends: one SQLite relay, one PostgreSQL relay."""
    return backend_relay


async def test_backlog_then_live_while_publishing_at_full_speed(relay):
    total = 20_000
    producer = ResendingProducer(relay.url, "fast")
    publishing = asyncio.create_task(
        producer.publish_all([event("r1", i) for i in range(1, total + 1)], batch=200)
    )
    # Join at several moments during the stream: each must see 1..total exactly.
    await until(lambda: producer.acked > 0)
    collectors = []
    for acked_before_join in (0, total // 4, total // 2):
        await until(lambda n=acked_before_join: producer.acked >= n)
        c = Collector(relay.url, "run_id=r1&since=0")
        await c.__aenter__()
        collectors.append(c)
    await asyncio.wait_for(publishing, 60)
    for c in collectors:
        await c.wait_for(total, timeout=30)
        assert c.seqs() == list(range(1, total + 1))
        assert [e["id"] for e in c.events] == list(range(1, total + 1))
        await c.__aexit__()
    assert producer.acked == total


async def test_subscriber_joining_mid_run_with_since_gets_the_rest(relay):
    producer = ResendingProducer(relay.url, "p")
    await producer.publish_all([event("r2", i) for i in range(1, 3001)], batch=100)
    last = 3000
    # Far behind (paged from the store), near the head (from the ring), at it.
    for since in (10, 2990, 3000):
        async with Collector(relay.url, f"run_id=r2&since={since}") as c:
            sub = await wait_for_control(c, "subscribed")
            assert sub["last_seq"] == last
            await c.wait_for(last - since)
            last += 1
            await producer.publish_all([event("r2", last)])
            await c.wait_for(last - since)
            assert c.seqs() == list(range(since + 1, last + 1))


async def test_resume_after_reconnect_has_no_gap_or_duplicate(relay):
    total = 6000
    producer = ResendingProducer(relay.url, "steady")
    publishing = asyncio.create_task(
        producer.publish_all([event("r3", i) for i in range(1, total + 1)], batch=20)
    )
    seen: list[int] = []
    since = 0
    reconnects = 0
    while len(seen) < total:
        async with connect(f"{relay.url}/subscribe?run_id=r3&since={since}", compression=None) as conn:
            reconnects += 1
            # Read a little, then drop the connection mid-stream.
            budget = 700
            async for frame in conn:
                msg = json.loads(frame)
                if isinstance(msg, dict) and msg.get("op") == "error":
                    await asyncio.sleep(0.01)  # run not created yet
                    break
                batch = msg if isinstance(msg, list) else ([] if "op" in msg else [msg])
                seen.extend(e["seq"] for e in batch)
                budget -= len(batch)
                if budget <= 0 or len(seen) >= total:
                    break
        if seen:
            since = seen[-1]
    await asyncio.wait_for(publishing, 60)
    assert seen == list(range(1, total + 1))
    assert reconnects >= 5


async def test_several_runs_and_wildcard(relay):
    async with Collector(relay.url, "run_id=*") as everything, Collector(relay.url, "run_id=a") as only_a:
        await wait_for_control(everything, "subscribed")
        # run "a" does not exist yet: by name it is waited for, by * it is live
        assert await wait_for_control(only_a, "subscribed") == {
            "op": "subscribed", "run_id": "a", "since": 0, "last_seq": 0,
        }  # fmt: skip
        producer = ResendingProducer(relay.url, "multi")
        await producer.publish_all([event("a" if i % 2 else "b", i) for i in range(1, 101)])
        await everything.wait_for(100)
        assert [e["seq"] for e in everything.events if e["run_id"] == "a"] == list(range(1, 51))
        assert [e["seq"] for e in everything.events if e["run_id"] == "b"] == list(range(1, 51))
        await only_a.wait_for(50)
        assert only_a.seqs() == list(range(1, 51))
        # Subscribing again over the same connection, with a position, restarts from there.
        await only_a.conn.send(json.dumps({"op": "subscribe", "run_id": "a", "since": 40}))
        await only_a.wait_for(60)
        assert only_a.seqs("a")[50:] == list(range(41, 51))
