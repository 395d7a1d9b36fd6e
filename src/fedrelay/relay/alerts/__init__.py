"""Alerts when a run needs a person: rules, engine, outbox, webhook delivery (docs/alerts.md)."""

from .engine import Alert, AlertEngine, RunFacts, alert_id
from .rules import Plateau, RuleError, Threshold, parse_rule
from .service import AlertService
from .settings import AlertSettings

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertService",
    "AlertSettings",
    "Plateau",
    "RuleError",
    "RunFacts",
    "Threshold",
    "alert_id",
    "parse_rule",
]
