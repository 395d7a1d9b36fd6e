"""/publish sessions: hello, frames through validation to the hub and the event log, acks
after commit, the dedup check of resent ids, backpressure, one connection per producer name.

Kept apart from the handshake and the subscribers because a producer's life (its name, its
ack positions, what it resent) is its own; it shares with them only the hub, the log and the
way replies are written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..schemas.wire import (
    PRODUCER_OPS,
    Refused,
    parse_frame,
    parse_holding,
    refuse_unsafe_values,
    split_frame,
    validate_event,
)
from .config import RelayConfig
from .eventlog import EventLog
from .http import first_param
from .hub import Accepted, Hub
from .metrics import RelayMetrics
from .producers import CLOSE_CODE as PRODUCER_REFUSED
from .producers import CONFLICT, IN_USE, PROBE_TIMEOUT, same_event
from .replies import Replies, Track, error, peer, valid_name
from .throttle import LogThrottle

log = logging.getLogger("fedrelay.relay")

MAX_STORE_LAG_CHARS = 256 << 20
"""Uncommitted characters past which producers are not read (with ``max_store_lag``)."""
ENVELOPE_SLACK = 1024
"""Bytes kept free under ``max_frame_bytes`` for the fields the relay adds."""
REFUSALS_LOG_EVERY = 60.0
"""Seconds between log lines about one producer name's refusals (in use, conflict)."""
PRODUCER_NAMES_LOGGED = 1024
"""Producer names whose refusals (in use, conflict) are throttled in the log."""


async def backpressure(store: EventLog, config: RelayConfig) -> None:
    """Stop reading producers while too much waits for the disk (events or bytes)."""
    if store.full(config.max_store_lag, MAX_STORE_LAG_CHARS):
        await store.wait_for_room(config.max_store_lag, MAX_STORE_LAG_CHARS)


def max_body(config: RelayConfig) -> int:
    """Largest stored event: what a client with ``max_frame_bytes`` can still take,
    with room for the root path's reshaping."""
    return config.max_frame_bytes - ENVELOPE_SLACK


class PublishSessions:
    """Every /publish connection of one relay, and the producer names they hold."""

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
        self.publishing: dict[str, ServerConnection] = {}
        """Producer name -> its open /publish connection (one at most): never forgotten."""
        self.gone: set[str] = set()
        """Producers whose last connection closed since the last housekeeping pass."""
        self._probing: set[str] = set()
        """Names whose connection is being pinged because another asked for the name."""
        self._producer_log = LogThrottle(REFUSALS_LOG_EVERY, PRODUCER_NAMES_LOGGED)
        self._acks_due: set[_AckState] = set()

    async def serve(self, conn: ServerConnection, query: dict[str, list[str]]) -> None:
        """One /publish connection, from hello to close."""
        name = first_param(query, "producer")
        if name is None:
            name = self._hub.new_producer_name()
        elif not valid_name(name):
            self._replies.send(
                conn,
                error(
                    "bad_producer",
                    "producer must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                ),
            )
            await conn.close(1008, "bad producer name")
            return
        older = self.publishing.get(name)
        if older is not None:
            await self._refuse_in_use(conn, name, older)
            return
        # The committed position, not the accepted one: an emitter drops what
        # this covers, and accepted-but-uncommitted events die with a crash.
        last_id = self._hub.stored_positions.get(name)
        if self._store.shared:
            # The database's position: another node may have stored more of the name than this
            # one has read, or forgotten it (housekeeping runs on one node).
            try:
                stored = await self._store.producer_position(name)
            except Exception as exc:  # the database away: what this node folded (dedup is the log's)
                log.debug("producer %r: stored position unknown (%s); using this node's", name, exc)
            else:
                if stored is None:  # forgotten (its accepted position stays: resends are compared)
                    self._hub.stored_positions.pop(name, None)
                elif stored > (last_id or 0):
                    self._hub.stored_positions[name] = stored
                    self._hub.producers[name] = max(self._hub.producers.get(name, 0), stored)
                last_id = stored
            older = self.publishing.get(name)
            if older is not None:  # it took the name while the position was read
                await self._refuse_in_use(conn, name, older)
                return
        self._replies.send(
            conn,
            {
                "op": "hello",
                "producer": name,
                "last_id": last_id,
                "max_frame_bytes": self._config.max_frame_bytes,
                "max_events_per_frame": self._config.max_events_per_frame,
                "accepts": list(PRODUCER_OPS),
            },
        )
        acks = _AckState(conn, name)
        # No await since last_id was read: the position cannot be forgotten in between,
        # and from here on it is kept for as long as the connection is open.
        self.publishing[name] = conn
        try:
            async for frame in conn:
                resent = self._ingest(conn, name, frame, acks)
                if resent is not None and not await self._check_resent(conn, name, acks, resent):
                    return
                await backpressure(self._store, self._config)
        finally:
            self._stopped_publishing(name, conn)

    def _stopped_publishing(self, name: str, conn: ServerConnection) -> None:
        if self.publishing.get(name) is not conn:
            return
        del self.publishing[name]
        if self._config.forget_producers_after > 0:
            self.gone.add(name)  # the next housekeeping pass marks it active up to then

    async def _refuse_in_use(self, conn: ServerConnection, name: str, older: ServerConnection) -> None:
        """Another connection publishes under ``name``: producer_in_use instead of hello, 4409.

        Two live emitters under one name would each see the other's ids as duplicates. The
        older connection may be a dead one the relay has not noticed yet (the same emitter
        back after a network cut), so it is pinged; silent for PROBE_TIMEOUT, it is closed.
        """
        stale_after = self._config.ping_interval + self._config.ping_timeout
        self._replies.send(
            conn,
            {
                "op": "error",
                "code": IN_USE,
                "detail": f"another connection is publishing as {name!r}: if it was this emitter's "
                f"own, retry for up to {stale_after:g} s; otherwise publish under another name",
                "stale_after": stale_after,
            },
        )
        self._metrics.producer_refusals.labels(IN_USE).inc()
        self._warn_producer(
            name,
            "producer name %r is in use by %s: refused it to %s (two emitters with one name?)",
            name,
            peer(older),
            peer(conn),
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
                peer(older),
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
            self._replies.check_size(frame)
            parsed, suspect = parse_frame(frame)
            if isinstance(parsed, dict) and "op" in parsed:  # events have no "op": a control frame
                self._producer_control(producer, parsed, acks)
                return None
            raws = split_frame(parsed, self._config.max_events_per_frame)
        except Refused as exc:
            self._replies.reject(conn, exc)
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
                self._replies.reject(conn, exc, event_id=raw_id, index=index if many else None)
        accepted = self._hub.accept(producer, valid, max_body=max_body(self._config), stop_at_known=True)
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
            self._replies.reject(conn, exc, event_id=raw_id, index=index if many else None)
        self._store.append(accepted.new)
        self._metrics.events_in.inc(len(accepted.new))
        if accepted.duplicates:
            self._metrics.duplicates.inc(accepted.duplicates)

    def _register_ack(self, acks: _AckState, upto: int) -> None:
        if upto > acks.registered:
            acks.registered = upto
            self._store.after_commit(partial(self._ack_ready, acks, upto))

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
        position = self._hub.producers.get(producer, 0)
        reused = [e["id"] for e in resent.events if isinstance(e.get("id"), int) and e["id"] <= position]
        stored = await self._store.stored_versions(producer, reused)
        conflict = None
        for k, event in enumerate(resent.events):
            row = stored.get(event.get("id"))  # type: ignore[arg-type]
            if row is not None and event["id"] <= position and not same_event(event, row, producer):
                conflict = k
                break
        kept = resent.events if conflict is None else resent.events[:conflict]
        accepted = self._hub.accept(producer, kept, max_body=max_body(self._config))
        self._queue(conn, accepted, resent.where, resent.many)
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
            self._replies.send(conn, {"op": "ack", "producer": producer, "upto": upto})
        seq = stored[bad_id][0]
        run_id = json.loads(stored[bad_id][2]).get("run_id")
        self._replies.send(
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
        self._metrics.producer_refusals.labels(CONFLICT).inc()
        self._warn_producer(
            producer,
            "producer %r from %s: id %d differs from the stored event (run %s, seq %d): two emitters "
            "share this name? refused its events from that id on",
            producer,
            peer(conn),
            bad_id,
            str(run_id)[:128],
            seq,
        )
        await conn.close(PRODUCER_REFUSED, "producer name shared with another emitter")
        return False

    async def _committed_or_closed(self, conn: ServerConnection) -> bool:
        """Wait until everything queued so far is committed; False if the connection closed first."""
        committed = asyncio.ensure_future(self._store.all_committed())
        closed = asyncio.ensure_future(conn.wait_closed())
        await asyncio.wait((committed, closed), return_when=asyncio.FIRST_COMPLETED)
        for waiter in (committed, closed):
            waiter.cancel()
        return committed.done() and not committed.cancelled() and not closed.done()

    def _producer_control(self, producer: str, msg: dict[str, Any], acks: _AckState) -> None:
        """``holding`` (the one op ``hello.accepts`` lists): runs lack events until acked.
        Anything else raises :class:`Refused`, answered with an error frame.

        One report per session, as the protocol says: a report may create up to
        MAX_HOLDING_RUNS runs, and a connection repeating it would create them without bound.
        """
        if msg.get("op") != "holding":
            op = str(msg.get("op"))[:40]
            raise Refused("bad_op", f"unknown op {op!r} on /publish; accepted: {', '.join(PRODUCER_OPS)}")
        if acks.holding_reported:
            raise Refused("bad_holding", "one holding report per session: this connection sent one already")
        held = parse_holding(msg)
        acks.holding_reported = True
        changed = self._hub.holding(producer, held)
        if changed:
            self._store.save_runs(changed)

    def _ack_ready(self, acks: _AckState, upto: int) -> None:
        """Events up to ``upto`` are stored; one ack per producer per commit goes out."""
        if upto <= acks.ready:
            return
        acks.ready = upto
        settled = self._hub.settle(acks.producer, upto)
        if settled:
            self._store.save_runs(settled)
        if not self._acks_due:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._acks_due.add(acks)

    def _send_acks(self) -> None:
        due, self._acks_due = self._acks_due, set()
        for acks in due:
            upto = acks.ready if acks.ceiling is None else min(acks.ready, acks.ceiling)
            if upto > acks.sent:
                acks.sent = upto
                self._replies.send(acks.conn, {"op": "ack", "producer": acks.producer, "upto": upto})


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
    holding_reported: bool = False
    """The session's one ``holding`` report came (a second is refused)."""


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
