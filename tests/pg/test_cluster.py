"""Three relay processes on one PostgreSQL database act as one relay, through a node crash and a
PostgreSQL restart in the middle of the stream.

Producers: raw WebSocket producers that publish through a random node, leave it for another one
every few hundred events without waiting for acks and resend from ``hello.last_id`` (so events in
flight on one node are sent again through another), and real ``Emitter`` objects given every
node's address. Subscribers: raw WebSocket clients on every node, some from the start and some
joining mid-stream, that resume on their node with ``since`` = the last seq they saw. During the
stream one node is SIGKILLed and restarted, then PostgreSQL is stopped (every node answers
``/healthz`` 503) and started again. At the end every subscriber, and every node's events API,
hold every event exactly once, gap-free, in seq order, and agree with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from fedrelay.emitters import Emitter
from tests.support.postgres import PgServer
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until

RUNS = ("cluster-a", "cluster-b")
RAW_PRODUCERS = {"raw-1": "cluster-a", "raw-2": "cluster-a", "raw-3": "cluster-b"}
EMITTERS = {"emitter-1": "cluster-a", "emitter-2": "cluster-b"}
EVENTS_PER_PRODUCER = 1200
RATE = 100.0
"""Events per second per producer: the stream lasts ~12 s, long enough for both faults."""
DEADLINE = 90.0
"""No loop of the test outlives this (the test's own budget is ~60 s)."""

TRANSIENT = (OSError, ConnectionClosed, InvalidHandshake, TimeoutError)


def event(run_id: str, label: str, i: int, stamp: str) -> dict[str, Any]:
    """One producer's event ``i``: the same body every time it is sent, whichever node gets it."""
    return {
        "type": "client_progress",
        "run_id": run_id,
        "id": i,
        "timestamp": stamp,
        "source": {"role": "client", "client_id": label},
        "data": {"round": 1, "client_id": label, "i": i},
    }


def key(stored: dict[str, Any]) -> tuple[str, int]:
    """Who sent an event and which of theirs it was, whatever producer name it went under."""
    return stored["data"]["client_id"], stored["data"]["i"]


@dataclass
class Stats:
    failures: list[str] = field(default_factory=list)
    checks: int = 0
    reconnects: Counter[str] = field(default_factory=Counter)

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if not ok:
            self.failures.append(what)


class RawProducer:
    """Publishes ``total`` events through random nodes, switching every 100-300 events."""

    def __init__(self, label: str, run_id: str, nodes: list[RelayProcess], rng: random.Random, stats: Stats):
        self.label, self.run_id, self.nodes, self.rng, self.stats = label, run_id, nodes, rng, stats
        stamp = datetime.now(UTC).isoformat()
        self.events = [event(run_id, label, i, stamp) for i in range(1, EVENTS_PER_PRODUCER + 1)]
        self.acked = 0
        self.sent = 0
        """Highest id sent so far (paced: ids past it wait for their time)."""
        self.start = time.monotonic()

    def due(self) -> int:
        return min(len(self.events), int((time.monotonic() - self.start) * RATE) + 1)

    async def run(self, deadline: float) -> None:
        while self.acked < len(self.events):
            if time.monotonic() > deadline:
                self.stats.failures.append(f"{self.label}: acked {self.acked}/{len(self.events)} at deadline")
                return
            node = self.rng.choice(self.nodes)
            with contextlib.suppress(*TRANSIENT):  # a node down, PostgreSQL away: another node
                await self.session(node, switch_after=self.rng.randint(100, 300))
            self.stats.reconnects[self.label] += 1
            await asyncio.sleep(0.05)

    async def session(self, node: RelayProcess, switch_after: int) -> None:
        async with connect(
            f"{node.url}/publish?producer={self.label}", open_timeout=3, close_timeout=1, compression=None
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 3))
            if hello.get("op") != "hello":
                if hello.get("code") != "producer_in_use":  # the previous node has not noticed yet
                    self.stats.failures.append(f"{self.label}: {hello}")
                return
            self.acked = max(self.acked, hello["last_id"] or 0)
            reader = asyncio.create_task(self.read_acks(ws))
            try:
                next_id, sent_here = self.acked + 1, 0
                while next_id <= len(self.events) and sent_here < switch_after:
                    upto = min(self.due(), next_id + 9, len(self.events))
                    if upto < next_id:
                        await asyncio.sleep(0.01)
                        if reader.done():
                            return
                        continue
                    await ws.send(json.dumps(self.events[next_id - 1 : upto]))
                    sent_here += upto - next_id + 1
                    self.sent = max(self.sent, upto)
                    next_id = upto + 1
                if next_id > len(self.events):  # all sent: stay for the acks (or the next node's hello)
                    await asyncio.wait_for(self.all_acked(reader), 5)
            finally:
                reader.cancel()

    async def all_acked(self, reader: asyncio.Task[None]) -> None:
        while self.acked < len(self.events) and not reader.done():
            await asyncio.sleep(0.02)

    async def read_acks(self, ws) -> None:
        async for message in ws:
            frame = json.loads(message)
            if frame.get("op") == "ack":
                self.acked = max(self.acked, frame["upto"])
            elif frame.get("op") == "error":
                self.stats.failures.append(f"{self.label}: {frame}")


class Subscriber:
    """Follows one run on one node; resumes there from its last seq when the connection ends."""

    def __init__(self, node: RelayProcess, run_id: str, name: str, stats: Stats):
        self.node, self.run_id, self.name, self.stats = node, run_id, name, stats
        self.events: list[dict[str, Any]] = []
        self.expected: int | None = None

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    def take(self, item: dict[str, Any]) -> None:
        if item.get("seq") != self.last_seq + 1:
            self.stats.failures.append(f"{self.name}: seq {item.get('seq')} after {self.last_seq}")
        self.events.append(item)

    async def run(self, deadline: float) -> None:
        while self.expected is None or self.last_seq < self.expected:
            if time.monotonic() > deadline:
                self.stats.failures.append(f"{self.name}: {self.last_seq}/{self.expected} at deadline")
                return
            try:
                await self.session()
            except TRANSIENT:
                await asyncio.sleep(0.05)  # its node is down: the same node again once it is back
            self.stats.reconnects[self.name] += 1

    async def session(self) -> None:
        path = f"/subscribe?run_id={self.run_id}&since={self.last_seq}"
        async with connect(self.node.url + path, open_timeout=3, close_timeout=1, compression=None) as ws:
            while self.expected is None or self.last_seq < self.expected:
                try:
                    message = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue  # look at ``expected`` again
                frame = json.loads(message)
                if isinstance(frame, list):
                    for item in frame:
                        self.take(item)
                elif "op" in frame:
                    if frame["op"] != "subscribed":
                        self.stats.failures.append(f"{self.name}: {frame}")
                else:
                    self.take(frame)


def emit_paced(emitter: Emitter, label: str, start: float) -> None:
    """``EVENTS_PER_PRODUCER`` events at ``RATE``, from a thread (``emit`` never blocks)."""
    for i in range(1, EVENTS_PER_PRODUCER + 1):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing a producer, not waiting for a condition
        emitter.emit(
            "client_progress", {"round": 1, "client_id": label, "i": i}, role="client", client_id=label
        )


def paged(node: RelayProcess, run_id: str, limit: int = 500) -> tuple[list[dict[str, Any]], int]:
    """A run's stored events through the events API in pages of ``limit``; and how many pages."""
    events: list[dict[str, Any]] = []
    pages, since = 0, 0
    while True:
        status, page = node.get_json(f"/api/runs/{run_id}/events?since={since}&limit={limit}")
        assert status == 200, page
        if not page["events"]:
            return events, pages
        pages += 1
        events.extend(page["events"])
        since = page["next_since"]


def healthz(node: RelayProcess) -> int:
    try:
        return node.get("/healthz")[0]
    except OSError:
        return 0


async def answers(node: RelayProcess, status: int) -> bool:
    return await asyncio.to_thread(healthz, node) == status


@pytest.fixture
def pg(tmp_path):
    """A server of the test's own: it is stopped and started mid-stream."""
    server = PgServer(tmp_path / "pg").start()
    yield server
    server.remove()


async def test_three_relays_on_one_database_deliver_every_event_once_through_a_node_kill_and_a_pg_restart(
    pg, tmp_path, monkeypatch
):
    monkeypatch.setenv("FEDRELAY_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.delenv("FEDRELAY_URL", raising=False)
    rng = random.Random(15)
    stats = Stats()
    url = pg.fresh_db("cluster")
    nodes = []
    for i in range(3):
        node = RelayProcess(url)
        node.log_path = tmp_path / f"node{i}.log"
        nodes.append(node)
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
    deadline = time.monotonic() + DEADLINE
    emitters: dict[str, Emitter] = {}
    tasks: list[asyncio.Task[None]] = []
    try:
        subscribers = [
            Subscriber(node, run_id, f"sub-{run_id}-node{i}-early", stats)
            for i, node in enumerate(nodes)
            for run_id in RUNS
        ]
        tasks += [asyncio.create_task(s.run(deadline)) for s in subscribers]

        raw = [RawProducer(label, run_id, nodes, rng, stats) for label, run_id in RAW_PRODUCERS.items()]
        tasks += [asyncio.create_task(p.run(deadline)) for p in raw]
        start = time.monotonic()
        emitting = []
        for label, run_id in EMITTERS.items():
            urls = [node.url for node in rng.sample(nodes, len(nodes))]
            emitters[label] = Emitter(urls, run_id=run_id, max_backoff=0.3, spool_dir=tmp_path / label)
            emitting.append(asyncio.create_task(asyncio.to_thread(emit_paced, emitters[label], label, start)))
        total = EVENTS_PER_PRODUCER * (len(raw) + len(emitters))

        def acked_share() -> float:
            return sum(p.acked for p in raw) / (EVENTS_PER_PRODUCER * len(raw))

        # A node crashes a quarter of the way through and comes back on its port.
        await until(lambda: acked_share() >= 0.25, 30, what="a quarter of the raw producers' events acked")
        victim = nodes[1]
        await asyncio.to_thread(victim.kill)
        before = acked_share()
        await until(lambda: acked_share() >= before + 0.05, 30, what="the other nodes carrying on")
        await asyncio.to_thread(victim.start)

        # Late subscribers, on every node, while the stream goes on: backlog then live.
        late = [
            Subscriber(node, run_id, f"sub-{run_id}-node{i}-late", stats)
            for i, node in enumerate(nodes)
            for run_id in RUNS
        ]
        subscribers += late
        tasks += [asyncio.create_task(s.run(deadline)) for s in late]

        # PostgreSQL goes away past half-way: every node says so, then it comes back.
        await until(lambda: acked_share() >= 0.5, 30, what="half of the raw producers' events acked")
        await asyncio.to_thread(pg.stop)
        for node in nodes:
            await until(lambda node=node: answers(node, 503), 20, interval=0.05, what="/healthz 503")
        stats.check(True, "every node answered 503 while PostgreSQL was away")
        await asyncio.to_thread(pg.start)
        for node in nodes:
            await until(lambda node=node: answers(node, 200), 30, interval=0.05, what="/healthz 200")

        await asyncio.gather(*emitting)
        for label, emitter in emitters.items():
            flushed = await asyncio.to_thread(emitter.flush, 40)
            stats.check(flushed, f"{label} flushed: {emitter.last_error}")
        await until(lambda: all(p.acked == EVENTS_PER_PRODUCER for p in raw), 40, what="raw producers acked")

        expected = {
            run_id: {
                (label, i)
                for label, run in {**RAW_PRODUCERS, **EMITTERS}.items()
                if run == run_id
                for i in range(1, EVENTS_PER_PRODUCER + 1)
            }
            for run_id in RUNS
        }
        for sub in subscribers:
            sub.expected = len(expected[sub.run_id])
        _, pending = await asyncio.wait(tasks, timeout=max(5.0, deadline - time.monotonic()))
        for sub in subscribers:
            if sub.last_seq < sub.expected:
                stats.failures.append(f"{sub.name}: {sub.last_seq}/{sub.expected} events at the end")
        assert not pending and not stats.failures, stats.failures[:20]

        # Every subscriber: every event once, seqs 1..N in order.
        for sub in subscribers:
            seqs = [e["seq"] for e in sub.events]
            stats.check(seqs == list(range(1, sub.expected + 1)), f"{sub.name}: seqs not 1..N")
            keys = [key(e) for e in sub.events]
            stats.check(len(set(keys)) == len(keys), f"{sub.name}: an event twice")
            stats.check(set(keys) == expected[sub.run_id], f"{sub.name}: events missing or foreign")

        # Every node's store, page by page, the same, and the same as what subscribers got.
        for run_id in RUNS:
            reference = None
            for i, node in enumerate(nodes):
                stored, pages = await asyncio.to_thread(paged, node, run_id)
                stats.check(pages > 1, f"node{i} {run_id}: read in pages")
                seqs = [e["seq"] for e in stored]
                stats.check(seqs == list(range(1, len(expected[run_id]) + 1)), f"node{i} {run_id}: seqs")
                keys = [key(e) for e in stored]
                stats.check(Counter(keys) == Counter(expected[run_id]), f"node{i} {run_id}: events once each")
                status, run = await asyncio.to_thread(node.get_json, f"/api/runs/{run_id}")
                stats.check(status == 200 and run["last_seq"] == len(seqs), f"node{i} {run_id}: last_seq")
                if reference is None:
                    reference = stored
                stats.check(stored == reference, f"node{i} {run_id}: differs from node0")
            for sub in subscribers:
                if sub.run_id == run_id:
                    stats.check(sub.events == reference, f"{sub.name}: differs from the store")

        print(
            f"\ncluster: {len(nodes)} relays, {total} events in {len(RUNS)} runs from "
            f"{len(raw)} raw producers and {len(emitters)} emitters, {len(subscribers)} subscribers "
            f"({sum(len(s.events) for s in subscribers)} deliveries), "
            f"{sum(v for k, v in stats.reconnects.items() if k.startswith('raw'))} producer sessions, "
            f"{sum(v for k, v in stats.reconnects.items() if k.startswith('sub'))} subscriber sessions, "
            f"{stats.checks} checks, {len(stats.failures)} failures"
        )
        assert not stats.failures, stats.failures[:20]
    finally:
        for task in tasks:
            task.cancel()
        for emitter in emitters.values():
            emitter.close(1)
        for node in nodes:
            node.stop()
