"""A peer that answers the closing handshake and then keeps its TCP connection open.

websockets sets a close deadline when the closing handshake starts but enforces it only when the
relay next sends something, in practice its next keepalive ping. Such a peer (a client frozen
after its close frame, or a TLS proxy in front whose loop stopped) held its connection, its
per-address slot and a SIGTERM'd relay's shutdown until that ping; with ``--ping-interval 0``,
for ever. CI saw it as a relay behind a test TLS proxy that took more than 20 s to stop.

The relay's own close of a subscriber that never reads (cut as a slow consumer, or at
shutdown) waited in websockets' ``close()`` for its write buffer to drain, without limit.

These relays run with ``--ping-interval 0``, so that only the close deadline can end such a
connection: without it, each test below waits until its timeout and fails.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.support.clients import ResendingProducer
from tests.support.metrics import wait_for_metric
from tests.support.raw_http import raw_exchange, status_of
from tests.support.slow_stream import BATCH, padded, stream_size
from tests.support.sockets import send_handshake, tiny_receive_socket
from tests.support.waiting import wait_until
from tests.support.wsframes import masked_frame, upgrade_request

pytestmark = pytest.mark.timeout(120)

ENDPOINTS = {"/subscribe?run_id=closing": "subscribe", "/publish?producer=closing": "publish", "/": "root"}


def close_and_linger(port: int, target: str, source: str = "127.0.0.1") -> socket.socket:
    """Open a WebSocket, complete the closing handshake, and keep the socket open, silent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(upgrade_request(port, target))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(masked_frame(struct.pack("!H", 1000), opcode=0x8))
    while read_frame(sock) != 0x8:  # what the relay sent first (a subscriber's hello), then its close
        pass
    return sock


def read_frame(sock: socket.socket) -> int:
    """Read one unmasked server frame; return its opcode."""
    first, size = recv_exactly(sock, 2)
    if size == 126:
        (size,) = struct.unpack("!H", recv_exactly(sock, 2))
    elif size == 127:
        (size,) = struct.unpack("!Q", recv_exactly(sock, 8))
    recv_exactly(sock, size)
    return first & 0x0F


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "the relay closed before its close frame"
        out += chunk
    return out


def test_the_connection_ends_at_the_close_deadline_and_frees_its_slot(relay_factory):
    relay = relay_factory("--ping-interval", "0", "--max-connections-per-ip", "1")
    # One client address per endpoint (Linux routes all of 127/8 to lo), each with one slot.
    clients = {target: f"127.0.0.{i}" for i, target in enumerate(ENDPOINTS, start=2)}
    socks = [close_and_linger(relay.port, target, source) for target, source in clients.items()]
    try:
        for target, source in clients.items():
            wait_until(lambda t=target, s=source: opens(relay.port, t, s), 30, what=f"{target}'s slot back")
    finally:
        for sock in socks:
            sock.close()


def opens(port: int, target: str, source: str) -> bool:
    """Whether a WebSocket handshake from ``source`` succeeds now (its slot is free)."""
    return status_of(raw_exchange(port, upgrade_request(port, target), source)) == 101


def test_sigterm_stops_the_relay_while_such_peers_keep_their_sockets(relay_factory):
    relay = relay_factory("--ping-interval", "0")
    socks = [close_and_linger(relay.port, target) for target in ENDPOINTS]
    try:
        assert relay.stop() == 0  # RelayProcess.stop waits 20 s for the exit, then fails
    finally:
        for sock in socks:
            sock.close()


async def test_sigterm_stops_the_relay_while_a_cut_subscriber_never_reads(relay_factory):
    relay = relay_factory("--ping-interval", "0", "--max-queue-bytes", "65536")
    total = stream_size()
    producer = ResendingProducer(relay.url, "trainer")
    await producer.publish_all([padded("backlog", i) for i in range(1, total + 1)], batch=BATCH)
    sock = tiny_receive_socket(relay.port)  # its catch-up fills the kernel's buffers, then the relay's
    try:
        send_handshake(sock, relay.port, "/subscribe?run_id=backlog&since=0")
        await wait_for_metric(relay, "fedrelay_slow_consumers_total", 1, timeout=60)
        assert await asyncio.to_thread(relay.stop) == 0  # RelayProcess.stop waits 20 s, then fails
    finally:
        sock.close()
