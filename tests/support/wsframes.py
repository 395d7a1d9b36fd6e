"""WebSocket frames written by hand: what a hostile client sends and a library would not."""

from __future__ import annotations

import os
import re
import socket
import struct
import zlib


def masked_frame(payload: bytes, *, opcode: int = 1, rsv1: bool = False) -> bytes:
    """A final, masked client frame (RFC 6455 5.2); ``rsv1`` marks a deflated message."""
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    mask = os.urandom(4)
    masked = (
        int.from_bytes(payload, "big") ^ int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    ).to_bytes(size, "big")
    return head + mask + masked


class DeflateSender:
    """Deflated messages for one connection (permessage-deflate with context takeover)."""

    def __init__(self, window_bits: int = 15) -> None:
        self._compressor = zlib.compressobj(wbits=-window_bits)

    def frame(self, payload: bytes) -> bytes:
        data = self._compressor.compress(payload) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(b"\x00\x00\xff\xff")
        return masked_frame(data[:-4], rsv1=True)


def upgrade_request(port: int, target: str, *, deflate: bool = False) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if deflate:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def open_deflating(port: int, target: str, source: str = "127.0.0.1") -> tuple[socket.socket, DeflateSender]:
    """A raw WebSocket connection that negotiated permessage-deflate; its frames are written by hand."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(upgrade_request(port, target, deflate=True))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"closed during the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    extensions = [
        line for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-extensions")
    ]
    assert extensions and b"permessage-deflate" in extensions[0], head
    bits = re.search(rb"client_max_window_bits=(\d+)", extensions[0])
    return sock, DeflateSender(int(bits.group(1)) if bits else 15)
