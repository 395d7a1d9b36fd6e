"""What one client can make the relay hold, measured on a real relay process (VmHWM, its peak RSS).

Each test reproduces an attack that once cost hundreds of MiB to GiB (issue 14) and checks the
peak stays under the bound docs/security.md states, computed from the relay's settings:

- deflated frames that inflate to megabytes (``--compression``), on /publish and /subscribe;
- unfinished requests with large headers (pre-auth, no token needed);
- API answers requested and never read, and pages capped in characters where emoji are 4 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct

import pytest
from websockets.asyncio.client import connect

from fedrelay.relay.connection import HANDSHAKES_PER_ADDRESS, READ_AHEAD_FRAMES, REQUEST_BYTES_MAX
from fedrelay.relay.http import API_READS_PER_ADDRESS, MAX_RESPONSE_BYTES
from tests.support.clients import ResendingProducer, event
from tests.support.memory import memory_kib, peak_growth_mib
from tests.support.metrics import scrape, wait_for_metric
from tests.support.raw_http import OTHER, raw_exchange, request, scrape_from_other, status_of
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until, wait_until
from tests.support.wsframes import open_deflating

MIB = 1 << 20
SLACK_MIB = 32
"""Allocator and interpreter noise on top of a bound (the relay idles at ~50 MiB)."""

pytestmark = pytest.mark.timeout(120)


def settle_rss(relay: RelayProcess) -> int:
    return memory_kib(relay.proc.pid)["VmRSS"]


def close_code(sock: socket.socket) -> int | None:
    """Read server frames until a close frame; its code (None: closed without one)."""
    sock.settimeout(10)
    buffer = b""

    def need(count: int) -> bool:
        nonlocal buffer
        while len(buffer) < count:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buffer += chunk
        return True

    with contextlib.suppress(ConnectionResetError):
        while need(2):
            opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
            head = 2
            if size == 126:
                if not need(4):
                    return None
                size, head = struct.unpack("!H", buffer[2:4])[0], 4
            elif size == 127:
                if not need(10):
                    return None
                size, head = struct.unpack("!Q", buffer[2:10])[0], 10
            if not need(head + size):
                return None
            payload, buffer = buffer[head : head + size], buffer[head + size :]
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    return None


# -- 1. compression bomb ----------------------------------------------------------------

FRAME = 256 * 1024
BOMBERS = 32
FRAMES_EACH = 17


async def test_deflated_frames_inflate_at_most_to_the_frame_limit_and_the_read_ahead(relay_factory):
    """32 connections (half /publish, half /subscribe) each write 17 deflated frames at once:
    a few hundred bytes each on the wire. Frames of exactly the frame limit are decoded a
    read-ahead at a time; frames past it close the connection (1009) before they inflate."""
    relay = relay_factory("--compression", "--max-frame-bytes", str(FRAME))
    before = settle_rss(relay)
    bound_mib = BOMBERS * (READ_AHEAD_FRAMES + 3) * FRAME / MIB + SLACK_MIB

    def bombers() -> list:
        return [
            open_deflating(relay.port, f"/publish?producer=bomb-{i}" if i % 2 else "/subscribe?run_id=*")
            for i in range(BOMBERS)
        ]

    # At the limit: refused one by one as bad JSON, never more than the read-ahead inflated.
    opened = await asyncio.to_thread(bombers)
    try:
        for sock, deflate in opened:
            sock.sendall(b"".join(deflate.frame(b" " * FRAME) for _ in range(FRAMES_EACH)))
        await wait_for_metric(relay, 'fedrelay_rejected_total{code="bad_json"}', BOMBERS * FRAMES_EACH, 60)
        at_limit = peak_growth_mib(relay.proc.pid, before)
    finally:
        for sock, _ in opened:
            sock.close()

    # Past the limit (the old hard limit was 4x): closed with 1009 before anything inflates.
    opened = await asyncio.to_thread(bombers)
    try:
        for sock, deflate in opened:
            sock.sendall(b"".join(deflate.frame(b" " * 4 * FRAME) for _ in range(FRAMES_EACH)))

        async def handled() -> bool:  # every bomber closed, or (as before the fix) every frame refused
            figures = scrape(relay)
            still_open = sum(v for k, v in figures.items() if k.startswith("fedrelay_connections{"))
            refused = figures.get('fedrelay_rejected_total{code="too_large"}', 0)
            return still_open == 0 or refused >= BOMBERS * FRAMES_EACH

        await until(handled, 60, interval=0.05, what="every unread answer handled")
        past_limit = peak_growth_mib(relay.proc.pid, before)
        print(
            f"peak RSS growth {at_limit:.1f} MiB at the limit, {past_limit:.1f} past it (bound {bound_mib})"
        )
        assert past_limit < bound_mib, (at_limit, past_limit, bound_mib)
        codes = await asyncio.gather(*(asyncio.to_thread(close_code, sock) for sock, _ in opened))
        assert codes == [1009] * BOMBERS
    finally:
        for sock, _ in opened:
            sock.close()

    # A compressing client with frames under the limit is served as before.
    async with connect(f"{relay.url}/publish?producer=fine", compression="deflate") as conn:
        assert json.loads(await conn.recv())["op"] == "hello"
        await conn.send(json.dumps(event("fine", 1, pad="z" * (FRAME // 2))))
        assert json.loads(await asyncio.wait_for(conn.recv(), 10)) == {
            "op": "ack",
            "producer": "fine",
            "upto": 1,
        }


# -- 4. pre-auth: unfinished requests ---------------------------------------------------

PAD_LINE = b"X-Pad: " + b"a" * 8000 + b"\r\n"
"""Under websockets' 8192-byte line limit: 127 of them are a 1 MiB request it would accept."""


def unfinished(port: int, head: bytes) -> socket.socket | None:
    """A connection that sends ``head`` and never ends its request; None if the relay closed it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(head)
    except OSError:  # reset past the cap
        sock.close()
        return None
    return sock


async def test_request_headers_are_capped_in_bytes(relay_factory):
    relay = relay_factory()
    before = settle_rss(relay)
    head = b"GET /subscribe HTTP/1.1\r\nHost: 127.0.0.1\r\n" + PAD_LINE * 127  # no blank line: unfinished
    socks = await asyncio.to_thread(lambda: [unfinished(relay.port, head) for _ in range(200)])
    try:
        growth = peak_growth_mib(relay.proc.pid, before)
        bound_mib = HANDSHAKES_PER_ADDRESS * 2 * REQUEST_BYTES_MAX / MIB + SLACK_MIB
        print(f"200 requests of 1 MiB of headers: peak RSS growth {growth:.1f} MiB; bound {bound_mib}")
        assert growth < bound_mib
        figures = scrape(relay)
        assert figures['fedrelay_handshakes_refused_total{reason="request_too_large"}'] == 200
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
    # A complete request past the cap is answered 431, one under it as usual.
    large = request("/healthz", *[f"X-Pad-{i}: {'a' * 8000}" for i in range(5)])
    assert status_of(await asyncio.to_thread(raw_exchange, relay.port, large)) == 431
    assert (
        status_of(
            await asyncio.to_thread(raw_exchange, relay.port, request("/healthz", "X-Pad: " + "a" * 8000))
        )
        == 200
    )


async def test_unfinished_handshakes_per_address_are_capped(relay_factory):
    """Past HANDSHAKES_PER_ADDRESS unfinished requests from one address, more are closed at
    accept; another address is served meanwhile, and the first once its slots free up."""
    relay = relay_factory()
    extra = 40
    head = b"GET /subscribe HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    socks = await asyncio.to_thread(
        lambda: [unfinished(relay.port, head) for _ in range(HANDSHAKES_PER_ADDRESS + extra)]
    )
    try:
        assert status_of(await asyncio.to_thread(raw_exchange, relay.port, request("/healthz"), OTHER)) == 200
        figures = await asyncio.to_thread(scrape_from_other, relay)
        assert figures.get('fedrelay_handshakes_refused_total{reason="handshake_flood"}', 0) >= extra
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()

    def answered() -> bool:
        try:
            return status_of(raw_exchange(relay.port, request("/healthz"))) == 200
        except OSError:  # reset at accept while the relay still counts the closed ones
            return False

    await asyncio.to_thread(wait_until, answered, 10, what="the closed handshakes' slots to come back")


# -- 3. API answers never read ----------------------------------------------------------

EMOJI_EVENTS = 3000
EMOJI = "\U0001f642" * 2000
"""2000 characters, 8000 bytes of UTF-8: a page capped in characters is 4x its cap in bytes."""


async def test_api_pages_are_capped_in_bytes_and_unread_answers_per_address(relay_factory):
    relay = relay_factory("--replay-size", "10")
    events = [event("emoji", i, note=EMOJI) for i in range(1, EMOJI_EVENTS + 1)]
    await ResendingProducer(relay.url, "smiley").publish_all(events, batch=20, timeout=90)

    status, body = await asyncio.to_thread(relay.get, "/api/runs/emoji/events?limit=10000")
    assert status == 200
    page = json.loads(body)
    assert len(body) <= MAX_RESPONSE_BYTES + 64 * 1024, len(body)
    assert 0 < len(page["events"]) < EMOJI_EVENTS and page["next_since"] == page["events"][-1]["seq"]

    before = settle_rss(relay)
    target = request("/api/runs/emoji/events?limit=10000")

    def never_read() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(target)
        return sock

    socks = await asyncio.to_thread(lambda: [never_read() for _ in range(60)])
    try:
        await wait_for_metric(
            relay, 'fedrelay_handshakes_refused_total{reason="api_busy"}', 60 - API_READS_PER_ADDRESS
        )
        await wait_for_metric(
            relay, 'fedrelay_store_reads_total{outcome="done",queue="api"}', 1 + API_READS_PER_ADDRESS
        )
        growth = peak_growth_mib(relay.proc.pid, before)
        bound_mib = API_READS_PER_ADDRESS * 3 * MAX_RESPONSE_BYTES / MIB + SLACK_MIB
        print(f"60 unread event pages: peak RSS growth {growth:.1f} MiB; bound {bound_mib}")
        assert growth < bound_mib
        busy = await asyncio.to_thread(raw_exchange, relay.port, target)
        assert status_of(busy) == 503 and b"Retry-After: 1" in busy
        assert status_of(await asyncio.to_thread(raw_exchange, relay.port, target, OTHER)) == 200
    finally:
        for sock in socks:
            sock.close()
    # Closed, the slots come back.
    served = lambda: status_of(raw_exchange(relay.port, target)) == 200  # noqa: E731
    await asyncio.to_thread(wait_until, served, 10, what="the API slots to come back")
