"""Raw HTTP on a socket: requests the standard clients would refuse to send, answers read as
bytes, and /metrics asked from a second loopback address that a flood from 127.0.0.1 cannot
refuse."""

from __future__ import annotations

import contextlib
import socket

from tests.support.metrics import parse
from tests.support.relay_process import RelayProcess

OTHER = "127.0.0.2"
"""A second loopback address (Linux routes all of 127/8 to lo): a different client address."""


def raw_exchange(port: int, data: bytes, source: str | None = None, timeout: float = 5.0) -> bytes:
    """Send bytes and read the relay's answer: a whole response, or up to its close (a reset is one)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    ) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> bytes:
    """Until the close, or the end of a response: a 101's headers, or a Content-Length body."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            if not sep:
                continue
            if b" 101 " in head.split(b"\r\n", 1)[0]:
                break
            length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if length and len(body) >= int(length[0].split(b":")[1]):
                break
    return out


def status_of(response: bytes) -> int | None:
    """The status code of a raw HTTP response, or None when the relay closed without one."""
    if not response:
        return None
    line = response.split(b"\r\n", 1)[0].split(b" ")
    assert line[0] in (b"HTTP/1.1", b"HTTP/1.0"), response[:200]
    return int(line[1])


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""


def request(target: str | bytes, *headers: str, host: str | None = None, upgrade: bool = False) -> bytes:
    """A GET request; ``host`` replaces the Host header (None: 127.0.0.1)."""
    lines = [b"GET " + (target if isinstance(target, bytes) else target.encode()) + b" HTTP/1.1"]
    lines.append(f"Host: {host or '127.0.0.1'}".encode())
    if upgrade:
        lines += [
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
        ]
    lines += [h.encode() for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def http_get(relay: RelayProcess, target: str, source: str = OTHER) -> tuple[int | None, bytes]:
    """GET from another client address than the flood's, so the flood cannot refuse it."""
    response = raw_exchange(relay.port, request(target, "Connection: close"), source)
    return status_of(response), body_of(response)


def scrape_from_other(relay: RelayProcess) -> dict[str, float]:
    """/metrics asked from the other address, so that a flood from 127.0.0.1 cannot refuse it."""
    status, body = http_get(relay, "/metrics")
    assert status == 200
    return parse(body.decode())
