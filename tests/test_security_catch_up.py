"""One address cannot make every other subscriber's catch-up wait behind its own.

Catch-up reads share one reader connection, first come first served. One client address
could put thousands of reads in that line at once (1024 runs per connection, any number of
connections): a subscriber from another address then waited for all of them before its first
event (8 connections x 1000 runs: seconds). Now an address has at most
CATCH_UP_READS_PER_ADDRESS reads in the line; its other catch-ups wait for one of those turns.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect

from fedrelay.relay.server import CATCH_UP_READS_PER_ADDRESS
from tests.support.clients import ResendingProducer, event
from tests.support.metrics import scrape, wait_for_metric
from tests.support.raw_http import OTHER

pytestmark = pytest.mark.timeout(180)

RUNS = 1000
PER_RUN = 12
"""More events than the replay ring keeps (--replay-size 10): every subscription pages from the store."""
CONNECTIONS = 8
DONE = 'fedrelay_store_reads_total{outcome="done",queue="catch_up"}'


async def test_one_address_cannot_fill_the_catch_up_line(relay_factory):
    relay = relay_factory("--replay-size", "10")
    events = [event(f"run-{r}", r * PER_RUN + i + 1) for r in range(RUNS) for i in range(PER_RUN)]
    events += [event("victim", RUNS * PER_RUN + i + 1) for i in range(PER_RUN)]
    await ResendingProducer(relay.url, "filler").publish_all(events, batch=1000, timeout=120)

    # One address, many catch-ups at once: 8 connections subscribe to 1000 runs each, then read
    # nothing more (each catch-up writes its page and waits for the socket to drain).
    floods = []
    for _ in range(CONNECTIONS):
        conn = await connect(f"{relay.url}/subscribe", max_size=None, ping_interval=None)
        await conn.send("[]")  # a first frame, answered: the connection is live
        await conn.recv()
        floods.append(conn)
    before = scrape(relay).get(DONE, 0)
    for conn in floods:
        for r in range(RUNS):
            await conn.send(json.dumps({"op": "subscribe", "run_id": f"run-{r}", "since": 0}))
    await wait_for_metric(
        relay, 'fedrelay_subscriptions_total{start="catch_up"}', CONNECTIONS * RUNS, timeout=60
    )
    queued_at = scrape(relay).get(DONE, 0) - before
    # A subscriber from another address.
    started = time.perf_counter()
    async with connect(f"{relay.url}/subscribe?run_id=victim", local_addr=(OTHER, 0)) as victim:
        assert json.loads(await asyncio.wait_for(victim.recv(), 60))["op"] == "subscribed"
        first = json.loads(await asyncio.wait_for(victim.recv(), 60))
        waited = time.perf_counter() - started
        done_then = scrape(relay).get(DONE, 0) - before
    print(
        f"{CONNECTIONS * RUNS} catch-ups from one address ({queued_at:.0f} read when the victim came): "
        f"the victim's first event after {waited * 1000:.0f} ms and {done_then - queued_at:.0f} reads"
    )
    assert (first[0] if isinstance(first, list) else first)["seq"] == 1
    assert queued_at < CONNECTIONS * RUNS / 2, "the flood's reads were done before the victim came"
    assert done_then - queued_at < CATCH_UP_READS_PER_ADDRESS * 100  # without the turns: ~8000
    for conn in floods:
        conn.transport.abort()
