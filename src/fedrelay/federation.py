"""Federation health, with no I/O: who took part in each round, and who finished, failed,
straggled or stayed silent, folded from a federated run's events.

One fold, three readers: the relay's ``GET /api/runs/{id}/clients`` (folded from the store, off the
event loop), ``fedrelay tail --clients`` (folded from the events it follows) and, with the same
rules in ``relay/static/federation.js``, the dashboard's health grid. A test feeds this module and
the JavaScript one the same events and compares what they make of them.

The rules, per round and client (train phase; an ``error`` of either phase fails the round):

- *sampled*: the client got a train message: listed in ``round_start`` (``participating_clients``
  or ``participating_nodes``) or ``round_end`` (participants, failures), or it sent a train event;
- *finished*: a train ``client_complete`` arrived; its ``duration`` (measured by the ClientApp mod
  from receipt to reply) goes into the round's distribution;
- *straggler*: finished, and slower than ``factor`` times the round's median duration and at least
  ``min_gap`` seconds slower than it (sub-second jitter is not straggling);
- *failed*: an ``error`` naming the client and the round, or ``round_end.failed_clients``; the
  reason is the client's own error when there is one (it has the exception), else the server's;
- *silent*: sampled, neither finished nor failed, and the round is over (its ``round_end``, a later
  round, or the run's end); *running* while the round is not over.

Servers name clients by Flower node id, clients name themselves by partition id; client events
carry both (``node_id``), and newer servers list both side by side, so a node id is reported under
its client id as soon as one event has joined the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

FINISHED = "finished"
STRAGGLER = "straggler"
FAILED = "failed"
SILENT = "silent"
RUNNING = "running"
STATES = (FINISHED, STRAGGLER, FAILED, SILENT, RUNNING)
"""Cell states; a client not sampled in a round has no cell there."""

DEFAULT_FACTOR = 2.0
"""A straggler is slower than this many times its round's median..."""
DEFAULT_MIN_GAP = 1.0
"""...and at least this many seconds slower than the median."""

MAX_CELLS = 200_000
"""(round, id) pairs remembered per run (1,000 clients x 200 rounds); later ones are dropped and
the report says ``truncated``."""
MAX_ALIASES = 100_000
"""Node id -> client id pairs remembered per run."""
MAX_ID_CHARS = 128
"""Longer client or node ids are ignored (a root-path producer may send anything)."""
MAX_REASON_CHARS = 300
MAX_DETAIL_CHARS = 2000
"""A failure's detail keeps its last characters: a traceback ends with the exception."""
MAX_DETAIL_TOTAL = 2 << 20
"""Characters of failure detail kept per run; past it, failures keep their reason only."""
MAX_DURATION = 1e9
"""Longer durations (seconds) are taken for garbage: sums and thresholds stay finite."""
SHOWN_STRAGGLERS = 50
"""Straggler ids listed per round (``num_stragglers`` counts them all)."""

_TRAIN = (None, "train")
LISTED, FROM_SERVER, FROM_CLIENT = 0, 1, 2
"""Failure ranks: listed in ``round_end.failed_clients``; the server's ``error`` event (the reply's
error reason); the client's own ``error`` event (its exception and traceback)."""


@dataclass(slots=True)
class Failure:
    """Why a client failed a round: the ``error`` event's message and detail."""

    reason: str
    detail: str | None = None
    phase: str | None = None
    seq: int | None = None
    rank: int = LISTED
    """Which reason a cell shows when several say it failed: the highest rank, then the first."""


@dataclass(slots=True)
class _Round:
    sampled: set[str] = field(default_factory=set)
    finished: dict[str, float | None] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)
    ended: bool = False


@dataclass(slots=True)
class Cell:
    """One client in one round."""

    state: str
    duration: float | None = None
    failure: Failure | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.duration is not None:
            out["duration"] = self.duration
        if self.failure is not None:
            out["reason"] = self.failure.reason
            if self.failure.detail is not None:
                out["detail"] = self.failure.detail
            if self.failure.phase is not None:
                out["phase"] = self.failure.phase
            if self.failure.seq is not None:
                out["seq"] = self.failure.seq
        return out


@dataclass(slots=True)
class RoundHealth:
    """One round: its cells and the distribution of its train durations."""

    round: int
    closed: bool
    cells: dict[str, Cell]
    median: float | None
    threshold: float | None
    """Durations above this are stragglers (None: no duration yet)."""
    critical_path: tuple[str, float] | None
    """The slowest finished client and its duration: what the round waited for."""
    stragglers: list[str]

    def count(self, state: str) -> int:
        return sum(1 for cell in self.cells.values() if cell.state == state)

    def summary(self) -> dict[str, Any]:
        """The round without its cells (counts, median, stragglers, critical path)."""
        counts = {state: 0 for state in STATES}
        for cell in self.cells.values():
            counts[cell.state] += 1
        return {
            "round": self.round,
            "closed": self.closed,
            "sampled": len(self.cells),
            **counts,
            "median": self.median,
            "threshold": self.threshold,
            "critical_path": (
                None
                if self.critical_path is None
                else {"client_id": self.critical_path[0], "duration": self.critical_path[1]}
            ),
            "stragglers": self.stragglers[:SHOWN_STRAGGLERS],
            "num_stragglers": len(self.stragglers),
        }


@dataclass(slots=True)
class ClientHealth:
    """One client over the run: rates are over the rounds it was sampled in that are over."""

    client_id: str
    sampled: int = 0
    finished: int = 0
    straggler: int = 0
    failed: int = 0
    silent: int = 0
    running: int = 0
    duration_sum: float = 0.0
    durations: int = 0

    def _rate(self, count: int) -> float | None:
        over = self.sampled - self.running
        return count / over if over else None

    def as_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "sampled": self.sampled,
            "finished": self.finished,
            "straggler": self.straggler,
            "failed": self.failed,
            "silent": self.silent,
            "running": self.running,
            "dropout_rate": self._rate(self.silent),
            "failure_rate": self._rate(self.failed),
            "straggler_rate": self._rate(self.straggler),
            "mean_duration": self.duration_sum / self.durations if self.durations else None,
        }


@dataclass(slots=True)
class HealthReport:
    rounds: list[RoundHealth]
    """Rounds in order."""
    clients: list[ClientHealth]
    """Clients in natural id order ("2" before "10")."""
    factor: float
    min_gap: float
    truncated: bool


def natural_key(text: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Sort key putting "2" before "10" (and "c2" before "c10"); the text itself breaks ties
    ("7" and "07"), so the order is total and the dashboard's (``naturalCompare``) is the same."""
    parts = _CHUNKS.findall(text)
    return tuple((0, int(part)) if part[0] in _ASCII_DIGITS else (1, part) for part in parts), text


_CHUNKS = re.compile(r"[0-9]+|[^0-9]+")
_ASCII_DIGITS = frozenset("0123456789")
_SAFE_INTEGER = 2**53 - 1
"""Ids and rounds beyond this lose digits in JavaScript: the dashboard could not agree on them."""


def median(values: list[float]) -> float:
    """The middle value; the mean of the two middle ones for an even count. ``values`` sorted."""
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


def _whole(value: Any) -> int | None:
    """A whole number as JSON gives it in Python (``3``) and in JavaScript (``3.0`` too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
        return value
    return None


def _id(value: Any) -> str | None:
    """A client or node id as the emitters send them (a string or a whole number), as text."""
    if isinstance(value, str):
        text = value
    else:
        number = _whole(value)
        if number is None:
            return None
        text = str(number)
    return text if 0 < len(text) <= MAX_ID_CHARS else None


def _round_of(data: dict[str, Any]) -> int | None:
    value = _whole(data.get("round"))
    return value if value is not None and value >= 1 else None


def _ids(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [text for text in map(_id, value) if text is not None]


def _listed(data: dict[str, Any], kind: str) -> list[str]:
    """``participating_clients`` and ``participating_nodes`` (or ``failed_...``) together."""
    return _ids(data.get(f"{kind}_clients")) + _ids(data.get(f"{kind}_nodes"))


def _duration(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 0 <= value <= MAX_DURATION:  # also: no float of 400 digits
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= MAX_DURATION else None


def _text(value: Any, limit: int, tail: bool = False) -> str | None:
    if not isinstance(value, str):
        return None
    return value[-limit:] if tail else value[:limit]


class FederationHealth:
    """Folds one run's events (any order) into rounds x clients; :meth:`report` judges them."""

    def __init__(self) -> None:
        self.rounds: dict[int, _Round] = {}
        self.aliases: dict[str, str] = {}
        """Node id -> client id."""
        self.latest_start = 0
        """Highest round a ``round_start`` opened: every round before it is over."""
        self.run_ended = False
        self.truncated = False
        self.last_seq = 0
        self._cells = 0
        self._detail_chars = 0

    # -- folding ---------------------------------------------------------------

    def add(self, event: dict[str, Any]) -> None:
        """Take one event into account (any type; most change nothing)."""
        data = event.get("data")
        seq = _whole(event.get("seq"))
        if seq is not None and seq > self.last_seq:
            self.last_seq = seq
        if not isinstance(data, dict):
            return
        kind = event.get("type")
        if kind == "training_end":
            self.run_ended = True
        elif kind == "round_start":
            self._round_start(data)
        elif kind == "round_end":
            self._round_end(data)
        elif kind in ("client_progress", "client_complete", "error"):
            self._client_event(kind, event, data)

    def _round(self, number: int) -> _Round | None:
        state = self.rounds.get(number)
        if state is None:
            if not self._room():
                return None
            state = self.rounds[number] = _Round()
        return state

    def _room(self) -> bool:
        if self._cells >= MAX_CELLS:
            self.truncated = True
            return False
        self._cells += 1
        return True

    def _sample(self, state: _Round, ids: list[str]) -> None:
        for raw in ids:
            if raw not in state.sampled and self._room():
                state.sampled.add(raw)

    def _learn(self, clients: Any, nodes: Any) -> None:
        """Newer servers list client ids and node ids side by side, in the same order."""
        if isinstance(clients, list) and isinstance(nodes, list) and len(clients) == len(nodes):
            for client, node in zip(clients, nodes, strict=True):
                self._alias(_id(node), _id(client))

    def _alias(self, node: str | None, client: str | None) -> None:
        if node is None or client is None or node == client or node in self.aliases:
            return
        if len(self.aliases) < MAX_ALIASES:
            self.aliases[node] = client

    def _round_start(self, data: dict[str, Any]) -> None:
        number = _round_of(data)
        if number is None:
            return
        self.latest_start = max(self.latest_start, number)
        self._learn(data.get("participating_clients"), data.get("participating_nodes"))
        state = self._round(number)
        if state is not None:
            self._sample(state, _listed(data, "participating"))

    def _round_end(self, data: dict[str, Any]) -> None:
        number = _round_of(data)
        if number is None:
            return
        for kind in ("participating", "failed", "evaluated"):
            self._learn(data.get(f"{kind}_clients"), data.get(f"{kind}_nodes"))
        state = self._round(number)
        if state is None:
            return
        state.ended = True
        self._sample(state, _listed(data, "participating"))
        failed = _listed(data, "failed")
        self._sample(state, failed)
        for raw in failed:
            if raw in state.sampled and raw not in state.failed:
                state.failed[raw] = Failure("listed in round_end.failed_clients", rank=LISTED)

    def _client_event(self, kind: str, event: dict[str, Any], data: dict[str, Any]) -> None:
        raw = _id(data.get("client_id"))
        if raw is None:
            return
        self._alias(_id(data.get("node_id")), raw)
        number = _round_of(data)
        if number is None:
            return
        phase = data.get("phase")
        if kind != "error" and phase not in _TRAIN:
            return
        state = self._round(number)
        if state is None:
            return
        self._sample(state, [raw])
        if raw not in state.sampled:
            return
        if kind == "client_complete":
            state.finished[raw] = _duration(data.get("duration"))
        elif kind == "error":
            self._failed(state, raw, event, data)

    def _failed(self, state: _Round, raw: str, event: dict[str, Any], data: dict[str, Any]) -> None:
        source = event.get("source")
        rank = FROM_CLIENT if isinstance(source, dict) and source.get("role") == "client" else FROM_SERVER
        old = state.failed.get(raw)
        if old is not None and old.rank >= rank:
            return
        message = data.get("message", data.get("error"))
        detail = _text(data.get("detail"), MAX_DETAIL_CHARS, tail=True)
        if detail is not None:
            if self._detail_chars + len(detail) > MAX_DETAIL_TOTAL:
                detail = None
            else:
                self._detail_chars += len(detail)
        state.failed[raw] = Failure(
            reason=_text(message, MAX_REASON_CHARS) or "error",
            detail=detail,
            phase=_text(data.get("phase"), 32),
            seq=_whole(event.get("seq")),
            rank=rank,
        )

    # -- judging ---------------------------------------------------------------

    def canonical(self, raw: str) -> str:
        return self.aliases.get(raw, raw)

    def closed(self, number: int) -> bool:
        state = self.rounds.get(number)
        return self.run_ended or number < self.latest_start or (state is not None and state.ended)

    def report(self, factor: float = DEFAULT_FACTOR, min_gap: float = DEFAULT_MIN_GAP) -> HealthReport:
        """Every round's cells and distribution, and every client's rates."""
        rounds = [self.judge_round(number, factor, min_gap) for number in sorted(self.rounds)]
        clients: dict[str, ClientHealth] = {}
        for rnd in rounds:
            for client_id, cell in rnd.cells.items():
                health = clients.get(client_id)
                if health is None:
                    health = clients[client_id] = ClientHealth(client_id)
                health.sampled += 1
                setattr(health, cell.state, getattr(health, cell.state) + 1)
                if cell.duration is not None and cell.state in (FINISHED, STRAGGLER):
                    health.duration_sum += cell.duration
                    health.durations += 1
        ordered = [clients[key] for key in sorted(clients, key=natural_key)]
        return HealthReport(rounds, ordered, factor, min_gap, self.truncated)

    def judge_round(
        self, number: int, factor: float = DEFAULT_FACTOR, min_gap: float = DEFAULT_MIN_GAP
    ) -> RoundHealth:
        """One round's cells and distribution (the round must be known: see ``rounds``)."""
        state = self.rounds[number]
        canonical = self.canonical
        finished: dict[str, float | None] = {}
        for raw, duration in state.finished.items():
            key = canonical(raw)
            if finished.get(key) is None:
                finished[key] = duration
        failed: dict[str, Failure] = {}
        for raw, failure in state.failed.items():
            key = canonical(raw)
            old = failed.get(key)
            if old is None or failure.rank > old.rank:
                failed[key] = failure
        durations = sorted(d for d in finished.values() if d is not None)
        mid = median(durations) if durations else None
        threshold = None if mid is None else max(factor * mid, mid + min_gap)
        closed = self.closed(number)
        cells: dict[str, Cell] = {}
        stragglers: list[str] = []
        critical: tuple[str, float] | None = None
        for key in sorted({canonical(raw) for raw in state.sampled}, key=natural_key):
            duration = finished.get(key)
            if key in failed:
                cells[key] = Cell(FAILED, duration, failed[key])
            elif key in finished:
                slow = duration is not None and threshold is not None and duration > threshold
                cells[key] = Cell(STRAGGLER if slow else FINISHED, duration)
                if slow:
                    stragglers.append(key)
            else:
                cells[key] = Cell(SILENT if closed else RUNNING)
            if duration is not None and key in finished and (critical is None or duration > critical[1]):
                critical = (key, duration)
        return RoundHealth(number, closed, cells, mid, threshold, critical, stragglers)
