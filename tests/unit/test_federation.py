"""Federation health folded from events, with no I/O: cell states, medians, stragglers, the
critical path, node ids joined to client ids, rates, and the bounds."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrelay import federation
from fedrelay.federation import FederationHealth, median, natural_key
from tests.support.federation_run import generated_run


def ev(kind: str, seq: int = 0, role: str = "server", **data) -> dict:
    return {"type": kind, "seq": seq, "source": {"role": role}, "data": data}


def done(rnd: int, client, duration: float | None, phase: str = "train", **extra) -> dict:
    data = {"round": rnd, "client_id": client, "phase": phase, **extra}
    if duration is not None:
        data["duration"] = duration
    return ev("client_complete", role="client", **data)


def states(report, rnd: int) -> dict[str, str]:
    (found,) = [r for r in report.rounds if r.round == rnd]
    return {client: cell.state for client, cell in found.cells.items()}


def fold(events: list[dict]) -> FederationHealth:
    health = FederationHealth()
    for event in events:
        health.add(event)
    return health


def test_a_round_with_every_outcome():
    health = fold(
        [
            ev("round_start", round=1, participating_clients=["0", "1", "2", "3", "4"]),
            done(1, 0, 1.0),
            done(1, 1, 1.2),
            done(1, 2, 9.5),
            ev(
                "error",
                7,
                "client",
                round=1,
                client_id=3,
                phase="train",
                message="train failed: boom",
                detail="Traceback ...\nRuntimeError: boom",
            ),
            ev("round_end", round=1, participating_clients=["0", "1", "2"], failed_clients=["3"]),
        ]
    )
    report = health.report()
    assert states(report, 1) == {
        "0": "finished",
        "1": "finished",
        "2": "straggler",
        "3": "failed",
        "4": "silent",
    }
    (rnd,) = report.rounds
    assert rnd.median == 1.2 and rnd.threshold == 2.4
    assert rnd.critical_path == ("2", 9.5) and rnd.stragglers == ["2"]
    failed = rnd.cells["3"]
    assert failed.failure.reason == "train failed: boom" and "RuntimeError: boom" in failed.failure.detail
    assert failed.failure.seq == 7 and failed.failure.phase == "train"
    assert rnd.summary()["finished"] == 2 and rnd.summary()["silent"] == 1
    assert json.loads(json.dumps(rnd.summary()))["critical_path"] == {"client_id": "2", "duration": 9.5}


def test_sub_second_jitter_is_not_straggling_and_the_factor_is_a_setting():
    events = [ev("round_start", round=1, participating_clients=["a", "b", "c"])]
    events += [done(1, "a", 0.01), done(1, "b", 0.012), done(1, "c", 0.05)]
    assert states(fold(events).report(), 1) == {"a": "finished", "b": "finished", "c": "finished"}
    assert states(fold(events).report(min_gap=0), 1)["c"] == "straggler"
    slow = [ev("round_start", round=1, participating_clients=["a", "b", "c"])]
    slow += [done(1, "a", 10.0), done(1, "b", 10.0), done(1, "c", 17.0)]
    assert states(fold(slow).report(factor=2.0), 1)["c"] == "finished"
    assert states(fold(slow).report(factor=1.5), 1)["c"] == "straggler"


@pytest.mark.parametrize(
    "closing",
    [
        ev("round_end", round=1, participating_clients=["a"]),
        ev("round_start", round=2, participating_clients=["a"]),
        ev("training_end", status="failed"),
    ],
)
def test_a_sampled_client_without_an_outcome_is_running_until_the_round_is_over(closing):
    events = [ev("round_start", round=1, participating_clients=["a", "b"]), done(1, "a", 1.0)]
    assert states(fold(events).report(), 1) == {"a": "finished", "b": "running"}
    assert states(fold([*events, closing]).report(), 1) == {"a": "finished", "b": "silent"}


def test_node_ids_from_the_server_are_reported_under_the_client_ids_clients_give():
    nodes = {0: "900001", 1: "900002", 2: "900003"}
    events = [
        ev("round_start", round=1, participating_clients=list(nodes.values())),  # an older server
        ev("error", round=1, client_id=nodes[1], message="client 900002 failed in train", detail="reply"),
        done(1, 0, 2.0, node_id=nodes[0]),
        ev("client_progress", role="client", round=1, client_id=1, node_id=nodes[1], phase="train"),
        ev("error", role="client", round=1, client_id=1, node_id=nodes[1], message="train failed: x"),
        ev("round_end", round=1, participating_clients=[nodes[0]], failed_clients=[nodes[1]]),
    ]  # fmt: skip
    report = fold(events).report()
    # Node 900003 never sent anything: nothing joins it to a client id, so it stays a node id.
    assert states(report, 1) == {"0": "finished", "1": "failed", "900003": "silent"}
    # The client's own reason, not the server's.
    assert report.rounds[0].cells["1"].failure.reason == "train failed: x"
    assert [c.client_id for c in report.clients] == ["0", "1", "900003"]


def test_newer_servers_list_client_and_node_ids_side_by_side():
    """Round 1: the server does not know client ids yet (a count, and node ids); round_end lists both."""
    events = [
        ev("round_start", round=1, participating_clients=3, participating_nodes=["n0", "n1", "n2"]),
        done(1, 0, 1.0, node_id="n0"),
        ev(
            "round_end",
            round=1,
            participating_clients=[0],
            participating_nodes=["n0"],
            failed_clients=[2],
            failed_nodes=["n2"],
        ),
        ev("round_start", round=2, participating_clients=[0, 1, 2], participating_nodes=["n0", "n1", "n2"]),
    ]
    report = fold(events).report()
    # n1 never reported and is listed nowhere with its client id: only round 2's start joins them.
    assert states(report, 1) == {"0": "finished", "1": "silent", "2": "failed"}
    assert report.rounds[0].cells["2"].failure.reason == "listed in round_end.failed_clients"
    assert states(report, 2) == {"0": "running", "1": "running", "2": "running"}


def test_the_failure_shown_is_the_clients_own_whatever_the_arrival_order():
    client_error = ev("error", 5, "client", round=1, client_id="a", message="own", detail="trace")
    server_error = ev("error", 9, round=1, client_id="a", message="server's")
    listed = ev("round_end", round=1, failed_clients=["a"])
    for order in ([client_error, server_error, listed], [listed, server_error, client_error]):
        cell = fold(order).report().rounds[0].cells["a"]
        assert (cell.state, cell.failure.reason, cell.failure.detail) == ("failed", "own", "trace")
    cell = fold([listed, server_error]).report().rounds[0].cells["a"]
    assert cell.failure.reason == "server's"


def test_evaluate_reports_do_not_count_as_training_but_an_evaluate_failure_fails_the_round():
    events = [
        ev("round_start", round=1, participating_clients=["a", "b"]),
        done(1, "a", 3.0),
        done(1, "a", 50.0, phase="evaluate"),
        done(1, "b", 50.0, phase="evaluate"),
        done(1, "b", 3.0),
        ev("error", round=1, client_id="b", phase="evaluate", message="client b failed in evaluate"),
        ev("round_end", round=1),
    ]
    report = fold(events).report()
    assert states(report, 1) == {"a": "finished", "b": "failed"}
    assert report.rounds[0].median == 3.0 and report.rounds[0].cells["b"].duration == 3.0


def test_client_rates_count_only_rounds_that_are_over():
    events = []
    for rnd in range(1, 5):
        events.append(ev("round_start", round=rnd, participating_clients=["a", "b"]))
        events.append(done(rnd, "a", 1.0))
        if rnd == 1:
            events.append(ev("error", round=rnd, client_id="b", message="x"))
        elif rnd == 2:
            events.append(done(rnd, "b", 1.0))
        if rnd < 4:
            events.append(ev("round_end", round=rnd))
    report = fold(events).report()
    a, b = (c.as_json() for c in report.clients)
    assert a["sampled"] == 4 and a["finished"] == 4 and a["failure_rate"] == 0.0 and a["mean_duration"] == 1.0
    assert (b["failed"], b["finished"], b["silent"], b["running"]) == (1, 1, 1, 1)
    assert b["failure_rate"] == pytest.approx(1 / 3) and b["dropout_rate"] == pytest.approx(1 / 3)


def test_median_and_natural_order():
    assert median([1.0, 2.0, 10.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert sorted(["10", "2", "c10", "c9", "1"], key=natural_key) == ["1", "2", "10", "c9", "c10"]


def test_the_generated_run_is_judged_as_it_was_made():
    run = generated_run("g", clients=60, rounds=12, fail=0.05, silent=0.05, straggle=0.05, seed=4)
    report = fold(run.events).report()
    judged = {(r.round, client): cell.state for r in report.rounds for client, cell in r.cells.items()}
    assert judged == run.cells
    assert {s for s in run.cells.values()} == {"finished", "failed", "silent", "straggler"}
    for r in report.rounds:
        finished = {c: run.durations[(r.round, c)] for c in r.cells if (r.round, c) in run.durations}
        assert r.critical_path == max(finished.items(), key=lambda item: (item[1], -int(item[0])))


def test_bounds_cells_ids_and_detail(monkeypatch):
    monkeypatch.setattr(federation, "MAX_CELLS", 10)
    health = fold([ev("round_start", round=r, participating_clients=["a", "b", "c"]) for r in range(1, 6)])
    assert health.truncated and sum(len(r.sampled) for r in health.rounds.values()) + len(health.rounds) == 10
    assert health.report().truncated

    monkeypatch.setattr(federation, "MAX_DETAIL_TOTAL", 2500)
    events = [ev("round_start", round=1, participating_clients=["x" * 129, "a", "b"])]
    events += [ev("error", round=1, client_id=c, message="m" * 1000, detail="d" * 5000) for c in ("a", "b")]
    cells = fold(events).report().rounds[0].cells
    assert sorted(cells) == ["a", "b"]  # an id over 128 characters is no id
    assert len(cells["a"].failure.reason) == federation.MAX_REASON_CHARS
    assert len(cells["a"].failure.detail) == federation.MAX_DETAIL_CHARS
    assert cells["b"].failure.detail is None  # past the run's detail budget: the reason only


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.sampled_from(
    ["round", "client_id", "node_id", "phase", "duration", "message", "detail", "participating_clients",
     "participating_nodes", "failed_clients", "failed_nodes", "status"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    [
                        "round_start",
                        "round_end",
                        "client_progress",
                        "client_complete",
                        "error",
                        "training_end",
                        "other",
                    ]
                ),
                "data": JSON | st.dictionaries(KEYS, JSON, max_size=5),
                "seq": JSON,
                "source": JSON,
            }
        ),
        max_size=12,
    )
)
def test_any_event_shape_is_folded_without_raising_and_reports_as_json(events):
    """Root-path producers send anything: nothing they send breaks the fold or its report."""
    report = fold(events).report()
    for rnd in report.rounds:
        json.dumps(rnd.summary(), allow_nan=False)
        for cell in rnd.cells.values():
            json.dumps(cell.as_json(), allow_nan=False)
    for client in report.clients:
        json.dumps(client.as_json(), allow_nan=False)
