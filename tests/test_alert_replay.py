"""After a crash, the alerts of events committed but not yet evaluated are found again, from the
store, before the relay listens; events that arrived while alerts were off are not alerted.

In process, with the real parts below the sockets: a Hub, an EventStore and the alert tables
on one SQLite file, the AlertService reopened on them as a restarted relay does.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from fedrelay.relay.alerts.engine import alert_id
from fedrelay.relay.alerts.outbox import SqliteAlertLog
from fedrelay.relay.alerts.service import ALIVE_SLACK, AlertService
from fedrelay.relay.alerts.settings import AlertSettings
from fedrelay.relay.hub import Hub
from fedrelay.relay.metrics import RelayMetrics
from fedrelay.relay.store import EventStore

SETTINGS = AlertSettings.build(["http://127.0.0.1:9/hook"], ["eval_metrics.val_loss > 2"], None)


def events(run_id: str) -> list[dict]:
    kinds = [
        ("training_start", {"num_rounds": 1}),
        ("round_end", {"round": 1, "eval_metrics": {"val_loss": 3.0}}),
        ("training_end", {"status": "failed"}),
    ]
    return [{"type": kind, "run_id": run_id, "data": data} for kind, data in kinds]


async def store_events(db: Path, runs: dict[str, float]) -> None:
    """Commit each run's events, stamped with its arrival time, with no alert service (the
    relay that stored them died before evaluating them, or ran without alerts)."""
    for run_id, arrived in runs.items():
        hub = Hub(clock=lambda arrived=arrived: arrived)
        store = EventStore(db, runs=hub.runs, on_commit=hub.committed)
        for run in (await store.open()).runs:
            hub.restore_run(run)
        store.append(hub.accept("p-" + run_id, events(run_id)).new)
        assert await store.close() == 0


async def restart(db: Path) -> tuple[AlertService, RelayMetrics]:
    """What Relay.start does for alerts: restore the runs, evaluate what was not, save."""
    hub = Hub()
    store = EventStore(db, runs=hub.runs, on_commit=hub.committed)
    for run in (await store.open()).runs:
        hub.restore_run(run)
    metrics = RelayMetrics()
    service = AlertService(
        SETTINGS,
        alert_log=SqliteAlertLog(str(db)),
        metrics=metrics,
        stall_after=0,
        dashboard=lambda: "http://x",
    )
    await service.open(hub.runs, store.read)
    await service.stop()  # saves the claims (nothing is sent: start() was not called)
    await store.close()
    return service, metrics


def claimed(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM alert_outbox")}


def cursors(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT run_id, seq FROM alert_runs"))


async def test_events_stored_after_the_last_save_are_evaluated_at_restart(tmp_path):
    db = tmp_path / "relay.db"
    # An alerting relay saved its state (cursor of run "crashed" at seq 1), then stored two more
    # events of that run and died before claiming their alerts. Run "off" got its events long after
    # the last save: a relay without alerts stored them.
    log = SqliteAlertLog(str(db))
    await log.open()
    saved_at = time.time()
    await log.save([], ["t"], {"crashed": (1, "{}")}, saved_at)
    await log.close()
    await store_events(db, {"crashed": saved_at + 1, "off": saved_at + ALIVE_SLACK + 60})

    await restart(db)
    assert claimed(db) == {
        alert_id("crashed", "failed"),
        alert_id("crashed", "rule:eval_metrics.val_loss > 2"),
    }
    assert cursors(db) == {"crashed": 3, "off": 3}
    with sqlite3.connect(db) as conn:
        ((payload,),) = conn.execute(
            "SELECT payload FROM alert_outbox WHERE key = ?", (alert_id("crashed", "failed"),)
        )
    assert (
        json.loads(payload)["run_id"] == "crashed" and json.loads(payload)["url"] == "http://x/#/runs/crashed"
    )

    _, metrics = await restart(db)  # nothing is left to evaluate: nothing new
    assert len(claimed(db)) == 2
    assert not metrics.registry.get_sample_value("fedrelay_alerts_fired_total", {"alert": "failed"})


async def test_switching_alerts_on_does_not_alert_the_past(tmp_path):
    db = tmp_path / "relay.db"
    await store_events(db, {"old": time.time() - 3600})
    await restart(db)
    assert claimed(db) == set() and cursors(db) == {"old": 3}
