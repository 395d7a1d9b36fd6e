"""Plain HTTP on the relay's port: health, metrics, the runs API, the dashboard.

Requests arrive through the WebSocket server's ``process_request`` hook, so
one port serves both; anything here answers without opening a WebSocket.
"""

from __future__ import annotations

import json
import math
import time
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.http11 import Response

from .. import __version__
from ..schemas.events import RUN_ID_RE
from .access import presented_token, token_ok
from .health_page import BadQuery, parse_query
from .health_reader import HealthReader

if TYPE_CHECKING:
    from .server import Relay

MAX_EVENTS_PAGE = 10_000
RUNS_PAGE = 100
MAX_RUNS_PAGE = 1000
RUN_STATUSES = frozenset({"running", "stalled", "inactive", "incomplete", "completed", "failed", "stopped"})
MAX_RESPONSE_CHARS = 8 << 20
"""An events page stops early past this much JSON; ``next_since`` says where."""
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
        self.health = HealthReader(relay.store)

    async def respond(self, path: str, query: dict[str, list[str]], headers: Headers) -> Response:
        if path == "/healthz":
            return self._health()
        if path == "/metrics":
            return _response(200, self.relay.metrics.render(), "text/plain; version=0.0.4")
        if path.startswith("/api/"):
            token = presented_token(headers.get("Authorization"), first_param(query, "token"))
            if not token_ok(self.relay.config.subscribe_token, token):
                return _error(401, "missing or wrong token: send Authorization: Bearer TOKEN")
            return await self._api(path, query)
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
                "store": {"path": store.path, "lag": store.lag, "error": store.failing},
            },
        )

    async def _api(self, path: str, query: dict[str, list[str]]) -> Response:
        parts = path.split("/")[2:]  # "", "api", ...
        hub = self.relay.hub
        now = time.time()
        stall = self.relay.config.stall_after
        if parts == ["runs"]:
            return self._runs(query, now, stall)
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
                return await self._events(run_id, query)
            if parts[2] == "clients":
                try:
                    health_query = parse_query(query)
                except BadQuery as exc:
                    return _error(400, str(exc))
                body = await self.health.page(run_id, run.committed_seq, health_query)
                return _response(200, body, "application/json")
        return _error(404, f"no API route {path[:100]}")

    def _runs(self, query: dict[str, list[str]], now: float, stall: float) -> Response:
        """Runs newest first, a page at a time: ``{"runs": [...], "next_cursor": C|null}``.

        A minimal stand-in for branch i14's paged listing (same query and answer): ``limit``
        (100, at most 1000), ``cursor``, ``status`` (comma-separated), ``mode``, ``q`` (run id or
        experiment name, substring, any case), ``updated_since``.
        """
        limit = _int_param(query, "limit", RUNS_PAGE)
        if limit is None or limit < 1:
            return _error(400, "limit must be a whole number >= 1")
        since_text = first_param(query, "updated_since")
        try:
            since = float(since_text) if since_text is not None else None
        except ValueError:
            since = math.nan
        if since is not None and not math.isfinite(since):
            return _error(400, "updated_since must be a time in seconds since the epoch")
        status_text = first_param(query, "status")
        statuses = {part.strip() for part in (status_text or "").split(",") if part.strip()}
        if status_text is not None and (not statuses or not statuses <= RUN_STATUSES):
            allowed = ", ".join(sorted(RUN_STATUSES))
            return _error(400, f"status must be one or more of {allowed}, comma-separated")
        mode = first_param(query, "mode")
        if mode not in (None, "federated", "centralized"):
            return _error(400, "mode must be federated or centralized")
        text = (first_param(query, "q") or "").casefold()
        if len(text) > 200:
            return _error(400, "q may have at most 200 characters")
        # Newest first; runs created in the same instant in reverse order of creation.
        runs = sorted(reversed(self.relay.hub.runs.values()), key=lambda r: r.created_at, reverse=True)
        cursor = first_param(query, "cursor")  # the last run of the previous page: new runs shift nothing
        if cursor is not None:
            after = next((i for i, run in enumerate(runs) if run.run_id == cursor), None)
            if after is None:
                return _error(400, "cursor names a run this relay does not have; start without it")
            runs = runs[after + 1 :]
        limit = min(limit, MAX_RUNS_PAGE)
        matched = []
        for run in runs:
            if len(matched) > limit:
                break
            summary = run.summary(now, stall)
            name = summary.get("experiment_name")
            named = text in run.run_id.casefold() or (isinstance(name, str) and text in name.casefold())
            if (
                (not statuses or summary["status"] in statuses)
                and (mode is None or summary.get("training_mode") == mode)
                and (since is None or run.updated_at >= since)
                and named
            ):
                matched.append(summary)
        page = matched[:limit]
        more = len(page) < len(matched)
        return json_response(200, {"runs": page, "next_cursor": page[-1]["run_id"] if more else None})

    async def _events(self, run_id: str, query: dict[str, list[str]]) -> Response:
        since = _int_param(query, "since", 0)
        limit = _int_param(query, "limit", 1000)
        if since is None or limit is None or limit < 1:
            return _error(400, "since and limit must be whole numbers (since >= 0, limit >= 1)")
        limit = min(limit, MAX_EVENTS_PAGE)
        run = self.relay.hub.runs[run_id]
        rows = await self.relay.store.read(run_id, since, run.committed_seq, limit, MAX_RESPONSE_CHARS)
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
