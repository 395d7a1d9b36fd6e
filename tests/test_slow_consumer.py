"""A subscriber that stops reading is cut; everyone else misses nothing.

The relay bounds what waits for one subscriber (``--max-queue-bytes``); past
it the subscriber is closed with 1013 "slow consumer" and resumes with
``since``. The kernel buffers a few MB of a loopback socket before anything
waits in the relay at all, so the streams here are sized from the kernel's
send-buffer ceiling: big enough that a client that does not read is
certainly cut in the middle of the stream.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.clients import Collector, ResendingProducer, wait_for_control
from tests.support.metrics import scrape, wait_for_metric
from tests.support.slow_stream import BATCH, padded, seqs_in, stream_size
from tests.support.sockets import send_handshake, tiny_receive_socket
from tests.support.waiting import until

MAX_QUEUE = 65536


async def test_subscriber_that_stops_reading_is_cut_and_resumes_without_gap(relay_factory):
    relay = relay_factory("--max-queue-bytes", str(MAX_QUEUE))
    total = stream_size()
    events = [padded("slow", i) for i in range(1, total + 1)]
    producer = ResendingProducer(relay.url, "trainer", pace=0.002)
    await producer.publish_all(events[:1])

    # A client that reads the handshake and one frame, then stops: max_queue=1
    # makes websockets stop reading the socket, and the socket's window is tiny.
    sock = tiny_receive_socket(relay.port)
    slow = await connect(
        f"{relay.url}/subscribe?run_id=slow&since=0", sock=sock, max_queue=1, compression=None, max_size=None
    )
    try:
        async with Collector(relay.url, "run_id=slow&since=0") as healthy:
            await healthy.wait_for(1)
            await producer.publish_all(events[1:], batch=BATCH, timeout=60)
            await healthy.wait_for(total, timeout=30)
            await wait_for_metric(relay, "fedrelay_slow_consumers_total", 1)

            # The healthy subscriber got everything, in order, and is still connected.
            assert healthy.seqs() == list(range(1, total + 1))
            assert [e["id"] for e in healthy.events] == list(range(1, total + 1))
            assert healthy.closed is None
            assert [c["op"] for c in healthy.controls] == ["subscribed"]
        assert producer.acked == total
        assert producer.errors == []
        assert producer.connections == 2  # the producer was never disconnected

        # Now the slow client reads: what was queued before the cut, then the close.
        seen: list[int] = []

        async def read_to_the_end() -> None:
            async for frame in slow:
                seen.extend(seqs_in(frame))

        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(read_to_the_end(), 10)
    finally:
        await slow.close()
    rcvd = closed.value.rcvd
    assert rcvd is not None, "the relay closed without a close frame"
    assert rcvd.code == 1013
    assert rcvd.reason.startswith("slow consumer")
    assert seen == list(range(1, len(seen) + 1)), "gap or duplicate before the cut"
    assert 1 <= len(seen) < total, f"cut after {len(seen)} of {total}: not in the middle of the stream"

    # It resumes from the last seq it saw and gets exactly the rest.
    last = seen[-1]
    async with Collector(relay.url, f"run_id=slow&since={last}") as resumed:
        subscribed = await wait_for_control(resumed, "subscribed")
        assert subscribed == {"op": "subscribed", "run_id": "slow", "since": last, "last_seq": total}
        await resumed.wait_for(total - last, timeout=30)
        assert resumed.seqs() == list(range(last + 1, total + 1))
        assert resumed.closed is None
    # Only the client that stopped reading was ever cut.
    assert (await asyncio.to_thread(scrape, relay))["fedrelay_slow_consumers_total"] == 1
    assert "cut slow consumer" in relay.log()


async def test_raw_socket_that_never_reads_is_cut_while_the_stream_goes_on(relay_factory):
    relay = relay_factory("--max-queue-bytes", str(MAX_QUEUE))
    total = stream_size()
    events = [padded("raw", i) for i in range(1, total + 1)]
    producer = ResendingProducer(relay.url, "trainer", pace=0.002)
    await producer.publish_all(events[:1])

    # Handshake by hand, read the 101 answer, and never read again.
    sock = tiny_receive_socket(relay.port)
    send_handshake(sock, relay.port, "/subscribe?run_id=raw&since=0")
    sock.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.to_thread(sock.recv, 1)
        assert chunk, "relay closed the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        before = await asyncio.to_thread(scrape, relay)
        assert before['fedrelay_connections{endpoint="subscribe"}'] == 1
        query = "run_id=raw&since=0"
        async with Collector(relay.url, query) as a, Collector(relay.url, query) as b:
            await a.wait_for(1)
            await b.wait_for(1)
            await producer.publish_all(events[1:], batch=BATCH, timeout=60)
            await until(lambda: len(a.events) >= total and len(b.events) >= total, timeout=30)
            await wait_for_metric(relay, "fedrelay_slow_consumers_total", 1)
            for sub in (a, b):
                assert sub.seqs() == list(range(1, total + 1))
                assert sub.closed is None
            after = await asyncio.to_thread(scrape, relay)
            assert after["fedrelay_events_in_total"] == total
            assert after["fedrelay_slow_consumers_total"] == 1  # the raw socket, not a or b
        assert producer.acked == total
        assert producer.errors == []
        assert producer.connections == 2
    finally:
        sock.close()
