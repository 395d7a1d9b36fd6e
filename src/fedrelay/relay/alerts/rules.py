"""Alert rules on metrics: a small hand-written parser, and the rules it builds (no I/O).

Two kinds, written as one line each (``--alert-rule`` or ``rules`` in the alerts file)::

    [SCOPE.]METRIC OP NUMBER                              e.g. eval_metrics.val_loss > 2
    no (improvement|increase|decrease) of [SCOPE.]METRIC [by NUMBER] for N (rounds|epochs)

The text is tokenised and parsed here, never evaluated: a rule can name metrics and
compare numbers, nothing else. docs/alerts.md is the reference for the syntax.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

ROUND_SCOPES = ("eval_metrics", "server_metrics", "fit_metrics")
"""Metric dictionaries of ``round_end``, in the order an unscoped name is looked up."""
EPOCH_SCOPES = ("metrics",)
"""...and of ``epoch_end``."""
SCOPES = ROUND_SCOPES + EPOCH_SCOPES
OPERATORS = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "perplexity")
"""``no improvement of NAME``: a name containing one of these improves downwards, others upwards."""
MAX_RULE_CHARS = 300
MAX_PATIENCE = 1_000_000

_TOKEN = re.compile(r"\s*(?:(>=|<=|==|!=|>|<)|([^\s<>=!]+))")
_NAME = re.compile(r"[A-Za-z0-9_./:\-]{1,128}")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_UNITS = {"round": "round", "rounds": "round", "epoch": "epoch", "epochs": "epoch"}
_PLATEAU_KINDS = ("improvement", "increase", "decrease")


class RuleError(ValueError):
    """A rule that does not parse: the message says where and what was expected."""


@dataclass(frozen=True, slots=True)
class MetricRef:
    """A metric by name, in one metric dictionary (``scope``) or in any of them (None)."""

    scope: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.scope}.{self.name}" if self.scope else self.name

    def find(self, event_type: str, data: dict[str, Any]) -> tuple[str, float] | None:
        """``(scope, value)`` of this metric in a ``round_end`` or ``epoch_end`` payload, or
        None when the event does not carry it as a finite number."""
        scopes = (
            ROUND_SCOPES if event_type == "round_end" else EPOCH_SCOPES if event_type == "epoch_end" else ()
        )
        for scope in scopes:
            if self.scope is not None and scope != self.scope:
                continue
            metrics = data.get(scope)
            if not isinstance(metrics, dict):
                continue
            value = metrics.get(self.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                return scope, float(value)
        return None


@dataclass(frozen=True, slots=True)
class Threshold:
    """``METRIC OP NUMBER``: holds on any ``round_end`` / ``epoch_end`` whose metric compares so."""

    metric: MetricRef
    op: str
    limit: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {_number_text(self.limit)}"

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.limit)


@dataclass(frozen=True, slots=True)
class Plateau:
    """``no improvement of METRIC for N rounds``: the metric was reported for a round (or epoch)
    at least ``patience`` rounds after the one of its best value, which nothing since has beaten
    by more than ``min_delta``."""

    metric: MetricRef
    lower_is_better: bool
    patience: int
    unit: str
    """``round`` (``round_end`` events, by their round number) or ``epoch`` (``epoch_end``)."""
    min_delta: float = 0.0
    kind: str = "improvement"
    """As written: improvement (direction from the name), increase or decrease."""

    def __str__(self) -> str:
        by = f" by {_number_text(self.min_delta)}" if self.min_delta else ""
        unit = self.unit if self.patience == 1 else f"{self.unit}s"
        return f"no {self.kind} of {self.metric}{by} for {self.patience} {unit}"

    @property
    def event_type(self) -> str:
        return "round_end" if self.unit == "round" else "epoch_end"

    def better(self, value: float, best: float) -> bool:
        if self.lower_is_better:
            return value < best - self.min_delta
        return value > best + self.min_delta


Rule = Threshold | Plateau


def parse_rule(text: str) -> Rule:
    """Parse one rule; :class:`RuleError` names what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError("an alert rule is empty")
    if len(text) > MAX_RULE_CHARS:
        raise RuleError(f"an alert rule is at most {MAX_RULE_CHARS} characters")
    tokens = _tokens(text)
    if tokens[0].lower() == "no":
        return _plateau(text, tokens)
    return _threshold(text, tokens)


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if match is None or match.end() == position:
            raise RuleError(f"alert rule {text!r}: unexpected {stripped[position:].strip()[:20]!r}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    return tokens


def _threshold(text: str, tokens: list[str]) -> Threshold:
    if len(tokens) != 3 or tokens[1] not in OPERATORS:
        raise RuleError(
            f"alert rule {text!r}: expected METRIC OP NUMBER (OP one of {' '.join(OPERATORS)}), "
            "or 'no improvement of METRIC for N rounds'"
        )
    return Threshold(_metric(text, tokens[0]), tokens[1], _number(text, tokens[2]))


def _plateau(text: str, tokens: list[str]) -> Plateau:
    expected = "no improvement|increase|decrease of METRIC [by NUMBER] for N rounds|epochs"
    words = [token.lower() for token in tokens]
    if len(words) not in (7, 9) or words[1] not in _PLATEAU_KINDS or words[2] != "of":
        raise RuleError(f"alert rule {text!r}: expected {expected}")
    metric = _metric(text, tokens[3])
    min_delta = 0.0
    rest = words[4:]
    if rest[0] == "by":
        min_delta = _number(text, tokens[5])
        if min_delta < 0:
            raise RuleError(f"alert rule {text!r}: 'by' takes a number >= 0")
        rest = rest[2:]
    if len(rest) != 3 or rest[0] != "for" or rest[2] not in _UNITS:
        raise RuleError(f"alert rule {text!r}: expected {expected}")
    if not rest[1].isdigit() or not 1 <= int(rest[1]) <= MAX_PATIENCE:
        raise RuleError(
            f"alert rule {text!r}: 'for' takes a whole number of rounds or epochs, 1-{MAX_PATIENCE}"
        )
    unit = _UNITS[rest[2]]
    if metric.scope is not None and metric.scope not in (ROUND_SCOPES if unit == "round" else EPOCH_SCOPES):
        raise RuleError(f"alert rule {text!r}: {metric.scope} is not reported with {unit}s")
    kind = words[1]
    lower = (
        any(part in metric.name.lower() for part in LOWER_IS_BETTER)
        if kind == "improvement"
        else kind == "decrease"
    )
    return Plateau(metric, lower, int(rest[1]), unit, min_delta, kind)


def _metric(text: str, token: str) -> MetricRef:
    scope, dot, name = token.partition(".")
    if not (dot and scope in SCOPES):
        scope, name = "", token
    if _NAME.fullmatch(name) is None:
        raise RuleError(
            f"alert rule {text!r}: {token[:40]!r} is no metric name (1-128 letters, digits, _ . / : -)"
        )
    return MetricRef(scope or None, name)


def _number(text: str, token: str) -> float:
    if _NUMBER.fullmatch(token) is None:
        raise RuleError(f"alert rule {text!r}: {token[:40]!r} is not a number")
    value = float(token)
    if not math.isfinite(value):
        raise RuleError(f"alert rule {text!r}: {token[:40]!r} is too large")
    return value


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
