"""Plain HTTP on the relay's port: health, metrics, the runs API, the dashboard.

Requests arrive through the WebSocket server's ``process_request`` hook, so
one port serves both; anything here answers without opening a WebSocket.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response

from .. import __version__
from ..schemas.events import RUN_ID_RE
from . import health_page
from .access import presented_token, token_ok
from .connection import RelayConnection
from .health_reader import HealthReader
from .runs_listing import BadQuery, RunOrder, page, parse_query
from .store_reads import API

if TYPE_CHECKING:
    from .server import Relay

MAX_EVENTS_PAGE = 10_000
MAX_RESPONSE_BYTES = 4 << 20
"""An events page stops early past this many bytes of events; ``next_since`` says where."""
API_READS_PER_ADDRESS = 8
"""API requests of one client address from request to close (its answer written or dropped):
what a client that never reads its answers can hold is this many pages."""
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".ts": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


def _response(status: int, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


def text_response(status: int, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def json_response(status: int, payload: Any) -> Response:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return _response(status, body, "application/json")


def _error(status: int, detail: str) -> Response:
    return json_response(status, {"error": HTTPStatus(status).phrase.lower(), "detail": detail})


class HttpApi:
    """Answers plain GET requests from the relay's own state."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._run_order = RunOrder(relay.hub.runs)
        self.health = HealthReader(relay.store)

    async def respond(
        self, conn: ServerConnection, path: str, query: dict[str, list[str]], headers: Headers
    ) -> Response:
        if path == "/healthz":
            return self._health()
        if path == "/metrics":
            return _response(200, self.relay.metrics.render(), "text/plain; version=0.0.4")
        if path.startswith("/api/"):
            token = presented_token(headers.get("Authorization"), first_param(query, "token"))
            if not token_ok(self.relay.config.subscribe_token, token):
                return _error(401, "missing or wrong token: send Authorization: Bearer TOKEN")
            if not self._take_api_slot(conn):
                self.relay.metrics.handshakes_refused.labels("api_busy").inc()
                response = _error(
                    503,
                    f"{API_READS_PER_ADDRESS} API requests from your address are in progress "
                    "(or their answers unread): retry when one is done",
                )
                response.headers["Retry-After"] = "1"
                return response
            return await self._api(conn, path, query)
        if path == "/" or path.startswith("/static/"):
            return self._static("index.html" if path == "/" else path[len("/static/") :])
        return _error(404, f"nothing at {path[:100]}")

    def _health(self) -> Response:
        store = self.relay.store
        status = "degraded" if store.failing else "ok"
        return json_response(
            200 if status == "ok" else 503,
            {
                "status": status,
                "version": __version__,
                "uptime": round(time.time() - self.relay.started_at, 3),
                "runs": len(self.relay.hub.runs),
                "store": {
                    "path": store.path,
                    "lag": store.lag,
                    "error": store.failing,
                    "repaired_runs": store.repaired_runs,
                },
            },
        )

    def _take_api_slot(self, conn: ServerConnection) -> bool:
        """One of the address's API slots, held until the connection closes."""
        if not isinstance(conn, RelayConnection):
            return True
        limits = self.relay.api_reads
        if limits.over(limits.opened(conn.address)):
            limits.closed(conn.address)
            return False
        conn.api_slot = True
        return True

    async def _api(self, conn: ServerConnection, path: str, query: dict[str, list[str]]) -> Response:
        parts = path.split("/")[2:]  # "", "api", ...
        hub = self.relay.hub
        now = time.time()
        stall = self.relay.config.stall_after
        if parts == ["runs"]:
            try:
                runs_query = parse_query(query)
                body = page(self._run_order.sync(), runs_query, now, stall)
            except BadQuery as exc:
                return _error(400, str(exc))
            return _response(200, body, "application/json")
        if len(parts) in (2, 3) and parts[0] == "runs":
            run_id = parts[1]
            if RUN_ID_RE.fullmatch(run_id) is None:
                return _error(400, "run_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
            run = hub.runs.get(run_id)
            if run is None:
                return _error(404, f"no run {run_id!r}")
            if len(parts) == 2:
                return json_response(200, run.summary(now, stall))
            if parts[2] == "events":
                return await self._events(conn, run_id, query)
            if parts[2] == "clients":
                try:
                    health_query = health_page.parse_query(query)
                except health_page.BadQuery as exc:
                    return _error(400, str(exc))
                body = await self.health.page(run_id, run.committed_seq, health_query)
                return _response(200, body, "application/json")
        return _error(404, f"no API route {path[:100]}")

    async def _events(self, conn: ServerConnection, run_id: str, query: dict[str, list[str]]) -> Response:
        since = _int_param(query, "since", 0)
        limit = _int_param(query, "limit", 1000)
        if since is None or limit is None or limit < 1:
            return _error(400, "since and limit must be whole numbers (since >= 0, limit >= 1)")
        limit = min(limit, MAX_EVENTS_PAGE)
        run = self.relay.hub.runs[run_id]
        rows = await self.relay.store.read(
            run_id,
            since,
            run.committed_seq,
            limit,
            MAX_RESPONSE_BYTES,
            queue=API,
            wanted=lambda: not conn.transport.is_closing(),
        )
        if rows is None:  # the client left while the read waited for its turn
            self.relay.metrics.store_reads.labels(API, "skipped").inc()
            return _error(503, "client gone")
        self.relay.metrics.store_reads.labels(API, "done").inc()
        next_since = rows[-1][0] if rows else since
        body = (
            '{"run_id":'
            + json.dumps(run_id)
            + ',"events":['
            + ",".join(r[1] for r in rows)
            + "]"
            + ',"next_since":'
            + str(next_since)
            + "}"
        ).encode()
        return _response(200, body, "application/json")

    def _static(self, name: str) -> Response:
        """Files shipped in ``fedrelay/relay/static``; nothing outside it."""
        if not name or ".." in name.split("/") or name.startswith("/") or "\\" in name:
            return _error(404, "no such file")
        root = resources.files("fedrelay.relay") / "static"
        target = root
        for part in name.split("/"):
            target = target / part
        try:
            body = target.read_bytes()
        except (OSError, ValueError):  # missing, a directory, a name too long, a NUL byte...
            return _error(404, f"no file {name[:100]}")
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        return _response(200, body, _STATIC_TYPES.get(suffix, "application/octet-stream"))


def first_param(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def whole_number(text: str) -> int | None:
    """A query-string count: ASCII digits only, no sign, no exponent."""
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def _int_param(query: dict[str, list[str]], key: str, default: int) -> int | None:
    text = first_param(query, key)
    return default if text is None else whole_number(text)
