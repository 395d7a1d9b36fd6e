"""A small real WebSocket server speaking the producer side of the relay protocol, with the frames
of protocol decisions A and B (``producer_in_use``, ``producer_conflict``, ``hello.accepts`` and
``holding``) that the relay of this branch does not speak yet.

It is not a relay: it keeps events in a dict by ``(producer, id)``, acks after every frame, and
knows a name as "in use" while a connection under it is open, or for ``stale_after`` seconds after
the test cut one (the relay has not noticed yet that the peer is gone).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve


class PublishPeer:
    def __init__(
        self,
        port: int = 0,
        *,
        accepts: tuple[str, ...] = (),
        stale_after: float = 1.0,
        conflict_at: dict[str, int] | None = None,
    ) -> None:
        self.accepts = list(accepts)
        self.stale_after = stale_after
        self.conflict_at = dict(conflict_at or {})
        self.events: dict[tuple[str, int], dict[str, Any]] = {}
        self.order: list[tuple[str, int]] = []
        self.positions: dict[str, int] = {}
        self.holdings: list[tuple[str, dict[str, Any]]] = []
        self.first_frames: list[tuple[str, Any]] = []
        self.refused: list[tuple[str, str]] = []
        self._open: dict[str, ServerConnection] = {}
        self._stale_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = serve(self._handle, "127.0.0.1", port, compression=None, max_size=2**24)
        self.port = self._server.socket.getsockname()[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()

    def stored(self, producer: str | None = None) -> list[tuple[str, int]]:
        with self._lock:
            return [key for key in self.order if producer is None or key[0] == producer]

    def cut(self, producer: str) -> None:
        """Drop the producer's connection without a close frame, and keep its name "in use" for
        ``stale_after`` seconds, as a relay does until its pings time out."""
        with self._lock:
            ws = self._open.get(producer)
            self._stale_until[producer] = time.monotonic() + self.stale_after
        if ws is not None:
            ws.close_socket()

    def hold(self, producer: str) -> None:
        """Another emitter has the name now, for as long as the test runs."""
        with self._lock:
            self._stale_until[producer] = float("inf")

    def _in_use(self, producer: str) -> bool:
        return producer in self._open or time.monotonic() < self._stale_until.get(producer, 0.0)

    def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        producer = query.get("producer", ["anonymous"])[0]
        with self._lock:
            if self._in_use(producer):
                self.refused.append((producer, "producer_in_use"))
                refuse = True
            else:
                self._open[producer] = ws
                refuse = False
        if refuse:
            ws.send(
                json.dumps(
                    {
                        "op": "error",
                        "code": "producer_in_use",
                        "detail": "in use",
                        "stale_after": self.stale_after,
                    }
                )
            )
            ws.close(4409, "producer in use")
            return
        try:
            hello = {
                "op": "hello",
                "producer": producer,
                "last_id": self.positions.get(producer),
                "max_frame_bytes": 1_000_000,
                "max_events_per_frame": 1000,
            }
            if self.accepts:
                hello["accepts"] = self.accepts
            ws.send(json.dumps(hello))
            first = True
            for message in ws:
                frame = json.loads(message)
                if first:
                    self.first_frames.append((producer, frame))
                    first = False
                if isinstance(frame, dict) and frame.get("op") == "holding":
                    self.holdings.append((producer, frame))
                    continue
                if self._store(ws, producer, frame if isinstance(frame, list) else [frame]):
                    return
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if self._open.get(producer) is ws:
                    del self._open[producer]

    def _store(self, ws: ServerConnection, producer: str, events: list[dict[str, Any]]) -> bool:
        """Store a frame's events; True when the connection was closed for a conflict."""
        upto = self.positions.get(producer, 0)
        for event in events:
            event_id = event["id"]
            if self.conflict_at.get(producer) == event_id:
                del self.conflict_at[producer]
                self.positions[producer] = upto
                self.refused.append((producer, "producer_conflict"))
                ws.send(json.dumps({"op": "ack", "producer": producer, "upto": event_id - 1}))
                ws.send(
                    json.dumps({"op": "error", "code": "producer_conflict", "id": event_id, "detail": "x"})
                )
                ws.close(4409, "producer conflict")
                return True
            if event_id > upto:
                with self._lock:
                    self.events[(producer, event_id)] = event
                    self.order.append((producer, event_id))
                upto = event_id
        self.positions[producer] = upto
        ws.send(json.dumps({"op": "ack", "producer": producer, "upto": upto}))
        return False
