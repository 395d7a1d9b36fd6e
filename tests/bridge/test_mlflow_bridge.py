"""``fedrelay bridge mlflow`` against a real relay and a real MLflow tracking server (SQLite backend):
every round's metrics end up in MLflow exactly once, across a bridge kill -9, a restart of the
tracking server and a restart of the relay.

One tracking server serves the module (it takes 5-10 s to start); each test records into its own
experiment, and the bridge looks runs up only there (``--experiment``), so tests stay independent.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrelay.bridge.mlflow_map import translate
from fedrelay.bridge.mlflow_sink import MlflowSink
from tests.support.clients import ResendingProducer
from tests.support.demo import demo_env
from tests.support.mlflow_bridge import (
    BridgeProcess,
    MlflowServer,
    expected_run,
    find_runs,
    recorded_series,
)
from tests.support.stored import stored_events
from tests.support.training import centralized_run, federated_run
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(600)

APP = Path(__file__).resolve().parents[1] / "support" / "flower_log_app.py"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow(tracking):
    """The test's own MLflow client: it must fail fast, not retry for minutes, while polling."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    from mlflow import MlflowClient

    yield MlflowClient(tracking_uri=tracking.uri)
    if saved is None:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    else:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


@pytest.fixture
def bridges(tracking, tmp_path):
    """Start bridge processes; any still running at the end are stopped."""
    started: list[BridgeProcess] = []

    def start(relay, *args: str) -> BridgeProcess:
        bridge = BridgeProcess(relay.url, tracking.uri, *args, log_path=tmp_path / "bridge.log").start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def recorded(mlflow, experiment: str, run_id: str, key: str) -> list[int]:
    """Steps of one metric of a relay run's MLflow record (empty until it exists)."""
    try:
        parent, _ = find_runs(mlflow, experiment, run_id)
    except Exception:
        return []
    return [m.step for m in mlflow.get_metric_history(parent.info.run_id, key)]


def ended(mlflow, experiment: str, run_id: str) -> bool:
    try:
        parent, _ = find_runs(mlflow, experiment, run_id)
    except Exception:
        return False
    return parent.info.status != "RUNNING" and "fedrelay.status" in parent.data.tags


def assert_recorded_exactly_once(mlflow, experiment: str, relay, run_id: str) -> tuple[object, dict]:
    """MLflow holds each of the run's points once, as the relay's stored events say."""
    events = stored_events(relay, run_id)
    parent, children = find_runs(mlflow, experiment, run_id)
    expected_parent, expected_clients = expected_run(events)
    assert expected_parent, "the run has metrics"
    assert recorded_series(mlflow, parent.info.run_id) == expected_parent
    assert sorted(children) == sorted(expected_clients)
    for client, series in expected_clients.items():
        assert recorded_series(mlflow, children[client].info.run_id) == series, f"client {client}"
    assert parent.data.tags["fedrelay.seq"] == str(events[-1]["seq"])
    return parent, children


# -- a real Flower run ------------------------------------------------------------------------------


async def test_a_real_flower_run_is_recorded_once_across_bridge_kills_and_a_tracking_restart(
    relay, tracking, mlflow, bridges, tmp_path
):
    experiment = "bridge-flower"
    gate = tmp_path / "gate"
    gate.mkdir()
    bridge = bridges(relay, "--all", "--experiment", experiment)
    app_log = tmp_path / "app.log"
    with open(app_log, "wb") as out:
        app = await asyncio.create_subprocess_exec(
            sys.executable, str(APP), "--relay", relay.url, "--rounds", "4", "--clients", "3",
            "--fail-client", "1", "--fail-round", "2", "--gate-dir", str(gate), "--experiment", experiment,
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=demo_env(tmp_path),
        )  # fmt: skip
    try:
        line = wait_until(
            lambda: [x for x in app_log.read_text(errors="replace").splitlines() if x.startswith("run_id=")],
            120,
            interval=0.2,
            what="the Flower run to start",
        )
        run_id = line[0].split("=", 1)[1]

        def rounds_recorded() -> int:
            return max(recorded(mlflow, experiment, run_id, "server.server_loss"), default=-1)

        def rounds_stored() -> int:
            return len([e for e in stored_events(relay, run_id) if e["type"] == "round_end"])

        def wait_recorded(n: int) -> None:
            wait_until(lambda: rounds_recorded() >= n, 120, interval=0.2, what=f"round {n} in MLflow")

        def wait_stored(n: int) -> None:
            wait_until(lambda: rounds_stored() >= n, 120, interval=0.2, what=f"round {n} on the relay")

        (gate / "round-1").touch()
        wait_recorded(1)
        bridge.kill()  # kill -9 mid-run
        (gate / "round-2").touch()
        wait_stored(2)  # a round passes with no bridge at all
        bridge = bridges(relay, "--all", "--experiment", experiment)
        wait_recorded(2)

        tracking.stop()  # the tracking server goes away mid-run...
        (gate / "round-3").touch()
        wait_stored(3)
        wait_until(lambda: "unavailable" in bridge.log(), 60, what="the bridge to notice MLflow is gone")
        tracking.start()  # ...and comes back with its database
        wait_recorded(3)
        bridge.kill()
        bridge = bridges(relay, "--all", "--experiment", experiment)
        (gate / "round-4").touch()
        assert await asyncio.wait_for(app.wait(), 180) == 0, app_log.read_text()[-4000:]
        wait_until(
            lambda: ended(mlflow, experiment, run_id), 120, interval=0.2, what="the run's end in MLflow"
        )
    finally:
        if app.returncode is None:
            app.kill()
            await app.wait()

    parent, children = assert_recorded_exactly_once(mlflow, experiment, relay, run_id)
    assert sorted(children) == ["0", "1", "2"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_id
    assert parent.data.params["strategy"] == "FedAvg" and parent.data.params["num_rounds"] == "4"
    assert parent.data.tags["fedrelay.best_metric_name"] == "eval_acc"
    assert parent.data.tags["fedrelay.best_round"] == "4"
    assert "injected failure" in children["1"].data.tags["fedrelay.last_error"]
    assert all(child.info.status == "FINISHED" for child in children.values())
    log = bridge.log()
    assert "unavailable" in log and "is back after" in log
    assert tracking.starts == 2


# -- every run, before and after the bridge starts, across a relay restart ---------------------------


def numbered(events: list[dict], first_id: int = 1) -> list[dict]:
    return [{**e, "id": first_id + i} for i, e in enumerate(events)]


async def test_every_run_before_and_after_start_is_recorded_once_across_a_relay_restart(
    relay_factory, tracking, mlflow, bridges
):
    experiment = "bridge-all"
    relay = relay_factory()
    before = federated_run("all-before", rounds=3, clients=3, fail=(1, 2))
    await ResendingProducer(relay.url, "p-before").publish_all(before)
    bridge = bridges(relay, "--all", "--experiment", experiment)  # finds it in the relay's run list
    wait_until(lambda: ended(mlflow, experiment, "all-before"), 60, interval=0.2, what="the earlier run")

    early = centralized_run("all-early", max_epochs=10, stop_at=6, patience=2)
    crashed = [
        e for e in centralized_run("all-crashed", max_epochs=10, stop_at=3) if e["type"] != "early_stopping"
    ]
    crashed[-1] = {**crashed[-1], "data": {"status": "failed"}}
    during = federated_run("all-during", rounds=4, clients=2)
    half = len(during) // 2
    await ResendingProducer(relay.url, "p-early").publish_all(early)
    await ResendingProducer(relay.url, "p-crashed").publish_all(numbered(crashed))
    await ResendingProducer(relay.url, "p-during").publish_all(during[:half])
    wait_until(
        lambda: recorded(mlflow, experiment, "all-during", "fit.train_loss"),
        60,
        interval=0.2,
        what="half a run",
    )
    relay.kill()  # kill -9 of the relay mid-run; the bridge resumes from MLflow's cursors
    relay.start()
    await ResendingProducer(relay.url, "p-during").publish_all(during[half:])
    for run_id in ("all-early", "all-crashed", "all-during"):
        wait_until(
            lambda r=run_id: ended(mlflow, experiment, r), 60, interval=0.2, what=f"the end of {run_id}"
        )

    for run_id, status in (
        ("all-before", "FINISHED"),
        ("all-early", "FINISHED"),  # "stopped" by early stopping is a normal end
        ("all-crashed", "FAILED"),
        ("all-during", "FINISHED"),
    ):
        parent, _ = assert_recorded_exactly_once(mlflow, experiment, relay, run_id)
        assert parent.info.status == status, run_id
    early_run, _ = find_runs(mlflow, experiment, "all-early")
    assert (
        early_run.data.tags["fedrelay.best_epoch"] == "4"
        and early_run.data.tags["fedrelay.status"] == "stopped"
    )
    assert early_run.data.tags["fedrelay.early_stopping.epoch"] == "6"
    assert early_run.data.params["lr"] == "0.001" and early_run.data.params["training_mode"] == "centralized"
    before_run, before_children = find_runs(mlflow, experiment, "all-before")
    assert before_run.data.tags["fedrelay.errors"] == "1"
    assert "CUDA out of memory" in before_children["1"].data.tags["fedrelay.last_error"]
    assert "lost the relay connection" in bridge.log()


# -- the one window a crash can hit ------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """The process dies here: not an error the bridge could wait out and retry."""


WRITES = ("create_run", "log_batch", "set_terminated")


def crash_at(sink: MlflowSink, call: int) -> None:
    """Make the sink's MLflow client die at its ``call``-th write from now (0 = the next one)."""
    count = {"n": 0}
    for name in WRITES:
        real = getattr(sink.client, name)

        def write(*args, _real=real, **kwargs):
            if count["n"] == call:
                raise SimulatedCrash
            count["n"] += 1
            return _real(*args, **kwargs)

        setattr(sink.client, name, write)


def test_a_crash_at_any_write_records_nothing_twice_and_loses_nothing(tracking, mlflow):
    """A batch of events is several MLflow writes (child runs, points, status, cursor last). Kill
    the bridge before each of them in turn: the next bridge, knowing only what MLflow holds,
    must end with every point once."""
    events = [{**e, "seq": i} for i, e in enumerate(federated_run("crash", rounds=3, clients=2), start=1)]
    crash_point = 0
    while True:
        experiment = f"bridge-crash-{crash_point}"
        sink = MlflowSink(tracking.uri, experiment=experiment)
        state = sink.load("crash")
        sink.apply(state, translate(events[:30], state))
        crash_at(sink, crash_point)
        try:
            sink.apply(state, translate(events[30:], state))
        except SimulatedCrash:
            pass
        else:
            break  # past the last write: every position has been tried
        again = MlflowSink(tracking.uri, experiment=experiment)  # a new process, knowing only MLflow
        state = again.load("crash")
        assert state.cursor == 30 and len(state.children) == 2
        again.apply(state, translate([e for e in events if e["seq"] > state.cursor], state))

        parent, children = find_runs(mlflow, experiment, "crash")
        expected_parent, expected_clients = expected_run(events)
        assert recorded_series(mlflow, parent.info.run_id) == expected_parent, crash_point
        for client, series in expected_clients.items():
            assert recorded_series(mlflow, children[client].info.run_id) == series, (crash_point, client)
        assert parent.info.status == "FINISHED" and parent.data.tags["fedrelay.seq"] == str(len(events))
        crash_point += 1
    assert crash_point >= 4, "children, parent points, status and cursor are separate writes"


# -- the command line ---------------------------------------------------------------------------------


def bridge_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", "bridge", "mlflow", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_the_command_needs_a_tracking_uri_and_a_token_the_relay_accepts(relay_factory, tmp_path):
    out = bridge_cli("some-run", env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 2 and "--tracking-uri" in out.stderr
    relay = relay_factory("--subscribe-token", "s3cret")
    uri = f"sqlite:///{tmp_path / 'local.db'}"  # a database URI works too, without a server
    out = bridge_cli("some-run", "--url", relay.url, "--tracking-uri", uri, "--token", "wrong")
    assert out.returncode == 1 and "401" in out.stderr
