"""A real Flower simulation (Ray) streaming into a real relay, read by a real subscriber.

Each test runs ``python -m fedrelay.demo`` in a subprocess: the ServerApp thread and every Ray
actor get their own emitter, as in production, and no Ray state leaks between tests. Ray's start
costs about ten seconds, so there are only three simulations.
"""

from __future__ import annotations

import sqlite3

import pytest

from tests.support.clients import Collector
from tests.support.demo import TINY, run_demo
from tests.support.relay_process import free_port
from tests.support.stored import assert_gap_free, of_type, run_status, stored_events
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)

ROUNDS, CLIENTS = 3, 4


async def test_simulation_streams_rounds_clients_and_best_round_in_order(relay, tmp_path):
    async with Collector(relay.url, "run_id=*") as live:
        code, log = await run_demo(
            tmp_path, "--relay", relay.url, "--rounds", str(ROUNDS), "--clients", str(CLIENTS),
            "--partition", "noniid", *TINY,
        )  # fmt: skip
        assert code == 0, log
        await until(lambda: any(e["type"] == "training_end" for e in live.events), timeout=30)

    events = live.events
    run_ids = {e["run_id"] for e in events}
    assert len(run_ids) == 1, run_ids
    (run_id,) = run_ids
    assert_gap_free(events)
    # What the subscriber saw live is exactly what the relay stored.
    assert [(e["seq"], e["type"]) for e in stored_events(relay, run_id)] == [
        (e["seq"], e["type"]) for e in events
    ]

    types = [e["type"] for e in events]
    assert types[0] == "training_start" and types.count("training_start") == 1
    assert types[-1] == "training_end" and types.count("training_end") == 1
    start = events[0]["data"]
    assert start["training_mode"] == "federated"
    assert start["num_rounds"] == ROUNDS and start["num_clients"] == CLIENTS
    assert start["config"]["strategy"] == "FedAvg"

    rounds = [e for e in events if e["type"] in ("round_start", "round_end")]
    assert [(e["type"], e["data"]["round"]) for e in rounds] == [
        (kind, r) for r in range(1, ROUNDS + 1) for kind in ("round_start", "round_end")
    ]
    for r in range(1, ROUNDS + 1):
        (begin,) = of_type(events, "round_start", round=r)
        (end,) = of_type(events, "round_end", round=r)
        data = end["data"]
        assert data["total_rounds"] == ROUNDS
        assert {"train_loss", "train_accuracy"} <= set(data["fit_metrics"])
        assert {"loss", "accuracy", "precision", "recall", "f1", "auroc"} <= set(data["eval_metrics"])
        assert {"loss", "accuracy", "auroc"} <= set(data["server_metrics"])
        assert sorted(data["participating_clients"]) == list(range(CLIENTS)) and data["num_failures"] == 0
        assert sorted(data["evaluated_clients"]) == list(range(CLIENTS))
        assert data["duration"] > 0
        # Client ids (partition ids) once the server has had a reply from every sampled node.
        expected = CLIENTS if r == 1 else list(range(CLIENTS))
        participating = begin["data"]["participating_clients"]
        assert (participating if r == 1 else sorted(participating)) == expected
        assert len(begin["data"]["participating_nodes"]) == CLIENTS
        # Clients flush before replying, so their events sit inside their round.
        for phase in ("train", "evaluate"):
            done = of_type(events, "client_complete", round=r, phase=phase)
            assert sorted(e["data"]["client_id"] for e in done) == list(range(CLIENTS)), (r, phase)
            assert all(begin["seq"] < e["seq"] < end["seq"] for e in done)
            nodes = data["participating_nodes"] if phase == "train" else data["evaluated_nodes"]
            assert sorted(e["data"]["node_id"] for e in done) == sorted(nodes)
            assert all(e["source"] == {"role": "client", "client_id": e["data"]["client_id"]} for e in done)
            assert all("loss" in e["data"]["metrics"] or "train_loss" in e["data"]["metrics"] for e in done)
        epochs = [e for e in of_type(events, "client_progress", round=r) if "local_epoch" in e["data"]]
        assert len(epochs) == CLIENTS and all(e["data"]["local_epoch"] == 1 for e in epochs)

    end = events[-1]["data"]
    assert end["status"] == "completed"
    assert 1 <= end["best_round"] <= ROUNDS
    assert end["best_metric_name"] == "auroc" and end["best_metric_source"] == "server"
    best = max(of_type(events, "round_end"), key=lambda e: e["data"]["server_metrics"]["auroc"])
    assert end["best_round"] == best["data"]["round"]
    assert end["training_duration"] > 0
    assert not of_type(events, "error")
    assert run_status(relay, run_id) == "completed"


async def test_failing_client_and_failing_serverapp_show_up_and_fail_the_run(relay, tmp_path):
    async with Collector(relay.url, "run_id=*") as live:
        code, log = await run_demo(
            tmp_path, "--relay", relay.url, "--rounds", "3", "--clients", "3",
            "--fail-client", "1", "--fail-round", "1", "--fail-server-round", "2", *TINY,
        )  # fmt: skip
        assert code == 1, log
        assert "training failed" in log
        await until(lambda: any(e["type"] == "training_end" for e in live.events), timeout=30)

    events = live.events
    (run_id,) = {e["run_id"] for e in events}
    assert_gap_free(events)

    # The failing client reports itself, and the server counts it as a failed reply.
    client_errors = [e for e in of_type(events, "error") if (e.get("source") or {}).get("role") == "client"]
    assert len(client_errors) == 1
    assert client_errors[0]["data"]["client_id"] == 1 and client_errors[0]["data"]["round"] == 1
    assert "injected failure on client 1" in client_errors[0]["data"]["message"]
    server_seen = [
        e for e in of_type(events, "error", round=1, phase="train") if e["source"]["role"] == "server"
    ]
    # The server knows nodes, the client knows its partition: node_id joins the two.
    assert (
        len(server_seen) == 1 and server_seen[0]["data"]["client_id"] == client_errors[0]["data"]["node_id"]
    )
    (round1,) = of_type(events, "round_end", round=1)
    # By round_end the node's evaluate reply has told the server its client id; the train error
    # above came before it, so it named the node (what a client without partition-id uses).
    assert round1["data"]["failed_clients"] == [client_errors[0]["data"]["client_id"]]
    assert round1["data"]["failed_nodes"] == [client_errors[0]["data"]["node_id"]]
    assert server_seen[0]["data"]["node_id"] == client_errors[0]["data"]["node_id"]
    assert round1["data"]["num_failures"] == 1 and len(round1["data"]["participating_clients"]) == 2
    assert len(of_type(events, "client_complete", round=1, phase="train")) == 2

    # The ServerApp fails in round 2: an error, then training_end failed, and no round_end 2.
    assert not of_type(events, "round_end", round=2)
    server_error = [e for e in of_type(events, "error") if "injected server failure" in e["data"]["message"]]
    assert len(server_error) == 1 and server_error[0]["data"]["round"] == 2
    assert "Traceback" in server_error[0]["data"]["detail"]
    assert events[-1]["type"] == "training_end"
    assert events[-1]["data"]["status"] == "failed"
    assert events[-1]["data"]["rounds_completed"] == 1
    assert run_status(relay, run_id) == "failed"


async def test_demo_with_its_own_relay_stores_the_run_and_ends_quietly(tmp_path):
    """``make demo``'s path: the demo starts a relay, trains, stops it. Its emitter must be done
    before the relay goes (every event stored, no "connection lost" on the way out)."""
    db = tmp_path / "own.db"
    code, log = await run_demo(
        tmp_path, "--relay", f"ws://127.0.0.1:{free_port()}", "--rounds", "1", "--clients", "2", *TINY,
        env={"FEDRELAY_DB": str(db)},
    )  # fmt: skip
    assert code == 0, log
    assert "fedrelay demo: started a relay" in log and "done in" in log, log
    assert "fedrelay emitter" not in log, log  # its warnings: lost connection, reconnecting
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        types = [row[0] for row in conn.execute("SELECT type FROM events ORDER BY run_id, seq")]
    assert types[0] == "training_start" and types[-1] == "training_end", types
