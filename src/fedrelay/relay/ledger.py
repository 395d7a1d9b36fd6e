"""What a run is known to lack, with no I/O: the relay's evidence that events exist elsewhere.

Two kinds of evidence, both folded in by the hub:

- A ``round_end`` names the clients that trained in its round (``participating_clients``); each
  of them streams a train ``client_complete`` from its ClientApp mod. A participant whose report
  has not arrived is missing: typically spooled on a SuperNode while the relay was down.
  Reports are matched by client id, or by ``node_id`` for servers that list Flower node ids.
  Only runs that have received at least one client event are judged: a run whose clients are not
  instrumented never sends any, and must not look incomplete for ever.
- An emitter's ``holding`` report (``{"op": "holding"}`` after ``hello``): it holds unacked
  events of a run up to some id. The run lacks them until that producer's acked position
  reaches the id, across disconnects and restarts.

Everything here is bounded (:data:`MAX_TRACKED`, :data:`MAX_HOLDERS`) and serialised as one
JSON text, stored with the run in the same transaction as its events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_TRACKED = 10_000
"""Client ids and ended rounds remembered per run. Past it, the run's later rounds go unchecked
(``overflow``): a run that big with that much missing is already flagged by its earlier rounds."""
MAX_HOLDERS = 64
"""Producers per run whose ``holding`` report is remembered; reports from more are ignored."""
SHOWN_ROUNDS = 100
"""Missing round numbers listed in a run's summary (``rounds_missing`` counts them all)."""
_RANGES_IN_TEXT = 12


@dataclass(eq=False)
class RunLedger:
    """One run's missing train reports and held events."""

    reported: dict[int, set[str]] = field(default_factory=dict)
    """Rounds with no ``round_end`` yet -> ids (client and node) whose train report arrived."""
    missing: dict[int, set[str]] = field(default_factory=dict)
    """Ended rounds -> participants whose train report has not arrived."""
    ended: set[int] = field(default_factory=set)
    holding: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Producer -> (events announced, highest id announced)."""
    clients_seen: bool = False
    """A client event arrived: this run's clients are instrumented."""
    overflow: bool = False
    _size: int = 0
    _json: str | None = None
    """The stored form, kept until the ledger changes: most commits change nothing here."""

    # -- events ------------------------------------------------------------

    def fold(self, kind: str, data: dict[str, Any]) -> None:
        """Take one event of the run into account (any type; most change nothing)."""
        if kind == "client_complete" or kind == "client_progress":
            if not self.clients_seen:
                self.clients_seen = True
                self._json = None
            if kind == "client_complete" and data.get("phase") in (None, "train"):
                self._reported(data)
        elif kind == "round_end":
            self._round_ended(data)

    def _reported(self, data: dict[str, Any]) -> None:
        number = data.get("round")
        if not isinstance(number, int) or number < 1:
            return
        ids = {str(data.get("client_id"))}
        node = data.get("node_id")
        if isinstance(node, str | int) and not isinstance(node, bool):
            ids.add(str(node))
        if number in self.ended:
            waiting = self.missing.get(number)
            if waiting is not None and not waiting.isdisjoint(ids):
                self._size -= len(waiting)
                waiting -= ids
                self._size += len(waiting)
                if not waiting:
                    del self.missing[number]
                self._json = None
            return
        bucket = self.reported.get(number)
        if bucket is None:
            if self._full(len(ids)):
                return
            bucket = self.reported[number] = set()
        new = ids - bucket
        if new and not self._full(len(new)):
            bucket |= new
            self._size += len(new)
            self._json = None

    def _round_ended(self, data: dict[str, Any]) -> None:
        number = data.get("round")
        if not isinstance(number, int) or number in self.ended:
            return
        seen = self.reported.pop(number, set())
        self._size -= len(seen)
        self._json = None
        if self._full(1):
            return
        self.ended.add(number)
        self._size += 1
        waiting = _ids(data.get("participating_clients")) - seen
        if waiting and not self._full(len(waiting)):
            self.missing[number] = waiting
            self._size += len(waiting)

    def _full(self, adding: int) -> bool:
        if self._size + adding > MAX_TRACKED:
            if not self.overflow:
                self.overflow = True
                self._json = None
            return True
        return False

    # -- holding reports -----------------------------------------------------

    def announce(self, producer: str, count: int, upto: int, position: int) -> bool:
        """``producer`` holds ``count`` events up to id ``upto``; the relay has its ids up to
        ``position``. Returns whether the ledger changed."""
        if position >= upto:
            return self.settle(producer, position)
        if producer not in self.holding and len(self.holding) >= MAX_HOLDERS:
            return False
        if self.holding.get(producer) == (count, upto):
            return False
        self.holding[producer] = (count, upto)
        self._json = None
        return True

    def settle(self, producer: str, position: int) -> bool:
        """The relay has ``producer``'s ids up to ``position``: drop a report that this covers."""
        held = self.holding.get(producer)
        if held is None or position < held[1]:
            return False
        del self.holding[producer]
        self._json = None
        return True

    # -- views -------------------------------------------------------------

    @property
    def lacking(self) -> bool:
        """Whether anything is known to be missing (cheap: no sentence built)."""
        return bool(self.holding) or bool(self.clients_seen and self.missing)

    def missing_rounds(self) -> list[int]:
        """Ended rounds some participant has not reported (none while no client event arrived)."""
        return sorted(self.missing) if self.clients_seen else []

    def incomplete(self) -> dict[str, Any] | None:
        """What the run lacks, for its summary; None when nothing is known to be missing."""
        rounds = self.missing_rounds()
        if not rounds and not self.holding:
            return None
        parts = []
        if rounds:
            parts.append(f"events missing for {rounds_text(rounds)}")
        held = sum(count for count, _ in self.holding.values())
        if self.holding:
            emitters = "emitter" if len(self.holding) == 1 else "emitters"
            parts.append(f"{held} events held by {len(self.holding)} {emitters} not delivered yet")
        return {
            "rounds": rounds[:SHOWN_ROUNDS],
            "rounds_missing": len(rounds),
            "reports_missing": sum(len(self.missing[r]) for r in rounds),
            "held_events": held,
            "holding_producers": len(self.holding),
            "detail": f"incomplete: {'; '.join(parts)} (run `fedrelay sync` where the clients ran)",
        }

    # -- storage -------------------------------------------------------------

    def to_json(self) -> str:
        if self._json is None:
            state: dict[str, Any] = {}
            if self.clients_seen:
                state["clients_seen"] = True
            if self.overflow:
                state["overflow"] = True
            if self.ended:
                state["ended"] = _ranges(sorted(self.ended))
            for name, rounds in (("reported", self.reported), ("missing", self.missing)):
                if rounds:
                    state[name] = {str(r): sorted(ids) for r, ids in rounds.items()}
            if self.holding:
                state["holding"] = {p: list(held) for p, held in self.holding.items()}
            self._json = json.dumps(state, separators=(",", ":"))
        return self._json

    @classmethod
    def from_json(cls, text: str | None) -> RunLedger:
        """The ledger as stored; an unreadable text gives an empty ledger (nothing known missing)."""
        ledger = cls()
        try:
            state = json.loads(text or "{}")
            ledger.clients_seen = bool(state.get("clients_seen"))
            ledger.overflow = bool(state.get("overflow"))
            for low, high in state.get("ended", []):
                ledger.ended.update(range(int(low), int(high) + 1))
            for name in ("reported", "missing"):
                target = getattr(ledger, name)
                for number, ids in state.get(name, {}).items():
                    target[int(number)] = {str(i) for i in ids}
            for producer, (count, upto) in state.get("holding", {}).items():
                ledger.holding[str(producer)] = (int(count), int(upto))
        except (ValueError, TypeError, AttributeError):
            return cls()
        ledger._size = (
            len(ledger.ended)
            + sum(len(ids) for ids in ledger.reported.values())
            + sum(len(ids) for ids in ledger.missing.values())
        )
        ledger._json = text
        return ledger


def _ids(value: Any) -> set[str]:
    """Participants as the emitters list them: client ids (or node ids), strings or integers."""
    if not isinstance(value, list):
        return set()
    return {str(v) for v in value if isinstance(v, str | int) and not isinstance(v, bool)}


def _ranges(numbers: list[int]) -> list[list[int]]:
    """Sorted whole numbers as [low, high] runs: 1..500 ended rounds store as [[1, 500]]."""
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def rounds_text(rounds: list[int]) -> str:
    """``[2, 3, 4, 7]`` -> "rounds 2-4, 7"; long lists end with "and N more"."""
    spans = _ranges(rounds)
    shown = [f"{low}-{high}" if high > low else str(low) for low, high in spans[:_RANGES_IN_TEXT]]
    rest = sum(high - low + 1 for low, high in spans[_RANGES_IN_TEXT:])
    text = ("round " if len(rounds) == 1 else "rounds ") + ", ".join(shown)
    return f"{text} and {rest} more" if rest else text
