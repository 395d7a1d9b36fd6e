"""An alert as the JSON body a webhook gets (no I/O).

One body serves three kinds of receivers: Slack's incoming webhooks read ``text``
(mrkdwn: ``&``, ``<`` and ``>`` escaped, so a run's strings cannot become ``<!channel>``
or a link), Discord's read ``content`` (at most 2000 characters; ``allowed_mentions``
empty, so ``@everyone`` in an error message pings nobody), and a plain JSON receiver
reads the structured fields. Strings from events sit inside code spans, with backticks
replaced, so neither service formats them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from .engine import Alert

DISCORD_CONTENT_CHARS = 2000
_HEADLINES = {
    "failed": "failed",
    "stalled": "stalled",
    "ended": "ended",
    "rule": "rule holds",
}


def run_url(dashboard: str, run_id: str) -> str:
    """The run's page in the dashboard (run ids need no escaping: ``A-Z a-z 0-9 . _ : -``)."""
    return f"{dashboard.rstrip('/')}/#/runs/{run_id}"


def body(alert: Alert, *, dashboard: str, now: float | None = None) -> dict[str, Any]:
    """The JSON body: ``text`` and ``content`` for chat services, then the structured fields."""
    url = run_url(dashboard, alert.run_id)
    line = _sentence(alert)
    discord = f"**fedrelay** {line}\n{url}"
    return {
        "text": f"*fedrelay* {_slack_escape(line)}\n{_slack_escape(url)}",
        "content": discord[:DISCORD_CONTENT_CHARS],
        "allowed_mentions": {"parse": []},
        "alert": alert.alert,
        "id": alert.id,
        "run_id": alert.run_id,
        "status": alert.status,
        "rule": alert.rule,
        "metric": alert.metric,
        "value": alert.value,
        "round": alert.round,
        "epoch": alert.epoch,
        "seq": alert.seq,
        "detail": alert.detail,
        "experiment": alert.experiment,
        "url": url,
        "at": datetime.fromtimestamp(time.time() if now is None else now, UTC).isoformat(),
    }


def _sentence(alert: Alert) -> str:
    run = f"run {_code(alert.run_id)}"
    if alert.experiment:
        run += f" ({_code(alert.experiment[:80])})"
    if alert.alert == "rule":
        where = f" at round {alert.round}" if alert.round is not None else ""
        where = f" at epoch {alert.epoch}" if alert.epoch is not None else where
        return f"{run}: {_code(alert.rule or '')} holds: {alert.metric} = {alert.value:g}{where}"
    if alert.alert == "stalled":
        minutes = (alert.silent_for or 0) / 60
        text = f"{run} stalled: no event for {minutes:.1f} min (last seq {alert.seq})"
    elif alert.alert == "ended":
        text = f"{run} ended: {alert.status}"
    else:
        text = f"{run} {_HEADLINES.get(alert.alert, alert.alert)}"
    if alert.detail:
        text += f": {_code(alert.detail)}"
    return text


def _code(text: str) -> str:
    """A code span: Slack and Discord render its content as is (no mentions, no markup)."""
    cleaned = "".join(" " if ch in "\r\n\t" else ch for ch in text).replace("`", "'")
    return f"`{cleaned}`"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
