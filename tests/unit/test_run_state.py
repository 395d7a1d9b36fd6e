"""Honest run state, driven through the sans-I/O hub: missing client reports, ``holding`` reports,
times from the events' own timestamps, runs streamed by clients only. No sockets, no disk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fedrelay.relay import ledger as ledger_module
from fedrelay.relay.hub import MAX_CLOCK_AHEAD, Hub
from fedrelay.relay.ledger import MAX_HOLDERS, RunLedger, rounds_text

NOW = 1_900_000_000.0
"""The relay's clock in these tests (2030): events carry their own, earlier, times."""


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


class Run:
    """One federated run's events as the Flower emitters send them, with timestamps an hour old."""

    def __init__(self, run_id: str = "r", clients: int = 2) -> None:
        self.run_id = run_id
        self.clients = [str(c) for c in range(clients)]
        self.t0 = NOW - 3600

    def event(self, kind: str, at: float, role: str = "server", **data) -> dict:
        return {"type": kind, "run_id": self.run_id, "timestamp": iso(self.t0 + at), "data": data,
                "source": {"role": role}}  # fmt: skip

    def start(self) -> dict:
        return self.event("training_start", 0, training_mode="federated", num_rounds=3)

    def report(self, rnd: int, client: str, phase: str = "train", node: str | None = None) -> dict:
        extra = {"node_id": node} if node is not None else {}
        return self.event("client_complete", 10 * rnd + 5, "client", round=rnd, client_id=int(client),
                          phase=phase, **extra)  # fmt: skip

    def end_round(self, rnd: int, participants: list[str] | None = None) -> dict:
        return self.event(
            "round_end", 10 * rnd + 9, round=rnd, participating_clients=participants or self.clients
        )

    def end(self) -> dict:
        return self.event("training_end", 40, status="completed")


def publish(hub: Hub, producer: str, events: list[dict]) -> None:
    hub.committed(hub.accept(producer, events).new)


def summary(hub: Hub, run_id: str = "r", stall_after: float = 300.0) -> dict:
    return hub.runs[run_id].summary(hub.clock(), stall_after)


def test_a_run_whose_clients_reports_are_missing_is_incomplete_until_they_arrive():
    hub, run = Hub(clock=Clock()), Run()
    # Round 1 live; rounds 2 and 3 reached the relay from the server only (clients spooled).
    publish(hub, "server", [run.start()])
    publish(hub, "client-0", [run.report(1, "0"), run.report(1, "0", phase="evaluate")])
    publish(hub, "client-1", [run.report(1, "1")])
    publish(hub, "server", [run.end_round(1), run.end_round(2), run.end_round(3), run.end()])

    state = summary(hub)
    assert state["status"] == "incomplete"
    assert state["incomplete"]["rounds"] == [2, 3] and state["incomplete"]["reports_missing"] == 4
    assert state["incomplete"]["detail"] == (
        "incomplete: events missing for rounds 2-3 (run `fedrelay sync` where the clients ran)"
    )
    # An evaluate report does not stand in for a train report.
    publish(hub, "client-0", [run.report(2, "0", phase="evaluate")])
    assert summary(hub)["incomplete"]["reports_missing"] == 4

    publish(hub, "client-0", [run.report(2, "0"), run.report(3, "0")])  # e.g. fedrelay sync
    assert summary(hub)["incomplete"]["rounds"] == [2, 3]
    assert summary(hub)["incomplete"]["reports_missing"] == 2
    publish(hub, "client-1", [run.report(2, "1"), run.report(3, "1")])
    state = summary(hub)
    assert state["status"] == "completed" and state["incomplete"] is None


def test_reports_arriving_before_their_round_end_count_and_node_ids_stand_in_for_client_ids():
    hub, run = Hub(clock=Clock()), Run()
    publish(hub, "server", [run.start()])
    # An older server lists Flower node ids; the mod's events carry node_id beside client_id.
    publish(hub, "client-0", [run.report(1, "0", node="9001")])
    publish(hub, "client-1", [run.report(1, "1", node="9002")])
    publish(hub, "server", [run.end_round(1, ["9001", "9002"]), run.end()])
    assert summary(hub)["status"] == "completed"

    publish(hub, "server2", [run.end_round(2, ["9001", "9002"])])
    assert summary(hub)["incomplete"]["rounds"] == [2]
    publish(hub, "client-1", [run.report(2, "1", node="9002")])
    publish(hub, "client-0", [run.report(2, "0", node="9001")])
    assert summary(hub)["incomplete"] is None


def test_a_run_whose_clients_never_streamed_is_not_judged():
    """Clients without the fedrelay mod send nothing: the run must not look incomplete for ever."""
    hub, run = Hub(clock=Clock()), Run()
    publish(hub, "server", [run.start(), run.end_round(1), run.end_round(2), run.end()])
    assert summary(hub)["status"] == "completed" and summary(hub)["incomplete"] is None
    # The first client event (a late sync, say) shows what the ledger kept meanwhile.
    publish(hub, "client-0", [run.report(1, "0")])
    assert summary(hub)["incomplete"]["rounds"] == [1, 2]


def test_holding_reports_keep_a_run_incomplete_until_the_producer_is_acked_that_far():
    hub, run = Hub(clock=Clock()), Run()
    publish(hub, "server", [run.start(), run.end()])
    assert hub.holding("spool-a", {"r": (2, 7)}) == ["r"]
    state = summary(hub)
    assert state["status"] == "incomplete"
    assert state["incomplete"]["held_events"] == 2 and state["incomplete"]["holding_producers"] == 1
    assert "2 events held by 1 emitter not delivered yet" in state["incomplete"]["detail"]

    assert hub.settle("spool-a", 6) == []  # not that far yet (a disconnect keeps the report too)
    assert summary(hub)["status"] == "incomplete"
    assert hub.settle("spool-a", 7) == ["r"]
    assert summary(hub)["status"] == "completed"
    # A report the relay's stored position already covers changes nothing.
    publish(hub, "spool-b", [{**run.report(1, "0"), "id": 4}])
    assert hub.holding("spool-b", {"r": (1, 4)}) == []
    assert summary(hub)["incomplete"] is None


def test_a_holding_report_for_an_unknown_run_creates_it_and_holders_are_capped():
    hub = Hub(clock=Clock())
    assert hub.holding("p", {"never-seen": (5, 5)}) == ["never-seen"]
    state = summary(hub, "never-seen")
    assert state["last_seq"] == 0 and state["incomplete"]["held_events"] == 5
    for n in range(MAX_HOLDERS + 10):
        hub.holding(f"p{n}", {"busy": (1, 1)})
    assert len(hub.runs["busy"].ledger.holding) == MAX_HOLDERS


def test_started_and_ended_come_from_the_events_timestamps_unless_the_clock_is_absurd():
    clock = Clock()
    hub, run = Hub(clock=clock), Run()
    publish(hub, "server", [run.start(), run.end()])  # delivered an hour late (fedrelay sync)
    state = summary(hub)
    assert state["started_at"] == pytest.approx(run.t0)
    assert state["ended_at"] == pytest.approx(run.t0 + 40)
    assert state["created_at"] == NOW and state["updated_at"] == NOW  # arrival, for stall detection

    for name, at in {
        "ahead": NOW + MAX_CLOCK_AHEAD + 60,
        "ancient": NOW - 400 * 86400,
    }.items():
        publish(hub, name, [{**run.start(), "run_id": name, "timestamp": iso(at)}])
        assert summary(hub, name)["started_at"] == NOW, name
    naive = datetime.fromtimestamp(NOW - 60, UTC).replace(tzinfo=None).isoformat()
    publish(hub, "naive", [{**run.start(), "run_id": "naive", "timestamp": naive}])
    assert summary(hub, "naive")["started_at"] == pytest.approx(NOW - 60)  # taken as UTC
    # An end stamped before the start (two clocks) never makes a negative duration.
    publish(hub, "skew", [{**run.start(), "run_id": "skew"}, {**run.end(), "run_id": "skew",
                          "timestamp": iso(run.t0 - 30)}])  # fmt: skip
    assert summary(hub, "skew")["ended_at"] == summary(hub, "skew")["started_at"]


def test_a_run_streamed_by_clients_only_goes_inactive_not_stalled():
    clock = Clock()
    hub, run = Hub(clock=clock), Run()
    publish(hub, "client-0", [run.report(1, "0")])
    assert summary(hub)["status"] == "running"
    clock.now += 301
    assert summary(hub)["status"] == "inactive"
    publish(hub, "server", [{**run.start(), "run_id": "driven"}])
    clock.now += 301
    assert summary(hub, "driven")["status"] == "stalled"


def test_the_ledger_round_trips_through_its_stored_form_and_restore_settles_holdings():
    hub, run = Hub(clock=Clock()), Run()
    publish(hub, "server", [run.start()])
    publish(hub, "client-0", [run.report(1, "0"), run.report(4, "1")])
    publish(hub, "server", [run.end_round(1), run.end_round(2), run.end_round(3)])
    hub.holding("held", {"r": (3, 9)})
    hub.holding("done", {"r": (1, 2)})
    stored = hub.runs["r"].ledger.to_json()
    back = RunLedger.from_json(stored)
    assert back.to_json() == stored
    assert (back.missing, back.reported, back.ended) == ({1: {"1"}, 2: {"0", "1"}, 3: {"0", "1"}},
                                                         {4: {"1"}}, {1, 2, 3})  # fmt: skip
    assert back.holding == {"held": (3, 9), "done": (1, 2)}

    restarted = Hub(clock=Clock())
    restarted_run = type(hub.runs["r"])("r", created_at=NOW, ledger=back)
    restarted.restore_run(restarted_run)
    restarted.restore_producer("done", 2)  # stored before the relay died, not yet recorded here
    assert restarted.settle_restored() == ["r"]
    assert set(restarted.runs["r"].ledger.holding) == {"held"}
    assert RunLedger.from_json("not json").to_json() == "{}"


def test_the_ledger_is_bounded(monkeypatch):
    monkeypatch.setattr(ledger_module, "MAX_TRACKED", 50)
    ledger = RunLedger()
    ledger.fold("client_progress", {"round": 1, "client_id": 0})
    for rnd in range(1, 40):
        ledger.fold("round_end", {"round": rnd, "participating_clients": [str(c) for c in range(10)]})
    assert ledger.overflow
    assert ledger._size <= 50
    assert len(ledger.to_json()) < 2000


def test_rounds_text_is_short_however_many_rounds():
    assert rounds_text([3]) == "round 3"
    assert rounds_text([1, 2, 3, 5, 8, 9]) == "rounds 1-3, 5, 8-9"
    many = rounds_text(list(range(1, 200, 2)))
    assert many.endswith("and 88 more") and len(many) < 120


def test_timestamps_at_the_edges_of_plausible(monkeypatch):
    hub, run = Hub(clock=Clock()), Run()
    edge = NOW + MAX_CLOCK_AHEAD - 1
    publish(hub, "s", [{**run.start(), "timestamp": iso(edge)}])
    assert summary(hub)["started_at"] == pytest.approx(edge)
    year = timedelta(days=365).total_seconds()
    publish(hub, "t", [{**run.start(), "run_id": "old", "timestamp": iso(NOW - year)}])
    assert summary(hub, "old")["started_at"] == pytest.approx(NOW - year)
