"""Alerts end to end: a real relay process, real emitters, a real HTTP receiver (http.server).

Each condition (failed, stalled, ended, a threshold rule, a no-improvement rule) reaches the
receiver exactly once with its fields; a relay restart (SIGTERM or SIGKILL) sends nothing twice
and keeps rule state; a receiver that refuses connections or never answers costs the relay
nothing (events flow, /healthz 200) and gets the queued alerts when it is back; redirects are
not followed; the webhook URL's secret path appears in no log line and no metric.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from websockets.sync.client import connect

from fedrelay.emitters import Emitter
from tests.support.alerting import end, ids, one, publish, rnd, start
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.waiting import wait_until
from tests.support.webhook_receiver import WebhookReceiver

RULES = ["--alert-rule", "eval_metrics.val_loss > 2", "--alert-rule", "no improvement of auroc for 3 rounds"]


def recorded_delivered(db) -> int:
    """Alerts the relay has recorded as delivered: only those are certain not to go again after
    a restart (one whose 200 came but was not recorded yet is sent once more: at least once)."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM alert_outbox WHERE state = 'delivered'").fetchone()[0]


def metric(relay: RelayProcess, name: str) -> float:
    return sum(v for k, v in scrape(relay).items() if k == name or k.startswith(name + "{"))


def test_each_condition_fires_once_with_its_fields(tmp_path, receiver, emitter):
    relay = RelayProcess(
        tmp_path / "relay.db", args=["--alert-webhook", receiver.url, "--stall-after", "1", *RULES]
    ).start()
    try:
        em = emitter(relay)
        publish(em, "fl-fail", start(), rnd(1, val_loss=1.0), ("error", {"message": "boom"}), end("failed"))
        publish(
            em, "fl-rules", start(5),
            rnd(1, val_loss=1.0, auroc=0.90), rnd(2, val_loss=2.5, auroc=0.85),
            rnd(3, val_loss=3.0, auroc=0.80), rnd(4, val_loss=1.5, auroc=0.88),
            rnd(5, val_loss=1.0, auroc=0.89), end("completed"),
        )  # fmt: skip
        publish(em, "fl-stall", start(), rnd(1, val_loss=1.0, auroc=0.5))
        wait_until(lambda: len(receiver.received) >= 5, 20, what="five alerts")

        # Stay long enough for the stall check to have seen fl-stall silent three times over.
        wait_until(lambda: relay.get_json("/api/runs/fl-stall")[1]["updated_at"] + 4 < time.time(), 20)
        assert sorted(b["alert"] for b in receiver.bodies()) == ["ended", "failed", "rule", "rule", "stalled"]
        assert set(ids(receiver).values()) == {1}

        failed = one(receiver, "failed", "fl-fail")
        assert failed["status"] == "failed" and failed["detail"] == "boom" and failed["seq"] == 4
        ended = one(receiver, "ended", "fl-rules")
        assert ended["status"] == "completed" and ended["experiment"] == "alerts"
        stalled = one(receiver, "stalled", "fl-stall")
        assert stalled["status"] == "stalled" and stalled["seq"] == 2
        threshold, plateau = sorted(receiver.bodies("rule"), key=lambda b: b["round"])
        assert (threshold["rule"], threshold["metric"], threshold["value"], threshold["round"]) == (
            "eval_metrics.val_loss > 2", "eval_metrics.val_loss", 2.5, 2,
        )  # fmt: skip
        assert (plateau["rule"], plateau["metric"], plateau["value"], plateau["round"]) == (
            "no improvement of auroc for 3 rounds", "eval_metrics.auroc", 0.88, 4,
        )  # fmt: skip
        for received in receiver.received:
            body = received.body
            assert received.path == "/hooks/T000/secret-token"
            assert received.headers["Idempotency-Key"] == body["id"]
            assert received.headers["Content-Type"].startswith("application/json")
            assert body["url"] == f"{relay.http}/#/runs/{body['run_id']}"
            assert body["run_id"] in body["text"] and body["run_id"] in body["content"]
            assert body["epoch"] is None

        metrics = scrape(relay)
        label = f'webhook="127.0.0.1:{receiver.port}"'
        assert metrics[f"fedrelay_alerts_sent_total{{{label}}}"] == 5
        assert metrics[f"fedrelay_alerts_queued{{{label}}}"] == 0
        assert metrics['fedrelay_alerts_fired_total{alert="rule"}'] == 2
        assert "secret-token" not in relay.get("/metrics")[1].decode()
    finally:
        relay.stop()
    assert "secret-token" not in relay.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restart_sends_nothing_twice_and_keeps_rule_state(tmp_path, receiver, emitter, sig):
    db = tmp_path / "relay.db"
    args = ["--alert-webhook", receiver.url, "--stall-after", "1", *RULES]
    first = RelayProcess(db, args=args).start()
    em = emitter(first)
    publish(em, "a", start(), rnd(1, val_loss=3.0), end("failed"))  # rule + failed
    publish(em, "s", start(), rnd(1, auroc=0.9), rnd(2, auroc=0.8))  # stalls; best auroc at round 1
    wait_until(lambda: recorded_delivered(db) == 3, 20, what="three alerts before the restart")
    first.kill(sig)

    second = RelayProcess(db, args=args).start()
    try:
        em2 = emitter(second)
        publish(em2, "a", rnd(2, val_loss=4.0))  # the rule holds again: claimed before, not sent
        # s is still silent at the same seq: found stalled again, not sent again.
        wait_until(lambda: metric(second, "fedrelay_alerts_repeated_total") >= 2, 20, what="repeats")
        publish(em2, "s", rnd(3, auroc=0.85), rnd(4, auroc=0.7), end("completed"))  # round 4 = 1 + 3
        publish(em2, "b", start(), end("failed"))  # a condition after the restart
        wait_until(lambda: len(receiver.received) >= 6, 20, what="alerts after the restart")
    finally:
        second.stop()
    assert set(ids(receiver).values()) == {1}, ids(receiver)
    assert len(receiver.received) == 6
    assert one(receiver, "rule", "s")["round"] == 4  # the best value survived the restart
    one(receiver, "rule", "a")
    for run in ("a", "b"):
        one(receiver, "failed", run)
    one(receiver, "stalled", "s")
    assert one(receiver, "ended", "s")["status"] == "completed"


def failed_attempts(relay: RelayProcess, label: str, reason: str) -> float:
    return scrape(relay).get(f'fedrelay_alert_attempts_failed_total{{reason="{reason}",{label}}}', 0)


def _live_events_flow(relay: RelayProcess, em: Emitter, run_id: str, count: int) -> None:
    """A subscriber gets events published now, and /healthz answers 200."""
    with connect(f"{relay.url}/subscribe?run_id={run_id}", open_timeout=5) as sub:
        assert json.loads(sub.recv(timeout=5))["op"] == "subscribed"
        publish(em, run_id, *[("status", {"message": f"m{i}"}) for i in range(count)])
        got = 0
        while got < count:
            frame = json.loads(sub.recv(timeout=5))
            got += len(frame) if isinstance(frame, list) else 1
    assert relay.get("/healthz")[0] == 200


def test_a_receiver_that_is_down_or_never_answers_costs_the_relay_nothing(tmp_path, receiver, emitter):
    alerts = tmp_path / "alerts.toml"
    alerts.write_text(
        f'webhooks = ["{receiver.url}"]\ntimeout = 1\nretry_first = 0.2\nretry_cap = 0.5\n'
        'rules = ["eval_metrics.loss > 1"]\n'
    )
    relay = RelayProcess(tmp_path / "relay.db", args=["--alerts", str(alerts)]).start()
    label = f'webhook="127.0.0.1:{receiver.port}"'
    try:
        em = emitter(relay)
        receiver.stop()  # connection refused
        publish(em, "x", start(), end("failed"))
        wait_until(
            lambda: failed_attempts(relay, label, "refused") >= 2,
            20,
            what="refused attempts",
        )
        assert scrape(relay)[f"fedrelay_alerts_queued{{{label}}}"] == 1
        _live_events_flow(relay, em, "live-1", 50)
        receiver.start()
        wait_until(lambda: receiver.bodies("failed"), 20, what="the queued alert, delivered")

        receiver.hang()  # accepts, reads, never answers
        publish(em, "y", start(), rnd(1, loss=5.0))  # a rule alert
        wait_until(
            lambda: failed_attempts(relay, label, "timeout") >= 2,
            20,
            what="timed-out attempts",
        )
        _live_events_flow(relay, em, "live-2", 50)
        receiver.hang(False)
        wait_until(lambda: receiver.bodies("rule"), 20, what="the rule alert, delivered")
        metrics = scrape(relay)
        assert metrics[f"fedrelay_alerts_sent_total{{{label}}}"] == 2
        assert metrics[f"fedrelay_alerts_queued{{{label}}}"] == 0
        assert "secret-token" not in relay.get("/metrics")[1].decode()
    finally:
        relay.stop()
    assert set(ids(receiver).values()) == {1} and len(receiver.received) == 2
    log = relay.log()
    assert "delivery failed (refused)" in log and "delivering again" in log
    assert "secret-token" not in log


def test_redirects_are_not_followed(tmp_path, receiver, emitter):
    elsewhere = WebhookReceiver().start()
    try:
        receiver.status = 307
        receiver.answer_headers = {"Location": elsewhere.url}
        relay = RelayProcess(tmp_path / "relay.db", args=["--alert-webhook", receiver.url]).start()
        try:
            publish(emitter(relay), "r", start(), end("failed"))
            label = f'webhook="127.0.0.1:{receiver.port}"'
            wait_until(
                lambda: scrape(relay).get(f'fedrelay_alerts_dropped_total{{reason="rejected",{label}}}'), 20
            )
        finally:
            relay.stop()
        assert len(receiver.received) == 1 and elsewhere.received == []
        assert "answered 307 (a redirect to 127.0.0.1: not followed)" in relay.log()
    finally:
        elsewhere.stop()


@pytest.mark.parametrize(
    ("args", "file", "says"),
    [
        (["--alert-webhook", "http://h/x", "--alert-rule", "loss >"], None, "expected METRIC OP NUMBER"),
        (["--alert-webhook", "ftp://h/x"], None, "http:// or https://"),
        (["--alert-webhook", "https://user:pw@h/x"], None, "user:password@"),
        (["--alert-rule", "loss > 1"], None, "no webhook"),
        ([], 'webhooks = ["http://h/x"]\nretries = 3\n', "unknown keys retries"),
        ([], 'webhooks = ["http://h/x"]\non = ["crashed"]\n', "'on' takes"),
        ([], 'webhooks = ["http://h/x"]\nqueue_size = 0\n', "queue_size must be"),
        ([], "webhooks = [", "not TOML"),
    ],
)
def test_bad_alert_settings_fail_the_start_with_exit_2(tmp_path, args, file, says):
    if file is not None:
        (tmp_path / "alerts.toml").write_text(file)
        args = [*args, "--alerts", str(tmp_path / "alerts.toml")]
    cmd = [sys.executable, "-m", "fedrelay", "serve", "--memory", "--port", "0", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)  # a relay that starts: red
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_webhooks_and_rules_from_the_environment_comma_separated():
    from fedrelay.relay.config import RelayConfig

    env = {
        "FEDRELAY_ALERT_WEBHOOK": "https://hooks.slack.com/services/T/B/x,https://hooks.slack.com/services/T/C/y",
        "FEDRELAY_ALERT_RULE": "val_loss > 2,no improvement of auroc for 10 rounds",
    }
    alerting = RelayConfig.from_env(env, db=":memory:").alerting
    assert alerting is not None
    assert [hook.label for hook in alerting.webhooks] == ["hooks.slack.com", "hooks.slack.com#2"]
    assert [str(rule) for rule in alerting.rules] == ["val_loss > 2", "no improvement of auroc for 10 rounds"]
    assert "services" not in repr(alerting.webhooks)  # the secret path stays out of reprs
    assert RelayConfig.from_env({}, db=":memory:").alerting is None


def test_past_the_queue_bound_alerts_are_dropped_counted_and_logged_once(tmp_path, receiver, emitter):
    alerts = tmp_path / "alerts.toml"
    alerts.write_text(f'webhooks = ["{receiver.url}"]\nqueue_size = 2\nretry_first = 0.1\nretry_cap = 0.2\n')
    args = ["--alerts", str(alerts)]
    relay = RelayProcess(tmp_path / "relay.db", args=args).start()
    label = f'webhook="127.0.0.1:{receiver.port}"'
    receiver.stop()
    em = emitter(relay)
    for run in ("q1", "q2", "q3", "q4"):
        publish(em, run, start(), end("failed"))
    dropped = f'fedrelay_alerts_dropped_total{{reason="queue_full",{label}}}'
    wait_until(lambda: scrape(relay).get(dropped) == 2, 20, what="two alerts dropped")
    receiver.start()
    wait_until(lambda: recorded_delivered(tmp_path / "relay.db") == 2, 20, what="the two queued alerts")
    relay.stop()
    assert relay.log().count("queue full") == 1  # once per episode

    again = RelayProcess(tmp_path / "relay.db", args=args).start()
    try:
        publish(emitter(again), "q5", start(), end("failed"))
        wait_until(lambda: receiver.bodies("failed")[-1:] and receiver.bodies()[-1]["run_id"] == "q5", 20)
    finally:
        again.stop()
    assert [b["run_id"] for b in receiver.bodies()] == ["q1", "q2", "q5"]  # dropped stays dropped


def test_a_relay_in_memory_alerts_too(tmp_path, receiver, emitter):
    # end_grace 0: the end is judged as soon as its commit's acks have settled the emitter's
    # `holding` report (the run is not incomplete for events that very commit stored).
    alerts = tmp_path / "alerts.toml"
    alerts.write_text(f'webhooks = ["{receiver.url}"]\nend_grace = 0\n')
    relay = RelayProcess(tmp_path / "unused.db", args=["--memory", "--alerts", str(alerts)]).start()
    try:
        publish(emitter(relay), "m", start(), end("completed"))
        wait_until(lambda: receiver.bodies("ended"), 20, what="the end alert")
    finally:
        relay.stop()
    assert one(receiver, "ended", "m")["status"] == "completed"
    assert not (tmp_path / "unused.db").exists()


def test_an_end_shown_incomplete_waits_for_late_client_reports(tmp_path, receiver, emitter):
    alerts = tmp_path / "alerts.toml"
    alerts.write_text(f'webhooks = ["{receiver.url}"]\nend_grace = 3\n')
    relay = RelayProcess(tmp_path / "relay.db", args=["--alerts", str(alerts)]).start()
    try:
        server, clients = emitter(relay), emitter(relay)

        def report(run_id: str, client: str) -> None:
            clients.emit("client_complete", {"round": 1, "client_id": client}, run_id=run_id, role="client")
            assert clients.flush(10)

        for run_id in ("late", "lost"):
            report(run_id, "c1")
            publish(
                server, run_id, start(1),
                ("round_end", {"round": 1, "total_rounds": 1, "participating_clients": ["c1", "c2"]}),
                end("completed"),
            )  # fmt: skip
            assert relay.get_json(f"/api/runs/{run_id}")[1]["status"] == "incomplete"
        report("late", "c2")  # within the grace: the end alert says completed
        wait_until(lambda: len(receiver.bodies("ended")) == 2, 20, what="both end alerts")
    finally:
        relay.stop()
    assert one(receiver, "ended", "late")["status"] == "completed"
    lost = one(receiver, "ended", "lost")
    assert lost["status"] == "incomplete" and "round 1" in lost["detail"]
