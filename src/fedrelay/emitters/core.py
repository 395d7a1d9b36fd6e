"""The emitter's delivery state, without I/O: what to send, spool, wait for, and call itself.

The thread shell (``sender.py``) feeds this core what happened (events drained from
``emit()``'s queue, the relay's ``hello``, acks and errors, failed connects, segments read
back from disk, the clock) and carries out what it answers: frames to send, segments to
write or delete, a producer name to take, how long to wait. Nothing here touches a socket,
a file or a thread, so every decision is tested by calling methods (``tests/unit/``), the
way ``websockets`` tests its ``Protocol``.

Where events live, oldest first: spool segments (on disk), ``inflight`` (sent on this
connection, not yet acked), ``unsent``. Ids only grow along that line, which is what the
relay needs to drop resent duplicates (it drops any id <= the highest it has stored).
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..client_settings import DEFAULT_URL
from ..failover import Failover
from ..failover import backoff_delay as failover_delay
from .encode import Unencodable, encode_event, too_large_stand_in
from .spool import Entry, Segment, run_of

STORED_SLACK = 2048
"""Bytes of an event's frame limit it may not use: the relay refuses an event whose stored form
(with the seq and producer it adds) comes within 1 KiB of its ``max_frame_bytes``."""
SPOOL_RETRY = 1.0
"""Seconds between attempts at a spool that could not be opened or written."""
FIRST_BACKOFF = 0.1
"""Seconds before the first reconnect; doubled per failure up to ``max_backoff``."""
DEFAULT_CONNECT_BUDGET = 0.01
"""Seconds a TCP connect may stay unanswered before waits stop (``connect_budget``): a relay that
is there answers a SYN within one round trip (microseconds on loopback, about a millisecond on a
LAN or within a cloud region); a host that drops packets never does. Short enough that a fresh
process pays it and still keeps the mod's 20 ms budget per message; settable for relays further
away, whose events are otherwise spooled and delivered after the reply."""
DEFAULT_STALE_AFTER = 40.0
"""``producer_in_use`` without ``stale_after``: the relay's default ping interval + timeout."""
MAX_SPANS = 100_000
"""Runs of consecutive ids per run id kept for the ``holding`` report (see :class:`HeldRuns`)."""
FRAME_LEVEL_ERRORS = frozenset(("too_large", "too_many_events"))

UP, DOWN, UNKNOWN = "up", "down", "unknown"
UNREACHABLE, SILENT, OVERDUE = "unreachable", "silent", "overdue"
"""Why waiting for acks stopped (:meth:`EmitterCore.not_worth_waiting`): the relay known
unreachable; no TCP connect answered within ``connect_budget``; no session within
``reach_timeout``."""


def backoff_delay(failures: int, max_backoff: float, jitter: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: 0.1 s doubling to ``max_backoff``,
    scaled by a jitter in [0.5, 1] (``jitter`` in [0, 1]) so that many emitters cut off by
    one relay restart do not all come back in the same millisecond."""
    return failover_delay(failures, FIRST_BACKOFF, max_backoff, jitter)


# -- actions: what the shell must do ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frame`` (a JSON array of events). When ``mark`` is set, record it as the spool's
    ``max_sent`` first (durably), so that whoever adopts the spool after a crash knows that
    the relay may hold ids up to it from this name."""

    frame: str
    last: int
    count: int
    mark: int | None = None


@dataclass(frozen=True, slots=True)
class SendControl:
    """Send a control frame (``holding``) before any event of this session."""

    frame: str


@dataclass(frozen=True, slots=True)
class ReadSegment:
    """Read this spool segment and hand it to :meth:`EmitterCore.segment_loaded` (or
    :meth:`EmitterCore.segment_unreadable`)."""

    segment: Segment


@dataclass(frozen=True, slots=True)
class WriteSegments:
    """Write each chunk as one segment, in order, then report with :meth:`EmitterCore.spooled`."""

    chunks: list[list[Entry]]


@dataclass(frozen=True, slots=True)
class DeleteSegments:
    """An ack covers these segments whole: delete their files."""

    segments: list[Segment]


@dataclass(frozen=True, slots=True)
class TakeName:
    """The producer name changed from ``old`` to ``new``: move the spool directory, record
    ``max_sent`` = 0 there, and say why (``reason``) in the log."""

    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Leave the session (if any) and connect again after ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop trying: ``give_up_after`` connects in a row failed."""


@dataclass(frozen=True, slots=True)
class MarkReach:
    """The relay became reachable (``up``) or not: update the mark other processes read."""

    up: bool


Action = (
    Send | SendControl | ReadSegment | WriteSegments | DeleteSegments | TakeName | Wait | GiveUp | MarkReach
)


class HeldRuns:
    """Which run each event not yet acked belongs to, as spans of consecutive ids.

    For the ``holding`` report (how many events per run the relay does not have yet). An
    emitter of one run keeps one span whatever it holds; each switch between runs, or each id
    given up on, starts another. Past ``MAX_SPANS`` spans the record is dropped and no report
    is sent (``known`` is False): memory stays bounded for an emitter that alternates runs
    while the relay is down for days.
    """

    def __init__(self) -> None:
        self.spans: deque[list[Any]] = deque()  # [run, first, last], ids increasing
        self.known = True

    def add(self, event_id: int, run: str | None) -> None:
        if not self.known or run is None:
            return
        if self.spans:
            tail = self.spans[-1]
            if tail[0] == run and tail[2] == event_id - 1:
                tail[2] = event_id
                return
        self._append([run, event_id, event_id])

    def insert(self, spans: Iterable[list[Any]]) -> None:
        """Spans of a segment read back from an adopted spool (older than what memory holds)."""
        for span in spans:
            if not self.known:
                return
            index = next(
                (i for i, existing in enumerate(self.spans) if existing[1] > span[1]), len(self.spans)
            )
            self.spans.insert(index, span)
            self._check()

    def trim(self, upto: int) -> None:
        spans = self.spans
        while spans and spans[0][2] <= upto:
            spans.popleft()
        if spans and spans[0][1] <= upto:
            spans[0][1] = upto + 1

    def discard(self, first: int, last: int) -> None:
        """Forget ids ``first..last`` (given up on: dropped, in an unreadable segment)."""
        if not self.spans or not self.known:
            return
        kept: deque[list[Any]] = deque()
        for run, a, b in self.spans:
            if b < first or a > last:
                kept.append([run, a, b])
                continue
            if a < first:
                kept.append([run, a, first - 1])
            if b > last:
                kept.append([run, last + 1, b])
        self.spans = kept

    def summary(self) -> dict[str, dict[str, int]]:
        runs: dict[str, dict[str, int]] = {}
        for run, first, last in self.spans:
            entry = runs.setdefault(run, {"count": 0, "upto": 0})
            entry["count"] += last - first + 1
            entry["upto"] = max(entry["upto"], last)
        return runs

    def _append(self, span: list[Any]) -> None:
        self.spans.append(span)
        self._check()

    def _check(self) -> None:
        if len(self.spans) > MAX_SPANS:
            self.spans.clear()
            self.known = False


def spans_of(entries: Iterable[Entry]) -> list[list[Any]]:
    """Spans of consecutive ids per run, for entries read back from disk."""
    spans: list[list[Any]] = []
    for event_id, line in entries:
        run = run_of(line)
        if run is None:
            continue
        if spans and spans[-1][0] == run and spans[-1][2] == event_id - 1:
            spans[-1][2] = event_id
        else:
            spans.append([run, event_id, event_id])
    return spans


def _no_report(kind: str, level: int, message: str, *args: Any) -> None:
    """Default problem reporter: the core is silent unless the shell listens."""


class EmitterCore:
    """One producer name's delivery state. Not thread-safe: the shell serialises every call.

    ``fresh_name()`` makes a name the relay has never seen; ``jitter()`` returns a float in
    [0, 1] for the backoff; ``report(kind, level, message, *args)`` hears about problems
    (the shell logs each kind once). Times (``now``) are ``time.monotonic()`` seconds.
    ``urls`` are the addresses of one relay: the shell connects to :attr:`url`, and the core
    moves on to the next after a failed connect or a lost session (:mod:`fedrelay.failover`).
    """

    def __init__(
        self,
        producer: str,
        *,
        fresh_name: Callable[[], str],
        urls: Sequence[str] = (DEFAULT_URL,),
        max_buffer: int = 10_000,
        batch_size: int = 1000,
        frame_bytes: int = 1_000_000,
        max_backoff: float = 5.0,
        give_up_after: int | None = None,
        reach_timeout: float = 1.0,
        connect_budget: float = DEFAULT_CONNECT_BUDGET,
        jitter: Callable[[], float] = random.random,
        report: Callable[..., None] = _no_report,
        now: float = 0.0,
    ) -> None:
        self.producer = producer
        self.fresh_name = fresh_name
        self.max_buffer = max(1, int(max_buffer))
        self.batch = self.own_batch = max(1, min(int(batch_size), 1000))
        self.frame_bytes = self.own_frame_bytes = max(1024, int(frame_bytes))
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.reach_timeout = reach_timeout
        self.connect_budget = connect_budget
        self.jitter = jitter
        self.report = report
        self.relays = Failover(urls, first_delay=FIRST_BACKOFF, max_delay=max_backoff, jitter=jitter)

        self.guard = True
        """Check ``hello.last_id`` against ``sent_mark`` (off for generated names of adopted spools)."""
        self.inflight: deque[Entry] = deque()
        self.unsent: deque[Entry] = deque()
        self.segments: deque[Segment] = deque()
        self.unscanned: set[str] = set()
        """Adopted segments whose runs are not known yet (read when a ``holding`` report needs them)."""
        self.held = HeldRuns()
        self.loaded: tuple[Segment, list[Entry]] | None = None
        self.pending_write: tuple[list[Entry], int] | None = None
        self.spool_retry_at = 0.0

        self.drained_upto = 0
        self.acked = 0
        self.sent_id = 0
        self.max_sent = 0
        self.sent_mark = 0
        self.oversize_counted_upto = 0
        """Oversize events are counted once, though a spooled one is fitted at every read."""

        self.session = False
        self.ever_connected = False
        self.accepts: frozenset[str] = frozenset()
        self.holding_sent = False
        self.reach = UNKNOWN
        self.started = now
        self.attempt_started: float | None = None
        """When the current attempt to reach the relay began: the first connect of this core, or
        the loss of a session while other addresses are left to try (reset by a ``hello``)."""
        self.dial_started: float | None = None
        """When the pending TCP connect began (None: none pending, or it completed)."""
        self.transport = False
        """The current connection's TCP connect completed (a relay, or something, is there)."""
        self.acked_at_session_start = 0
        self.in_use_since: float | None = None
        self.in_use_failures = 0

        self.counts = dict.fromkeys(
            (
                "non_finite",
                "sent",
                "frames",
                "acked",
                "refused",
                "spooled",
                "reconnects",
                "errors",
                "dropped",
                "renamed",
                "bad_segments",
                "oversize",
            ),
            0,
        )

    # -- set-up -----------------------------------------------------------------------------

    def adopt(self, segments: Iterable[Segment], max_sent: int) -> None:
        """Deliver a spool another process left: its segments, and the mark it recorded."""
        self.segments.extend(segments)
        self.unscanned = {segment.name for segment in self.segments}
        self.max_sent = self.sent_mark = max(0, int(max_sent))
        last = self.segments[-1].last if self.segments else 0
        self.drained_upto = last

    def shared_mark(self, down: bool) -> None:
        """Another process of this machine found the relay unreachable recently (the mark)."""
        if down and self.reach == UNKNOWN:
            self.reach = DOWN

    # -- events from emit() ---------------------------------------------------------------

    def take(
        self,
        event_id: int,
        ts: float,
        type_: str,
        run_id: str,
        source: dict[str, Any] | None,
        data: dict[str, Any],
        now: float,
    ) -> WriteSegments | None:
        """Encode one emitted event; past ``max_buffer`` in memory, spill the oldest half."""
        self.drained_upto = event_id
        try:
            line, non_finite = encode_event(event_id, ts, type_, run_id, source, data)
        except Unencodable as exc:
            self.counts["errors"] += 1
            self.report(
                "unencodable", logging.WARNING, "a %s event cannot be encoded (%s); dropped", type_, exc
            )
            return None
        if non_finite:
            self.counts["non_finite"] += non_finite
            self.report("non_finite", logging.WARNING, "NaN/Infinity in a %s event sent as null", type_)
        self.unsent.append(self.fitted((event_id, line)))
        self.held.add(event_id, run_id)
        in_memory = len(self.unsent) + len(self.inflight)
        if in_memory > self.max_buffer:
            return self.spill(in_memory - self.max_buffer // 2, now)
        return None

    # -- spooling ---------------------------------------------------------------------------

    def spill(self, count: int, now: float, *, force: bool = False) -> WriteSegments | None:
        """Move the ``count`` oldest in-memory events to the spool, in order.

        When the spool failed less than ``SPOOL_RETRY`` seconds ago (``force``: try anyway, for
        ``close()`` and ``persist()``) the events stay in memory, and past ``max_buffer`` the
        oldest are dropped: memory stays bounded and the cost per event constant, whatever the
        disk does.
        """
        count = min(count, len(self.inflight) + len(self.unsent))
        if count > 0 and (force or now >= self.spool_retry_at):
            from_inflight = min(count, len(self.inflight))
            moved = [(self.inflight or self.unsent).popleft() for _ in range(count)]
            self.pending_write = (moved, from_inflight)
            return WriteSegments(self.chunks(moved))
        self._drop_excess()
        return None

    def leftovers(self, now: float) -> WriteSegments | None:
        """Everything not acked that is only in memory, to the spool now."""
        return self.spill(len(self.inflight) + len(self.unsent), now, force=True)

    def spooled(self, written: list[Segment], failed: bool, now: float) -> None:
        """The outcome of the last :class:`WriteSegments`: the segments written, in order, and
        whether writing stopped on an error (the rest go back where they came from)."""
        if self.pending_write is None:
            return
        moved, from_inflight = self.pending_write
        self.pending_write = None
        count = sum(segment.count for segment in written)
        self.segments.extend(written)
        self.counts["spooled"] += count
        if failed:
            self.counts["errors"] += 1
            self.spool_retry_at = now + SPOOL_RETRY
            back = moved[count:]  # ids stay in order along the line
            to_inflight = max(0, from_inflight - count)
            self.unsent.extendleft(reversed(back[to_inflight:]))
            self.inflight.extendleft(reversed(back[:to_inflight]))
        self._drop_excess()

    def _drop_excess(self) -> None:
        excess = len(self.inflight) + len(self.unsent) - self.max_buffer
        if excess <= 0:
            return
        first = last = None
        for _ in range(excess):
            event_id = (self.inflight or self.unsent).popleft()[0]
            if first is None:
                first = event_id
            elif last is not None and event_id != last + 1:
                self.held.discard(first, last)
                first = event_id
            last = event_id
        if first is not None and last is not None:
            self.held.discard(first, last)
        self.counts["dropped"] += excess
        self.report(
            "spool_drop",
            logging.ERROR,
            "buffer full and the spool unusable: dropping the oldest events (counted in stats['dropped'])",
        )

    def chunks(self, entries: list[Entry]) -> list[list[Entry]]:
        """Split into frame-sized runs: one spool segment is one frame."""
        chunks: list[list[Entry]] = []
        current: list[Entry] = []
        size = 2
        for entry in entries:
            if current and (len(current) >= self.batch or size + len(entry[1]) + 1 > self.frame_bytes):
                chunks.append(current)
                current, size = [], 2
            current.append(entry)
            size += len(entry[1]) + 1
        if current:
            chunks.append(current)
        return chunks

    def all_on_disk(self) -> bool:
        """Nothing unacked left only in memory."""
        return not self.inflight and not self.unsent and self.pending_write is None

    # -- sending ----------------------------------------------------------------------------

    def next_send(self) -> Send | ReadSegment | None:
        """The next frame to send on this session (oldest first), a segment to read for it, or
        None when the window of unacked events is full or nothing is waiting."""
        if not self.session:
            return None
        window = max(self.max_buffer, self.batch)
        if self.sent_id - self.acked >= window:
            return None
        entries = self._frame_from_spool()
        if isinstance(entries, ReadSegment):
            return entries
        if entries is None:
            entries = self._frame_from_memory()
        if not entries:
            return None
        last = entries[-1][0]
        mark = None
        if last > self.sent_mark:
            mark = self.sent_mark = last + window
        self.sent_id = last
        self.max_sent = max(self.max_sent, last)
        self.counts["frames"] += 1
        self.counts["sent"] += len(entries)
        return Send("[" + ",".join(line for _, line in entries) + "]", last, len(entries), mark)

    def _frame_from_spool(self) -> list[Entry] | ReadSegment | None:
        for segment in self.segments:
            if segment.last <= self.sent_id:
                continue
            if self.loaded is None or self.loaded[0] != segment:
                return ReadSegment(segment)
            fitted = [self.fitted(e) for e in self.loaded[1] if e[0] > self.sent_id]
            return self.chunks(fitted)[0]
        return None

    def _frame_from_memory(self) -> list[Entry]:
        frame: list[Entry] = []
        size = 2
        unsent = self.unsent
        while unsent and len(frame) < self.batch:
            entry = unsent[0] = self.fitted(unsent[0])
            if frame and size + len(entry[1]) + 1 > self.frame_bytes:
                break
            frame.append(unsent.popleft())
            size += len(entry[1]) + 1
        self.inflight.extend(frame)
        return frame

    def segment_loaded(self, segment: Segment, entries: list[Entry]) -> None:
        """A segment read back from disk, for :meth:`next_send` or the ``holding`` report."""
        self.loaded = (segment, entries)
        if segment.name in self.unscanned:
            self.unscanned.discard(segment.name)
            self.held.insert(spans_of(e for e in entries if e[0] > self.acked))

    def segment_unreadable(self, segment: Segment) -> None:
        """A segment that cannot be read (missing, truncated, garbled): its events are given up
        on, counted in ``bad_segments``; the ones after it go on."""
        try:
            self.segments.remove(segment)
        except ValueError:
            return
        self.unscanned.discard(segment.name)
        self.held.discard(segment.first, segment.last)
        self.counts["bad_segments"] += 1
        if self.loaded is not None and self.loaded[0] == segment:
            self.loaded = None

    def fitted(self, entry: Entry) -> Entry:
        """An event the relay would refuse for its size becomes an ``error`` event with the
        same id: sent as it is, it would be refused on every reconnect; dropped, nobody
        watching would know, and a spooled one would wait for an ack that never comes."""
        event_id, line = entry
        limit = max(self.frame_bytes - STORED_SLACK, self.frame_bytes // 4)
        if len(line) <= limit:
            return entry
        if event_id > self.oversize_counted_upto:
            self.oversize_counted_upto = event_id
            self.counts["oversize"] += 1
        self.report(
            "too_large",
            logging.WARNING,
            "an event of %d bytes is over the limit of %d per event; an error event is sent in its place",
            len(line),
            limit,
        )
        return event_id, too_large_stand_in(line, limit)

    # -- connection events ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The relay address to connect to now."""
        return self.relays.current

    def connecting(self, now: float) -> None:
        if self.attempt_started is None:
            self.attempt_started = now

    def dialing(self, now: float) -> None:
        """The shell starts a TCP connect to :attr:`url` (after name resolution and TLS set-up,
        which cost this process, not the network): the ``connect_budget`` runs from now."""
        self.dial_started = now
        self.transport = False

    def transport_connected(self, now: float) -> None:
        """The TCP connect completed: something answers at the address, so waiting for the
        TLS handshake, the upgrade and the hello may pay off, up to ``reach_timeout``."""
        self.dial_started = None
        self.transport = True

    def _transport_lost(self) -> None:
        self.dial_started = None
        self.transport = False

    def connect_failed(self, now: float) -> list[Action]:
        """A connect (TCP, TLS or the HTTP upgrade) failed: the next address after a backoff, or
        give up after ``give_up_after`` rounds of the list."""
        self._transport_lost()
        delay = self.relays.failed(progress=False)
        actions = self._unreached(now)
        if self.give_up_after and self.relays.rounds_failed >= self.give_up_after:
            actions.append(GiveUp())
        else:
            actions.append(Wait(delay))
        return actions

    def hello(self, frame: dict[str, Any], now: float) -> list[Action]:
        """The relay's first frame: a ``hello``, or an ``error`` refusing this name."""
        if frame.get("op") == "error":
            return self._refused(frame, now)
        self.relays.connected()
        last_id = frame.get("last_id")
        if not isinstance(last_id, int) or isinstance(last_id, bool):
            last_id = None
        if last_id is not None and last_id > self.sent_mark and self.guard:
            # The relay has ids from this name that this emitter never sent: another process
            # used it, and our ids would be dropped as duplicates.
            return [
                self._take_fresh_name(
                    f"the relay already has ids up to {last_id} from producer {self.producer!r}"
                ),
                Wait(0.0),
            ]
        if self.ever_connected:
            self.counts["reconnects"] += 1
        self.ever_connected = self.session = True
        self.attempt_started = None
        self.in_use_since, self.in_use_failures = None, 0
        self.holding_sent = False
        accepts = frame.get("accepts")
        self.accepts = (
            frozenset(a for a in accepts if isinstance(a, str)) if isinstance(accepts, list) else frozenset()
        )
        self._adopt_limits(frame)
        self.rewind()
        actions = self._set_reach(UP)
        if last_id is not None:
            delete = self.apply_ack(last_id)
            if delete is not None:
                actions.append(delete)
        self.acked_at_session_start = self.acked
        return actions

    def holding(self) -> SendControl | ReadSegment | None:
        """Decision B: right after ``hello``, before any event, once per session and only to a
        relay that accepts it: per run, how many events not yet acked this emitter holds and
        the highest id among them. A segment of an adopted spool is read first when its runs
        are not known yet."""
        if not self.session or self.holding_sent or "holding" not in self.accepts:
            return None
        for segment in self.segments:
            if segment.name in self.unscanned:
                return ReadSegment(segment)
        self.holding_sent = True
        if not self.held.known:
            self.report("holding_unknown", logging.WARNING, "too many runs interleaved: no holding report")
            return None
        runs = self.held.summary()
        if not runs:
            return None
        return SendControl(json.dumps({"op": "holding", "runs": runs}, separators=(",", ":")))

    def received(self, frame: Any) -> list[Action]:
        """A frame from the relay during the session: acks and errors."""
        if not isinstance(frame, dict):
            return []
        op = frame.get("op")
        if op == "ack":
            upto = frame.get("upto")
            if isinstance(upto, int) and not isinstance(upto, bool):
                delete = self.apply_ack(upto)
                return [delete] if delete is not None else []
            return []
        if op != "error":
            return []
        code = str(frame.get("code"))
        if code == "producer_conflict":
            # Decision A.2: another emitter uses this name with different events. Nothing of
            # ours from that id on was stored: resend it all under a name of our own.
            return [
                self._take_fresh_name(
                    f"the relay stored other events under producer {self.producer!r} "
                    f"(conflict at id {frame.get('id')})"
                ),
                Wait(0.0),
            ]
        self.counts["refused"] += 1
        self.report(
            f"refused_{code}",
            logging.WARNING,
            "relay refused event id=%s: %s (%s)",
            frame.get("id"),
            code,
            frame.get("detail"),
        )
        if frame.get("id") is None and code in FRAME_LEVEL_ERRORS and self.halve_limits():
            return [Wait(0.0)]  # smaller frames, resent on a new connection
        return []

    def session_ended(self, now: float, *, failed: bool, close_code: int | None = None) -> list[Action]:
        """The connection closed. A failed session moves to the next address and backs off like a
        failed connect (from 0.1 s), counting from scratch if it had made progress (acks), so that
        one that keeps failing does not spin. A session left on purpose (a new name, smaller
        frames) stays on the address."""
        self.session = False
        self.loaded = None
        self._transport_lost()
        if close_code == 1009:
            self.halve_limits()  # a frame over 4x the relay's limit: smaller ones
        if not failed:
            return []
        delay = self.relays.failed(progress=self.acked > self.acked_at_session_start)
        actions = self._unreached(now)
        actions.append(Wait(delay))
        return actions

    def _unreached(self, now: float) -> list[Action]:
        """After a failure: known unreachable once every address failed since the last connection;
        while another is left to try, waiting may still pay off, for ``reach_timeout`` from now."""
        if self.relays.all_failed:
            return self._set_reach(DOWN)
        if self.reach == UP:
            self.reach = UNKNOWN
            self.attempt_started = now
        return []

    def _refused(self, frame: dict[str, Any], now: float) -> list[Action]:
        """Decision A.1: ``producer_in_use`` instead of ``hello``.

        If this emitter may have sent events under the name (its ``sent_mark``: this process
        sent, or the adopted spool's meta says it did), the other connection is most likely our
        own, cut without the relay noticing yet: the relay drops it within ``stale_after``
        seconds, and keeping the name keeps its deduplication. Past that, or at once when
        nothing was ever sent under it, another emitter really uses the name: take a fresh one
        and resend everything not acked under it.
        """
        code = frame.get("code")
        if code != "producer_in_use":
            self.report(
                f"hello_{code}",
                logging.WARNING,
                "relay refused the connection: %s (%s)",
                code,
                frame.get("detail"),
            )
            return self.session_ended(now, failed=True)
        stale_after = frame.get("stale_after")
        if not isinstance(stale_after, int | float) or isinstance(stale_after, bool) or stale_after < 0:
            stale_after = DEFAULT_STALE_AFTER
        if self.sent_mark > 0:
            if self.in_use_since is None:
                self.in_use_since = now
            if now - self.in_use_since < stale_after:
                self.in_use_failures += 1
                self.report(
                    "in_use",
                    logging.INFO,
                    "producer name %r still in use on the relay (an earlier connection of ours?); "
                    "retrying it for up to %gs",
                    self.producer,
                    stale_after,
                )
                return [Wait(backoff_delay(self.in_use_failures, self.max_backoff, self.jitter()))]
        return [
            self._take_fresh_name(f"producer name {self.producer!r} is in use by another connection"),
            Wait(0.0),
        ]

    def _take_fresh_name(self, reason: str) -> TakeName:
        old = self.producer
        self.producer = self.fresh_name()
        self.max_sent = self.sent_mark = 0
        self.guard = True
        self.in_use_since, self.in_use_failures = None, 0
        self.counts["renamed"] += 1
        self.session = False
        self.rewind()
        return TakeName(old, self.producer, reason)

    def name_taken_by_spool(self) -> str:
        """An explicit name already has a spool directory here (not ours to extend): a fresh one."""
        self.producer = self.fresh_name()
        return self.producer

    def rewind(self) -> None:
        """A new connection (or name): resend everything not acked, from the oldest."""
        if self.inflight:
            self.unsent.extendleft(reversed(self.inflight))
            self.inflight.clear()
        self.sent_id = self.acked

    def apply_ack(self, upto: int) -> DeleteSegments | None:
        """Everything up to ``upto`` is stored (or refused) by the relay: forget it."""
        if upto <= self.acked:
            return None
        self.acked = upto
        acked = 0
        for pending in (self.inflight, self.unsent):
            while pending and pending[0][0] <= upto:
                pending.popleft()
                acked += 1
        covered: list[Segment] = []
        while self.segments and self.segments[0].last <= upto:
            segment = self.segments.popleft()
            covered.append(segment)
            self.unscanned.discard(segment.name)
            acked += segment.count
        if covered and self.loaded is not None and self.loaded[0] in covered:
            self.loaded = None
        self.held.trim(upto)
        self.counts["acked"] += acked
        self.sent_id = max(self.sent_id, upto)
        return DeleteSegments(covered) if covered else None

    # -- frame limits ---------------------------------------------------------------------

    def _adopt_limits(self, hello: dict[str, Any]) -> None:
        """Frames no larger than the relay takes (its ``hello`` says): a frame past its
        limit is refused whole, and past 4x the limit the connection is closed. Each
        hello sets them anew, so a relay restarted with larger limits gets larger frames."""
        frame_bytes, per_frame = hello.get("max_frame_bytes"), hello.get("max_events_per_frame")
        if isinstance(frame_bytes, int) and not isinstance(frame_bytes, bool) and frame_bytes >= 1024:
            self.frame_bytes = min(self.own_frame_bytes, frame_bytes)
        if isinstance(per_frame, int) and not isinstance(per_frame, bool) and per_frame >= 1:
            self.batch = min(self.own_batch, per_frame)

    def halve_limits(self) -> bool:
        """For a relay that refuses our frames though its hello named no limit; False at the floor."""
        if self.batch == 1 and self.frame_bytes <= 4096:
            self.report(
                "frame_floor", logging.WARNING, "relay refuses even single small frames; giving up shrinking"
            )
            return False
        self.batch = max(1, self.batch // 2)
        self.frame_bytes = max(min(4096, self.frame_bytes), self.frame_bytes // 2)
        return True

    # -- what callers may wait for ------------------------------------------------------

    @property
    def settled(self) -> int:
        """The id up to which nothing is pending: acked, or given up on."""
        first = None
        if self.segments:
            first = self.segments[0].first
        elif self.pending_write is not None and self.pending_write[0]:
            first = self.pending_write[0][0][0]
        elif self.inflight:
            first = self.inflight[0][0]
        elif self.unsent:
            first = self.unsent[0][0]
        if first is None:
            return self.drained_upto
        return first - 1 if first > self.acked else self.acked  # a partly acked segment

    def worth_waiting(self, now: float) -> bool:
        """Whether waiting for acks can pay off (:meth:`not_worth_waiting` says why not)."""
        return self.not_worth_waiting(now) is None

    def not_worth_waiting(self, now: float, *, answered: bool = False) -> str | None:
        """None while waiting for acks can pay off: connected, or the current attempt to reach
        the relay (the first connection, or moving on to its next address after a loss) within
        ``reach_timeout`` and its TCP connect, if one is pending, answered within
        ``connect_budget``. Else why not: ``UNREACHABLE`` (every address failed to connect or
        lost its session, or another process marked it so, until a connection succeeds
        again), ``SILENT`` (nothing answered the TCP connect: a host that drops packets, which
        would otherwise cost a fresh process the whole ``reach_timeout``), ``OVERDUE``.

        ``answered``: the shell sees that the pending connect has an answer its connecting
        thread has not reported yet (a busy machine may not run that thread for milliseconds):
        not silent, whatever the clock says."""
        if self.reach == UP:
            return None  # connected, or reconnecting at once (a new name, smaller frames)
        if self.reach == DOWN:
            return UNREACHABLE
        if self.dial_started is not None and not answered and now - self.dial_started >= self.connect_budget:
            return SILENT
        since = self.attempt_started if self.attempt_started is not None else self.started
        return None if now - since < self.reach_timeout else OVERDUE

    def reach_deadline(self) -> float | None:
        """When :meth:`worth_waiting` turns False by itself: the pending TCP connect's budget,
        or the first connection's."""
        if self.reach != UNKNOWN:
            return None
        deadline = (self.attempt_started if self.attempt_started is not None else self.started) + (
            self.reach_timeout
        )
        if self.dial_started is not None:
            deadline = min(deadline, self.dial_started + self.connect_budget)
        return deadline

    def _set_reach(self, state: str) -> list[Action]:
        """Up: clear the shared mark once (it may be stale). Down: (re)write it at every failure,
        so that its age says how recently someone found the relay unreachable."""
        changed = state != self.reach
        self.reach = state
        if state == UP:
            return [MarkReach(True)] if changed else []
        return [MarkReach(False)]
