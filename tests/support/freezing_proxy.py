"""A TCP proxy whose answers can be held back: a network cut with no reset.

``freeze()`` stops passing what the server sends (the client's requests still get through, so
a commit can happen while its answer never arrives); ``thaw()`` drops every connection made
so far, as a cut that ends does, and passes new ones normally again. For a relay in front of
PostgreSQL: the hardest failure, a commit the relay cannot know happened."""

from __future__ import annotations

import contextlib
import socket
import threading


class FreezingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        with self._lock:
            old, self._sockets = self._sockets, []
        for sock in old:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.frozen.clear()

    def close(self) -> None:
        self.thaw()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if answers and self.frozen.is_set():
                    continue  # held back: the client waits for an answer that never comes
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()
