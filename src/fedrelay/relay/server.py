"""WebSocket I/O: the handshake gate, producer, subscriber and root connections.

All decisions live in :mod:`.hub` (who gets what) and :mod:`.schemas.wire`
(what is valid); this module reads frames, calls them, and writes results.
Writes to subscribers are synchronous and never await a slow peer: a
subscriber's backlog is its transport buffer, bounded by
``max_queue_bytes``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..schemas.compat import repair_values, root_event
from ..schemas.events import RUN_ID_RE
from ..schemas.wire import (
    PRODUCER_OPS,
    Refused,
    encode,
    parse_frame,
    parse_holding,
    parse_json,
    refuse_unsafe_values,
    split_frame,
    utf8_size,
    validate_event,
)
from .access import (
    ConnectionLimiter,
    address_key,
    any_token_ok,
    origin_ok,
    presented_tokens,
    rebinding_suspect,
)
from .alerts.choice import alert_log_for
from .alerts.service import AlertService
from .config import RelayConfig
from .connection import HANDSHAKES_PER_ADDRESS, READ_AHEAD_FRAMES, REQUEST_BYTES_MAX, RelayConnection
from .eventlog import EventLog, StoreError, is_postgres_url
from .fanout import Frame, queued_bytes
from .http import API_READS_PER_ADDRESS, HttpApi, first_param, text_response, whole_number
from .hub import Accepted, Delivery, Hub, Sequenced, Subscription
from .metrics import RelayMetrics
from .producers import CLOSE_CODE as PRODUCER_REFUSED
from .producers import CONFLICT, IN_USE, PROBE_TIMEOUT, same_event
from .root_runs import FOLLOW_FOR, RootRuns
from .store import EventStore
from .store_reads import CATCH_UP, bounded
from .throttle import LogThrottle, OncePer
from .tls import server_context
from .turns import TurnsPerKey

log = logging.getLogger("fedrelay.relay")

CATCH_UP_PAGE = 5000
"""Events per store read while a subscriber catches up."""
CATCH_UP_PAGE_BYTES = 2 << 20
"""...and bytes per read, so that a page of large events stays small."""
CATCH_UP_READS_PER_ADDRESS = 4
"""Catch-up reads of one client address in the reader's line at a time (turns.py)."""
MAX_RUNS_PER_SUBSCRIBER = 1024
MAX_STORE_LAG_CHARS = 256 << 20
"""Uncommitted characters past which producers are not read (with ``max_store_lag``)."""
HOUSEKEEPING_EVERY = 60.0
"""Seconds between housekeeping passes (shorter when ``forget_producers_after`` is short)."""
HOUSEKEEPING_AT_LEAST = 0.1
IDLE_RING_AFTER = 600.0
"""Seconds after its last event before a finished run's replay ring is freed."""
FRAME_BUDGET = 256 * 1024
"""Bytes per array frame to subscribers: well under clients' usual 1 MiB cap."""
_ENVELOPE_SLACK = 1024
"""Bytes kept free under ``max_frame_bytes`` for the fields the relay adds."""
IPV6_LOOPBACK = "::1"
_ENDPOINTS = {"/publish": "publish", "/subscribe": "subscribe", "/": "root"}
SLOW_CONSUMER = 1013  # "try again later": resume with since=<last seq>
SLOW_AFTER = 2.0
"""Seconds a subscriber's queue may stay over ``max_queue_bytes`` before it is cut: a burst
(commits held up by another process's write lock, then megabytes at once) drains from a
subscriber that reads, and stays queued at one that does not."""
HARD_QUEUE_FACTOR = 4
"""...but past this many times ``max_queue_bytes`` a subscriber is cut at once (memory bound)."""
HARD_SIZE_FACTOR = 4
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection gets to send its request and be answered; it holds its address's slot."""
ANSWERED_PAST_LIMIT = 64
"""Connections past an address's limit that still get a 503; beyond that they are closed unread."""
REFUSALS_LOG_EVERY = 60.0
"""Seconds between log lines about one address's refused connections (or root frames)."""
ROOT_REFUSALS_HOSTS = 1024
"""Hosts whose refused root frames are counted between log lines; the least recent go first."""
ORIGINS_LOGGED = 256
"""Refused browser origins named in the log, once each; past that one line says more were."""
PRODUCER_NAMES_LOGGED = 1024
"""Producer names whose refusals (in use, conflict) are throttled in the log."""


class Relay:
    """One relay: a hub, a store, and the sockets between them."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        shared = is_postgres_url(config.db)
        self.hub = Hub(
            replay_size=config.replay_size, replay_bytes=config.replay_bytes, assigns_seqs=not shared
        )
        self.metrics = RelayMetrics()
        self.store: EventLog
        if shared:
            try:  # asyncpg only where PostgreSQL is used
                from .pg.log import PgEventLog
            except ImportError as exc:
                need = "a PostgreSQL --db needs asyncpg: pip install 'fedrelay[server]'"
                raise StoreError(f"{need} ({exc})") from exc

            self.store = PgEventLog(
                config.db,
                runs=self.hub.runs,
                on_commit=self._on_commit,
                forget_producers_after=config.forget_producers_after,
                retain_events=config.retain_events,
                on_pruned=self.hub.pruned,
            )
        else:
            self.store = EventStore(
                config.db,
                runs=self.hub.runs,
                on_commit=self._on_commit,
                retain_events=config.retain_events,
                on_pruned=self.hub.pruned,
                on_history_changed=self._history_changed,
                forget_producers_after=config.forget_producers_after,
            )
        self.http = HttpApi(self)
        self.alerts: AlertService | None = None
        if config.alerting is not None:
            self.alerts = AlertService(
                config.alerting,
                alert_log=alert_log_for(config.db, in_memory=config.in_memory, settings=config.alerting),
                metrics=self.metrics,
                stall_after=config.stall_after,
                dashboard=lambda: self.http_url,
            )
        self.started_at = time.time()
        self._server: Server | None = None
        self.hosts: list[str] = list(config.host)
        """Addresses listened on: ``config.host`` less ::1 when IPv6 is off."""
        self._subscribers: dict[Subscription, ServerConnection] = {}
        self._catch_ups: dict[tuple[Subscription, str], asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._acks_due: set[_AckState] = set()
        self._cutting: set[ServerConnection] = set()
        self._stopping = asyncio.Event()
        self._housekeeping: asyncio.Task[None] | None = None
        self._publishing: dict[str, ServerConnection] = {}
        """Producer name -> its open /publish connection (one at most): never forgotten."""
        self._probing: set[str] = set()
        """Names whose connection is being pinged because another asked for the name."""
        self._producer_log = LogThrottle(REFUSALS_LOG_EVERY, PRODUCER_NAMES_LOGGED)
        self._gone: set[str] = set()
        """Producers whose last connection closed since the last housekeeping pass."""
        self.limits = ConnectionLimiter(config.max_connections_per_ip, REFUSALS_LOG_EVERY)
        self.root_runs = RootRuns()
        self._root_refusals = LogThrottle(REFUSALS_LOG_EVERY, ROOT_REFUSALS_HOSTS)
        self._origins_refused = OncePer(ORIGINS_LOGGED)
        self.handshakes = ConnectionLimiter(HANDSHAKES_PER_ADDRESS)
        """Connections per address whose request is not complete yet."""
        self.api_reads = ConnectionLimiter(API_READS_PER_ADDRESS)
        self._catch_up_turns = TurnsPerKey(CATCH_UP_READS_PER_ADDRESS)
        """Catch-up reads per address in the reader's line: one address cannot fill it."""
        """API requests per address from their request until their connection closes."""

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the store and listen; :class:`TlsError` before anything else when the
        certificate or key cannot be used."""
        cfg = self.config
        tls = server_context(cfg.certfile, cfg.keyfile) if cfg.certfile is not None else None
        restored = await self.store.open()
        for run in restored.runs:
            self.hub.restore_run(run)
        for name, last_id in restored.producers.items():
            self.hub.restore_producer(name, last_id)
        await self.store.follow()  # a shared log: what other nodes committed since the summaries
        self.store.save_runs(self.hub.settle_restored())
        if self.alerts is not None:  # before listening: what the last relay did not evaluate
            await self.alerts.open(self.hub.runs, self.store.read)
        self.metrics.producers_forgotten.inc(restored.forgotten)
        self.metrics.bind(
            store_lag=lambda: self.store.lag,
            store_failing=lambda: 1.0 if self.store.failing else 0.0,
            runs=lambda: len(self.hub.runs),
            producers=lambda: len(self.hub.stored_positions),
        )
        # TLS runs in the connection (connection.py), after the TCP connection has been counted.
        connection_type = type("RelayConnection", (RelayConnection,), {"relay": self, "tls": tls})
        self.hosts = _without_missing_ipv6(cfg.host)
        self._server = await serve(
            self._handle,
            self.hosts,
            _one_port_for_all(self.hosts, cfg.port),
            logger=_websockets_logger(),
            create_connection=connection_type,
            open_timeout=HANDSHAKE_TIMEOUT,
            process_request=self._gate,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.max_frame_bytes * HARD_SIZE_FACTOR,
            max_queue=READ_AHEAD_FRAMES,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            close_timeout=5,
            server_header=None,
        )
        self._housekeeping = asyncio.create_task(self._keep_house(), name="fedrelay-housekeeping")
        if self.alerts is not None:
            self.alerts.start(self.hub.runs)
        log.info(
            "relay listening on %s (store %s, %d runs restored)",
            " and ".join(_ws_url(host, self.port, secure=cfg.tls) for host in self.hosts),
            self.store.path,
            len(restored.runs),
        )
        open_roles = [role for role in ("publish", "subscribe") if getattr(cfg, f"{role}_token") is None]
        if open_roles and not all(_loopback(host) for host in self.hosts):
            log.warning(
                "listening on %s without a %s token: anyone who can reach this port may %s "
                "(set FEDRELAY_PUBLISH_TOKEN and FEDRELAY_SUBSCRIBE_TOKEN; see docs/security.md)",
                ", ".join(self.hosts),
                " or ".join(open_roles),
                " and ".join(open_roles),
            )
        if tls is None and len(open_roles) < 2 and not all(_loopback(host) for host in self.hosts):
            log.warning(
                "listening on %s without TLS: tokens and events cross the network in clear text "
                "(give --certfile and --keyfile, or put a TLS proxy in front; see docs/security.md)",
                ", ".join(self.hosts),
            )

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The WebSocket base URL of the first address listened on (127.0.0.1 by default;
        [::1] answers too): ``wss://`` when the relay serves TLS."""
        return _ws_url(self.hosts[0], self.port, secure=self.config.tls)

    @property
    def http_url(self) -> str:
        """The same port as ``http://`` or ``https://``: the dashboard and the API."""
        return "http" + self.url[2:]

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_stopped(self) -> int:
        await self._stopping.wait()
        return await self.stop()

    async def stop(self) -> int:
        """Stop accepting, close connections, and flush the store.

        Returns how many accepted events could not be stored (0 = clean).
        """
        self.store.begin_close()  # producers held by backpressure let go
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        tasks = [*self._catch_ups.values(), *self._background]
        if self._housekeeping is not None:
            tasks.append(self._housekeeping)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        left = await self.store.close()
        if self.alerts is not None:  # after the last commits: their alerts are claimed too
            await self.alerts.stop()
        if left:
            log.error("relay stopped; %d accepted events were not stored", left)
        else:
            log.info("relay stopped; store flushed")
        return left

    @property
    def housekeeping_every(self) -> float:
        """Seconds between housekeeping passes: 60, or half of ``forget_producers_after``
        when that is shorter, so that a short setting is kept to within its own length."""
        forget = self.config.forget_producers_after
        if forget > 0:
            return max(HOUSEKEEPING_AT_LEAST, min(HOUSEKEEPING_EVERY, forget / 2))
        return HOUSEKEEPING_EVERY

    async def _keep_house(self) -> None:
        """Free memory: rings of finished, idle runs; positions of long-idle producers."""
        while True:
            await asyncio.sleep(self.housekeeping_every)
            await self._forget_idle_producers()
            freed = self.hub.forget_idle_rings(time.time(), IDLE_RING_AFTER)
            if freed:
                log.debug("freed the replay rings of %d idle runs", freed)
            for address, unlogged in self.limits.quiet_since(time.monotonic()):
                if unlogged:
                    log.warning(
                        "refused %d more connections from %s (over --max-connections-per-ip %d)",
                        unlogged,
                        address,
                        self.limits.limit,
                    )

    async def _forget_idle_producers(self) -> None:
        """Forget the dedup positions of producers idle past ``forget_producers_after``.

        Never one with a /publish connection open now or since the pass began; those seen
        since the last pass are marked active first. The store deletes in small batches
        between commits. Names the hub knows without a stored position (every event they
        sent was refused) have no row to age: they go once nothing of theirs is open or queued.
        """
        if not self.config.forget_producers_after > 0:
            return
        seen = self._gone | self._publishing.keys()
        self._gone = set()
        try:
            forgotten = await self.store.forget_producers(
                seen=seen,
                keep=lambda name: name in self._publishing or name in self._gone,
                on_forgotten=self._forgot_producers,
            )
        except Exception:
            log.exception("forgetting idle producers failed")
            forgotten = None
        if forgotten is None:
            self._gone |= seen - self._publishing.keys()  # mark them at the next pass
        elif forgotten:
            log.debug(
                "forgot %d producers idle for more than %g s", forgotten, self.config.forget_producers_after
            )
        if len(self.hub.producers) != len(self.hub.stored_positions):  # rare: skip the scan otherwise
            busy = self._publishing.keys() | self._gone | self.store.queued_producers()
            rowless = self.hub.producers.keys() - self.hub.stored_positions.keys() - busy
            if rowless:
                self.hub.forget_producers(rowless)

    def _forgot_producers(self, names: list[str]) -> None:
        self.hub.forget_producers(names)
        self.metrics.producers_forgotten.inc(len(names))

    # -- connections per address ---------------------------------------------

    def _opened(self, conn: RelayConnection, transport: asyncio.BaseTransport) -> None:
        """Take a slot of the peer's address and a handshake slot; past the limits, refuse
        now or at the request."""
        conn.address = address_key(transport.get_extra_info("peername"))
        conn.handshaking = True
        if self.handshakes.over(self.handshakes.opened(conn.address)):
            self.metrics.handshakes_refused.labels("handshake_flood").inc()
            transport.abort()  # that many unfinished requests: a slow-header flood
        count = self.limits.opened(conn.address)
        if not self.limits.over(count):
            return
        if self.limits.over(count, ANSWERED_PAST_LIMIT):
            self.metrics.handshakes_refused.labels("ip_flood").inc()
            transport.abort()  # a flood: not even worth reading its request
        else:
            conn.over_limit = True
        self._note_refused(conn.address, count)

    def _request_done(self, conn: ServerConnection) -> None:
        """The request is complete: its handshake slot is free again."""
        if isinstance(conn, RelayConnection) and conn.handshaking:
            conn.handshaking = False
            self.handshakes.closed(conn.address)

    def _request_too_large(self, conn: RelayConnection) -> None:
        """More than REQUEST_BYTES_MAX before the request was complete: 431, and close."""
        self._request_done(conn)
        self.metrics.handshakes_refused.labels("request_too_large").inc()
        body = f"request headers over {REQUEST_BYTES_MAX} bytes\n".encode()
        conn.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        conn.transport.close()

    def _closed(self, conn: RelayConnection) -> None:
        """Give back every slot the connection held."""
        self._request_done(conn)
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

    async def _gate(self, conn: ServerConnection, request: Request) -> Response | None:
        """Refuse floods, bad targets and DNS rebinding; route plain HTTP; check origin
        and tokens before a WebSocket opens."""
        self._request_done(conn)
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
                headers.get("Origin"), headers.get("Sec-Fetch-Site"), host, self.config.allow_origins
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
                return await self.http.respond(conn, url.path, query, request.headers)
            return self._check_handshake(url.path, query, request.headers)
        except MultipleValuesError as exc:
            name = str(exc.args[0] if exc.args else "a")[:40]
            if name.lower() == "origin":
                return self._refuse("origin", 403, "several Origin headers\n")
            return self._refuse("header", 400, f"several {name} headers; send one\n")

    @property
    def _open_to_rebinding(self) -> bool:
        """Without both tokens a DNS-rebinding page could read or publish; with them it has no token."""
        return self.config.publish_token is None or self.config.subscribe_token is None

    def _check_handshake(self, path: str, query: dict[str, list[str]], headers: Headers) -> Response | None:
        endpoint = _ENDPOINTS.get(path)
        if endpoint is None:
            return text_response(404, f"no WebSocket endpoint at {path[:100]}\n")
        origin = headers.get("Origin")
        if not origin_ok(origin, headers.get("Host"), self.config.allow_origins):
            self._note_origin(str(origin)[:100])
            return self._refuse("origin", 403, f"origin {str(origin)[:100]!r} is not allowed\n")
        if not self._rights(endpoint, headers, query):
            return self._refuse("token", 401, "missing or wrong token: send Authorization: Bearer TOKEN\n")
        return None

    def _rights(self, endpoint: str, headers: Headers, query: dict[str, list[str]]) -> set[str]:
        """What a connection may do: publish, subscribe, or (root path) both.

        The root path serves both roles; with different tokens configured it
        gets each role whose token it presents (header or repeated ``token``
        query parameters), so a read-only legacy frontend needs only the
        subscribe token.
        """
        tokens = presented_tokens(headers.get("Authorization"), query.get("token", []))
        wanted = {"publish", "subscribe"} if endpoint == "root" else {endpoint}
        expected = {"publish": self.config.publish_token, "subscribe": self.config.subscribe_token}
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
        self.metrics.handshakes_refused.labels(reason).inc()
        return text_response(status, text)

    async def _handle(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        url = urlsplit(conn.request.path)
        query = parse_qs(url.query, keep_blank_values=True)
        endpoint = {"/publish": "publish", "/subscribe": "subscribe"}.get(url.path, "root")
        gauge = self.metrics.connections.labels(endpoint)
        gauge.inc()
        self.metrics.connections_opened.labels(endpoint).inc()
        try:
            if endpoint == "publish":
                await self._publisher(conn, query)
            elif endpoint == "subscribe":
                await self._subscriber(conn, query)
            else:
                await self._root(conn, self._rights("root", conn.request.headers, query))
        except ConnectionClosed:
            pass
        finally:
            gauge.dec()
            self._cutting.discard(conn)

    # -- producers ---------------------------------------------------------

    async def _publisher(self, conn: ServerConnection, query: dict[str, list[str]]) -> None:
        name = first_param(query, "producer")
        if name is None:
            name = self.hub.new_producer_name()
        elif not _valid_name(name):
            self._send(
                conn,
                _error(
                    "bad_producer",
                    "producer must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                ),
            )
            await conn.close(1008, "bad producer name")
            return
        older = self._publishing.get(name)
        if older is not None:
            await self._refuse_in_use(conn, name, older)
            return
        # The committed position, not the accepted one: an emitter drops what
        # this covers, and accepted-but-uncommitted events die with a crash.
        last_id = self.hub.stored_positions.get(name)
        if self.store.shared:
            # The database's position: another node may have stored more of the name than this
            # one has read, or forgotten it (housekeeping runs on one node).
            try:
                stored = await self.store.producer_position(name)
            except Exception as exc:  # the database away: what this node folded (dedup is the log's)
                log.debug("producer %r: stored position unknown (%s); using this node's", name, exc)
            else:
                if stored is None:  # forgotten (its accepted position stays: resends are compared)
                    self.hub.stored_positions.pop(name, None)
                elif stored > (last_id or 0):
                    self.hub.stored_positions[name] = stored
                    self.hub.producers[name] = max(self.hub.producers.get(name, 0), stored)
                last_id = stored
            older = self._publishing.get(name)
            if older is not None:  # it took the name while the position was read
                await self._refuse_in_use(conn, name, older)
                return
        self._send(
            conn,
            {
                "op": "hello",
                "producer": name,
                "last_id": last_id,
                "max_frame_bytes": self.config.max_frame_bytes,
                "max_events_per_frame": self.config.max_events_per_frame,
                "accepts": list(PRODUCER_OPS),
            },
        )
        acks = _AckState(conn, name)
        # No await since last_id was read: the position cannot be forgotten in between,
        # and from here on it is kept for as long as the connection is open.
        self._publishing[name] = conn
        try:
            async for frame in conn:
                resent = self._ingest(conn, name, frame, acks)
                if resent is not None and not await self._check_resent(conn, name, acks, resent):
                    return
                await self._backpressure()
        finally:
            self._stopped_publishing(name, conn)

    def _stopped_publishing(self, name: str, conn: ServerConnection) -> None:
        if self._publishing.get(name) is not conn:
            return
        del self._publishing[name]
        if self.config.forget_producers_after > 0:
            self._gone.add(name)  # the next housekeeping pass marks it active up to then

    async def _refuse_in_use(self, conn: ServerConnection, name: str, older: ServerConnection) -> None:
        """Another connection publishes under ``name``: producer_in_use instead of hello, 4409.

        Two live emitters under one name would each see the other's ids as duplicates. The
        older connection may be a dead one the relay has not noticed yet (the same emitter
        back after a network cut), so it is pinged; silent for PROBE_TIMEOUT, it is closed.
        """
        stale_after = self.config.ping_interval + self.config.ping_timeout
        self._send(
            conn,
            {
                "op": "error",
                "code": IN_USE,
                "detail": f"another connection is publishing as {name!r}: if it was this emitter's "
                f"own, retry for up to {stale_after:g} s; otherwise publish under another name",
                "stale_after": stale_after,
            },
        )
        self.metrics.producer_refusals.labels(IN_USE).inc()
        self._warn_producer(
            name,
            "producer name %r is in use by %s: refused it to %s (two emitters with one name?)",
            name,
            _peer(older),
            _peer(conn),
        )
        if name not in self._probing:
            self._probing.add(name)
            self._track(self._probe_older(name, older))
        await conn.close(PRODUCER_REFUSED, "producer name in use")

    async def _probe_older(self, name: str, older: ServerConnection) -> None:
        """Ping the connection holding a name another one asked for; close it if it is silent."""
        try:
            pong = await older.ping()
            await asyncio.wait_for(pong, PROBE_TIMEOUT)
        except TimeoutError:
            log.warning(
                "producer %r: its connection from %s did not answer a ping within %g s; closing it",
                name,
                _peer(older),
                PROBE_TIMEOUT,
            )
            older.transport.abort()
        except ConnectionClosed:
            pass
        finally:
            self._probing.discard(name)

    def _warn_producer(self, name: str, message: str, *args: Any) -> None:
        """A WARNING about a producer name, at most once a minute per name."""
        held_back = self._producer_log.allow(name, time.monotonic())
        if held_back is not None:
            log.warning(
                message + (f" ({held_back} more like it in the last minute)" if held_back else ""), *args
            )

    def _ingest(
        self, conn: ServerConnection, producer: str, frame: str | bytes, acks: _AckState
    ) -> _Resent | None:
        """Validate, sequence and queue one producer frame; ack after commit.

        A frame that reuses an id of this producer is queued up to that event; the rest
        is returned, to be compared with what is stored (:meth:`_check_resent`).
        """
        try:
            self._check_size(frame)
            parsed, suspect = parse_frame(frame)
            if isinstance(parsed, dict) and "op" in parsed:  # events have no "op": a control frame
                self._producer_control(producer, parsed)
                return
            raws = split_frame(parsed, self.config.max_events_per_frame)
        except Refused as exc:
            self._reject(conn, exc)
            return None
        many = isinstance(parsed, list)
        valid: list[dict[str, Any]] = []
        where: list[tuple[int, Any]] = []
        top_id = 0
        for index, raw in enumerate(raws):
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(raw_id, int) and not isinstance(raw_id, bool):
                top_id = max(top_id, raw_id)
            try:
                if suspect:
                    refuse_unsafe_values(raw)
                valid.append(validate_event(raw))
                where.append((index, raw_id))
            except Refused as exc:
                self._reject(conn, exc, event_id=raw_id, index=index if many else None)
        accepted = self.hub.accept(producer, valid, max_body=self._max_body, stop_at_known=True)
        self._queue(conn, accepted, where, many)
        if accepted.known_from is not None:
            known = accepted.known_from
            return _Resent(valid[known:], where[known:], many, raws, top_id)
        self._register_ack(acks, top_id)
        return None

    def _queue(
        self, conn: ServerConnection, accepted: Accepted, where: list[tuple[int, Any]], many: bool
    ) -> None:
        """Refuse what was too large once encoded, queue the rest for the store."""
        for position, exc in accepted.too_large:
            index, raw_id = where[position]
            self._reject(conn, exc, event_id=raw_id, index=index if many else None)
        self.store.append(accepted.new)
        self.metrics.events_in.inc(len(accepted.new))
        if accepted.duplicates:
            self.metrics.duplicates.inc(accepted.duplicates)

    def _register_ack(self, acks: _AckState, upto: int) -> None:
        if upto > acks.registered:
            acks.registered = upto
            self.store.after_commit(partial(self._ack_ready, acks, upto))

    async def _check_resent(
        self, conn: ServerConnection, producer: str, acks: _AckState, resent: _Resent
    ) -> bool:
        """Compare the reused ids of a frame with the stored events; False once refused.

        Identical resends are dropped as duplicates, as always. An id stored with another
        body means a second emitter under this name: nothing from that event on is stored
        from this connection; the ack covers what came before it, never the id itself, then
        ``producer_conflict`` and 4409. The connection is not read meanwhile.
        """
        if not await self._committed_or_closed(conn):  # what the producer sent before is in the table
            return False
        position = self.hub.producers.get(producer, 0)
        reused = [e["id"] for e in resent.events if isinstance(e.get("id"), int) and e["id"] <= position]
        stored = await self.store.stored_versions(producer, reused)
        conflict = None
        for k, event in enumerate(resent.events):
            row = stored.get(event.get("id"))  # type: ignore[arg-type]
            if row is not None and event["id"] <= position and not same_event(event, row, producer):
                conflict = k
                break
        kept = resent.events if conflict is None else resent.events[:conflict]
        self._queue(conn, self.hub.accept(producer, kept, max_body=self._max_body), resent.where, resent.many)
        if conflict is None:
            self._register_ack(acks, resent.top_id)
            return True
        index, bad_id = resent.where[conflict]
        before = [raw.get("id") for raw in resent.raws[:index] if isinstance(raw, dict)]
        ids_before = [i for i in before if isinstance(i, int) and not isinstance(i, bool)]
        acks.ceiling = bad_id - 1
        self._register_ack(acks, min(max(ids_before, default=0), acks.ceiling))
        if not await self._committed_or_closed(conn):
            return False
        upto = min(acks.registered, acks.ceiling)
        if upto > acks.sent:
            acks.sent = upto
            self._send(conn, {"op": "ack", "producer": producer, "upto": upto})
        seq = stored[bad_id][0]
        run_id = json.loads(stored[bad_id][2]).get("run_id")
        self._send(
            conn,
            {
                "op": "error",
                "code": CONFLICT,
                "id": bad_id,
                "detail": f"id {bad_id} of producer {producer!r} is stored with another body (run "
                f"{str(run_id)[:128]!r}, seq {seq}): two emitters share this name; publish the "
                "events not acked under another name",
            },
        )
        self.metrics.producer_refusals.labels(CONFLICT).inc()
        self._warn_producer(
            producer,
            "producer %r from %s: id %d differs from the stored event (run %s, seq %d): two emitters "
            "share this name? refused its events from that id on",
            producer,
            _peer(conn),
            bad_id,
            str(run_id)[:128],
            seq,
        )
        await conn.close(PRODUCER_REFUSED, "producer name shared with another emitter")
        return False

    async def _committed_or_closed(self, conn: ServerConnection) -> bool:
        """Wait until everything queued so far is committed; False if the connection closed first."""
        committed = asyncio.ensure_future(self.store.all_committed())
        closed = asyncio.ensure_future(conn.wait_closed())
        await asyncio.wait((committed, closed), return_when=asyncio.FIRST_COMPLETED)
        for waiter in (committed, closed):
            waiter.cancel()
        return committed.done() and not committed.cancelled() and not closed.done()

    def _producer_control(self, producer: str, msg: dict[str, Any]) -> None:
        """``holding`` (the one op ``hello.accepts`` lists): runs lack events until acked.
        Anything else raises :class:`Refused`, answered with an error frame."""
        if msg.get("op") != "holding":
            op = str(msg.get("op"))[:40]
            raise Refused("bad_op", f"unknown op {op!r} on /publish; accepted: {', '.join(PRODUCER_OPS)}")
        changed = self.hub.holding(producer, parse_holding(msg))
        if changed:
            self.store.save_runs(changed)

    def _ack_ready(self, acks: _AckState, upto: int) -> None:
        """Events up to ``upto`` are stored; one ack per producer per commit goes out."""
        if upto <= acks.ready:
            return
        acks.ready = upto
        settled = self.hub.settle(acks.producer, upto)
        if settled:
            self.store.save_runs(settled)
        if not self._acks_due:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._acks_due.add(acks)

    def _send_acks(self) -> None:
        due, self._acks_due = self._acks_due, set()
        for acks in due:
            upto = acks.ready if acks.ceiling is None else min(acks.ready, acks.ceiling)
            if upto > acks.sent:
                acks.sent = upto
                self._send(acks.conn, {"op": "ack", "producer": acks.producer, "upto": upto})

    def _check_size(self, frame: str | bytes) -> int:
        """Refuse a frame over ``max_frame_bytes`` (UTF-8 bytes); return its size."""
        limit = self.config.max_frame_bytes
        size = utf8_size(frame, limit) if isinstance(frame, str) else len(frame)
        if size > limit:
            raise Refused("too_large", f"frame of {size} bytes; at most {limit} are accepted")
        return size

    async def _backpressure(self) -> None:
        """Stop reading producers while too much waits for the disk (events or bytes)."""
        if self.store.full(self.config.max_store_lag, MAX_STORE_LAG_CHARS):
            await self.store.wait_for_room(self.config.max_store_lag, MAX_STORE_LAG_CHARS)

    @property
    def _max_body(self) -> int:
        """Largest stored event: what a client with ``max_frame_bytes`` can still take,
        with room for the root path's reshaping."""
        return self.config.max_frame_bytes - _ENVELOPE_SLACK

    def _reject(
        self,
        conn: ServerConnection,
        exc: Refused,
        *,
        event_id: Any = None,
        index: int | None = None,
        run_id: str | None = None,
        legacy: bool = False,
    ) -> None:
        self.metrics.rejected.labels(exc.code).inc()
        if legacy:
            self._send(conn, {"type": "error", "data": {"code": exc.code, "detail": exc.detail}})
            return
        frame = _error(exc.code, exc.detail)
        if isinstance(event_id, int) and not isinstance(event_id, bool):
            frame["id"] = event_id
        if index is not None:
            frame["index"] = index
        if run_id is not None:
            frame["run_id"] = run_id
        self._send(conn, frame)

    # -- subscribers -------------------------------------------------------

    async def _subscriber(self, conn: ServerConnection, query: dict[str, list[str]]) -> None:
        sub = Subscription(handle=conn)
        self._subscribers[sub] = conn
        try:
            runs = query.get("run_id", [])
            since_text = first_param(query, "since")
            since = 0
            if since_text is not None:
                since = whole_number(since_text)
                if since is None:
                    self._reject(
                        conn,
                        Refused(
                            "bad_since",
                            f"since must be a whole number >= 0, not {since_text[:40]!r}",
                        ),
                    )
                    runs = []
            for run_id in runs:
                self._join(conn, sub, run_id, since)
            async for frame in conn:
                self._subscriber_frame(conn, sub, frame)
        finally:
            self._forget(sub)

    def _forget(self, sub: Subscription) -> None:
        """A subscriber is gone (closed or cut): drop its state and catch-ups."""
        self._subscribers.pop(sub, None)
        self.hub.drop(sub)
        for key in [key for key in self._catch_ups if key[0] is sub]:
            self._stop_catch_up(sub, key[1])

    def _stop_catch_up(self, sub: Subscription, run_id: str) -> None:
        task = self._catch_ups.pop((sub, run_id), None)
        if task is not None:
            task.cancel()

    def _subscriber_frame(self, conn: ServerConnection, sub: Subscription, frame: str | bytes) -> None:
        try:
            self._check_size(frame)
            msg = parse_json(frame)
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                raise Refused("bad_frame", 'send {"op": "subscribe"|"unsubscribe"|"ping", ...}')
            op = msg["op"]
            if op == "ping":
                self._send(conn, {"op": "pong"})
                return
            if op not in ("subscribe", "unsubscribe"):
                raise Refused("bad_op", f"unknown op {op[:40]!r}; use subscribe, unsubscribe or ping")
            run_id = msg.get("run_id")
            if not isinstance(run_id, str):
                raise Refused("bad_run_id", "run_id must be a string")
            if op == "unsubscribe":
                self._stop_catch_up(sub, run_id)
                self.hub.unsubscribe(sub, run_id)
                self._send(conn, {"op": "unsubscribed", "run_id": run_id})
                return
            since = msg.get("since", 0)
            if not isinstance(since, int) or isinstance(since, bool) or since < 0:
                raise Refused("bad_since", "since must be a whole number >= 0")
        except Refused as exc:
            self._reject(conn, exc)
            return
        self._join(conn, sub, run_id, since)

    def _join(self, conn: ServerConnection, sub: Subscription, run_id: str, since: int) -> None:
        """Subscribe to one run: acknowledge, send what the ring has, page the rest."""
        if run_id == "*":
            self.hub.subscribe_all(sub)
            self._send(conn, {"op": "subscribed", "run_id": "*", "since": None, "last_seq": None})
            return
        if not _valid_name(run_id):
            self._reject(
                conn,
                Refused(
                    "bad_run_id",
                    "run_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-', or '*'",
                ),
            )
            return
        if run_id not in sub.cursors and len(sub.cursors) >= MAX_RUNS_PER_SUBSCRIBER:
            self._reject(
                conn,
                Refused(
                    "too_many_runs",
                    f"at most {MAX_RUNS_PER_SUBSCRIBER} runs per connection; "
                    "unsubscribe from some, or subscribe to '*'",
                ),
                run_id=run_id,
            )
            return
        self._stop_catch_up(sub, run_id)
        try:
            joined = self.hub.subscribe(sub, run_id, since)
        except Refused as exc:
            self._reject(conn, exc, run_id=run_id)
            return
        self._send(
            conn,
            {"op": "subscribed", "run_id": run_id, "since": since, "last_seq": joined.last_seq},
        )
        waiting = joined.last_seq < since or run_id not in self.hub.runs
        start = "waiting" if waiting else "catch_up" if joined.from_store else "live"
        self.metrics.subscriptions.labels(start).inc()
        if self.store.shared and since > joined.last_seq:
            self._track(self._check_since(conn, sub, run_id, since))
        if joined.gap_resume_from is not None:
            self._send_gap(conn, run_id, since, joined.gap_resume_from)
        self._write_events(conn, sub, joined.backlog)
        if joined.from_store:
            task = asyncio.create_task(self._catch_up(conn, sub, run_id))
            self._catch_ups[(sub, run_id)] = task
            task.add_done_callback(lambda done: self._catch_up_done(sub, run_id, done))

    async def _check_since(self, conn: ServerConnection, sub: Subscription, run_id: str, since: int) -> None:
        """Shared log: a ``since`` past what this node has read waits, since another node may
        have handed it out; one past every seq the database handed out is refused, as on one
        relay (``bad_since``, after ``subscribed``), so no later event hides behind it."""
        try:
            handed_out = await self.store.last_seq(run_id)
        except Exception as exc:  # the database away: keep waiting
            log.debug("since=%d of run %s not checked: %s", since, run_id, exc)
            return
        if since <= handed_out or sub.cursors.get(run_id) != since or self._subscribers.get(sub) is not conn:
            return
        self._stop_catch_up(sub, run_id)
        self.hub.unsubscribe(sub, run_id)
        refused = Refused(
            "bad_since",
            f"since={since} is past run {run_id!r}'s last seq {handed_out}: those seqs come from "
            "another relay or a store that lost events; subscribe again from 0",
        )
        self._reject(conn, refused, run_id=run_id)

    def _history_changed(self, run_id: str, committed_seq: int) -> None:
        """Rows another process wrote are now part of the run: live subscribers page them."""
        for sub in self.hub.history_changed(run_id, committed_seq):
            conn = self._subscribers.get(sub)
            if conn is not None:
                self._start_catch_up(conn, sub, run_id)

    def _start_catch_up(self, conn: ServerConnection, sub: Subscription, run_id: str) -> None:
        self._stop_catch_up(sub, run_id)
        task = asyncio.create_task(self._catch_up(conn, sub, run_id))
        self._catch_ups[(sub, run_id)] = task
        task.add_done_callback(lambda done: self._catch_up_done(sub, run_id, done))

    def _catch_up_done(self, sub: Subscription, run_id: str, task: asyncio.Task[None]) -> None:
        if self._catch_ups.get((sub, run_id)) is task:
            del self._catch_ups[(sub, run_id)]

    async def _catch_up(self, conn: ServerConnection, sub: Subscription, run_id: str) -> None:
        """Page a run's history from the store until the replay ring reaches.

        Only one task runs per (subscriber, run): a new subscribe, an
        unsubscribe or a disconnect cancels it. Pages stop at the run's
        committed seq, so a read never sees rows a failed commit takes back.
        """
        run = self.hub.runs[run_id]
        try:
            while run_id in sub.catching_up:
                cursor = sub.cursors[run_id]
                async with self._catch_up_turns.turn(getattr(conn, "address", "")):
                    rows = await bounded(
                        self.store.read(
                            run_id, cursor, run.committed_seq, CATCH_UP_PAGE, CATCH_UP_PAGE_BYTES
                        ),
                        f"catch-up read of run {run_id}",
                    )
                assert rows is not None  # skipped only for a ``wanted`` that says no
                self.metrics.store_reads.labels(CATCH_UP, "done").inc()
                if rows and rows[0][0] != cursor + 1:
                    self._send_gap(conn, run_id, cursor, rows[0][0])
                if rows:
                    self._write_frames(conn, [row[1] for row in rows])
                    self.metrics.events_out.inc(len(rows))
                    if queued_bytes(conn) > self.config.max_queue_bytes:
                        self._cut_slow(sub, conn)
                        return
                    await conn.drain()
                    cursor = rows[-1][0]
                else:
                    ring = run.ring
                    if ring and ring[0].seq > cursor + 1:  # pruned under us: jump to memory
                        self._send_gap(conn, run_id, cursor, ring[0].seq)
                        cursor = ring[0].seq - 1
                rest = self.hub.caught_up_to(sub, run_id, cursor)
                if rest is not None:
                    self._write_events(conn, sub, rest)
                    return
        except (ConnectionClosed, OSError):
            return
        except StoreError as exc:  # the database away or slow: one line, the client resubscribes
            log.warning("catch-up of run %s failed: %s", run_id, exc)
            self._track(conn.close(1011, "catch-up failed"))
        except Exception:
            log.exception("catch-up of run %s failed", run_id)
            self._track(conn.close(1011, "catch-up failed"))

    def _send_gap(self, conn: ServerConnection, run_id: str, since: int, resume_from: int) -> None:
        self._send(conn, {"op": "gap", "run_id": run_id, "since": since, "resume_from": resume_from})

    # -- root path (compatibility) -------------------------------------------

    async def _root(self, conn: ServerConnection, rights: set[str]) -> None:
        """The ``{type, timestamp, data}`` relay that existing frontends speak."""
        sub = Subscription(handle=conn, legacy=True)
        if "subscribe" in rights:
            self._subscribers[sub] = conn
            self.hub.subscribe_all(sub)
        producer = self.hub.new_producer_name() if "publish" in rights else None
        sub.own_producer = producer
        try:
            async for frame in conn:
                self._root_frame(conn, producer, frame)
                await self._backpressure()
        finally:
            self._forget(sub)

    def _root_frame(self, conn: ServerConnection, producer: str | None, frame: str | bytes) -> None:
        """Store a root frame under its run; refuse only what no browser could read back."""
        try:
            self._check_size(frame)
            raw, suspect = parse_frame(frame)
            if suspect:
                raw = repair_values(raw)
            if isinstance(raw, dict) and raw.get("type") == "ping":
                self._send(conn, {"type": "pong"})
                return
            if producer is None:
                raise Refused("forbidden", "this connection has no publish token: it may only receive")
            event, named = root_event(raw)
        except Refused as exc:
            self._reject_root(conn, exc)
            return
        host = _host(conn)
        if named is not None:
            self.root_runs.named(host, named)
            event["run_id"] = named
        else:
            event["run_id"] = self.root_runs.unnamed(host, self._takes_unnamed_frames)
        accepted = self.hub.accept(producer, [event], max_body=self._max_body)
        for _, exc in accepted.too_large:
            self._reject_root(conn, exc)
        self.store.append(accepted.new)
        self.metrics.events_in.inc(len(accepted.new))

    def _takes_unnamed_frames(self, run_id: str) -> bool:
        run = self.hub.runs.get(run_id)
        return run is not None and run.status == "running" and time.time() - run.updated_at < FOLLOW_FOR

    def _reject_root(self, conn: ServerConnection, exc: Refused) -> None:
        """Answer in the legacy shape and log: root producers never read the answer."""
        self._reject(conn, exc, legacy=True)
        host = _host(conn)
        held = self._root_refusals.allow(host, time.monotonic())
        if held is None:
            return
        log.warning(
            "refused a frame on / from %s: %s: %s (root-path producers do not read replies: "
            "the frame is lost)%s",
            _peer(conn),
            exc.code,
            exc.detail[:200],
            f"; {held} more refused from {host} since the last such line" if held else "",
        )

    # -- delivery ------------------------------------------------------------

    def _on_commit(self, batch: list[Sequenced]) -> None:
        """Stored events become visible: write them to every live subscriber."""
        self.metrics.store_commits.inc()
        deliveries = self.hub.committed(batch)
        if deliveries:
            self._deliver(deliveries)
        if self.alerts is not None:
            self.alerts.committed(batch, self.hub.runs)

    def _deliver(self, deliveries: Iterable[Delivery]) -> None:
        frames: dict[int, list[Frame]] = {}
        limit = self.config.max_queue_bytes
        sent = 0
        for sub, items in deliveries:
            conn = self._subscribers.get(sub)
            if conn is None:
                continue
            try:
                if sub.legacy:
                    for item in items:
                        Frame.text(item.legacy_body()).write_to(conn)
                else:
                    shared = frames.get(id(items))
                    if shared is None:
                        shared = frames[id(items)] = event_frames([item.body for item in items])
                    for frame in shared:
                        frame.write_to(conn)
                sent += len(items)
                queued = queued_bytes(conn)
                if queued > limit:
                    if self._too_slow(conn, queued, limit):
                        self._cut_slow(sub, conn)
                elif conn.over_since is not None:  # type: ignore[attr-defined]
                    conn.over_since = None  # type: ignore[attr-defined]  # drained: the clock stops
            except Exception:  # one broken connection must not starve the rest
                log.exception("delivery to %s failed; dropping it", _peer(conn))
                self._forget(sub)
                conn.transport.abort()
        self.metrics.events_out.inc(sent)

    def _write_events(self, conn: ServerConnection, sub: Subscription, items: list[Sequenced]) -> None:
        self._write_frames(conn, [item.body for item in items])
        self.metrics.events_out.inc(len(items))

    @staticmethod
    def _write_frames(conn: ServerConnection, bodies: list[str]) -> None:
        for frame in event_frames(bodies):
            if not frame.write_to(conn):
                return

    @staticmethod
    def _too_slow(conn: ServerConnection, queued: int, limit: int) -> bool:
        """A queue over ``limit``: slow once it has stayed over it for SLOW_AFTER seconds of
        deliveries, or at once past HARD_QUEUE_FACTOR times it."""
        if not isinstance(conn, RelayConnection) or queued > HARD_QUEUE_FACTOR * limit:
            return True
        now = time.monotonic()
        if conn.over_since is None:
            conn.over_since = now
            return False
        return now - conn.over_since > SLOW_AFTER

    def _cut_slow(self, sub: Subscription, conn: ServerConnection) -> None:
        """Drop a subscriber whose queue is full; it resumes with since=N."""
        self.metrics.slow_consumers.inc()
        self._forget(sub)
        log.warning(
            "cut slow consumer %s: over %d bytes queued for %g s, or over %d",
            _peer(conn),
            self.config.max_queue_bytes,
            SLOW_AFTER,
            HARD_QUEUE_FACTOR * self.config.max_queue_bytes,
        )
        self._track(conn.close(SLOW_CONSUMER, "slow consumer: resume with since=<last seq>"))

    def _track(self, coro: Any) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- small helpers -------------------------------------------------------

    def _send(self, conn: ServerConnection, frame: dict[str, Any]) -> None:
        """Write a reply (hello, ack, error, pong, ...); cut a peer that does not read them.

        Replies can outgrow what provoked them (a 2 KB frame of 1000 bad
        events earns 80 KB of errors), so they obey ``max_queue_bytes`` too.
        """
        Frame.text(encode(frame)).write_to(conn)
        if queued_bytes(conn) > self.config.max_queue_bytes and conn not in self._cutting:
            self._cutting.add(conn)
            self.metrics.slow_consumers.inc()
            log.warning("cut %s: it does not read the relay's replies", _peer(conn))
            self._track(conn.close(SLOW_CONSUMER, "not reading: replies queued past the limit"))


@dataclass(eq=False, slots=True)
class _AckState:
    """A producer connection's ack positions: registered, stored, sent."""

    conn: ServerConnection
    producer: str
    registered: int = 0
    ready: int = 0
    sent: int = 0
    ceiling: int | None = None
    """Set on a producer_conflict: no ack may reach the conflicting id."""


@dataclass(slots=True)
class _Resent:
    """The rest of a frame from its first reused id on, held until compared with the store."""

    events: list[dict[str, Any]]
    where: list[tuple[int, Any]]
    """(index in the frame, id as sent) of each of ``events``."""
    many: bool
    raws: list[Any]
    """The frame's events as sent, valid or not: the ids before a conflict are acked."""
    top_id: int


def event_frames(bodies: list[str]) -> list[Frame]:
    """Encoded events as frames: one object, or arrays of at most FRAME_BUDGET bytes."""
    if len(bodies) == 1:
        return [Frame.text(bodies[0])]
    frames: list[Frame] = []
    chunk: list[str] = []
    size = 0
    for body in bodies:
        if chunk and size + len(body) > FRAME_BUDGET:
            frames.append(Frame.text("[" + ",".join(chunk) + "]"))
            chunk, size = [], 0
        chunk.append(body)
        size += len(body) + 1
    if chunk:
        frames.append(Frame.text("[" + ",".join(chunk) + "]"))
    return frames


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"op": "error", "code": code, "detail": detail}


def _valid_name(name: str) -> bool:
    return RUN_ID_RE.fullmatch(name) is not None


def _ws_url(host: str, port: int, *, secure: bool = False) -> str:
    scheme = "wss" if secure else "ws"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _without_missing_ipv6(hosts: list[str]) -> list[str]:
    """Drop ::1 from several hosts when this machine cannot bind it (IPv6 disabled).

    ``localhost`` resolves to ::1 first on many systems, hence the default; a
    relay on a machine without IPv6 still starts, on the other addresses.
    """
    if IPV6_LOOPBACK not in hosts or len(hosts) == 1:
        return list(hosts)
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((IPV6_LOOPBACK, 0))
    except OSError as exc:
        rest = [host for host in hosts if host != IPV6_LOOPBACK]
        log.warning(
            "cannot listen on [::1] (%s): IPv6 looks disabled; listening on %s only", exc, ", ".join(rest)
        )
        return rest
    return list(hosts)


def _one_port_for_all(hosts: list[str], port: int) -> int:
    """Port 0 with several hosts would give each its own free port: pick one for all.

    (The port is free when probed and taken a moment later; only tests and
    benchmarks ask for port 0.)
    """
    if port != 0 or len(hosts) == 1:
        return port
    family = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((hosts[0], 0))
        return probe.getsockname()[1]


def _loopback(host: str) -> bool:
    """Whether only this machine can reach an address the relay listens on."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _websockets_logger() -> logging.Logger:
    """websockets' own logger, at WARNING unless someone set its level on purpose.

    At DEBUG websockets logs every request line and header: tokens in
    ``?token=`` and ``Authorization``. An application that embeds the relay
    and turns DEBUG on for everything must not write those to its log.
    """
    logger = logging.getLogger("fedrelay.websockets")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return logger


def _host(conn: ServerConnection) -> str:
    try:
        return str(conn.remote_address[0])
    except Exception:
        return "?"


def _peer(conn: ServerConnection) -> str:
    try:
        host, port = conn.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"
