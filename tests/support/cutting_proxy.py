"""A TCP proxy in front of a real relay that cuts every connection: right after accepting it
(the relay looks down: every connection attempt fails), or once the relay's ``hello`` has
passed (a flaky load balancer: every session dies). No relay setting produces these network
faults; they test how producers behave when nothing they do gets through.

The time of every accepted connection is kept, so a test can check the gaps a client leaves
between its attempts."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Literal

HELLO = b'"op":"hello"'


class CuttingProxy:
    def __init__(self, upstream_port: int, cut: Literal["hello", "accept"] = "hello") -> None:
        self.upstream_port = upstream_port
        self.cut = cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        self.accepted: list[float] = []
        """``time.monotonic()`` of each connection accepted, in order."""
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            if self.cut == "accept":
                self.cuts += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, cut_after_hello: bool) -> None:
        seen = b""
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                if cut_after_hello:
                    seen = (seen + chunk)[-4096:]
                    if HELLO in seen:
                        self.cuts += 1
                        break
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
