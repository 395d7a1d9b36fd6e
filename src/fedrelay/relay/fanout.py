"""Writing one encoded frame to many connections.

``websockets.broadcast()`` frames the payload again for every connection.
Without compression a server's text frame is the same bytes for every
client (servers do not mask), so it is framed once here and written to
each transport as is. Connections that negotiated an extension fall back
to the protocol's own framing.
"""

from __future__ import annotations

import struct

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final, uncompressed text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


class Frame:
    """A payload, framed lazily once and shared by every recipient."""

    __slots__ = ("_framed", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._framed: bytes | None = None

    @classmethod
    def text(cls, text: str) -> Frame:
        return cls(text.encode())

    def write_to(self, conn: ServerConnection) -> bool:
        """Queue the frame on ``conn``; False if it is no longer open."""
        protocol = conn.protocol
        if protocol.state is not State.OPEN:
            return False
        if protocol.extensions:
            protocol.send_text(self.payload)
            conn.send_data()
        else:
            if self._framed is None:
                self._framed = text_frame(self.payload)
            conn.transport.write(self._framed)
        return True


def queued_bytes(conn: ServerConnection) -> int:
    """Bytes written to ``conn`` that the peer has not taken yet."""
    return conn.transport.get_write_buffer_size()
