"""Store reads: none for clients already gone, and catch-up never behind the HTTP API.

One reader connection used to serve everything in arrival order, including reads for
clients that had left: 300 HTTP requests whose sockets closed at once delayed a new
subscriber's first catch-up event from 34 ms to 10.1 s.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from tests.support.clients import Collector, ResendingProducer, event
from tests.support.metrics import scrape, wait_for_metric
from tests.support.raw_http import read_response, request, status_of
from tests.support.relay_process import RelayProcess

pytestmark = pytest.mark.timeout(180)

BIG = 8000
PAD = "b" * 2000
"""~2 KB events: an events page (4 MiB at most) is ~2000 of them, tens of ms to read."""
SMALL = 200


@pytest.fixture
def backend_relay_factory(relay_factory, backend_db, tmp_path):
    """A test on both backends: its relay on a fresh SQLite file or PostgreSQL database."""

    def make(*args: str) -> RelayProcess:
        if backend_db.startswith("postgresql"):
            return relay_factory(*args, db=backend_db, log_dir=tmp_path)
        return relay_factory(*args, db=backend_db)

    return make


async def stored_runs(relay) -> None:
    producer = ResendingProducer(relay.url, "filler")
    big = [event("big", i, pad=PAD) for i in range(1, BIG + 1)]
    small = [event("small", BIG + i) for i in range(1, SMALL + 1)]
    await producer.publish_all(big + small, batch=200, timeout=120)


def address(i: int) -> str:
    """Client addresses 127.0.1.x: each under the per-address API limit."""
    return f"127.0.1.{1 + i % 250}"


async def test_reads_for_clients_already_gone_are_skipped(backend_relay_factory):
    relay = backend_relay_factory("--replay-size", "10")
    await stored_runs(relay)
    target = request("/api/runs/big/events?limit=10000")
    count = 300

    def fire_and_leave() -> None:
        for i in range(count):
            with socket.create_connection(("127.0.0.1", relay.port), source_address=(address(i), 0)) as sock:
                sock.sendall(target)

    await asyncio.to_thread(fire_and_leave)
    async with Collector(relay.url, "run_id=small&since=0") as sub:
        await sub.wait_for(SMALL, timeout=60)
    assert sub.seqs() == list(range(1, SMALL + 1))

    async def burst_handled() -> float:
        figures = scrape(relay)
        done = figures.get('fedrelay_store_reads_total{outcome="done",queue="api"}', 0)
        skipped = figures.get('fedrelay_store_reads_total{outcome="skipped",queue="api"}', 0)
        return done + skipped

    async def all_handled() -> None:
        while await burst_handled() < count:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(all_handled(), 60)
    figures = scrape(relay)
    skipped = figures['fedrelay_store_reads_total{outcome="skipped",queue="api"}']
    print(f"{count} requests from clients gone at once: {int(skipped)} reads skipped")
    assert skipped >= count * 0.9


async def test_catch_up_reads_do_not_wait_behind_api_reads(relay_factory):
    """40 clients (40 addresses) ask for 4 MiB event pages; while the relay works through
    them, a new subscriber's catch-up is served from its own reader, not after them.

    SQLite only: the PostgreSQL store serves catch-up and API reads from one pool of 4
    connections, so there the catch-up ends after 20 to 40 of the 40 pages (a relay
    difference, reported; see docs/testing.md)."""
    relay = relay_factory("--replay-size", "10")
    await stored_runs(relay)
    clients = 40
    target = request("/api/runs/big/events?limit=10000")
    answered: list[float] = []
    first_byte = threading.Event()
    statuses: list[int | None] = []

    def api_client(i: int) -> None:
        with socket.create_connection(
            ("127.0.0.1", relay.port), timeout=60, source_address=(address(i), 0)
        ) as s:
            s.sendall(target)
            s.settimeout(60)
            if s.recv(1, socket.MSG_PEEK):  # the relay has read its page and started the answer
                answered.append(time.monotonic())
                first_byte.set()
            statuses.append(status_of(read_response(s)))

    threads = [threading.Thread(target=api_client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(first_byte.wait, 60)  # the relay is reading pages; the rest are queued
    async with Collector(relay.url, "run_id=small&since=0") as sub:
        await sub.wait_for(SMALL, timeout=60)
        caught_up = time.monotonic()
    for thread in threads:
        await asyncio.to_thread(thread.join, 60)
    assert statuses == [200] * clients
    before = sum(1 for t in answered if t < caught_up)
    print(f"catch-up done after {before} of {clients} API pages were read")
    assert before < clients // 2, before
    await wait_for_metric(relay, 'fedrelay_store_reads_total{outcome="done",queue="catch_up"}', 1)
