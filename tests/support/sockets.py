"""Raw TCP sockets against a relay: a client that reads as little as the kernel allows, and a
WebSocket upgrade written by hand (for clients that never read, or that break the protocol)."""

from __future__ import annotations

import socket
from pathlib import Path


def kernel_send_buffer_max() -> int:
    """The largest send buffer the kernel gives a TCP socket (what it holds before a sender waits)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


def tiny_receive_socket(port: int) -> socket.socket:
    """A connected TCP socket whose receive window is as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def send_handshake(sock: socket.socket, port: int, target: str) -> None:
    """A WebSocket upgrade request written by hand; reading the answer is up to the caller."""
    sock.sendall(
        (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
