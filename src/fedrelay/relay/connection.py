"""The relay's connection class: what one TCP connection may cost before and after its handshake.

- From accept to close it holds one slot of its client address (``--max-connections-per-ip``).
- Until its request is complete it also holds one of ``HANDSHAKES_PER_ADDRESS`` handshake slots,
  and may send at most ``REQUEST_BYTES_MAX`` bytes: an unfinished request costs at most that
  much memory, for at most the handshake timeout.
- With permessage-deflate, a few KiB on the wire can inflate to megabytes. websockets decodes
  every complete frame of a socket read before its read-ahead limit (``max_queue`` frames) can
  stop it, so one 256 KiB read of deflated frames could become gigabytes. Here a compressed
  connection's reads are fed to the protocol in steps that can inflate to at most about one
  frame, and the rest waits, still compressed, until the read-ahead queue has room again.

The relay (server.py) owns the counters and the decisions; this class only reports events of
the connection's life to it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

if TYPE_CHECKING:
    from .server import Relay

REQUEST_BYTES_MAX = 32 * 1024
"""Bytes a client may send before its request is complete (request line and headers):
browsers send a few KiB, cookies for localhost included."""
HANDSHAKES_PER_ADDRESS = 256
"""Connections of one client address whose request is not complete yet; more are closed at
accept. Clients open at most a few at a time; a load generator opening 1,000 subscribers
does it 50 at a time."""
READ_AHEAD_FRAMES = 4
"""Frames websockets reads ahead of the relay on one connection (``max_queue``)."""
DEFLATE_RATIO_MAX = 1032
"""Deflate's largest expansion: one byte on the wire becomes at most this many."""


class RelayConnection(ServerConnection):
    """A connection that reports to its relay and bounds what it reads before the relay asks."""

    relay: Relay
    """Set on the subclass each relay makes (serve() takes a class, not an instance)."""
    address: str = ""
    over_limit: bool = False
    handshaking: bool = False
    """Holds a handshake slot of its address: its request is not complete yet."""
    request_bytes: int = 0
    api_slot: bool = False
    """Holds an API-read slot of its address until it closes (its answer is written or dropped)."""
    over_since: float | None = None
    """When its send queue went over ``max_queue_bytes`` (None: under it)."""
    _configured: bool = False
    _feed_step: int = 0
    """Bytes of a compressed connection's reads fed to the protocol at a time (0: whole reads)."""
    _held: bytearray | None = None
    """Compressed bytes read but not fed yet, while the read-ahead queue is full."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay._opened(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._held = None
        self.relay._closed(self)

    def data_received(self, data: bytes) -> None:
        if self._configured and not self._feed_step:
            super().data_received(data)  # the common case: an open, uncompressed connection
            return
        if self.handshaking:
            self.request_bytes += len(data)
            if self.request_bytes > REQUEST_BYTES_MAX:
                self.relay._request_too_large(self)
                return
        elif not self._configured and self.protocol.state is State.OPEN:
            self._configure()
        if self._held is not None:  # the transport delivered more before it paused
            self._held += data
        elif self._feed_step:
            self._feed(data)
        else:
            super().data_received(data)

    def _configure(self) -> None:
        """Once the handshake is done: a compressed connection gets its decompressed frame limit
        and stepped reads (frames cannot be parsed with extensions before this point)."""
        self._configured = True
        if self.protocol.extensions:
            limit = self.relay.config.max_frame_bytes
            set_max_message_size(self.protocol, limit)
            self._feed_step = max(256, limit // DEFLATE_RATIO_MAX)
            self.recv_messages.resume = self._resume_reading

    def _feed(self, data: bytes | bytearray) -> None:
        """Feed ``data`` in steps; once the read-ahead queue is full, keep the rest compressed."""
        step = self._feed_step
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            super().data_received(bytes(view[offset : offset + step]))
            offset += step
            if self.recv_messages.paused and offset < len(view):
                self._held = bytearray(view[offset:])
                return

    def _resume_reading(self) -> None:
        """The read-ahead queue has room: feed what was held, then let the socket be read."""
        asyncio.get_running_loop().call_soon(self._feed_held)

    def _feed_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._feed(held)
        if self._held is None and not self.recv_messages.paused and not self.transport.is_closing():
            self.transport.resume_reading()


def set_max_message_size(protocol: Any, size: int) -> None:
    """The protocol's limit on an incoming message, which websockets 16 renamed."""
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = size
    else:  # websockets 15
        protocol.max_size = size
