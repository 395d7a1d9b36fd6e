"""The handshake gate: what a connection must pass before a session or an HTTP answer.

Per-address slots from accept (``--max-connections-per-ip``, unfinished requests), the
request target, the Host (DNS rebinding), Origin and tokens; plain HTTP goes to the API,
a WebSocket to the session kind its path names. Decisions on tokens and names are in
:mod:`.access`; this class applies them and counts every refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .access import (
    ConnectionLimiter,
    address_key,
    any_token_ok,
    origin_ok,
    presented_tokens,
    rebinding_suspect,
)
from .config import RelayConfig
from .connection import HANDSHAKES_PER_ADDRESS, REQUEST_BYTES_MAX, RelayConnection
from .http import API_READS_PER_ADDRESS, HttpApi, text_response
from .metrics import RelayMetrics
from .publish import PublishSessions
from .replies import Replies
from .root import RootSessions
from .subscribe import SubscribeSessions
from .throttle import OncePer

log = logging.getLogger("fedrelay.relay")

ANSWERED_PAST_LIMIT = 64
"""Connections past an address's limit that still get a 503; beyond that they are closed unread."""
REFUSALS_LOG_EVERY = 60.0
"""Seconds between log lines about one address's refused connections."""
ORIGINS_LOGGED = 256
"""Refused browser origins named in the log, once each; past that one line says more were."""
ENDPOINTS = {"/publish": "publish", "/subscribe": "subscribe", "/": "root"}


class Gate:
    """Admits connections and requests, then hands each WebSocket to its session kind."""

    def __init__(
        self,
        config: RelayConfig,
        metrics: RelayMetrics,
        http: HttpApi,
        replies: Replies,
        publish: PublishSessions,
        subscribe: SubscribeSessions,
        root: RootSessions,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._http = http
        self._replies = replies
        self._publish = publish
        self._subscribe = subscribe
        self._root = root
        self.limits = ConnectionLimiter(config.max_connections_per_ip, REFUSALS_LOG_EVERY)
        """Connections per address from accept to close."""
        self.handshakes = ConnectionLimiter(HANDSHAKES_PER_ADDRESS)
        """Connections per address whose request is not complete yet."""
        self.api_reads = ConnectionLimiter(API_READS_PER_ADDRESS)
        """API requests per address from their request until their connection closes."""
        self._origins_refused = OncePer(ORIGINS_LOGGED)

    # -- connections per address ---------------------------------------------

    def opened(self, conn: RelayConnection, transport: asyncio.BaseTransport) -> None:
        """Take a slot of the peer's address and a handshake slot; past the limits, refuse
        now or at the request."""
        conn.address = address_key(transport.get_extra_info("peername"))
        conn.handshaking = True
        if self.handshakes.over(self.handshakes.opened(conn.address)):
            self._metrics.handshakes_refused.labels("handshake_flood").inc()
            transport.abort()  # that many unfinished requests: a slow-header flood
        count = self.limits.opened(conn.address)
        if not self.limits.over(count):
            return
        if self.limits.over(count, ANSWERED_PAST_LIMIT):
            self._metrics.handshakes_refused.labels("ip_flood").inc()
            transport.abort()  # a flood: not even worth reading its request
        else:
            conn.over_limit = True
        self._note_refused(conn.address, count)

    def request_done(self, conn: ServerConnection) -> None:
        """The request is complete: its handshake slot is free again."""
        if isinstance(conn, RelayConnection) and conn.handshaking:
            conn.handshaking = False
            self.handshakes.closed(conn.address)

    def request_too_large(self, conn: RelayConnection) -> None:
        """More than REQUEST_BYTES_MAX before the request was complete: 431, and close."""
        self.request_done(conn)
        self._metrics.handshakes_refused.labels("request_too_large").inc()
        body = f"request headers over {REQUEST_BYTES_MAX} bytes\n".encode()
        conn.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        conn.transport.close()

    def closed(self, conn: RelayConnection) -> None:
        """Give back every slot the connection held."""
        self.request_done(conn)
        self.limits.closed(conn.address)
        if conn.api_slot:
            conn.api_slot = False
            self.api_reads.closed(conn.address)

    def _note_refused(self, address: str, count: int) -> None:
        """Log an address's refusals once per interval, with how many there were."""
        unlogged = self.limits.note_refusal(address, time.monotonic())
        if unlogged is None:
            return
        log.warning(
            "refusing connections from %s: %d open, over --max-connections-per-ip %d (%s)",
            address,
            count,
            self.limits.limit,
            f"{unlogged} more refused since the last such line" if unlogged else "one line a minute at most",
        )

    # -- handshake ---------------------------------------------------------

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """Refuse floods, bad targets and DNS rebinding; route plain HTTP; check origin
        and tokens before a WebSocket opens."""
        self.request_done(conn)
        if isinstance(conn, RelayConnection) and conn.over_limit:
            response = self._refuse(
                "ip_limit",
                503,
                f"too many connections from your address (at most {self.limits.limit}, "
                "--max-connections-per-ip): close some, or retry later\n",
            )
            response.headers["Retry-After"] = "5"
            return response
        if not request.path.isprintable():  # NUL, CR, tabs...: no URL has them
            return self._refuse("request", 400, "malformed request target\n")
        try:
            url = urlsplit(request.path)
            query = parse_qs(url.query, keep_blank_values=True)
        except ValueError:
            return self._refuse("request", 400, "malformed request target\n")
        try:
            headers = request.headers
            host = headers.get("Host")  # two Host headers: 400, as RFC 9112 requires
            if self._open_to_rebinding and rebinding_suspect(
                headers.get("Origin"), headers.get("Sec-Fetch-Site"), host, self._config.allow_origins
            ):
                return self._refuse(
                    "host",
                    403,
                    f"Host {str(host)[:100]!r} is not a name of this relay: without both tokens, browsers "
                    "must name it by IP address, localhost, or a host given with --allow-origin "
                    "(protection against DNS rebinding)\n",
                )
            upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
            if not upgrade:
                return await self._http.respond(conn, url.path, query, request.headers)
            return self._check_handshake(url.path, query, request.headers)
        except MultipleValuesError as exc:
            name = str(exc.args[0] if exc.args else "a")[:40]
            if name.lower() == "origin":
                return self._refuse("origin", 403, "several Origin headers\n")
            return self._refuse("header", 400, f"several {name} headers; send one\n")

    @property
    def _open_to_rebinding(self) -> bool:
        """Without both tokens a DNS-rebinding page could read or publish; with them it has no token."""
        return self._config.publish_token is None or self._config.subscribe_token is None

    def _check_handshake(self, path: str, query: dict[str, list[str]], headers: Headers) -> Response | None:
        endpoint = ENDPOINTS.get(path)
        if endpoint is None:
            return text_response(404, f"no WebSocket endpoint at {path[:100]}\n")
        origin = headers.get("Origin")
        if not origin_ok(origin, headers.get("Host"), self._config.allow_origins):
            self._note_origin(str(origin)[:100])
            return self._refuse("origin", 403, f"origin {str(origin)[:100]!r} is not allowed\n")
        if not self.rights(endpoint, headers, query):
            return self._refuse("token", 401, "missing or wrong token: send Authorization: Bearer TOKEN\n")
        return None

    def rights(self, endpoint: str, headers: Headers, query: dict[str, list[str]]) -> set[str]:
        """What a connection may do: publish, subscribe, or (root path) both.

        The root path serves both roles; with different tokens configured it
        gets each role whose token it presents (header or repeated ``token``
        query parameters), so a read-only legacy frontend needs only the
        subscribe token.
        """
        tokens = presented_tokens(headers.get("Authorization"), query.get("token", []))
        wanted = {"publish", "subscribe"} if endpoint == "root" else {endpoint}
        expected = {"publish": self._config.publish_token, "subscribe": self._config.subscribe_token}
        return {role for role in wanted if any_token_ok(expected[role], tokens)}

    def _note_origin(self, origin: str) -> None:
        """Say once per origin why a browser's WebSocket was refused, and what would allow it."""
        if not self._origins_refused.first(origin):
            return
        log.warning(
            "refused a WebSocket from a page at origin %r: start the relay with --allow-origin %s "
            "(or FEDRELAY_ALLOW_ORIGINS) to allow it%s",
            origin,
            origin if origin.startswith(("http://", "https://")) else "URL",
            f"; further refused origins are not logged (more than {ORIGINS_LOGGED})"
            if self._origins_refused.overflowed
            else "",
        )

    def _refuse(self, reason: str, status: int, text: str) -> Response:
        self._metrics.handshakes_refused.labels(reason).inc()
        return text_response(status, text)

    # -- sessions ----------------------------------------------------------

    async def handle(self, conn: ServerConnection) -> None:
        """An open WebSocket: count it, and run the session its path names."""
        assert conn.request is not None
        url = urlsplit(conn.request.path)
        query = parse_qs(url.query, keep_blank_values=True)
        endpoint = {"/publish": "publish", "/subscribe": "subscribe"}.get(url.path, "root")
        gauge = self._metrics.connections.labels(endpoint)
        gauge.inc()
        self._metrics.connections_opened.labels(endpoint).inc()
        try:
            if endpoint == "publish":
                await self._publish.serve(conn, query)
            elif endpoint == "subscribe":
                await self._subscribe.serve(conn, query)
            else:
                await self._root.serve(conn, self.rights("root", conn.request.headers, query))
        except ConnectionClosed:
            pass
        finally:
            gauge.dec()
            self._replies.closed(conn)
