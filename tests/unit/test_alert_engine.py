"""The alert engine (no I/O): which committed events fire which alert, once; its state across
a restart; the retry policy and the message body."""

from __future__ import annotations

import json

import pytest

from fedrelay.relay.alerts.delivery import outcome, retry_delay
from fedrelay.relay.alerts.engine import AlertEngine, RunFacts, alert_id
from fedrelay.relay.alerts.message import DISCORD_CONTENT_CHARS, body
from fedrelay.relay.alerts.rules import parse_rule
from fedrelay.relay.alerts.webhook import Answer

RUNNING = RunFacts("running", experiment="exp")


def ev(kind: str, **data) -> dict:
    return {"type": kind, "data": data}


def round_end(n: int, **eval_metrics) -> dict:
    return ev("round_end", round=n, eval_metrics=eval_metrics)


def engine(*rules: str, **kwargs) -> AlertEngine:
    return AlertEngine([parse_rule(r) for r in rules], **kwargs)


def test_failed_end_fires_failed_with_the_last_error():
    e = engine()
    facts = RunFacts("failed", experiment="exp", last_error="CUDA out of memory")
    (alert,) = e.observe("r", 9, ev("training_end", status="failed"), facts)
    expected = ("failed", "failed", 9, "CUDA out of memory")
    assert (alert.alert, alert.status, alert.seq, alert.detail) == expected
    assert alert.id == alert_id("r", "failed") and alert.experiment == "exp"


@pytest.mark.parametrize("status", ["completed", "stopped", None])
def test_other_ends_fire_ended_with_the_status_the_relay_shows(status):
    data = {} if status is None else {"status": status}
    shown = RunFacts("incomplete", incomplete="events missing for round 2")
    (alert,) = engine().observe("r", 5, ev("training_end", **data), shown)
    assert (alert.alert, alert.status, alert.detail) == ("ended", "incomplete", "events missing for round 2")
    assert alert.id == alert_id("r", "ended")


def test_a_root_error_that_names_no_client_fails_the_run_others_do_not():
    e = engine()
    root = {"type": "error", "via": "root", "data": {"message": "boom"}}
    (alert,) = e.observe("r", 3, root, RunFacts("failed"))
    assert alert.alert == "failed" and alert.detail == "boom"
    assert e.observe("r", 4, {"type": "error", "via": "root", "data": {"client_id": 2}}, RUNNING) == []
    assert e.observe("r", 5, ev("error", message="one bad event"), RUNNING) == []  # /publish: not an end


def test_conditions_switched_off_do_not_fire():
    e = engine(conditions=["stalled"])
    assert e.observe("r", 1, ev("training_end", status="failed"), RunFacts("failed")) == []
    assert e.observe("r", 2, ev("training_end"), RunFacts("completed")) == []


def test_a_threshold_fires_once_per_run_at_the_first_event_where_it_holds():
    e = engine("eval_metrics.val_loss > 2")
    assert e.observe("r", 1, round_end(1, val_loss=1.5), RUNNING) == []
    (alert,) = e.observe("r", 2, round_end(2, val_loss=2.5), RUNNING)
    assert (alert.alert, alert.rule, alert.metric, alert.value, alert.round, alert.epoch) == (
        "rule", "eval_metrics.val_loss > 2", "eval_metrics.val_loss", 2.5, 2, None,
    )  # fmt: skip
    assert alert.id == alert_id("r", "rule:eval_metrics.val_loss > 2")
    assert e.observe("r", 3, round_end(3, val_loss=3.0), RUNNING) == []  # keeps holding: no re-fire
    assert e.observe("r", 4, round_end(4, val_loss=1.0), RUNNING) == []
    assert e.observe("r", 5, round_end(5, val_loss=9.0), RUNNING) == []  # holds again: not re-armed
    assert len(e.observe("other", 1, round_end(1, val_loss=9.0), RUNNING)) == 1  # each run on its own


def test_an_unscoped_threshold_reads_epoch_metrics_too():
    e = engine("val_loss > 2")
    (alert,) = e.observe("c", 4, ev("epoch_end", epoch=3, metrics={"val_loss": 4.0}), RUNNING)
    assert (alert.metric, alert.epoch, alert.round) == ("metrics.val_loss", 3, None)


def test_no_improvement_fires_patience_rounds_after_the_best():
    e = engine("no improvement of auroc for 3 rounds")
    values = [0.60, 0.70, 0.69, 0.71, 0.70, 0.70]  # best at round 4 (0.71)
    for n, value in enumerate(values, start=1):
        assert e.observe("r", n, round_end(n, auroc=value), RUNNING) == [], n
    (alert,) = e.observe("r", 7, round_end(7, auroc=0.65), RUNNING)  # round 7 = 4 + 3
    assert (alert.rule, alert.value, alert.round) == ("no improvement of auroc for 3 rounds", 0.65, 7)
    assert e.observe("r", 8, round_end(8, auroc=0.5), RUNNING) == []


def test_no_improvement_of_a_loss_means_no_decrease_and_by_sets_the_margin():
    e = engine("no improvement of val_loss by 0.1 for 2 rounds")
    assert e.observe("r", 1, round_end(1, val_loss=1.0), RUNNING) == []
    assert e.observe("r", 2, round_end(2, val_loss=0.95), RUNNING) == []  # better, but not by 0.1
    assert len(e.observe("r", 3, round_end(3, val_loss=0.92), RUNNING)) == 1
    e = engine("no improvement of val_loss by 0.1 for 2 rounds")
    for n, value in enumerate([1.0, 0.8, 0.6, 0.4], start=1):  # keeps improving
        assert e.observe("r", n, round_end(n, val_loss=value), RUNNING) == []


def test_no_improvement_counts_rounds_by_number_whatever_their_arrival_order():
    e = engine("no improvement of auroc for 2 rounds")
    assert e.observe("r", 1, round_end(5, auroc=0.9), RUNNING) == []
    assert e.observe("r", 2, round_end(1, auroc=0.5), RUNNING) == []  # late, earlier rounds:
    assert e.observe("r", 3, round_end(2, auroc=0.4), RUNNING) == []  # not rounds after the best
    assert len(e.observe("r", 4, round_end(7, auroc=0.8), RUNNING)) == 1


def test_an_epoch_plateau_ignores_rounds():
    e = engine("no improvement of val_loss for 1 epoch")
    assert e.observe("c", 1, round_end(1, val_loss=1.0), RUNNING) == []
    assert e.observe("c", 2, round_end(2, val_loss=2.0), RUNNING) == []
    assert e.observe("c", 3, ev("epoch_end", epoch=1, metrics={"val_loss": 1.0}), RUNNING) == []
    assert len(e.observe("c", 4, ev("epoch_end", epoch=2, metrics={"val_loss": 1.0}), RUNNING)) == 1


def test_a_stall_fires_once_per_silence_and_again_after_progress():
    e = engine()
    first = e.stalled("r", 10, 400.0, RunFacts("stalled"))
    assert first is not None and (first.alert, first.seq, first.silent_for) == ("stalled", 10, 400.0)
    assert e.stalled("r", 10, 500.0, RunFacts("stalled")) is None
    e.observe("r", 11, round_end(3), RUNNING)
    second = e.stalled("r", 11, 301.0, RunFacts("stalled"))
    assert second is not None and second.id != first.id and second.id == alert_id("r", "stalled@11")
    assert engine(conditions=["failed"]).stalled("r", 1, 999.0, RUNNING) is None


def test_rule_state_survives_a_snapshot_and_restore():
    rules = ("val_loss > 2", "no improvement of auroc for 2 rounds")
    before = engine(*rules)
    before.observe("r", 1, round_end(1, val_loss=3.0, auroc=0.9), RUNNING)  # fires val_loss > 2
    before.observe("r", 2, round_end(2, val_loss=3.0, auroc=0.8), RUNNING)
    after = engine(*rules)
    after.restore("r", before.snapshot("r"))
    assert after.observe("r", 3, round_end(3, val_loss=5.0, auroc=0.7), RUNNING)[0].rule == rules[1]
    fresh = engine(*rules)  # without the state the same event fires the threshold instead
    fired = fresh.observe("r", 3, round_end(3, val_loss=5.0, auroc=0.7), RUNNING)
    assert [a.rule for a in fired] == [rules[0]]


def test_unreadable_state_starts_the_run_over():
    e = engine("val_loss > 2")
    e.restore("r", "not json")
    e.restore("s", json.dumps({"plateaus": {"x": [1]}}))
    assert len(e.observe("r", 1, round_end(1, val_loss=3.0), RUNNING)) == 1


def test_run_state_is_bounded_and_an_evicted_state_is_handed_out_once():
    e = engine("val_loss > 2", max_runs=2)
    for run in ("a", "b", "c"):
        e.observe(run, 1, round_end(1, val_loss=3.0), RUNNING)
    assert len(e._runs) == 2 and "a" not in e._runs
    assert "val_loss > 2" in json.loads(e.snapshot("a"))["fired"]
    assert e.snapshot("a") == "{}"


def test_retry_delays_double_up_to_the_cap_with_jitter_in_the_upper_half():
    highest = [retry_delay(n, 1.0, 10.0, 1.0 - 1e-12) for n in (1, 2, 3, 4, 5)]
    assert highest == pytest.approx([1, 2, 4, 8, 10])
    assert retry_delay(3, 1.0, 10.0, 0.0) == 2.0
    assert retry_delay(10_000, 1.0, 300.0, 0.5) == pytest.approx(225.0)  # no overflow


@pytest.mark.parametrize(
    ("status", "result"),
    [(200, "sent"), (204, "sent"), (429, "retry"), (408, "retry"), (500, "retry"), (503, "retry"),
     (301, "refused"), (400, "refused"), (404, "refused")],
)  # fmt: skip
def test_outcome_of_an_answer(status, result):
    assert outcome(Answer(status)) == result


def test_the_body_suits_slack_discord_and_plain_receivers():
    e = engine("val_loss > 2")
    facts = RunFacts("running", experiment="<!channel> @everyone `x`")
    (alert,) = e.observe("r-1", 4, round_end(3, val_loss=2.5), facts)
    payload = body(alert, dashboard="https://relay.example/", now=0)
    assert payload["url"] == "https://relay.example/#/runs/r-1"
    assert "<!channel>" not in payload["text"] and "&lt;!channel&gt;" in payload["text"]
    assert payload["allowed_mentions"] == {"parse": []}
    assert "`<!channel> @everyone 'x'`" in payload["content"]  # a code span: no mention, no markup
    fields = ("alert", "id", "run_id", "status", "rule", "value", "round", "epoch")
    assert {k: payload[k] for k in fields} == {
        "alert": "rule", "id": alert.id, "run_id": "r-1", "status": "running", "rule": "val_loss > 2",
        "value": 2.5, "round": 3, "epoch": None,
    }  # fmt: skip
    long_error = RunFacts("failed", last_error="x" * 5000)
    (failed,) = engine().observe("r", 2, ev("training_end", status="failed"), long_error)
    assert len(body(failed, dashboard="http://h")["content"]) <= DISCORD_CONTENT_CHARS
