"""Alert settings: webhooks and rules from flags (or ``FEDRELAY_ALERT_*``) and an alerts file.

The file is TOML (``tomllib``, no dependency); every key is optional, unknown keys are
refused (a typo would otherwise switch an alert off silently)::

    webhooks = ["https://hooks.slack.com/services/T000/B000/XXXX"]
    rules = ["eval_metrics.val_loss > 2", "no improvement of auroc for 10 rounds"]
    on = ["failed", "stalled", "ended"]      # run conditions alerted (default: all three)
    dashboard_url = "https://relay.example.com"   # links in messages (default: the relay's URL)
    queue_size = 1000       # alerts waiting per webhook; more are dropped (counted, logged)
    timeout = 10            # seconds per attempt: connect, send, read the answer
    retry_first = 1         # seconds before the first retry; doubles (with jitter) ...
    retry_cap = 300         # ... up to this
    give_up_after = 86400   # seconds after which an undelivered alert is dropped
    stall_horizon = 86400   # a run silent longer than stall_after + this is not alerted
    end_grace = 10          # an end shown incomplete waits this long for the missing events
    claim_lease = 30        # PostgreSQL: a stopped relay's undelivered alerts go to another after this

Flags add to the file's webhooks and rules.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import CONDITIONS
from .rules import Rule, RuleError, parse_rule
from .webhook import Webhook, WebhookError

MAX_WEBHOOKS = 16
MAX_RULES = 64
_NUMBERS = {
    "queue_size": (1, 1_000_000),
    "timeout": (0.1, 600),
    "retry_first": (0.01, 3600),
    "retry_cap": (0.01, 86400),
    "give_up_after": (1, 30 * 86400),
    "stall_horizon": (0, 365 * 86400),
    "end_grace": (0, 3600),
    "claim_lease": (5, 86400),
}


@dataclass(frozen=True)
class AlertSettings:
    webhooks: list[Webhook]
    rules: list[Rule] = field(default_factory=list)
    conditions: frozenset[str] = frozenset(CONDITIONS)
    dashboard_url: str | None = None
    queue_size: int = 1000
    timeout: float = 10.0
    retry_first: float = 1.0
    retry_cap: float = 300.0
    give_up_after: float = 86400.0
    stall_horizon: float = 86400.0
    end_grace: float = 10.0
    """Seconds an end the relay shows ``incomplete`` waits for the missing events before alerting."""
    claim_lease: float = 30.0
    """PostgreSQL: seconds without a heartbeat after which a relay's undelivered claims are
    sent by another (at least a few saves of ``FLUSH_EVERY``, 2 s, apart)."""

    @classmethod
    def build(cls, webhooks: list[str], rules: list[str], file: str | None) -> AlertSettings | None:
        """Flags and file together; None when no webhook is configured. ``ValueError`` names
        the flag or file key that is wrong (``fedrelay serve`` exits 2 with it)."""
        options: dict[str, Any] = {}
        urls = list(webhooks)
        texts = list(rules)
        if file is not None:
            loaded = _load(file)
            urls += _strings(loaded.pop("webhooks", []), "webhooks", file)
            texts += _strings(loaded.pop("rules", []), "rules", file)
            options = loaded
        if not urls:
            if texts or file is not None:
                raise ValueError(
                    "alert rules or --alerts given, but no webhook (--alert-webhook or 'webhooks')"
                )
            return None
        if len(urls) > MAX_WEBHOOKS or len(texts) > MAX_RULES:
            raise ValueError(f"at most {MAX_WEBHOOKS} alert webhooks and {MAX_RULES} alert rules")
        try:
            hooks = [Webhook.parse(url) for url in urls]
            parsed = [parse_rule(text) for text in texts]
        except (WebhookError, RuleError) as exc:
            raise ValueError(str(exc)) from None
        if len({hook.id for hook in hooks}) != len(hooks):
            raise ValueError("an alert webhook is given twice")
        hooks = _unique_labels(hooks)
        kwargs: dict[str, Any] = {}
        conditions = options.pop("on", None)
        if conditions is not None:
            names = _strings(conditions, "on", file)
            unknown = set(names) - set(CONDITIONS)
            if unknown:
                raise ValueError(
                    f"{file}: 'on' takes {', '.join(CONDITIONS)}, not {', '.join(sorted(unknown))}"
                )
            kwargs["conditions"] = frozenset(names)
        dashboard = options.pop("dashboard_url", None)
        if dashboard is not None:
            if not isinstance(dashboard, str) or not dashboard.startswith(("http://", "https://")):
                raise ValueError(f"{file}: dashboard_url must be an http:// or https:// URL")
            kwargs["dashboard_url"] = dashboard.rstrip("/")
        for name, (low, high) in _NUMBERS.items():
            if name not in options:
                continue
            value = options.pop(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"{file}: {name} must be a number from {low} to {high}, not {value!r}")
            if name == "queue_size" and not float(value).is_integer():
                raise ValueError(f"{file}: queue_size must be a whole number")
            kwargs[name] = int(value) if name == "queue_size" else float(value)
        if options:
            raise ValueError(f"{file}: unknown keys {', '.join(sorted(options))} (see docs/alerts.md)")
        return cls(hooks, parsed, **kwargs)


def _load(file: str) -> dict[str, Any]:
    try:
        with Path(file).expanduser().open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"--alerts {file}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--alerts {file}: not TOML ({exc})") from None


def _strings(value: Any, key: str, file: str | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{file}: {key} must be a list of strings")
    return value


def _unique_labels(hooks: list[Webhook]) -> list[Webhook]:
    """Two webhooks on one host (two Slack channels) get ``host#2``: metrics keep them apart."""
    seen: dict[str, int] = {}
    out = []
    for hook in hooks:
        count = seen[hook.label] = seen.get(hook.label, 0) + 1
        if count > 1:
            hook = Webhook(
                hook.url, hook.scheme, hook.host, hook.port, hook.target, f"{hook.label}#{count}", hook.id
            )
        out.append(hook)
    return out
