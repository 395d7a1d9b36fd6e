"""/subscribe sessions: the query, control ops, catch-up reads from the event log, live
fan-out of committed events, and cutting slow consumers.

Every connection that receives events (the root path's too) is registered here, so that one
place writes committed events to all of them and bounds what each may leave unread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..schemas.wire import Refused, parse_json
from .config import RelayConfig
from .connection import RelayConnection
from .eventlog import EventLog, StoreError
from .fanout import Frame, queued_bytes
from .http import first_param, whole_number
from .hub import Delivery, Hub, Sequenced, Subscription
from .metrics import RelayMetrics
from .replies import SLOW_CONSUMER, Replies, Track, peer, valid_name
from .store_reads import CATCH_UP, bounded
from .turns import TurnsPerKey

log = logging.getLogger("fedrelay.relay")

CATCH_UP_PAGE = 5000
"""Events per store read while a subscriber catches up."""
CATCH_UP_PAGE_BYTES = 2 << 20
"""...and bytes per read, so that a page of large events stays small."""
CATCH_UP_READS_PER_ADDRESS = 4
"""Catch-up reads of one client address in the reader's line at a time (turns.py)."""
MAX_RUNS_PER_SUBSCRIBER = 1024
FRAME_BUDGET = 256 * 1024
"""Bytes per array frame to subscribers: well under clients' usual 1 MiB cap."""
SLOW_AFTER = 2.0
"""Seconds a subscriber's queue may stay over ``max_queue_bytes`` before it is cut: a burst
(commits held up by another process's write lock, then megabytes at once) drains from a
subscriber that reads, and stays queued at one that does not."""
HARD_QUEUE_FACTOR = 4
"""...but past this many times ``max_queue_bytes`` a subscriber is cut at once (memory bound)."""


class SubscribeSessions:
    """Every connection that receives events, their catch-up reads, and live delivery."""

    def __init__(
        self,
        config: RelayConfig,
        hub: Hub,
        store: EventLog,
        metrics: RelayMetrics,
        replies: Replies,
        track: Track,
    ) -> None:
        self._config = config
        self._hub = hub
        self._store = store
        self._metrics = metrics
        self._replies = replies
        self._track = track
        self._subscribers: dict[Subscription, ServerConnection] = {}
        self._catch_ups: dict[tuple[Subscription, str], asyncio.Task[None]] = {}
        self._catch_up_turns = TurnsPerKey(CATCH_UP_READS_PER_ADDRESS)
        """Catch-up reads per address in the reader's line: one address cannot fill it."""

    def catch_up_tasks(self) -> list[asyncio.Task[None]]:
        """The catch-up reads running now (the relay cancels them when it stops)."""
        return list(self._catch_ups.values())

    def register(self, sub: Subscription, conn: ServerConnection) -> None:
        """Deliver to ``conn`` what ``sub`` is given (the root path's subscribers come here too)."""
        self._subscribers[sub] = conn

    async def serve(self, conn: ServerConnection, query: dict[str, list[str]]) -> None:
        """One /subscribe connection: the runs of its query, then its control frames."""
        sub = Subscription(handle=conn)
        self._subscribers[sub] = conn
        try:
            runs = query.get("run_id", [])
            since_text = first_param(query, "since")
            since = 0
            if since_text is not None:
                since = whole_number(since_text)
                if since is None:
                    self._replies.reject(
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
            self.forget(sub)

    def forget(self, sub: Subscription) -> None:
        """A subscriber is gone (closed or cut): drop its state and catch-ups."""
        self._subscribers.pop(sub, None)
        self._hub.drop(sub)
        for key in [key for key in self._catch_ups if key[0] is sub]:
            self._stop_catch_up(sub, key[1])

    def _stop_catch_up(self, sub: Subscription, run_id: str) -> None:
        task = self._catch_ups.pop((sub, run_id), None)
        if task is not None:
            task.cancel()

    def _subscriber_frame(self, conn: ServerConnection, sub: Subscription, frame: str | bytes) -> None:
        try:
            self._replies.check_size(frame)
            msg = parse_json(frame)
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                raise Refused("bad_frame", 'send {"op": "subscribe"|"unsubscribe"|"ping", ...}')
            op = msg["op"]
            if op == "ping":
                self._replies.send(conn, {"op": "pong"})
                return
            if op not in ("subscribe", "unsubscribe"):
                raise Refused("bad_op", f"unknown op {op[:40]!r}; use subscribe, unsubscribe or ping")
            run_id = msg.get("run_id")
            if not isinstance(run_id, str):
                raise Refused("bad_run_id", "run_id must be a string")
            if op == "unsubscribe":
                self._stop_catch_up(sub, run_id)
                self._hub.unsubscribe(sub, run_id)
                self._replies.send(conn, {"op": "unsubscribed", "run_id": run_id})
                return
            since = msg.get("since", 0)
            if not isinstance(since, int) or isinstance(since, bool) or since < 0:
                raise Refused("bad_since", "since must be a whole number >= 0")
        except Refused as exc:
            self._replies.reject(conn, exc)
            return
        self._join(conn, sub, run_id, since)

    def _join(self, conn: ServerConnection, sub: Subscription, run_id: str, since: int) -> None:
        """Subscribe to one run: acknowledge, send what the ring has, page the rest."""
        if run_id == "*":
            self._hub.subscribe_all(sub)
            self._replies.send(conn, {"op": "subscribed", "run_id": "*", "since": None, "last_seq": None})
            return
        if not valid_name(run_id):
            self._replies.reject(
                conn,
                Refused(
                    "bad_run_id",
                    "run_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-', or '*'",
                ),
            )
            return
        if run_id not in sub.cursors and len(sub.cursors) >= MAX_RUNS_PER_SUBSCRIBER:
            self._replies.reject(
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
            joined = self._hub.subscribe(sub, run_id, since)
        except Refused as exc:
            self._replies.reject(conn, exc, run_id=run_id)
            return
        self._replies.send(
            conn,
            {"op": "subscribed", "run_id": run_id, "since": since, "last_seq": joined.last_seq},
        )
        waiting = joined.last_seq < since or run_id not in self._hub.runs
        start = "waiting" if waiting else "catch_up" if joined.from_store else "live"
        self._metrics.subscriptions.labels(start).inc()
        if self._store.shared and since > joined.last_seq:
            self._track(self._check_since(conn, sub, run_id, since))
        if joined.gap_resume_from is not None:
            self._send_gap(conn, run_id, since, joined.gap_resume_from)
        self._write_events(conn, joined.backlog)
        if joined.from_store:
            task = asyncio.create_task(self._catch_up(conn, sub, run_id))
            self._catch_ups[(sub, run_id)] = task
            task.add_done_callback(lambda done: self._catch_up_done(sub, run_id, done))

    async def _check_since(self, conn: ServerConnection, sub: Subscription, run_id: str, since: int) -> None:
        """Shared log: a ``since`` past what this node has read waits, since another node may
        have handed it out; one past every seq the database handed out is refused, as on one
        relay (``bad_since``, after ``subscribed``), so no later event hides behind it."""
        try:
            handed_out = await self._store.last_seq(run_id)
        except Exception as exc:  # the database away: keep waiting
            log.debug("since=%d of run %s not checked: %s", since, run_id, exc)
            return
        if since <= handed_out or sub.cursors.get(run_id) != since or self._subscribers.get(sub) is not conn:
            return
        self._stop_catch_up(sub, run_id)
        self._hub.unsubscribe(sub, run_id)
        refused = Refused(
            "bad_since",
            f"since={since} is past run {run_id!r}'s last seq {handed_out}: those seqs come from "
            "another relay or a store that lost events; subscribe again from 0",
        )
        self._replies.reject(conn, refused, run_id=run_id)

    def history_changed(self, run_id: str, committed_seq: int) -> None:
        """Rows another process wrote are now part of the run: live subscribers page them."""
        for sub in self._hub.history_changed(run_id, committed_seq):
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
        run = self._hub.runs[run_id]
        try:
            while run_id in sub.catching_up:
                cursor = sub.cursors[run_id]
                async with self._catch_up_turns.turn(getattr(conn, "address", "")):
                    rows = await bounded(
                        self._store.read(
                            run_id, cursor, run.committed_seq, CATCH_UP_PAGE, CATCH_UP_PAGE_BYTES
                        ),
                        f"catch-up read of run {run_id}",
                    )
                assert rows is not None  # skipped only for a ``wanted`` that says no
                self._metrics.store_reads.labels(CATCH_UP, "done").inc()
                if rows and rows[0][0] != cursor + 1:
                    self._send_gap(conn, run_id, cursor, rows[0][0])
                if rows:
                    _write_frames(conn, [row[1] for row in rows])
                    self._metrics.events_out.inc(len(rows))
                    if queued_bytes(conn) > self._config.max_queue_bytes:
                        self._cut_slow(sub, conn)
                        return
                    await conn.drain()
                    cursor = rows[-1][0]
                else:
                    ring = run.ring
                    if ring and ring[0].seq > cursor + 1:  # pruned under us: jump to memory
                        self._send_gap(conn, run_id, cursor, ring[0].seq)
                        cursor = ring[0].seq - 1
                rest = self._hub.caught_up_to(sub, run_id, cursor)
                if rest is not None:
                    self._write_events(conn, rest)
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
        self._replies.send(conn, {"op": "gap", "run_id": run_id, "since": since, "resume_from": resume_from})

    # -- delivery ------------------------------------------------------------

    def deliver(self, deliveries: Iterable[Delivery]) -> None:
        """Write committed events to their subscribers; one encoding per shared list."""
        frames: dict[int, list[Frame]] = {}
        limit = self._config.max_queue_bytes
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
                    if _too_slow(conn, queued, limit):
                        self._cut_slow(sub, conn)
                elif conn.over_since is not None:  # type: ignore[attr-defined]
                    conn.over_since = None  # type: ignore[attr-defined]  # drained: the clock stops
            except Exception:  # one broken connection must not starve the rest
                log.exception("delivery to %s failed; dropping it", peer(conn))
                self.forget(sub)
                conn.transport.abort()
        self._metrics.events_out.inc(sent)

    def _write_events(self, conn: ServerConnection, items: list[Sequenced]) -> None:
        _write_frames(conn, [item.body for item in items])
        self._metrics.events_out.inc(len(items))

    def _cut_slow(self, sub: Subscription, conn: ServerConnection) -> None:
        """Drop a subscriber whose queue is full; it resumes with since=N."""
        self._metrics.slow_consumers.inc()
        self.forget(sub)
        log.warning(
            "cut slow consumer %s: over %d bytes queued for %g s, or over %d",
            peer(conn),
            self._config.max_queue_bytes,
            SLOW_AFTER,
            HARD_QUEUE_FACTOR * self._config.max_queue_bytes,
        )
        self._track(conn.close(SLOW_CONSUMER, "slow consumer: resume with since=<last seq>"))


def _write_frames(conn: ServerConnection, bodies: list[str]) -> None:
    for frame in event_frames(bodies):
        if not frame.write_to(conn):
            return


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
