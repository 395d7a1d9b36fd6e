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

from ..schemas.wire import Refused, encode, legacy_shape, utf8_size

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
            self._legacy = encode(legacy_shape(json.loads(self.body)))
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

    def track(self, kind: str, data: dict[str, Any], now: float) -> None:
        """Fold an event into the run's status and progress summary."""
        self.updated_at = now
        for name in _RUN_INFO_FIELDS.get(kind, ()):
            if name in data:
                self.info[name] = data[name]
        if kind == "training_start":
            self.status = "running"
            self.started_at = now
            self.ended_at = None
        elif kind in ("round_start", "round_end"):
            self.info["round"] = data.get("round")
            if data.get("total_rounds") is not None:
                self.info["num_rounds"] = data["total_rounds"]
            self.info.setdefault("training_mode", "federated")
        elif kind in ("epoch_start", "epoch_end"):
            self.info["epoch"] = data.get("epoch")
        elif kind == "early_stopping":
            self.info["early_stopping"] = {
                k: data.get(k) for k in ("epoch", "metric_name", "best_metric_value", "reason")
            }
        elif kind == "error":
            self.info["last_error"] = str(data.get("message", ""))[:500]
        elif kind == "training_end":
            status = data.get("status", "completed")
            self.status = status if status in ("completed", "failed", "stopped") else "completed"
            self.ended_at = now

    def current_status(self, now: float, stall_after: float) -> str:
        """The status the API shows: a running run silent for ``stall_after`` is stalled."""
        if self.status == "running" and stall_after > 0 and now - self.updated_at > stall_after:
            return "stalled"
        return self.status

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
    ) -> None:
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
        self._changed: dict[str, Run] = {}

    # -- state restored from the store -------------------------------------

    def restore_run(self, run: Run) -> None:
        run.committed_seq = run.last_seq
        self.runs[run.run_id] = run

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
            run = self.runs.get(run_id)
            seq = (run.last_seq if run is not None else 0) + 1
            body = stored_form(event, seq, producer, now)
            if max_body is not None:
                size = utf8_size(body, max_body)
                if size > max_body:
                    refused = Refused(
                        "too_large", f"event of {size} bytes once stored; at most {max_body} are accepted"
                    )
                    accepted.too_large.append((position, refused))
                    continue
            if run is None:
                run = self.runs[run_id] = Run(run_id, created_at=now)
            run.last_seq = seq
            run.track(event["type"], event.get("data") or {}, now)
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
        for run_id, items in by_run.items():
            run = self.runs[run_id]
            run.committed_seq = items[-1].seq
            run.ring.extend(items)
            run.ring_chars += sum(len(item.body) for item in items)
            ring = run.ring
            while ring and (len(ring) > self.replay_size or run.ring_chars > self.replay_bytes):
                run.ring_chars -= len(ring.popleft().body)
            for sub in run.live:
                sub.cursors[run_id] = run.committed_seq
                deliveries.append((sub, items))
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
        """Start following a run from ``since``; backlog first, then live."""
        run = self.runs.get(run_id)
        if run is None:
            raise Refused("unknown_run", f"no run {run_id!r} on this relay (GET /api/runs lists them)")
        if since > run.committed_seq:
            raise Refused(
                "bad_since",
                f"since={since} is past run {run_id!r}'s last seq {run.committed_seq}",
            )
        self.unsubscribe(sub, run_id)
        joined = Joined(run_id, since, run.committed_seq, [], False)
        if since + 1 < run.first_seq:
            joined.gap_resume_from = run.first_seq
            since = run.first_seq - 1
        sub.cursors[run_id] = since
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


def stored_form(event: dict[str, Any], seq: int, producer: str, received_at: float) -> str:
    """An event as stored and sent: with its seq, its producer and, when it came without one,
    the relay's timestamp. Fills those fields into ``event``."""
    event["seq"] = seq
    event["producer"] = producer
    if event.get("timestamp") is None:
        event["timestamp"] = _iso(received_at)
    return encode(event)


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
