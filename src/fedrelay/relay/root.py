"""The root path ``/``: the ``{type, timestamp, data}`` relay that existing frontends speak.

Both a producer and a subscriber on one connection, by the tokens it shows; its frames
name a run or are tied to their host's last one (:mod:`.root_runs`). Kept apart because it
answers in its own shape and its producers never read the answers (refusals are logged).
"""

from __future__ import annotations

import logging
import time

from websockets.asyncio.server import ServerConnection

from ..schemas.compat import repair_values, root_event
from ..schemas.wire import Refused, parse_frame
from .config import RelayConfig
from .eventlog import EventLog
from .hub import Hub, Subscription
from .metrics import RelayMetrics
from .publish import backpressure, max_body
from .replies import Replies, host, peer
from .root_runs import FOLLOW_FOR, RootRuns
from .subscribe import SubscribeSessions
from .throttle import LogThrottle

log = logging.getLogger("fedrelay.relay")

REFUSALS_LOG_EVERY = 60.0
"""Seconds between log lines about one host's refused root frames."""
ROOT_REFUSALS_HOSTS = 1024
"""Hosts whose refused root frames are counted between log lines; the least recent go first."""


class RootSessions:
    """Every connection on ``/``: what it publishes goes to the hub, what it reads comes
    through the subscribers' delivery."""

    def __init__(
        self,
        config: RelayConfig,
        hub: Hub,
        store: EventLog,
        metrics: RelayMetrics,
        replies: Replies,
        subscribers: SubscribeSessions,
    ) -> None:
        self._config = config
        self._hub = hub
        self._store = store
        self._metrics = metrics
        self._replies = replies
        self._subscribers = subscribers
        self.runs = RootRuns()
        self._refusals = LogThrottle(REFUSALS_LOG_EVERY, ROOT_REFUSALS_HOSTS)

    async def serve(self, conn: ServerConnection, rights: set[str]) -> None:
        """One root connection, with the roles its tokens give it (publish, subscribe)."""
        sub = Subscription(handle=conn, legacy=True)
        if "subscribe" in rights:
            self._subscribers.register(sub, conn)
            self._hub.subscribe_all(sub)
        producer = self._hub.new_producer_name() if "publish" in rights else None
        sub.own_producer = producer
        try:
            async for frame in conn:
                self._root_frame(conn, producer, frame)
                await backpressure(self._store, self._config)
        finally:
            self._subscribers.forget(sub)

    def _root_frame(self, conn: ServerConnection, producer: str | None, frame: str | bytes) -> None:
        """Store a root frame under its run; refuse only what no browser could read back."""
        try:
            self._replies.check_size(frame)
            raw, suspect = parse_frame(frame)
            if suspect:
                raw = repair_values(raw)
            if isinstance(raw, dict) and raw.get("type") == "ping":
                self._replies.send(conn, {"type": "pong"})
                return
            if producer is None:
                raise Refused("forbidden", "this connection has no publish token: it may only receive")
            event, named = root_event(raw)
        except Refused as exc:
            self._reject_root(conn, exc)
            return
        address = host(conn)
        if named is not None:
            self.runs.named(address, named)
            event["run_id"] = named
        else:
            event["run_id"] = self.runs.unnamed(address, self._takes_unnamed_frames)
        accepted = self._hub.accept(producer, [event], max_body=max_body(self._config))
        for _, exc in accepted.too_large:
            self._reject_root(conn, exc)
        self._store.append(accepted.new)
        self._metrics.events_in.inc(len(accepted.new))

    def _takes_unnamed_frames(self, run_id: str) -> bool:
        run = self._hub.runs.get(run_id)
        return run is not None and run.status == "running" and time.time() - run.updated_at < FOLLOW_FOR

    def _reject_root(self, conn: ServerConnection, exc: Refused) -> None:
        """Answer in the legacy shape and log: root producers never read the answer."""
        self._replies.reject(conn, exc, legacy=True)
        address = host(conn)
        held = self._refusals.allow(address, time.monotonic())
        if held is None:
            return
        log.warning(
            "refused a frame on / from %s: %s: %s (root-path producers do not read replies: "
            "the frame is lost)%s",
            peer(conn),
            exc.code,
            exc.detail[:200],
            f"; {held} more refused from {address} since the last such line" if held else "",
        )
