"""A peer that sends WebSocket pings and never reads: every ping makes websockets queue a pong,
below the relay's send-queue checks, and nothing stopped it. One /subscribe connection (no token
on a loopback relay) flooding pings for 15 s took a relay from 64 MiB to 431 MiB; the relay's own
keepalive would only have noticed after 40 s.

Now the relay cuts a connection whose unread backlog passes UNREAD_BACKLOG_FACTOR x
``--max-queue-bytes``, whatever queued it, as it does a subscriber's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time

import pytest
from websockets.asyncio.client import connect

from fedrelay.relay.connection import UNREAD_BACKLOG_FACTOR
from tests.support.memory import memory_kib, peak_growth_mib
from tests.support.metrics import metric

pytestmark = pytest.mark.timeout(120)

QUEUE = 1 << 20
"""--max-queue-bytes for these relays: the cut comes at 4 MiB of unread pongs."""
SLACK_MIB = 32
PING = bytes([0x89, 0x80 | 125]) + b"\x00" * 4 + b"p" * 125
"""A masked ping frame with the largest control payload: its pong is 127 bytes."""


def open_websocket(port: int, path: str) -> socket.socket:
    """A raw WebSocket connection that will never read again once the 101 is in."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def flood_pings(sock: socket.socket, budget: int, seconds: float) -> int:
    """Send pings until the relay drops the connection, ``budget`` bytes are sent, or time is up;
    returns the bytes sent."""
    chunk = PING * 512
    sent = 0
    sock.settimeout(2)
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):  # reset, broken pipe, or a send that no longer moves
        while sent < budget and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


@pytest.mark.parametrize("path", ["/subscribe", "/publish?producer=pinger", "/"])
async def test_a_ping_flood_that_never_reads_is_cut(relay_factory, path):
    relay = relay_factory("--max-queue-bytes", str(QUEUE))
    before = memory_kib(relay.proc.pid)["VmRSS"]
    sock = await asyncio.to_thread(open_websocket, relay.port, path)
    try:
        budget = 256 << 20  # 2 M pongs: 250 MiB queued without the cut
        sent = await asyncio.to_thread(flood_pings, sock, budget, 60)
    finally:
        sock.close()
    growth = peak_growth_mib(relay.proc.pid, before)
    bound = UNREAD_BACKLOG_FACTOR * QUEUE / (1 << 20) + SLACK_MIB
    print(f"{path}: {sent / (1 << 20):.0f} MiB of pings sent before the cut; peak growth {growth:.1f} MiB")
    assert sent < budget, "the relay kept reading pings it could not answer"
    assert growth < bound
    assert metric(relay, "fedrelay_slow_consumers_total") >= 1
    # The relay goes on: a client that reads gets its pong and its subscription.
    async with connect(f"{relay.url}/subscribe?run_id=r") as conn:
        pong = await conn.ping()
        await asyncio.wait_for(pong, 5)
        assert json.loads(await asyncio.wait_for(conn.recv(), 5))["op"] == "subscribed"
