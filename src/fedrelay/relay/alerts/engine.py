"""Which committed events need a person: the alert engine, with no I/O.

The shell feeds it every committed event of interest (``round_end``, ``epoch_end``,
``training_end``, ``error``) in seq order per run, and asks it about silent runs; it answers
with :class:`Alert` objects. Each condition has a stable id (:func:`alert_id`), so whoever
persists the alerts can tell a condition already claimed from a new one, across restarts
and across relays that evaluate the same events.

When a condition may fire again (docs/alerts.md says the same):

- ``failed`` and ``ended``: once per run id, on the ``training_end`` (or, on the root path,
  the ``error`` that names no client) that ends it.
- ``stalled``: once per silence: the id holds the run's last seq, so a run that resumes and
  goes silent again at a later seq fires again.
- a rule: once per run id, at the first event where it holds; it is not re-armed.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .rules import Plateau, Rule, Threshold

CONDITIONS = ("failed", "stalled", "ended")
"""Run conditions that can be switched on (all by default); rules come on their own."""
INTERESTING = frozenset({"round_end", "epoch_end", "training_end", "error"})
"""Event types the engine reads; the shell parses no other body."""
MAX_TRACKED_RUNS = 10_000
"""Runs whose rule state is kept in memory; the least recently active go first."""
_DETAIL_CHARS = 300


def alert_id(run_id: str, condition: str) -> str:
    """A stable key per (run, condition): the same on every relay and after every restart."""
    digest = hashlib.blake2b(f"{run_id}\n{condition}".encode(), digest_size=12).hexdigest()
    return f"fr1-{digest}"


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the relay shows of a run when an alert fires (filled by the shell from the hub)."""

    status: str
    """As ``GET /api/runs/{id}`` shows it: ``incomplete`` and ``stalled`` included."""
    experiment: str | None = None
    incomplete: str | None = None
    """The ``incomplete.detail`` sentence, when the relay knows events are missing."""
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """One condition of one run; ``id`` is stable (see :func:`alert_id`)."""

    id: str
    alert: str
    """``failed``, ``stalled``, ``ended`` or ``rule``."""
    run_id: str
    status: str
    seq: int | None = None
    rule: str | None = None
    metric: str | None = None
    value: float | None = None
    round: int | None = None
    epoch: int | None = None
    detail: str | None = None
    experiment: str | None = None
    silent_for: float | None = None


@dataclass(slots=True)
class _PlateauState:
    best: float
    best_at: int
    latest: int


@dataclass(slots=True)
class _RunState:
    fired: set[str] = field(default_factory=set)
    """Rule texts that fired for this run: not claimed again."""
    plateaus: dict[str, _PlateauState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "fired": sorted(self.fired),
                "plateaus": {k: [p.best, p.best_at, p.latest] for k, p in self.plateaus.items()},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> _RunState:
        state = cls()
        try:
            raw = json.loads(text)
            state.fired = {str(name) for name in raw.get("fired", [])}
            for key, (best, best_at, latest) in raw.get("plateaus", {}).items():
                state.plateaus[str(key)] = _PlateauState(float(best), int(best_at), int(latest))
        except (ValueError, TypeError, AttributeError):
            return cls()  # a state this version cannot read: start the run's rules over
        return state


class AlertEngine:
    """Rules and run conditions evaluated on committed events; state per run, bounded."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        conditions: Iterable[str] = CONDITIONS,
        max_runs: int = MAX_TRACKED_RUNS,
    ) -> None:
        self.rules = {str(rule): rule for rule in rules}
        """Canonical text -> rule: the text names the rule in ids, state and messages."""
        self.conditions = frozenset(conditions)
        self.max_runs = max_runs
        self._runs: OrderedDict[str, _RunState] = OrderedDict()
        self._stalls: dict[str, int] = {}
        """Run id -> the last seq at which it was reported stalled (once per silence)."""
        self._evicted: dict[str, str] = {}
        """State of runs pushed out of memory since the shell last took snapshots."""

    # -- events ----------------------------------------------------------------

    def observe(self, run_id: str, seq: int, event: dict[str, Any], facts: RunFacts) -> list[Alert]:
        """One committed event (parsed) of one run, in seq order; returns what fires."""
        kind = event.get("type")
        data = event.get("data")
        if not isinstance(data, dict):
            data = {}
        self._stalls.pop(run_id, None)  # an event ends a silence
        if kind in ("round_end", "epoch_end"):
            return self._metrics(run_id, seq, kind, data, facts)
        if kind == "training_end":
            status = data.get("status", "completed")
            if status == "failed":
                return self._condition(run_id, seq, "failed", facts, data.get("message"))
            return self._condition(run_id, seq, "ended", facts, facts.incomplete)
        if kind == "error" and event.get("via") == "root" and data.get("client_id") is None:
            message = data.get("message", data.get("error"))
            return self._condition(run_id, seq, "failed", facts, message)
        return []

    def _condition(self, run_id: str, seq: int, condition: str, facts: RunFacts, detail: Any) -> list[Alert]:
        if condition not in self.conditions:
            return []
        if condition == "failed" and detail is None:
            detail = facts.last_error
        return [
            Alert(
                alert_id(run_id, condition),
                condition,
                run_id,
                facts.status,
                seq=seq,
                detail=_short(detail),
                experiment=facts.experiment,
            )
        ]

    def _metrics(
        self, run_id: str, seq: int, kind: str, data: dict[str, Any], facts: RunFacts
    ) -> list[Alert]:
        if not self.rules:
            return []
        step = data.get("round" if kind == "round_end" else "epoch")
        if not isinstance(step, int) or isinstance(step, bool):
            step = None
        fired: list[Alert] = []
        state: _RunState | None = None
        for text, rule in self.rules.items():
            if isinstance(rule, Plateau) and rule.event_type != kind:
                continue
            found = rule.metric.find(kind, data)
            if found is None:
                continue
            if state is None:
                state = self._state(run_id)
            if text in state.fired:
                continue
            scope, value = found
            if isinstance(rule, Threshold):
                holds = rule.holds(value)
            else:
                if step is None:
                    continue
                holds = _plateau_holds(rule, state.plateaus, text, value, step)
            if holds:
                state.fired.add(text)
                state.plateaus.pop(text, None)
                fired.append(
                    Alert(
                        alert_id(run_id, f"rule:{text}"),
                        "rule",
                        run_id,
                        facts.status,
                        seq=seq,
                        rule=text,
                        metric=f"{scope}.{rule.metric.name}",
                        value=value,
                        round=step if kind == "round_end" else None,
                        epoch=step if kind == "epoch_end" else None,
                        experiment=facts.experiment,
                    )
                )
        return fired

    # -- silence ---------------------------------------------------------------

    def stalled(self, run_id: str, last_seq: int, silent_for: float, facts: RunFacts) -> Alert | None:
        """A run the relay shows as stalled (a running run a server or trainer streams, silent
        for ``stall_after``): an alert once per silence, None if this one was reported."""
        if "stalled" not in self.conditions or self._stalls.get(run_id) == last_seq:
            return None
        self._stalls[run_id] = last_seq
        return Alert(
            alert_id(run_id, f"stalled@{last_seq}"),
            "stalled",
            run_id,
            facts.status,
            seq=last_seq,
            detail=facts.incomplete,
            experiment=facts.experiment,
            silent_for=round(silent_for, 1),
        )

    # -- state across restarts ---------------------------------------------------

    def snapshot(self, run_id: str) -> str:
        """The run's rule state as JSON, for the shell to store with its cursor."""
        evicted = self._evicted.pop(run_id, None)
        state = self._runs.get(run_id)
        if state is None:
            return evicted if evicted is not None else "{}"
        return state.to_json()

    def clear_evicted(self) -> None:
        """Forget evicted states that :meth:`snapshot` did not take: their run had no new
        event since its state was last stored, so the stored state is the same."""
        self._evicted.clear()

    def restore(self, run_id: str, text: str) -> None:
        """Load a run's state stored by :meth:`snapshot` (at start, before its events replay)."""
        state = _RunState.from_json(text)
        if state.fired or state.plateaus:
            self._runs[run_id] = state
            self._trim()

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)
        self._stalls.pop(run_id, None)

    def _state(self, run_id: str) -> _RunState:
        state = self._runs.get(run_id)
        if state is None:
            state = self._runs[run_id] = _RunState()
            self._trim()
        else:
            self._runs.move_to_end(run_id)
        return state

    def _trim(self) -> None:
        while len(self._runs) > self.max_runs:
            run_id, state = self._runs.popitem(last=False)
            self._evicted[run_id] = state.to_json()
        while len(self._stalls) > self.max_runs:
            del self._stalls[next(iter(self._stalls))]


def _plateau_holds(
    rule: Plateau, plateaus: dict[str, _PlateauState], text: str, value: float, step: int
) -> bool:
    """Track the best value and its round; holds once a report comes ``patience`` rounds after it."""
    state = plateaus.get(text)
    if state is None:
        plateaus[text] = _PlateauState(value, step, step)
        return False
    state.latest = max(state.latest, step)
    if rule.better(value, state.best):
        state.best, state.best_at = value, step
    return state.latest - state.best_at >= rule.patience


def _short(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_DETAIL_CHARS]
