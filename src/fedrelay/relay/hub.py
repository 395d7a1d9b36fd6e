"""The relay's core, with no sockets and no disk: runs, sequencing, dedup,
replay rings and subscriptions.

The I/O layer feeds it producer events (:meth:`Hub.accept`) and store
commits (:meth:`Hub.committed`) and gets back what to write and to whom.
Events become visible to subscribers only once committed, so a subscriber
never sees a seq that a relay crash could take back and hand to another
event.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..schemas.compat import VIA_ROOT, root_view
from ..schemas.wire import Refused, encode, utf8_size
from .ledger import RunLedger

_SUMMARY_TEXT = 200
"""Longest string a run summary keeps from an event (a name, a reason, a duration)."""

_RUN_INFO_FIELDS = {
    "training_start": (
        "experiment_name",
        "training_mode",
        "num_rounds",
        "num_clients",
        "local_epochs",
        "max_epochs",
    ),
    "training_end": (
        "best_round",
        "best_epoch",
        "best_metric_name",
        "best_metric_value",
        "training_duration",
    ),
}

MAX_EVENT_AGE = 366 * 86400.0
"""An event timestamp older than this (seconds before its arrival) is taken for a wrong clock."""
MAX_CLOCK_AHEAD = 300.0
"""...and one this far ahead of the relay's clock, too: the arrival time is used instead."""


def _summary_value(value: Any) -> bool:
    """A value small and plain enough for the run summary: a number, a short string, a bool, null."""
    if isinstance(value, str):
        return len(value) <= _SUMMARY_TEXT
    return value is None or isinstance(value, int | float)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(slots=True, eq=False)
class Sequenced:
    """An event with its seq: the unit the store writes and subscribers get."""

    run_id: str
    seq: int
    type: str
    producer: str
    producer_id: int | None
    received_at: float
    body: str
    """The event as stored and sent. Rings hold only this text, not the
    parsed dict: a dict costs many times its JSON in memory."""
    _legacy: str | None = None

    def legacy_body(self) -> str:
        """The ``{type, timestamp, data}`` frame for root-path connections."""
        if self._legacy is None:
            self._legacy = encode(root_view(json.loads(self.body)))
        return self._legacy


@dataclass(eq=False)
class Run:
    """One training run as the relay sees it."""

    run_id: str
    created_at: float
    status: str = "running"
    updated_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    last_seq: int = 0
    """Highest seq handed out (may not be stored yet)."""
    committed_seq: int = 0
    """Highest seq stored: what subscribers may see."""
    first_seq: int = 1
    """Lowest seq the store still holds (raised by retention)."""
    ring: deque[Sequenced] = field(default_factory=deque)
    ring_chars: int = 0
    live: set[Subscription] = field(default_factory=set)
    ledger: RunLedger = field(default_factory=RunLedger)
    """Events the relay knows exist but does not have (missing client reports, held events)."""

    def track(
        self, kind: str, data: Any, now: float, timestamp: Any = None, *, from_root: bool = False
    ) -> None:
        """Fold an event into the run's status and progress summary.

        ``updated_at`` is the arrival time (silence is the relay's to judge), while the start and
        end come from the events' own timestamps: a run delivered late by ``fedrelay sync`` keeps
        the times it ran at.

        Root-path events reach here unvalidated (``data`` may be anything, a
        ``status`` a list, a duration a string): only values of the expected
        kind are folded in, and kept small, so the summary stays what the API
        documents whatever a trainer sends. On the root path an ``error`` that
        names no client ends the run as failed, as hand-rolled frontends take
        it; fedrelay's emitters say so with ``training_end`` instead, and use
        ``error`` for things that do not end a run (an oversized event dropped).
        """
        self.updated_at = now
        if not isinstance(data, dict):
            return
        self.ledger.fold(kind, data)
        for name in _RUN_INFO_FIELDS.get(kind, ()):
            if name in data and _summary_value(data[name]):
                self.info[name] = data[name]
        if kind == "training_start":
            self.status = "running"
            self.started_at = event_time(timestamp, now)
            self.ended_at = None
        elif kind in ("round_start", "round_end"):
            if _count(data.get("round")):
                self.info["round"] = data["round"]
            if _count(data.get("total_rounds")):
                self.info["num_rounds"] = data["total_rounds"]
            self.info.setdefault("training_mode", "federated")
        elif kind in ("epoch_start", "epoch_end"):
            if _count(data.get("epoch")):
                self.info["epoch"] = data["epoch"]
        elif kind == "early_stopping":
            self.info["early_stopping"] = {
                k: data.get(k) if _summary_value(data.get(k)) else None
                for k in ("epoch", "metric_name", "best_metric_value", "reason")
            }
        elif kind == "error":
            message = data.get("message", data.get("error", ""))
            self.info["last_error"] = (message if isinstance(message, str) else encode(message))[:500]
            if from_root and data.get("client_id") is None:  # not one client's failure: the run's
                self.status = "failed"
                self.ended_at = event_time(timestamp, now)
        elif kind == "training_end":
            status = data.get("status", "completed")
            self.status = status if status in ("failed", "stopped") else "completed"
            ended = event_time(timestamp, now)
            self.ended_at = ended if self.started_at is None else max(ended, self.started_at)

    @property
    def driven(self) -> bool:
        """Whether a server or trainer streams this run (it can say when the run ends)."""
        return (
            self.started_at is not None
            or self.status != "running"
            or any(key in self.info for key in ("round", "epoch", "training_mode"))
        )

    def current_status(self, now: float, stall_after: float) -> str:
        """The status the API shows.

        A silent running run is ``stalled``, or ``inactive`` when only clients stream it (no
        server emitter: nothing will ever say it ended). A run that lacks events the relay knows
        exist (:class:`RunLedger`) is ``incomplete`` instead of ``completed``, ``stalled`` or
        ``inactive``; the summary's ``incomplete`` says what is missing, also while it runs or
        after it failed.
        """
        status = self.status
        if status == "running" and stall_after > 0 and now - self.updated_at > stall_after:
            status = "stalled" if self.driven else "inactive"
        if status in ("completed", "stalled", "inactive") and self.ledger.lacking:
            status = "incomplete"
        return status

    def summary(self, now: float, stall_after: float) -> dict[str, Any]:
        """The run as the HTTP API shows it."""
        return {
            "run_id": self.run_id,
            "status": self.current_status(now, stall_after),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "last_seq": self.committed_seq,
            "first_seq": self.first_seq,
            **self.info,
            "incomplete": self.ledger.incomplete(),
        }


@dataclass(eq=False)
class Subscription:
    """One subscriber connection's interest: runs with cursors, or all runs."""

    handle: Hashable
    legacy: bool = False
    """Root-path connection: every event, one legacy-shaped frame each."""
    own_producer: str | None = None
    """A root connection's producer name: it does not get its own events back."""
    wildcard: bool = False
    cursors: dict[str, int] = field(default_factory=dict)
    """run_id -> last seq delivered (or being caught up to)."""
    catching_up: set[str] = field(default_factory=set)

    def __hash__(self) -> int:
        return id(self)


@dataclass(slots=True)
class Accepted:
    """What :meth:`Hub.accept` made of a producer frame."""

    new: list[Sequenced]
    duplicates: int
    upto: int | None
    """Highest producer id now handled (for the cumulative ack)."""
    too_large: list[tuple[int, Refused]] = field(default_factory=list)
    """(position in the events given, why) for events refused once encoded."""
    known_from: int | None = None
    """With ``stop_at_known``: the position of the first event whose id the producer had
    already used; it and the events after it were left alone."""


@dataclass(slots=True)
class Joined:
    """What :meth:`Hub.subscribe` decided for one run."""

    run_id: str
    since: int
    last_seq: int
    backlog: list[Sequenced]
    """Events to send now, from the replay ring."""
    from_store: bool
    """The ring does not reach back far enough: page from the store first."""
    gap_resume_from: int | None = None


Delivery = tuple[Subscription, list[Sequenced]]


class Hub:
    """Runs, seqs, producer positions and subscriptions: pure state."""

    def __init__(
        self,
        *,
        replay_size: int = 1000,
        replay_bytes: int = 8 << 20,
        clock: Callable[[], float] = time.time,
        assigns_seqs: bool = True,
    ) -> None:
        self.assigns_seqs = assigns_seqs
        """True when this process owns the log (SQLite): :meth:`accept` hands out seqs and folds
        events into run state. False when several relays share it (PostgreSQL): the seq comes
        from the committing transaction, and runs are created and folded in :meth:`committed`,
        from every node's commits alike, so every node's state is the same fold in seq order."""
        self.replay_size = replay_size
        self.replay_bytes = replay_bytes
        """Per-run ring bound in encoded characters: large events take fewer slots."""
        self.clock = clock
        self.runs: dict[str, Run] = {}
        self.producers: dict[str, int] = {}
        """Producer name -> highest id accepted (dedup position)."""
        self.stored_positions: dict[str, int] = {}
        """Producer name -> highest id committed: what ``hello.last_id`` reports,
        since a producer may forget what it sent once this covers it."""
        self.wildcards: set[Subscription] = set()
        self.waiting: dict[str, set[Subscription]] = {}
        """Run id -> subscriptions to a run with no event yet: they join its ``live`` set
        when its first event is accepted. Not a run: ``/api/runs`` does not list them."""
        self._changed: dict[str, Run] = {}
        self._holders: dict[str, set[str]] = {}
        """Producer name -> runs whose ledger keeps a ``holding`` report of it."""

    # -- state restored from the store -------------------------------------

    def restore_run(self, run: Run) -> None:
        run.committed_seq = run.last_seq
        self.runs[run.run_id] = run
        for producer in run.ledger.holding:
            self._holders.setdefault(producer, set()).add(run.run_id)

    def settle_restored(self) -> list[str]:
        """After a restart, drop the ``holding`` reports that stored positions now cover (the
        relay may have stopped between the commit that covered them and the one recording it).
        Returns the runs whose ledger changed."""
        changed: list[str] = []
        for producer in list(self._holders):
            changed += self.settle(producer, self.stored_positions.get(producer, 0))
        return changed

    def restore_producer(self, name: str, last_id: int) -> None:
        self.producers[name] = last_id
        self.stored_positions[name] = last_id

    def forget_producers(self, names: Iterable[str]) -> None:
        """The store forgot these producers' positions (idle too long): their names are new again."""
        for name in names:
            self.producers.pop(name, None)
            self.stored_positions.pop(name, None)

    # -- producers ---------------------------------------------------------

    @staticmethod
    def new_producer_name() -> str:
        return f"anon-{uuid.uuid4().hex}"

    def accept(
        self,
        producer: str,
        events: Iterable[dict[str, Any]],
        max_body: int | None = None,
        *,
        stop_at_known: bool = False,
    ) -> Accepted:
        """Sequence validated events; drop those this producer sent before.

        An event whose encoded form (with ``seq``, ``producer``, ``timestamp``)
        is over ``max_body`` UTF-8 bytes is refused rather than sequenced:
        re-encoding can grow a number (``1e15`` -> ``1000000000000000.0``),
        and every subscriber must be able to receive what is stored.
        With ``stop_at_known``, an id already used stops the frame there
        instead (``Accepted.known_from``): the caller compares it with the
        stored event before it is dropped as a resend.
        """
        now = self.clock()
        last_id = self.producers.get(producer, 0)
        accepted = Accepted([], 0, None)
        for position, event in enumerate(events):
            event_id = event.get("id")
            if event_id is not None:
                if event_id <= last_id:
                    if stop_at_known:
                        accepted.known_from = position
                        break
                    accepted.duplicates += 1
                    accepted.upto = last_id
                    continue
                last_id = accepted.upto = event_id
            run_id = event["run_id"]
            if not self.assigns_seqs:
                body = stored_form(event, None, producer, now)
                if self._too_large(accepted, position, body, max_body, SEQ_ROOM):
                    continue
                accepted.new.append(Sequenced(run_id, 0, event["type"], producer, event_id, now, body))
                continue
            run = self.runs.get(run_id)
            seq = (run.last_seq if run is not None else 0) + 1
            body = stored_form(event, seq, producer, now)
            if self._too_large(accepted, position, body, max_body):
                continue
            if run is None:
                run = self._new_run(run_id, now)
            run.last_seq = seq
            run.track(
                event["type"],
                event.get("data"),
                now,
                event["timestamp"],
                from_root=event.get("via") == VIA_ROOT,
            )
            self._changed[run_id] = run
            accepted.new.append(
                Sequenced(
                    run_id=run_id,
                    seq=seq,
                    type=event["type"],
                    producer=producer,
                    producer_id=event_id,
                    received_at=now,
                    body=body,
                )
            )
        if accepted.upto is not None:
            self.producers[producer] = last_id
        return accepted

    @staticmethod
    def _too_large(accepted: Accepted, position: int, body: str, max_body: int | None, room: int = 0) -> bool:
        """Refuse an event over ``max_body`` UTF-8 bytes once encoded (``room``: what the
        database adds later, the seq)."""
        if max_body is None:
            return False
        size = utf8_size(body, max_body) + room
        if size <= max_body:
            return False
        refused = Refused("too_large", f"event of {size} bytes once stored; at most {max_body} are accepted")
        accepted.too_large.append((position, refused))
        return True

    # -- what producers hold ------------------------------------------------

    def _new_run(self, run_id: str, now: float) -> Run:
        """A run seen for the first time (its first event, or a ``holding`` report naming it):
        subscriptions waiting for it go live in the same step, so they miss nothing."""
        run = self.runs[run_id] = Run(run_id, created_at=now)
        waiting = self.waiting.pop(run_id, None)
        if waiting:
            run.live |= waiting
        return run

    def holding(self, producer: str, runs: dict[str, tuple[int, int]]) -> list[str]:
        """``producer`` reports unacked events per run: ``(count, highest id)``.

        The report stands until the producer's position reaches that id, across its
        disconnects. A run the relay has never seen is created: its events exist somewhere.
        Returns the runs whose ledger changed (for the store).
        """
        now = self.clock()
        position = self.stored_positions.get(producer, 0)
        changed: list[str] = []
        for run_id, (count, upto) in runs.items():
            run = self.runs.get(run_id)
            if run is None:
                if position >= upto:
                    continue
                run = self._new_run(run_id, now)
                run.updated_at = now
            if run.ledger.announce(producer, count, upto, position):
                changed.append(run_id)
            if producer in run.ledger.holding:
                self._holders.setdefault(producer, set()).add(run_id)
        return changed

    def settle(self, producer: str, position: int) -> list[str]:
        """Every id of ``producer`` up to ``position`` is stored or refused (acked): clear the
        reports this covers. Returns the runs whose ledger changed."""
        runs = self._holders.get(producer)
        if not runs:
            return []
        changed = [run_id for run_id in runs if self.runs[run_id].ledger.settle(producer, position)]
        runs.difference_update(changed)
        if not runs:
            del self._holders[producer]
        return changed

    # -- commits -----------------------------------------------------------

    def committed(self, batch: list[Sequenced]) -> list[Delivery]:
        """Make stored events visible: fill rings and say who gets what."""
        by_run: dict[str, list[Sequenced]] = {}
        for item in batch:
            by_run.setdefault(item.run_id, []).append(item)
        deliveries: list[Delivery] = []
        positions = self.stored_positions
        for item in batch:
            if item.producer_id is not None and item.producer_id > positions.get(item.producer, 0):
                positions[item.producer] = item.producer_id
                if not self.assigns_seqs and item.producer_id > self.producers.get(item.producer, 0):
                    self.producers[item.producer] = item.producer_id  # stored by another node
        if not self.assigns_seqs:
            self._fold(batch)
        for run_id, items in by_run.items():
            run = self.runs[run_id]
            run.committed_seq = items[-1].seq
            run.ring.extend(items)
            run.ring_chars += sum(len(item.body) for item in items)
            ring = run.ring
            while ring and (len(ring) > self.replay_size or run.ring_chars > self.replay_bytes):
                run.ring_chars -= len(ring.popleft().body)
            for sub in run.live:
                cursor = sub.cursors[run_id]
                sub.cursors[run_id] = max(cursor, run.committed_seq)
                if cursor < items[0].seq:
                    deliveries.append((sub, items))
                else:  # it joined with a since past the committed seq: only what comes after
                    after = [item for item in items if item.seq > cursor]
                    if after:
                        deliveries.append((sub, after))
            for sub in self.wildcards:
                if run_id in sub.cursors:
                    continue  # an explicit subscription to this run serves it
                if sub.legacy:
                    mine = [i for i in items if i.producer != sub.own_producer]
                    if mine:
                        deliveries.append((sub, mine))
                else:
                    deliveries.append((sub, items))
        return deliveries

    def _fold(self, batch: list[Sequenced]) -> None:
        """Shared log: committed events (this node's or another's) create and update runs, in
        seq order, from their stored form, so every node folds the same state."""
        for item in batch:
            run = self.runs.get(item.run_id)
            if run is None:
                run = self._new_run(item.run_id, item.received_at)
            run.last_seq = item.seq
            event = json.loads(item.body)
            run.track(
                item.type,
                event.get("data"),
                item.received_at,
                event.get("timestamp"),
                from_root=event.get("via") == VIA_ROOT,
            )
            self._changed[item.run_id] = run

    def history_changed(self, run_id: str, committed_seq: int) -> list[Subscription]:
        """The store holds rows up to ``committed_seq`` that did not pass through here (written
        by another process): they are history now. The ring, which lacks them, is dropped and
        the run's live subscribers go back to catching up from the store; returns them."""
        run = self.runs[run_id]
        run.committed_seq = max(run.committed_seq, committed_seq)
        run.ring.clear()
        run.ring_chars = 0
        moved = list(run.live)
        run.live.clear()
        for sub in moved:
            sub.catching_up.add(run_id)
        return moved

    def pruned(self, run_id: str, first_seq: int) -> None:
        """The store dropped events below ``first_seq`` (retention)."""
        run = self.runs.get(run_id)
        if run is not None and first_seq > run.first_seq:
            run.first_seq = first_seq

    # -- subscribers -------------------------------------------------------

    def subscribe(self, sub: Subscription, run_id: str, since: int) -> Joined:
        """Start following a run from ``since``; backlog first, then live.

        A run with no event yet, or a ``since`` past the committed seq, is
        waited for: live, with nothing to send yet. That is only safe for
        seqs this relay has handed out itself (``since <= last_seq``): those
        are bound to events and reach the subscriber in order. A ``since``
        past every seq the run ever got comes from another history (another
        relay, a store that lost its last commits); waiting there would hide
        the events that will take those seqs here, so it is refused.
        """
        run = self.runs.get(run_id)
        assigned = run.last_seq if run is not None else 0
        if since > assigned and self.assigns_seqs:
            last = run.committed_seq if run is not None else 0
            raise Refused(
                "bad_since",
                f"since={since} is past run {run_id!r}'s last seq {last} on this relay: those seqs "
                "come from another relay or a store that lost events; subscribe again from 0",
            )
        self.unsubscribe(sub, run_id)
        sub.cursors[run_id] = since
        if run is None:
            self.waiting.setdefault(run_id, set()).add(sub)
            return Joined(run_id, since, 0, [], False)
        joined = Joined(run_id, since, run.committed_seq, [], False)
        if since + 1 < run.first_seq:
            joined.gap_resume_from = run.first_seq
            since = sub.cursors[run_id] = run.first_seq - 1
        if since >= run.committed_seq or (run.ring and run.ring[0].seq <= since + 1):
            joined.backlog = self._go_live(sub, run)
        else:
            sub.catching_up.add(run_id)
            joined.from_store = True
        return joined

    def subscribe_all(self, sub: Subscription) -> None:
        sub.wildcard = True
        self.wildcards.add(sub)

    def caught_up_to(self, sub: Subscription, run_id: str, seq: int) -> list[Sequenced] | None:
        """Record store-paged progress; once the ring reaches, go live.

        Returns the rest of the backlog (from the ring) when the subscription
        is now live, or None while it must keep paging from the store.
        """
        run = self.runs[run_id]
        sub.cursors[run_id] = max(sub.cursors.get(run_id, 0), seq)
        cursor = sub.cursors[run_id]
        if cursor >= run.committed_seq or (run.ring and run.ring[0].seq <= cursor + 1):
            sub.catching_up.discard(run_id)
            return self._go_live(sub, run)
        return None

    def _go_live(self, sub: Subscription, run: Run) -> list[Sequenced]:
        cursor = sub.cursors[run.run_id]
        backlog = [item for item in run.ring if item.seq > cursor]
        if backlog:
            sub.cursors[run.run_id] = backlog[-1].seq
        run.live.add(sub)
        return backlog

    def unsubscribe(self, sub: Subscription, run_id: str) -> None:
        if run_id == "*":
            sub.wildcard = False
            self.wildcards.discard(sub)
            return
        run = self.runs.get(run_id)
        if run is not None:
            run.live.discard(sub)
        else:
            waiting = self.waiting.get(run_id)
            if waiting is not None:
                waiting.discard(sub)
                if not waiting:
                    del self.waiting[run_id]
        sub.cursors.pop(run_id, None)
        sub.catching_up.discard(run_id)

    def drop(self, sub: Subscription) -> None:
        """Forget a subscriber entirely (disconnected or cut as slow)."""
        for run_id in list(sub.cursors):
            self.unsubscribe(sub, run_id)
        self.wildcards.discard(sub)

    def forget_idle_rings(self, now: float, idle_after: float) -> int:
        """Free the replay rings of runs that got no event for a while.

        A ring only speeds up catch-up; without it, a late subscriber pages
        from the store. Returns how many rings were freed.
        """
        freed = 0
        for run in self.runs.values():
            if run.ring and not run.live and now - run.updated_at > idle_after:
                run.ring.clear()
                run.ring_chars = 0
                freed += 1
        return freed

    # -- views -------------------------------------------------------------

    def take_changed_runs(self) -> list[Run]:
        """Runs whose summary changed since the last call (for the store)."""
        changed, self._changed = list(self._changed.values()), {}
        return changed


def event_time(timestamp: str | None, now: float) -> float:
    """An event's own time (seconds since the epoch), or ``now`` when it has none or its
    producer's clock is implausible (over a year behind, or minutes ahead of the relay's)."""
    if timestamp is None:
        return now
    try:
        moment = datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return now
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        seconds = moment.timestamp()
    except (OverflowError, OSError, ValueError):
        return now
    return seconds if now - MAX_EVENT_AGE <= seconds <= now + MAX_CLOCK_AHEAD else now


SEQ_ROOM = 32
"""Bytes kept for the ``"seq":N`` a shared log adds to a stored body at commit."""


def stored_form(event: dict[str, Any], seq: int | None, producer: str, received_at: float) -> str:
    """An event as stored and sent: with its seq, its producer and, when it came without one,
    the relay's timestamp. Fills those fields into ``event``. ``seq`` None: the body has no
    seq yet (a shared log adds it at commit, :func:`with_seq`)."""
    if seq is None:
        event.pop("seq", None)
    else:
        event["seq"] = seq
    event["producer"] = producer
    if event.get("timestamp") is None:
        event["timestamp"] = _iso(received_at)
    return encode(event)


def with_seq(body: str, seq: int) -> str:
    """A body made without a seq (``stored_form(..., None, ...)``), with its seq as the last
    field: an object's text with one more member, no parse."""
    return f'{body[:-1]},"seq":{seq}}}'


_second_prefix: list[Any] = [None, ""]


def relay_timestamp(ts: float) -> str:
    """The timestamp the relay gives an event that came without one."""
    return _iso(ts)


def _iso(ts: float) -> str:
    """ISO-8601 UTC with milliseconds; the date part is formatted once a second."""
    second = int(ts)
    micros = round((ts - second) * 1e6)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if _second_prefix[0] != second:
        _second_prefix[0] = second
        _second_prefix[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second_prefix[1]}.{micros // 1000:03d}+00:00"
