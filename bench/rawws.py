"""A minimal WebSocket subscriber on a raw asyncio Protocol.

Why not the ``websockets`` client: 100 subscribers x 500 events/s is 50,000
frames/s, and a full client (frame objects, UTF-8 decoding, message queue,
one task per connection) spends enough CPU per frame to become the
bottleneck on a 2-core machine and to inflate the latency it is supposed to
measure. This client does the HTTP upgrade itself, parses the unmasked
server frames in place and never JSON-decodes an event: it counts events by
a marker key and pulls ``sent_ns`` out with one regex.

Every bench event carries ``"sent_ns"`` in its ``data`` exactly once, so the
number of events in a frame (one object, or a JSON array from fedrelay) is
the number of times the marker occurs. Frames without the marker are
control frames (``{"op": ...}``) or non-bench events and are decoded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import time
from array import array
from collections.abc import Sequence
from typing import Any, Protocol

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENT_MARKER = b'"sent_ns"'
SENT_NS_RE = re.compile(rb'"sent_ns": ?(\d+)')
MAX_CONTROLS_KEPT = 20

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def client_frame(opcode: int, payload: bytes) -> bytes:
    """Encode a small masked client frame (pong, close): clients must mask."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    if len(payload) >= 126:
        raise ValueError("control payloads are at most 125 bytes")
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + masked


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """Build the upgrade request and the Sec-WebSocket-Accept value to expect."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    return request, accept


class RawSubscriber(asyncio.Protocol):
    """One subscriber connection: counts events, records latency on demand.

    ``record_latency`` keeps ``receive_ns - sent_ns`` (both CLOCK_MONOTONIC,
    which is system-wide on Linux) for every event with a non-zero
    ``sent_ns``; ``keep_payloads`` keeps the raw event frames so a caller
    can check seq order after the clock has stopped.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        record_latency: bool = False,
        keep_payloads: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.host, self.port, self.path = host, port, path
        self.count = 0
        self.frames = 0
        self.reads = 0
        self.other_frames = 0
        self.first_ns = 0
        self.last_ns = 0
        self.latencies: array[int] | None = array("q") if record_latency else None
        """Flat (sent_ns, latency_ns) pairs, so latency can be plotted against time."""
        self.payloads: list[bytes] | None = [] if keep_payloads else None
        self.controls: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.handshake_done: asyncio.Future[None] = loop.create_future()
        self.subscribed: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._frag = bytearray()
        self._frag_open = False
        self._handshaking = True
        self._accept = b""
        self._want = 0
        self._want_fut: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request as soon as TCP is up."""
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request, self._accept = handshake_request(self.host, self.port, self.path)
        transport.write(request)

    def data_received(self, data: bytes) -> None:
        """Take one receive timestamp per read, then parse what arrived."""
        now = time.monotonic_ns()
        self.reads += 1
        if self._handshaking:
            self._buf += data
            data = self._finish_handshake()
            if not data:
                return
        self._parse(data, now)
        if self._want_fut is not None and self.count >= self._want:
            if not self._want_fut.done():
                self._want_fut.set_result(None)
            self._want_fut = None

    def connection_lost(self, exc: Exception | None) -> None:
        """Resolve every waiter so nobody hangs on a dead connection."""
        err = ConnectionError(f"closed: {self.close_code} {self.close_reason} {exc or ''}")
        for fut in (self.handshake_done, self.subscribed, self._want_fut):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be waiting on it
        if not self.closed.done():
            self.closed.set_result(None)

    # -- public helpers -----------------------------------------------------

    def wait_count(self, target: int) -> asyncio.Future[None]:
        """A future that resolves once ``count >= target`` (one waiter at a time)."""
        fut = asyncio.get_running_loop().create_future()
        if self.count >= target:
            fut.set_result(None)
        elif self.closed.done():
            fut.set_exception(ConnectionError("connection closed"))
        else:
            self._want, self._want_fut = target, fut
        return fut

    def close(self) -> None:
        """Start a clean close; the transport is aborted if the peer stalls."""
        if self._transport is not None and not self._transport.is_closing():
            payload = (1000).to_bytes(2, "big")
            self._transport.write(client_frame(OP_CLOSE, payload))
            self._transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        if self._transport is not None:
            self._transport.abort()

    # -- internals ----------------------------------------------------------

    def _finish_handshake(self) -> bytes:
        """Check the 101 answer; return bytes received after the headers."""
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                self._fail_handshake("oversized handshake response")
            return b""
        head = bytes(self._buf[:end]).decode("latin-1")
        rest = bytes(self._buf[end + 4 :])
        self._buf.clear()
        status = head.split("\r\n", 1)[0]
        if not status.startswith("HTTP/1.1 101"):
            self._fail_handshake(f"handshake refused: {status}")
            return b""
        if self._accept.decode() not in head:
            self._fail_handshake("bad Sec-WebSocket-Accept")
            return b""
        self._handshaking = False
        self.handshake_done.set_result(None)
        return rest

    def _fail_handshake(self, message: str) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(ConnectionError(message))
        if self._transport is not None:
            self._transport.abort()

    def _parse(self, data: bytes | bytearray, now: int) -> None:
        """Split ``data`` (plus any leftover) into frames without copying them."""
        buf = self._buf
        if buf:
            buf += data
            data = buf
        pos, n = 0, len(data)
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, header = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, header = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                self._fail_handshake("server sent a masked frame")
                return
            end = pos + header + length
            if end > n:
                break
            self._frame(b0, data, pos + header, end, now)
            pos = end
        if data is buf:
            del buf[:pos]
        elif pos < n:
            buf += data[pos:]

    def _frame(self, b0: int, data: bytes | bytearray, start: int, end: int, now: int) -> None:
        """Dispatch one complete frame by opcode."""
        opcode, fin = b0 & 0x0F, b0 & 0x80
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self._message(data, start, end, now)
            else:
                self._frag = bytearray(data[start:end])
                self._frag_open = True
        elif opcode == OP_CONT and self._frag_open:
            self._frag += data[start:end]
            if fin:
                message = bytes(self._frag)
                self._frag, self._frag_open = bytearray(), False
                self._message(message, 0, len(message), now)
        elif opcode == OP_PING and self._transport is not None:
            self._transport.write(client_frame(OP_PONG, bytes(data[start:end])))
        elif opcode == OP_CLOSE:
            self._on_close(bytes(data[start:end]))

    def _message(self, data: bytes | bytearray, start: int, end: int, now: int) -> None:
        """Count bench events by marker; decode anything else as control."""
        self.frames += 1
        events = data.count(EVENT_MARKER, start, end)
        if not events:
            self._control(bytes(data[start:end]))
            return
        if not self.count:
            self.first_ns = now
        self.count += events
        self.last_ns = now
        if self.latencies is not None:
            for sent in SENT_NS_RE.findall(data, start, end):
                sent_ns = int(sent)
                if sent_ns:
                    self.latencies.append(sent_ns)
                    self.latencies.append(now - sent_ns)
        if self.payloads is not None:
            self.payloads.append(bytes(data[start:end]))

    def _control(self, payload: bytes) -> None:
        """Keep the first few non-event frames; resolve ``subscribed``."""
        self.other_frames += 1
        try:
            message = json.loads(payload)
        except ValueError:
            message = {"undecodable": payload[:200].decode("utf-8", "replace")}
        if not isinstance(message, dict):
            message = {"non_object": str(message)[:200]}
        if len(self.controls) < MAX_CONTROLS_KEPT:
            self.controls.append(message)
        if message.get("op") == "subscribed" and not self.subscribed.done():
            self.subscribed.set_result(message)

    def _on_close(self, payload: bytes) -> None:
        """Record the close code and reason (1013 = slow consumer) and answer."""
        if len(payload) >= 2:
            self.close_code = int.from_bytes(payload[:2], "big")
            self.close_reason = payload[2:].decode("utf-8", "replace")
        else:
            self.close_code = 1005
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(client_frame(OP_CLOSE, payload[:2]))
            self._transport.close()


async def connect_subscriber(
    host: str,
    port: int,
    path: str,
    *,
    timeout: float = 10.0,
    wait_subscribed: bool = True,
    **options: bool,
) -> RawSubscriber:
    """Open one subscriber and wait for the handshake and the ``subscribed`` frame."""
    loop = asyncio.get_running_loop()
    proto = RawSubscriber(host, port, path, **options)
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: proto, host, port)
        await proto.handshake_done
        if wait_subscribed:
            await proto.subscribed
    return proto


async def connect_many(
    host: str,
    port: int,
    path: str,
    count: int,
    *,
    concurrency: int = 50,
    timeout: float = 30.0,
    **options: bool,
) -> tuple[list[RawSubscriber], list[str]]:
    """Open ``count`` subscribers, at most ``concurrency`` handshakes at a time.

    Bounded so a burst of SYNs cannot overflow the relay's listen backlog
    (which would add 1 s SYN retransmits and look like a slow relay).
    """
    gate = asyncio.Semaphore(concurrency)
    subs: list[RawSubscriber] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                subs.append(await connect_subscriber(host, port, path, timeout=timeout, **options))
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))
    return subs, errors


class Closable(Protocol):
    """What close_all needs of a client: both client kinds in bench/ have it."""

    closed: asyncio.Future[Any]

    def close(self) -> None: ...

    def abort(self) -> None: ...


async def close_all(subs: Sequence[Closable], timeout: float = 5.0) -> None:
    """Close cleanly; abort what has not finished by the deadline."""
    for sub in subs:
        sub.close()
    pending = [sub.closed for sub in subs if not sub.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for sub in subs:
        if not sub.closed.done():
            sub.abort()
