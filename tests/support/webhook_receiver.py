"""A real HTTP receiver for alert webhooks: an http.server on a free port, in a thread.

It records every POST (path, headers, JSON body) and can be switched between answering
(``ok``, or any status), being down (the socket closed: connection refused) and hanging
(``hang``: it accepts and reads the request, then never answers).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.relay_process import free_port


class Received:
    def __init__(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        self.path = path
        self.headers = headers
        self.body = body


class WebhookReceiver:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.status = 200
        self.answer_headers: dict[str, str] = {}
        self.hanging = False
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T000/secret-token"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if receiver.hanging:
                    receiver._release.wait(120)
                    return  # closes without an answer
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers), json.loads(raw)))
                self.send_response(receiver.status)
                self.send_header("Content-Type", "text/plain")
                for name, value in receiver.answer_headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._release.clear()
        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down: the listening socket is closed, connections are refused."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def hang(self, on: bool = True) -> None:
        self.hanging = on
        if not on:
            self._release.set()

    def bodies(self, alert: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.received if alert is None or r.body["alert"] == alert]
