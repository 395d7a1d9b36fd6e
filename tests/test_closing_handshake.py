"""A peer that answers the closing handshake and then keeps its TCP connection open.

websockets sets a close deadline when the closing handshake starts but enforces it only when the
relay next sends something, in practice its next keepalive ping. Such a peer (a client frozen
after its close frame, or a TLS proxy in front whose loop stopped) held its connection, its
per-address slot and a SIGTERM'd relay's shutdown until that ping; with ``--ping-interval 0``,
for ever. CI saw it as a relay behind a test TLS proxy that took more than 20 s to stop.

These relays run with ``--ping-interval 0``, so that only the close deadline can end such a
connection: without it, each test below waits until its timeout and fails.
"""

from __future__ import annotations

import socket
import struct

import pytest

from tests.support.waiting import wait_until
from tests.support.wsframes import masked_frame, upgrade_request

pytestmark = pytest.mark.timeout(120)

ENDPOINTS = {"/subscribe?run_id=closing": "subscribe", "/publish?producer=closing": "publish", "/": "root"}


def close_and_linger(port: int, target: str) -> socket.socket:
    """Open a WebSocket, complete the closing handshake, and keep the socket open, silent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
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


@pytest.mark.parametrize("target", list(ENDPOINTS))
def test_the_connection_ends_at_the_close_deadline_and_frees_its_slot(relay_factory, target):
    relay = relay_factory("--ping-interval", "0", "--max-connections-per-ip", "1")
    sock = close_and_linger(relay.port, target)
    try:
        wait_until(lambda: opens(relay.port, target), 30, what="the lingering connection's slot back")
    finally:
        sock.close()


def opens(port: int, target: str) -> bool:
    """Whether a WebSocket handshake from this address succeeds now (its slot is free)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upgrade_request(port, target))
        head = b""
        while b"\r\n\r\n" not in head and (chunk := sock.recv(1)):
            head += chunk
        return head.startswith(b"HTTP/1.1 101")


def test_sigterm_stops_the_relay_while_such_peers_keep_their_sockets(relay_factory):
    relay = relay_factory("--ping-interval", "0")
    socks = [close_and_linger(relay.port, target) for target in ENDPOINTS]
    try:
        assert relay.stop() == 0  # RelayProcess.stop waits 20 s for the exit, then fails
    finally:
        for sock in socks:
            sock.close()
