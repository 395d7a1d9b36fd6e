"""The MLflow bridge's pure parts: events -> writes, and the feed's gap-free ordering decisions."""

from __future__ import annotations

from fedrelay.bridge import feed as feed_module
from fedrelay.bridge.feed import Feed
from fedrelay.bridge.mlflow_map import (
    CURSOR_TAG,
    MAX_PARAM_VALUE,
    MAX_PARAMS,
    RunState,
    mlflow_key,
    restore_state,
    translate,
)


def ev(seq: int, kind: str, data: dict, *, role: str = "server", client=None, ts: str | None = None) -> dict:
    stamp = ts or f"2026-12-01T10:00:{seq % 60:02d}.{seq:03d}+00:00"
    return {
        "type": kind,
        "run_id": "r",
        "seq": seq,
        "timestamp": stamp,
        "source": {"role": role, "client_id": client},
        "data": data,
    }


FEDERATED = [
    ev(1, "training_start", {"experiment_name": "exp", "training_mode": "federated", "num_rounds": 2,
                             "config": {"strategy": "FedAvg", "train_config": {"lr": 0.1}, "dims": [1, 2]}}),
    ev(2, "status", {"message": "initial", "round": 0, "server_metrics": {"auroc": 0.5}}),
    ev(3, "client_complete", {"round": 1, "client_id": 0, "phase": "train",
                              "metrics": {"loss": 0.9, "num-examples": 10}}, role="client", client=0),
    ev(4, "client_complete", {"round": 1, "client_id": 0, "phase": "evaluate",
                              "metrics": {"loss": 0.8, "acc": None}}, role="client", client=0),
    ev(5, "error", {"message": "train failed", "client_id": 1, "round": 1}, role="client", client=1),
    ev(6, "round_end", {"round": 1, "fit_metrics": {"loss": 0.9}, "eval_metrics": {"loss": 0.8},
                        "server_metrics": {"auroc": 0.7}, "duration": 1.5, "num_failures": 1}),
    ev(7, "log", {"level": "warning", "message": "ignored"}),
    ev(8, "training_end", {"status": "completed", "best_round": 1, "best_metric_name": "auroc",
                           "best_metric_value": 0.7}),
]  # fmt: skip


def test_a_federated_run_becomes_params_points_per_round_client_runs_tags_and_status():
    state = RunState("r")
    writes = translate(FEDERATED, state)
    assert writes.experiment_name == "exp"
    assert writes.params["strategy"] == "FedAvg" and writes.params["train_config.lr"] == "0.1"
    assert writes.params["dims"] == "[1,2]" and writes.params["num_rounds"] == "2"
    points = {(p.key, p.step): p.value for p in writes.metrics}
    assert points == {
        ("server.auroc", 0): 0.5,
        ("fit.loss", 1): 0.9,
        ("eval.loss", 1): 0.8,
        ("server.auroc", 1): 0.7,
        ("round.duration", 1): 1.5,
        ("round.failures", 1): 1.0,
    }
    client0 = {(p.key, p.step): p.value for p in writes.client_metrics["0"]}
    assert client0 == {("fit.loss", 1): 0.9, ("fit.num-examples", 1): 10.0, ("eval.loss", 1): 0.8}
    assert writes.client_tags["1"]["fedrelay.last_error"] == "train failed"
    assert writes.tags["fedrelay.errors"] == "1" and writes.tags["fedrelay.best_round"] == "1"
    assert writes.terminate is not None and writes.terminate[0] == "FINISHED"
    assert writes.tags[CURSOR_TAG] == "8" and state.cursor == 8


def test_points_carry_the_events_own_time_so_a_replay_writes_identical_points():
    first = translate(FEDERATED, RunState("r"))
    again = translate(FEDERATED, restore_state("r", "m", {}, {}))
    assert first.metrics == again.metrics and first.client_metrics == again.client_metrics
    assert first.metrics[0].timestamp == 1796119202002  # 2026-12-01T10:00:02.002Z, not the clock


def test_client_metrics_as_keys_or_off():
    keys = translate(FEDERATED, RunState("r"), clients="keys")
    assert not keys.client_metrics
    assert {p.key for p in keys.metrics if p.key.startswith("client/")} == {
        "client/0/fit.loss", "client/0/fit.num-examples", "client/0/eval.loss",
    }  # fmt: skip
    off = translate(FEDERATED, RunState("r"), clients="off")
    assert not off.client_metrics and not any(p.key.startswith("client/") for p in off.metrics)


def test_final_status_stopped_is_finished_after_early_stopping_and_killed_otherwise():
    early = [
        ev(1, "early_stopping", {"epoch": 4, "reason": "patience"}),
        ev(2, "training_end", {"status": "stopped"}),
    ]
    assert translate(early, RunState("r")).terminate[0] == "FINISHED"
    interrupted = [ev(1, "training_end", {"status": "stopped"})]
    assert translate(interrupted, RunState("r")).terminate[0] == "KILLED"
    assert translate([ev(1, "training_end", {"status": "failed"})], RunState("r")).terminate[0] == "FAILED"
    # The early stop survives a restart of the bridge through its tag.
    tags = translate(early[:1], RunState("r")).tags
    assert translate(interrupted, restore_state("r", "m", tags, {})).terminate[0] == "FINISHED"


def test_epochs_are_steps_and_validation_phases_are_prefixed():
    writes = translate(
        [
            ev(1, "epoch_end", {"epoch": 1, "metrics": {"train_loss": 0.5, "val_loss": 0.6}}),
            ev(2, "epoch_end", {"epoch": 1, "phase": "val", "metrics": {"loss": 0.6, "val_acc": 0.7}}),
        ],
        RunState("r"),
    )
    assert {(p.key, p.step) for p in writes.metrics} == {
        ("train_loss", 1), ("val_loss", 1), ("val_loss", 1), ("val_acc", 1),
    }  # fmt: skip


def test_params_are_capped_and_never_changed():
    big = {f"k{i}": i for i in range(MAX_PARAMS + 5)}
    writes = translate([ev(1, "training_start", {"config": {**big, "long": "x" * 10_000}})], RunState("r"))
    assert len(writes.params) == MAX_PARAMS and writes.params_dropped == 6
    state = RunState("r", params={"lr": "0.1"})
    writes = translate([ev(2, "training_start", {"config": {"lr": 0.2, "new": 1}})], state)
    assert writes.params == {"new": "1"} and writes.param_conflicts == ["lr"]
    long = translate([ev(1, "training_start", {"config": {"long": "x" * 10_000}})], RunState("r"))
    assert len(long.params["long"]) == MAX_PARAM_VALUE and long.params["long"].endswith("…")


def test_keys_are_made_valid_for_mlflow():
    assert mlflow_key("a:b c/d.e-f_g") == "a_b c/d.e-f_g"
    assert mlflow_key("/../a//b/./") == "a/b"
    assert mlflow_key("é") == "é" and mlflow_key("") == "_" and len(mlflow_key("x" * 400)) == 250


# -- the feed --------------------------------------------------------------------------------------


def test_all_runs_takes_new_runs_from_star_and_catches_up_a_run_seen_after_a_hole():
    feed = Feed(None, {"old": 3})
    assert feed.on_connect() == [{"op": "subscribe", "run_id": "*"}]
    fresh, frames = feed.on_events(
        "new", [ev(1, "round_start", {"round": 1}), ev(2, "round_end", {"round": 1})]
    )
    assert [e["seq"] for e in fresh] == [1, 2] and frames == []
    assert feed.on_recorded("new", 2) == []

    # "old" went on while the bridge was away: seq 7 via "*" means 4-6 were missed.
    fresh, frames = feed.on_events("old", [ev(7, "round_end", {"round": 7})])
    assert fresh == [] and frames == [{"op": "subscribe", "run_id": "old", "since": 3}]
    assert feed.on_events("old", [ev(8, "round_end", {"round": 8})]) == ([], [])  # asked once
    assert feed.on_control({"op": "subscribed", "run_id": "old", "since": 3, "last_seq": 8}) == []
    fresh, _ = feed.on_events("old", [ev(s, "round_end", {"round": s}) for s in range(4, 9)])
    assert [e["seq"] for e in fresh] == [4, 5, 6, 7, 8]
    assert feed.on_recorded("old", 8) == [{"op": "unsubscribe", "run_id": "old"}]  # "*" serves it again
    assert feed.on_events("old", [ev(8, "round_end", {})]) == ([], [])  # already recorded


def test_the_run_list_at_connect_catches_up_only_runs_behind_and_bounds_named_subscriptions(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_CATCHING_UP", 2)
    feed = Feed(None, {"done": 5, "behind": 2})
    feed.on_connect()
    frames = feed.on_runs_listed({"done": 5, "behind": 4, "new1": 1, "new2": 3})
    assert frames == [
        {"op": "subscribe", "run_id": "behind", "since": 2},
        {"op": "subscribe", "run_id": "new1", "since": 0},
    ]
    feed.on_control({"op": "subscribed", "run_id": "behind", "since": 2, "last_seq": 4})
    feed.on_events("behind", [ev(3, "x", {}), ev(4, "x", {})])
    assert feed.on_recorded("behind", 4) == [
        {"op": "unsubscribe", "run_id": "behind"},
        {"op": "subscribe", "run_id": "new2", "since": 0},
    ]


def test_one_run_resubscribes_from_its_cursor_after_a_hole_and_follows_gaps_and_bad_since():
    feed = Feed(["r"], {"r": 10})
    assert feed.on_connect() == [{"op": "subscribe", "run_id": "r", "since": 10}]
    assert feed.on_events("r", [ev(13, "x", {})]) == ([], [{"op": "subscribe", "run_id": "r", "since": 10}])
    assert feed.on_events("r", [ev(14, "x", {})]) == ([], [])
    feed.on_control({"op": "subscribed", "run_id": "r", "since": 10, "last_seq": 14})
    assert [e["seq"] for e in feed.on_events("r", [ev(11, "x", {})])[0]] == [11]
    feed.on_recorded("r", 11)
    feed.on_control({"op": "gap", "run_id": "r", "since": 11, "resume_from": 20})
    assert feed.cursor("r") == 19
    feed.on_control({"op": "error", "code": "bad_since", "run_id": "r", "detail": "past the end"})
    assert feed.on_connect() == [] and feed.on_events("r", [ev(20, "x", {})]) == ([], [])
