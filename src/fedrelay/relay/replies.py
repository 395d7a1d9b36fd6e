"""What every WebSocket session writes back, and the few facts about a peer it names.

Publish, subscribe and root sessions all answer with error frames and must cut a peer that
does not read its replies; one :class:`Replies` per relay holds the connections being cut,
so that each is cut once whichever session noticed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection

from ..schemas.events import RUN_ID_RE
from ..schemas.wire import Refused, encode, utf8_size
from .config import RelayConfig
from .fanout import Frame, queued_bytes
from .metrics import RelayMetrics

log = logging.getLogger("fedrelay.relay")

SLOW_CONSUMER = 1013  # "try again later": resume with since=<last seq>

Track = Callable[[Coroutine[Any, Any, Any]], None]
"""Runs a fire-and-forget coroutine the relay cancels when it stops."""


class Replies:
    """Replies (hello, ack, error, pong, ...) to any session, bounded like event deliveries."""

    def __init__(self, config: RelayConfig, metrics: RelayMetrics, track: Track) -> None:
        self._config = config
        self._metrics = metrics
        self._track = track
        self._cutting: set[ServerConnection] = set()

    def send(self, conn: ServerConnection, frame: dict[str, Any]) -> None:
        """Write a reply; cut a peer that does not read them.

        Replies can outgrow what provoked them (a 2 KB frame of 1000 bad
        events earns 80 KB of errors), so they obey ``max_queue_bytes`` too.
        """
        Frame.text(encode(frame)).write_to(conn)
        if queued_bytes(conn) > self._config.max_queue_bytes and conn not in self._cutting:
            self._cutting.add(conn)
            self._metrics.slow_consumers.inc()
            log.warning("cut %s: it does not read the relay's replies", peer(conn))
            self._track(conn.close(SLOW_CONSUMER, "not reading: replies queued past the limit"))

    def closed(self, conn: ServerConnection) -> None:
        """The session ended: forget that it was being cut."""
        self._cutting.discard(conn)

    def reject(
        self,
        conn: ServerConnection,
        exc: Refused,
        *,
        event_id: Any = None,
        index: int | None = None,
        run_id: str | None = None,
        legacy: bool = False,
    ) -> None:
        """Count a refusal and answer it: an ``error`` frame, or the root path's shape."""
        self._metrics.rejected.labels(exc.code).inc()
        if legacy:
            self.send(conn, {"type": "error", "data": {"code": exc.code, "detail": exc.detail}})
            return
        frame = error(exc.code, exc.detail)
        if isinstance(event_id, int) and not isinstance(event_id, bool):
            frame["id"] = event_id
        if index is not None:
            frame["index"] = index
        if run_id is not None:
            frame["run_id"] = run_id
        self.send(conn, frame)

    def check_size(self, frame: str | bytes) -> int:
        """Refuse a frame over ``max_frame_bytes`` (UTF-8 bytes); return its size."""
        limit = self._config.max_frame_bytes
        size = utf8_size(frame, limit) if isinstance(frame, str) else len(frame)
        if size > limit:
            raise Refused("too_large", f"frame of {size} bytes; at most {limit} are accepted")
        return size


def error(code: str, detail: str) -> dict[str, Any]:
    return {"op": "error", "code": code, "detail": detail}


def valid_name(name: str) -> bool:
    """A producer name or run id: the run-id alphabet, 1-128 characters."""
    return RUN_ID_RE.fullmatch(name) is not None


def host(conn: ServerConnection) -> str:
    try:
        return str(conn.remote_address[0])
    except Exception:
        return "?"


def peer(conn: ServerConnection) -> str:
    try:
        address, port = conn.remote_address[:2]
        return f"{address}:{port}"
    except Exception:
        return "?"
