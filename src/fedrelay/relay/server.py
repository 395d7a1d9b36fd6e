"""The relay: config to event log, hub, metrics and alerts; start, stop, housekeeping; and the
role objects wired together.

Each role has its own module: the handshake gate (:mod:`.gate`), /publish sessions
(:mod:`.publish`), /subscribe sessions and live delivery (:mod:`.subscribe`), the root path
(:mod:`.root`), and the replies they share (:mod:`.replies`). All decisions live in
:mod:`.hub` (who gets what) and :mod:`.schemas.wire` (what is valid).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import Server, serve

from .alerts.choice import alert_log_for
from .alerts.service import AlertService
from .config import RelayConfig
from .connection import CLOSE_TIMEOUT, READ_AHEAD_FRAMES, RelayConnection
from .eventlog import EventLog, StoreError, is_postgres_url
from .gate import ANSWERED_PAST_LIMIT as ANSWERED_PAST_LIMIT
from .gate import Gate
from .http import HttpApi
from .hub import Hub, Sequenced
from .metrics import RelayMetrics
from .publish import MAX_STORE_LAG_CHARS as MAX_STORE_LAG_CHARS
from .publish import PublishSessions
from .replies import SLOW_CONSUMER as SLOW_CONSUMER
from .replies import Replies
from .root import RootSessions
from .store import EventStore
from .subscribe import CATCH_UP_PAGE as CATCH_UP_PAGE
from .subscribe import CATCH_UP_PAGE_BYTES as CATCH_UP_PAGE_BYTES
from .subscribe import CATCH_UP_READS_PER_ADDRESS as CATCH_UP_READS_PER_ADDRESS
from .subscribe import FRAME_BUDGET as FRAME_BUDGET
from .subscribe import HARD_QUEUE_FACTOR as HARD_QUEUE_FACTOR
from .subscribe import MAX_RUNS_PER_SUBSCRIBER as MAX_RUNS_PER_SUBSCRIBER
from .subscribe import SLOW_AFTER as SLOW_AFTER
from .subscribe import SubscribeSessions
from .subscribe import event_frames as event_frames
from .tls import server_context

log = logging.getLogger("fedrelay.relay")

HOUSEKEEPING_EVERY = 60.0
"""Seconds between housekeeping passes (shorter when ``forget_producers_after`` is short)."""
HOUSEKEEPING_AT_LEAST = 0.1
IDLE_RING_AFTER = 600.0
"""Seconds after its last event before a finished run's replay ring is freed."""
IPV6_LOOPBACK = "::1"
HARD_SIZE_FACTOR = 4
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection gets to send its request and be answered; it holds its address's slot."""


class Relay:
    """One relay: a hub, an event log, and the role objects between them and the sockets."""

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
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._housekeeping: asyncio.Task[None] | None = None
        replies = Replies(config, self.metrics, self._track)
        self.publish = PublishSessions(config, self.hub, self.store, self.metrics, replies, self._track)
        self.subscribe = SubscribeSessions(config, self.hub, self.store, self.metrics, replies, self._track)
        self.root = RootSessions(config, self.hub, self.store, self.metrics, replies, self.subscribe)
        self.gate = Gate(config, self.metrics, self.http, replies, self.publish, self.subscribe, self.root)
        self.limits = self.gate.limits
        self.handshakes = self.gate.handshakes
        self.api_reads = self.gate.api_reads
        """API requests per address (the HTTP API takes and gives back its slots)."""
        self.root_runs = self.root.runs

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
            self.gate.handle,
            self.hosts,
            _one_port_for_all(self.hosts, cfg.port),
            logger=_websockets_logger(),
            create_connection=connection_type,
            open_timeout=HANDSHAKE_TIMEOUT,
            process_request=self.gate.process_request,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.max_frame_bytes * HARD_SIZE_FACTOR,
            max_queue=READ_AHEAD_FRAMES,
            ping_interval=cfg.ping_interval or None,  # 0: no keepalive (websockets takes None)
            ping_timeout=cfg.ping_timeout or None,
            close_timeout=CLOSE_TIMEOUT,
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
        tasks = [*self.subscribe.catch_up_tasks(), *self._background]
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
        publish = self.publish
        seen = publish.gone | publish.publishing.keys()
        publish.gone = set()
        try:
            forgotten = await self.store.forget_producers(
                seen=seen,
                keep=lambda name: name in publish.publishing or name in publish.gone,
                on_forgotten=self._forgot_producers,
            )
        except Exception:
            log.exception("forgetting idle producers failed")
            forgotten = None
        if forgotten is None:
            publish.gone |= seen - publish.publishing.keys()  # mark them at the next pass
        elif forgotten:
            log.debug(
                "forgot %d producers idle for more than %g s", forgotten, self.config.forget_producers_after
            )
        if len(self.hub.producers) != len(self.hub.stored_positions):  # rare: skip the scan otherwise
            busy = publish.publishing.keys() | publish.gone | self.store.queued_producers()
            rowless = self.hub.producers.keys() - self.hub.stored_positions.keys() - busy
            if rowless:
                self.hub.forget_producers(rowless)

    def _forgot_producers(self, names: list[str]) -> None:
        self.hub.forget_producers(names)
        self.metrics.producers_forgotten.inc(len(names))

    # -- what the event log reports; background tasks -----------------------

    def _on_commit(self, batch: list[Sequenced]) -> None:
        """Stored events become visible: to every live subscriber, then to the alerts."""
        self.metrics.store_commits.inc()
        deliveries = self.hub.committed(batch)
        if deliveries:
            self.subscribe.deliver(deliveries)
        if self.alerts is not None:
            self.alerts.committed(batch, self.hub.runs)

    def _history_changed(self, run_id: str, committed_seq: int) -> None:
        """Rows another process wrote are now part of the run (the store's callback)."""
        self.subscribe.history_changed(run_id, committed_seq)

    def _track(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends (cancelled at stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


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
