"""The alert rule parser: what parses into what, and what is refused with which message."""

from __future__ import annotations

import pytest

from fedrelay.relay.alerts.rules import MetricRef, Plateau, RuleError, Threshold, parse_rule


@pytest.mark.parametrize(
    ("text", "metric", "op", "limit"),
    [
        ("val_loss > 2", MetricRef(None, "val_loss"), ">", 2.0),
        ("eval_metrics.val_loss>2", MetricRef("eval_metrics", "val_loss"), ">", 2.0),
        ("  server_metrics.accuracy <= 0.5 ", MetricRef("server_metrics", "accuracy"), "<=", 0.5),
        ("fit_metrics.loss != -1e-3", MetricRef("fit_metrics", "loss"), "!=", -0.001),
        ("metrics.val/loss == .25", MetricRef("metrics", "val/loss"), "==", 0.25),
        ("train.loss >= 3", MetricRef(None, "train.loss"), ">=", 3.0),  # not a scope: one name
        ("auroc < +1", MetricRef(None, "auroc"), "<", 1.0),
    ],
)
def test_thresholds_parse(text, metric, op, limit):
    rule = parse_rule(text)
    assert rule == Threshold(metric, op, limit)


def test_a_threshold_compares_with_its_operator():
    rule = parse_rule("loss > 2")
    assert rule.holds(2.5) and not rule.holds(2.0)
    assert parse_rule("loss >= 2").holds(2.0)
    assert parse_rule("acc < 0.5").holds(0.4) and not parse_rule("acc < 0.5").holds(0.5)


@pytest.mark.parametrize(
    ("text", "lower", "patience", "unit", "delta", "canonical"),
    [
        ("no improvement of auroc for 10 rounds", False, 10, "round", 0.0, None),
        ("no improvement of eval_metrics.val_loss for 3 rounds", True, 3, "round", 0.0, None),
        ("No Improvement Of val_error by 0.01 for 1 epoch", True, 1, "epoch", 0.01, None),
        ("no increase of metrics.val_loss for 2 epochs", False, 2, "epoch", 0.0, None),
        ("no decrease of acc for 5 round", True, 5, "round", 0.0, "no decrease of acc for 5 rounds"),
    ],
)
def test_plateaus_parse(text, lower, patience, unit, delta, canonical):
    rule = parse_rule(text)
    assert isinstance(rule, Plateau)
    assert (rule.lower_is_better, rule.patience, rule.unit, rule.min_delta) == (lower, patience, unit, delta)
    assert str(parse_rule(str(rule))) == str(rule)  # the canonical text parses to the same rule
    if canonical:
        assert str(rule) == canonical


def test_canonical_text_ignores_spacing_so_ids_do_not_change():
    assert str(parse_rule("eval_metrics.val_loss>2")) == str(parse_rule(" eval_metrics.val_loss  >  2.0 "))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("val_loss", "expected METRIC OP NUMBER"),
        ("val_loss > ", "expected METRIC OP NUMBER"),
        ("val_loss => 2", "unexpected"),
        ("val_loss > two", "not a number"),
        ("val_loss > nan", "not a number"),
        ("val_loss > inf", "not a number"),
        ("val_loss > 1_000", "not a number"),
        ("val_loss > 1e999", "too large"),
        ("__import__('os') > 1", "no metric name"),
        ("eval_metrics. > 1", "no metric name"),
        ("val_loss > 2 and acc < 1", "expected METRIC OP NUMBER"),
        ("no improvement auroc for 10 rounds", "expected no improvement"),
        ("no improvement of auroc for ten rounds", "whole number"),
        ("no improvement of auroc for 0 rounds", "whole number"),
        ("no improvement of auroc for 10 weeks", "expected no improvement"),
        ("no improvement of auroc by -1 for 10 rounds", "'by' takes"),
        ("no improvement of metrics.auroc for 10 rounds", "metrics is not reported with rounds"),
        ("no improvement of eval_metrics.auroc for 2 epochs", "eval_metrics is not reported with epochs"),
        ("x" * 301, "at most 300"),
    ],
)
def test_bad_rules_are_refused_with_a_reason(text, says):
    with pytest.raises(RuleError, match=says):
        parse_rule(text)


def test_a_metric_is_looked_up_in_its_scope_or_in_every_scope_in_order():
    data = {"fit_metrics": {"loss": 1.0}, "eval_metrics": {"loss": 2.0}, "server_metrics": {"acc": True}}
    assert MetricRef(None, "loss").find("round_end", data) == ("eval_metrics", 2.0)
    assert MetricRef("fit_metrics", "loss").find("round_end", data) == ("fit_metrics", 1.0)
    assert MetricRef(None, "acc").find("round_end", data) is None  # a bool is no metric value
    assert MetricRef(None, "loss").find("epoch_end", {"metrics": {"loss": 3}}) == ("metrics", 3.0)
    assert MetricRef(None, "loss").find("epoch_end", data) is None  # round scopes are not epoch scopes
    assert MetricRef(None, "loss").find("round_end", {"eval_metrics": {"loss": None}}) is None
    assert MetricRef(None, "loss").find("round_end", {"eval_metrics": ["loss"]}) is None
