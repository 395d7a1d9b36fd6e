"""Alert tests' shared parts: a run's events as the alert rules see them, and what a webhook
receiver got (tests/test_alerts.py, tests/pg/test_pg_alerts.py)."""

from __future__ import annotations

from collections import Counter

from fedrelay.emitters import Emitter
from tests.support.webhook_receiver import WebhookReceiver


def publish(em: Emitter, run_id: str, *events: tuple[str, dict]) -> None:
    for kind, data in events:
        em.emit(kind, data, run_id=run_id, role="server")
    assert em.flush(10), "the relay did not ack"


def start(n: int = 3) -> tuple[str, dict]:
    return ("training_start", {"experiment_name": "alerts", "num_rounds": n, "training_mode": "federated"})


def rnd(n: int, **eval_metrics: float) -> tuple[str, dict]:
    return ("round_end", {"round": n, "total_rounds": 9, "eval_metrics": eval_metrics})


def end(status: str = "completed") -> tuple[str, dict]:
    return ("training_end", {"status": status})


def ids(rx: WebhookReceiver) -> Counter:
    return Counter(body["id"] for body in rx.bodies())


def one(rx: WebhookReceiver, alert: str, run_id: str) -> dict:
    found = [b for b in rx.bodies(alert) if b["run_id"] == run_id]
    assert len(found) == 1, (alert, run_id, rx.bodies())
    return found[0]
