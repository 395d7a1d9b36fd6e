"""A burst after a write stall must not cut healthy subscribers.

Another process holding SQLite's write lock (a backup, the sqlite3 shell) stalls commits
while producers keep sending; when the lock goes, megabytes commit at once and reach every
subscriber in one go. Judged by that one write, fast ``/subscribe``, ``*`` and root
subscribers were cut as slow consumers (3 of 3 trials), and ``*`` and root subscribers
cannot resume: they missed events. A subscriber is now judged by whether it drains over
time; one that really does not read is still cut.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fedrelay.relay.server import HARD_QUEUE_FACTOR
from tests.support.clients import Collector, ResendingProducer, event, until
from tests.support.memory import memory_kib, peak_growth_mib
from tests.support.metrics import scrape, wait_for_metric
from tests.support.sockets import send_handshake, tiny_receive_socket

pytestmark = pytest.mark.timeout(180)

PAD = "s" * 4000
RATE_FRAMES = 100
"""Frames of 20 events a second: ~8 MB/s, so a 1.5 s stall leaves ~12 MB to commit at once."""
STALL = 1.5
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))  # the stall itself: the relay's commits wait for this lock
db.execute("ROLLBACK")
print("released", flush=True)
"""


class RootReader:
    """A root-path (``/``) connection: every event in the legacy shape, one frame each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seqs: list[int] = []
        self.closed: ConnectionClosed | None = None

    async def run(self, ready: asyncio.Event) -> None:
        async with connect(self.url + "/", compression=None, max_size=None) as conn:
            ready.set()
            try:
                async for frame in conn:
                    data = json.loads(frame).get("data", {})
                    if data.get("run_id") == "burst":
                        self.seqs.append(data["seq"])
            except ConnectionClosed as exc:
                self.closed = exc


async def test_a_burst_after_a_write_stall_cuts_only_the_subscriber_that_does_not_read(relay):
    total_frames = 600
    events = [event("burst", i, pad=PAD) for i in range(1, 20 * total_frames + 1)]
    producer = ResendingProducer(relay.url, "steady", pace=1 / RATE_FRAMES)
    await producer.publish_all(events[:1])
    limit = 4 << 20  # the default --max-queue-bytes

    root = RootReader(relay.url)
    root_ready = asyncio.Event()
    root_task = asyncio.create_task(root.run(root_ready))
    await asyncio.wait_for(root_ready.wait(), 10)
    slow = tiny_receive_socket(relay.port)
    send_handshake(slow, relay.port, "/subscribe?run_id=burst&since=0")
    rss_before = memory_kib(relay.proc.pid)["VmRSS"]
    try:
        async with (
            Collector(relay.url, "run_id=burst&since=0") as named,
            Collector(relay.url, "run_id=*") as every,
        ):
            await named.wait_for(1)
            await until(lambda: any(c.get("op") == "subscribed" for c in every.controls))
            publishing = asyncio.create_task(producer.publish_all(events[1:], batch=20, timeout=150))
            await until(lambda: len(named.events) > 1000, timeout=60)

            locker = await asyncio.create_subprocess_exec(
                sys.executable, "-c", LOCKER, relay.db, str(STALL), stdout=subprocess.PIPE
            )
            assert locker.stdout is not None
            assert await asyncio.wait_for(locker.stdout.readline(), 10) == b"locked\n"
            released = asyncio.create_task(locker.stdout.readline())
            burst_events = 0  # the most events waiting for the lock: what commits at once after it
            while not released.done():
                figures = scrape(relay)
                burst_events = max(burst_events, int(figures["fedrelay_store_lag_events"]))
                await asyncio.sleep(0.05)
            assert released.result() == b"released\n"
            await locker.wait()

            await asyncio.wait_for(publishing, 150)
            total = len(events)

            def settled() -> bool:  # each has every event, or was closed
                return (
                    (named.closed is not None or len(named.events) >= total)
                    and (every.closed is not None or len(every.events) >= total - 1)
                    and (root.closed is not None or len(root.seqs) >= total - 1)
                )

            await until(settled, timeout=60)

            # The fast subscribers, of every kind, were never cut and missed nothing.
            assert named.closed is None and every.closed is None and root.closed is None
            assert named.seqs() == list(range(1, total + 1))
            first_live = every.seqs()[0]
            assert every.seqs() == list(range(first_live, total + 1))
            assert root.seqs == list(range(root.seqs[0], total + 1))
            # The one that never reads was cut, and it alone.
            await wait_for_metric(relay, "fedrelay_slow_consumers_total", 1)
            assert (scrape(relay))["fedrelay_slow_consumers_total"] == 1
            growth = peak_growth_mib(relay.proc.pid, rss_before)
            bound = 4 * HARD_QUEUE_FACTOR * limit / (1 << 20) + 64
            print(f"burst of {burst_events} events (~{burst_events * 4.1 / 1000:.0f} MB) after {STALL} s;")
            print(f"peak RSS growth {growth:.1f} MiB; bound {bound:.0f} MiB (4 subscribers at the hard cap)")
            assert burst_events * 4100 > 2 * limit, "the stall left too little to burst: not the scenario"
            assert growth < bound
    finally:
        slow.close()
        root_task.cancel()
        await asyncio.gather(root_task, return_exceptions=True)
