"""Regressions from review: each test failed on a defect that is now fixed.

- a lone surrogate escape (``"\\ud800"``) reached SQLite, whose commit then
  failed forever and jammed every run;
- store reads for catch-up shared the writer's connection and could see
  rows of a commit still in flight;
- a second subscribe (or an unsubscribe) during a catch-up left the first
  catch-up running, so old pages arrived after the new ``subscribed``;
- a catch-up to a client that never reads waited forever instead of
  cutting it as a slow consumer;
- an event that fits ``--max-frame-bytes`` could outgrow it once the relay
  added ``seq``, ``producer`` and ``timestamp``;
- SIGTERM hung while the store was failing and a producer was held by
  backpressure.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import time

from websockets.asyncio.client import connect

from tests.support.clients import Collector, ResendingProducer, event
from tests.support.metrics import scrape, wait_for_metric
from tests.support.relay_process import RelayProcess
from tests.support.sockets import kernel_send_buffer_max, send_handshake, tiny_receive_socket
from tests.support.waiting import until, wait_until


async def publish_raw(url: str, producer: str, frames: list[str], upto: int) -> list[dict]:
    """Send text frames as they are; return every control frame until ``ack upto``."""
    got: list[dict] = []
    async with connect(f"{url}/publish?producer={producer}", compression=None) as conn:
        assert json.loads(await conn.recv())["op"] == "hello"
        for frame in frames:
            await conn.send(frame)
        while not any(m.get("op") == "ack" and m["upto"] >= upto for m in got):
            got.append(json.loads(await asyncio.wait_for(conn.recv(), 10)))
    return got


async def test_lone_surrogate_is_refused_and_the_store_keeps_committing(relay):
    good = json.dumps(event("uni", 1))
    lone = json.dumps(event("uni", 2)).replace('"c1"', '"c\\ud800"')
    pair = json.dumps(event("uni", 3)).replace('"c1"', '"c\\ud83d\\ude00"')  # a valid escaped emoji
    got = await publish_raw(relay.url, "uni", [f"[{good},{lone},{pair}]"], upto=3)
    errors = [m for m in got if m["op"] == "error"]
    assert [(e["code"], e["index"], e["id"]) for e in errors] == [("bad_unicode", 1, 2)], errors
    # Later events are still stored: the writer is not stuck on the bad one.
    got = await publish_raw(relay.url, "uni", [json.dumps(event("uni", 4))], upto=4)
    assert not [m for m in got if m["op"] == "error"]
    status, page = relay.get_json("/api/runs/uni/events?since=0")
    assert status == 200
    assert [(e["seq"], e["id"]) for e in page["events"]] == [(1, 1), (2, 3), (3, 4)]
    assert page["events"][1]["data"]["client_id"] == "c\U0001f600"
    assert "Traceback" not in relay.log()


async def test_unsubscribe_echo_of_a_lone_surrogate_is_refused(relay):
    async with connect(f"{relay.url}/subscribe", compression=None) as conn:
        await conn.send('{"op": "unsubscribe", "run_id": "x\\udfff"}')
        answer = json.loads(await asyncio.wait_for(conn.recv(), 5))
    assert answer["op"] == "error" and answer["code"] == "bad_unicode", answer


async def test_joins_during_a_full_speed_stream_see_only_committed_rows(relay_factory):
    """With a tiny replay ring every join pages from the store while commits land."""
    relay = relay_factory("--replay-size", "5")
    total = 15_000
    producer = ResendingProducer(relay.url, "fast")
    publishing = asyncio.create_task(
        producer.publish_all([event("race", i) for i in range(1, total + 1)], batch=100)
    )
    await until(lambda: producer.acked > 0)
    collectors = []
    for fraction in range(8):
        await until(lambda f=fraction: producer.acked >= f * total // 10)
        c = Collector(relay.url, "run_id=race&since=0")
        await c.__aenter__()
        collectors.append(c)
    await asyncio.wait_for(publishing, 60)
    for c in collectors:
        await c.wait_for(total, timeout=30)
        await c.__aexit__()
        assert c.seqs() == list(range(1, total + 1))


class OrderedReader:
    """Every frame of one subscriber connection, controls and events, in arrival order."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.frames: list[dict] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.conn:
            msg = json.loads(frame)
            self.frames.extend(msg if isinstance(msg, list) else [msg])

    def after_last(self, op: str) -> list[dict]:
        marks = [i for i, f in enumerate(self.frames) if f.get("op") == op]
        return self.frames[marks[-1] + 1 :] if marks else []

    async def barrier(self) -> None:
        """Wait for a pong: everything the relay wrote before it has arrived."""
        pongs = sum(1 for f in self.frames if f.get("op") == "pong")
        await self.conn.send('{"op": "ping"}')
        await until(lambda: sum(1 for f in self.frames if f.get("op") == "pong") > pongs, timeout=20)


async def test_subscribing_again_during_a_catch_up_replaces_it(relay_factory):
    relay = relay_factory("--replay-size", "10")
    total = 40_000
    await ResendingProducer(relay.url, "p").publish_all(
        [event("again", i) for i in range(1, total + 1)], batch=500, timeout=120
    )
    url = f"{relay.url}/subscribe?run_id=again&since=0"
    async with connect(url, compression=None, max_size=None) as conn:
        reader = OrderedReader(conn)
        for since in (1000, 20_000, 39_000):
            await conn.send(json.dumps({"op": "subscribe", "run_id": "again", "since": since}))
        await until(lambda: len([f for f in reader.after_last("subscribed") if "seq" in f]) >= 1000)
        await reader.barrier()
        tail = [f["seq"] for f in reader.after_last("subscribed") if "seq" in f]
        assert tail == list(range(39_001, total + 1))


async def test_unsubscribing_during_a_catch_up_stops_it(relay_factory):
    relay = relay_factory("--replay-size", "10")
    total = 40_000
    await ResendingProducer(relay.url, "p").publish_all(
        [event("gone", i) for i in range(1, total + 1)], batch=500, timeout=120
    )
    async with connect(f"{relay.url}/subscribe?run_id=gone&since=0", compression=None, max_size=None) as conn:
        reader = OrderedReader(conn)
        await conn.send(json.dumps({"op": "unsubscribe", "run_id": "gone"}))
        await until(lambda: any(f.get("op") == "unsubscribed" for f in reader.frames))
        await reader.barrier()
        await reader.barrier()
        assert [f for f in reader.after_last("unsubscribed") if "seq" in f] == []
        assert len([f for f in reader.frames if "seq" in f]) < total


async def test_catch_up_to_a_reader_that_never_reads_is_cut(relay_factory):
    relay = relay_factory("--replay-size", "10", "--max-queue-bytes", "262144")
    pad = "p" * 2000
    count = 4 * (kernel_send_buffer_max() // 2000) + 2000
    await ResendingProducer(relay.url, "p").publish_all(
        [event("big", i, pad=pad) for i in range(1, count + 1)], batch=200, timeout=120
    )
    sock = tiny_receive_socket(relay.port)
    try:
        send_handshake(sock, relay.port, "/subscribe?run_id=big&since=0")
        await wait_for_metric(relay, "fedrelay_slow_consumers_total", 1, timeout=30)
        # Everyone else is unaffected: a reading subscriber gets the whole run.
        async with Collector(relay.url, "run_id=big&since=0") as c:
            await c.wait_for(count, timeout=60)
            assert c.seqs() == list(range(1, count + 1))
        assert (await asyncio.to_thread(scrape, relay))["fedrelay_slow_consumers_total"] == 1
    finally:
        sock.close()


async def test_event_that_would_outgrow_the_frame_limit_once_sequenced_is_refused(relay_factory):
    relay = relay_factory("--max-frame-bytes", "8192")
    fits = json.dumps(event("edge", 1, pad="x" * 4000))
    near = json.dumps(event("edge", 2, pad="x" * (8192 - 300)))
    assert len(near.encode()) <= 8192
    got = await publish_raw(relay.url, "edge", [fits, near], upto=2)
    errors = [m for m in got if m["op"] == "error"]
    assert [(e["code"], e["id"]) for e in errors] == [("too_large", 2)], errors
    async with Collector(relay.url, "run_id=edge&since=0") as c:
        await c.wait_for(1)
    assert c.seqs() == [1]


def small_files(limit: int):
    """preexec hook: files the relay writes may not grow past ``limit`` bytes (EFBIG)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


async def test_sigterm_while_the_store_fails_exits_and_says_what_was_lost(tmp_path):
    relay = RelayProcess(
        tmp_path / "full.db",
        preexec_fn=small_files(600_000),
        env={"FEDRELAY_MAX_STORE_LAG": "50"},
    ).start()
    try:
        pad = "f" * 1000
        producer = ResendingProducer(relay.url, "filler")
        filling = asyncio.create_task(
            producer.publish_all([event("full", i, pad=pad) for i in range(1, 5001)], timeout=120)
        )
        await asyncio.to_thread(
            wait_until, lambda: relay.get("/healthz")[0] == 503, 60, what="the store to fail"
        )
        # The producer is now held by backpressure; shutdown must still finish.
        relay.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(relay.proc.wait, 30)
        filling.cancel()
    finally:
        if relay.proc.poll() is None:
            relay.proc.kill()
    assert code == 1
    assert "not stored" in relay.log()


async def test_hello_reports_what_is_stored_not_what_is_queued(tmp_path):
    """An emitter drops what ``hello.last_id`` covers: it must never cover events
    that only sit in memory while the store fails (they die with the relay)."""
    relay = RelayProcess(tmp_path / "full.db", preexec_fn=small_files(400_000)).start()
    try:
        pad = "f" * 1000
        producer = ResendingProducer(relay.url, "careful")
        filling = asyncio.create_task(
            producer.publish_all([event("hello", i, pad=pad) for i in range(1, 2001)], timeout=120)
        )
        failing = lambda: relay.get("/healthz")[0] == 503  # noqa: E731
        await asyncio.to_thread(wait_until, failing, 60, what="a failing store")
        filling.cancel()

        async def hello_frame() -> dict | None:
            """The next connection's hello; None while the relay still holds the cancelled one
            (held by backpressure, it is not read: the relay's probe closes it within seconds)."""
            async with connect(f"{relay.url}/publish?producer=careful", compression=None) as conn:
                first = json.loads(await asyncio.wait_for(conn.recv(), 5))
            return None if first.get("code") == "producer_in_use" else first

        hello = await until(hello_frame, 30, interval=0.5, what="a hello for the producer's next connection")
        health = relay.get_json("/healthz")[1]
        stored = relay.get_json("/api/runs/hello")[1]["last_seq"]
    finally:
        relay.proc.kill()
        relay.proc.wait()
    assert hello["op"] == "hello"
    assert (hello["last_id"] or 0) == stored == producer.acked, (hello, stored, producer.acked, health)
    assert stored < 2000


async def test_an_event_that_grows_when_re_encoded_is_refused(relay_factory):
    relay = relay_factory("--max-frame-bytes", "4096")
    # 1e15 is 4 characters as sent and 18 once re-encoded (1000000000000000.0).
    grows = {"type": "status", "run_id": "grow", "id": 1, "data": {"v": [1e15] * 200}}
    text = json.dumps(grows).replace("1000000000000000.0", "1e15")
    assert len(text) < 4096 - 1024
    got = await publish_raw(relay.url, "grow", [text, json.dumps(event("grow", 2))], upto=2)
    errors = [m for m in got if m["op"] == "error"]
    assert [(e["code"], e["id"]) for e in errors] == [("too_large", 1)], errors
    assert relay.get_json("/api/runs/grow")[1]["last_seq"] == 1  # only event 2, as seq 1


async def test_a_publisher_that_never_reads_its_errors_is_cut(relay_factory):
    relay = relay_factory("--max-queue-bytes", "65536")
    sock = tiny_receive_socket(relay.port)
    try:
        send_handshake(sock, relay.port, "/publish?producer=deaf")
        # Masked client text frames of 1000 bad events each: ~80 KB of errors per 2 KB sent.
        payload = ("[" + ",".join(["1"] * 1000) + "]").encode()
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x81, 0xFE]) + len(payload).to_bytes(2, "big") + mask + masked

        def flood() -> None:
            # Until the relay cuts the connection, not a fixed count: on a loaded machine the
            # relay reads slower, and the errors of a fixed number of frames can all fit in the
            # kernel's socket buffers, where they cost the relay nothing and earn no cut.
            sock.settimeout(5)
            deadline = time.monotonic() + 60
            try:
                while time.monotonic() < deadline:
                    sock.sendall(frame)
            except OSError:
                pass  # cut: that is the point

        await asyncio.to_thread(flood)
        await wait_for_metric(relay, "fedrelay_slow_consumers_total", 1, timeout=30)
    finally:
        sock.close()
    assert "does not read the relay's replies" in relay.log()
    # Everyone else is fine.
    got = await publish_raw(relay.url, "ok", [json.dumps(event("after", 1))], upto=1)
    assert not [m for m in got if m["op"] == "error"]


def test_a_second_relay_on_the_same_database_is_refused(relay, tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "fedrelay", "serve", "--port", "0", "--db", relay.db],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "another relay is using this database" in out.stderr
