"""Relay events -> MLflow writes: params, metrics, tags, status. Pure: no MLflow, no I/O.

What goes where (docs/mlflow.md has the table):

- ``training_start``: params (the ``data`` flattened with dots, ``config.`` dropped), values as
  text capped at MLflow's 6000 characters, at most ``MAX_PARAMS`` per run;
- ``round_end``: ``fit.<k>``, ``eval.<k>``, ``server.<k>`` with the round as step, and
  ``round.duration``/``round.failures``; ``status`` with ``server_metrics`` (the initial
  evaluation): ``server.<k>`` at its round (0);
- ``epoch_end``: its metrics under their own names (validation phases prefixed as the dashboard
  does) with the epoch as step;
- ``client_complete``: per client, ``fit.<k>`` (train phase) or ``eval.<k>`` (evaluate) with the
  round as step, in the client's child run (``clients="runs"``), or in the parent as
  ``client/<id>/fit.<k>`` (``clients="keys"``), or not at all (``"off"``);
- ``error``: ``fedrelay.errors`` (count) and ``fedrelay.last_error`` tags, on the client's child
  run too; ``early_stopping``: ``fedrelay.early_stopping.*`` tags;
- ``training_end``: ``fedrelay.best_*`` tags and the run's status: completed -> FINISHED,
  failed -> FAILED, stopped -> FINISHED after an ``early_stopping`` event, KILLED otherwise.

Every metric point carries the event's own timestamp (ms), so writing the same event twice
writes an identical point, which MLflow's SQL store drops (its primary key is key, timestamp,
step, value): that is what makes a replay after a crash harmless.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..export import flatten

CURSOR_TAG = "fedrelay.seq"
"""The last relay seq recorded, written after (never with or before) the points of its events."""
RUN_TAG = "fedrelay.run_id"
KIND_TAG = "fedrelay.kind"
CLIENT_TAG = "fedrelay.client_id"
RELAY_TAG = "fedrelay.relay"
ERRORS_TAG = "fedrelay.errors"
LAST_ERROR_TAG = "fedrelay.last_error"
EARLY_STOPPED_TAG = "fedrelay.early_stopping.epoch"
STATUS_TAG = "fedrelay.status"
PARENT_TAG = "mlflow.parentRunId"

MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS = 1000
"""Params per run; a config with more keys keeps the first ones (``fedrelay.params_dropped``)."""
MAX_ERROR_TEXT = 500
CLIENT_MODES = ("runs", "keys", "off")

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")
_SUMMARY_FIELDS = ("training_duration", "rounds_completed", "epochs_completed")
_PHASES = {"train": "fit", "fit": "fit", "evaluate": "eval", "eval": "eval"}
_PHASE_PREFIX = re.compile(r"^(train|training|fit|val|valid|validation|eval|evaluate|test)[_/.-]", re.I)


def mlflow_key(name: str) -> str:
    """A valid MLflow metric/param/tag key: other characters become ``_``, no empty or ``..`` parts."""
    cleaned = _BAD_KEY_CHARS.sub("_", str(name))
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    return key[:MAX_KEY].rstrip("/")


def timestamp_ms(event: dict[str, Any]) -> int:
    """The event's own time in ms (stable across replays; the relay stamps it when absent)."""
    stamp = event.get("timestamp")
    if isinstance(stamp, str):
        try:
            return int(datetime.fromisoformat(stamp).timestamp() * 1000)
        except ValueError:
            pass
    return 0


def param_text(value: Any) -> str:
    """A param value as MLflow stores it: text, at most 6000 characters (cut ones end in ``…``)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        text = json.dumps(value, default=str, separators=(",", ":"))
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - 1] + "…"
    return text


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class Point:
    key: str
    value: float
    timestamp: int
    step: int


@dataclass
class RunState:
    """What the bridge knows of one relay run's MLflow record (rebuilt from its tags on restart)."""

    relay_run_id: str
    mlflow_run_id: str | None = None
    cursor: int = 0
    params: dict[str, str] = field(default_factory=dict)
    children: dict[str, str] = field(default_factory=dict)
    """client id (as text) -> child MLflow run id."""
    errors: int = 0
    early_stopped: bool = False
    status: str | None = None
    """MLflow status once a ``training_end`` was recorded."""


@dataclass
class Writes:
    """What a batch of events asks of MLflow, in the order the sink must apply it."""

    experiment_name: str | None = None
    start_ms: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    param_conflicts: list[str] = field(default_factory=list)
    params_dropped: int = 0
    metrics: list[Point] = field(default_factory=list)
    client_metrics: dict[str, list[Point]] = field(default_factory=dict)
    client_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    client_start_ms: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    terminate: tuple[str, int] | None = None
    """(MLflow status, end time in ms) from ``training_end``."""
    cursor: int | None = None


def _add_metrics(out: list[Point], metrics: Any, prefix: str, ts: int, step: int) -> None:
    if not isinstance(metrics, dict):
        return
    for name, raw in metrics.items():
        value = _number(raw)
        if value is not None:
            out.append(Point(mlflow_key(f"{prefix}{name}"), value, ts, step))


def _client_id(event: dict[str, Any]) -> str | None:
    data = event.get("data") or {}
    client = data.get("client_id")
    if client is None:
        client = (event.get("source") or {}).get("client_id")
    return None if client is None else str(client)


def final_status(status: Any, early_stopped: bool) -> str:
    """The relay's ``training_end.status`` as an MLflow run status."""
    if status == "failed":
        return "FAILED"
    if status == "stopped":
        return "FINISHED" if early_stopped else "KILLED"
    return "FINISHED"


def translate(events: list[dict[str, Any]], state: RunState, *, clients: str = "runs") -> Writes:
    """The MLflow writes for consecutive events of one run; updates ``state`` as if applied."""
    writes = Writes()
    for event in events:
        _translate_one(event, state, writes, clients)
        seq = event.get("seq")
        if isinstance(seq, int):
            writes.cursor = seq
    if writes.cursor is not None:
        writes.tags[CURSOR_TAG] = str(writes.cursor)
        state.cursor = writes.cursor
    return writes


def _translate_one(event: dict[str, Any], state: RunState, writes: Writes, clients: str) -> None:
    kind = event.get("type")
    data = event.get("data") or {}
    if not isinstance(data, dict):
        return
    ts = timestamp_ms(event)
    if writes.start_ms is None:
        writes.start_ms = ts
    if kind == "training_start":
        if isinstance(data.get("experiment_name"), str) and writes.experiment_name is None:
            writes.experiment_name = data["experiment_name"]
        _params(data, state, writes)
    elif kind == "round_end":
        step = data.get("round") if isinstance(data.get("round"), int) else 0
        _add_metrics(writes.metrics, data.get("fit_metrics"), "fit.", ts, step)
        _add_metrics(writes.metrics, data.get("eval_metrics"), "eval.", ts, step)
        _add_metrics(writes.metrics, data.get("server_metrics"), "server.", ts, step)
        extra = {"duration": data.get("duration"), "failures": data.get("num_failures")}
        _add_metrics(writes.metrics, extra, "round.", ts, step)
    elif kind == "status" and isinstance(data.get("server_metrics"), dict):
        step = data.get("round") if isinstance(data.get("round"), int) else 0
        _add_metrics(writes.metrics, data["server_metrics"], "server.", ts, step)
    elif kind == "epoch_end":
        step = data.get("epoch") if isinstance(data.get("epoch"), int) else 0
        phase = data.get("phase")
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        if isinstance(phase, str) and phase != "train":
            metrics = {(k if _PHASE_PREFIX.match(k) else f"{phase}_{k}"): v for k, v in metrics.items()}
        _add_metrics(writes.metrics, metrics, "", ts, step)
    elif kind == "client_complete" and clients != "off":
        client = _client_id(event)
        if client is None:
            return
        phase = data.get("phase")
        prefix = f"{_PHASES.get(phase, phase)}." if isinstance(phase, str) and phase else ""
        step = data.get("round") if isinstance(data.get("round"), int) else 0
        if clients == "keys":
            _add_metrics(writes.metrics, data.get("metrics"), f"client/{client}/{prefix}", ts, step)
        else:
            writes.client_start_ms.setdefault(client, ts)
            _add_metrics(writes.client_metrics.setdefault(client, []), data.get("metrics"), prefix, ts, step)
    elif kind == "error":
        state.errors += 1
        message = str(data.get("message", ""))[:MAX_ERROR_TEXT]
        writes.tags[ERRORS_TAG] = str(state.errors)
        writes.tags[LAST_ERROR_TAG] = message
        client = _client_id(event) if (event.get("source") or {}).get("role") == "client" else None
        if client is not None and clients == "runs":
            writes.client_start_ms.setdefault(client, ts)
            writes.client_tags.setdefault(client, {})[LAST_ERROR_TAG] = message
    elif kind == "early_stopping":
        state.early_stopped = True
        for name in ("epoch", "metric_name", "best_metric_value", "patience", "reason"):
            if data.get(name) is not None:
                writes.tags[f"fedrelay.early_stopping.{name}"] = param_text(data[name])[:MAX_TAG_VALUE]
        writes.tags.setdefault(EARLY_STOPPED_TAG, "?")
    elif kind == "training_end":
        status = final_status(data.get("status", "completed"), state.early_stopped)
        state.status = status
        writes.terminate = (status, ts)
        writes.tags[STATUS_TAG] = str(data.get("status", "completed"))
        for name, value in data.items():
            summary = name.startswith("best_") or name in _SUMMARY_FIELDS
            if summary and value is not None and not isinstance(value, dict | list):
                writes.tags[f"fedrelay.{name}"] = param_text(value)[:MAX_TAG_VALUE]


def _params(data: dict[str, Any], state: RunState, writes: Writes) -> None:
    own = {k: v for k, v in data.items() if k != "config"}
    flat = flatten(own, "", {}) if own else {}
    config = data.get("config")
    if isinstance(config, dict) and config:
        flat = {**flatten(config, "", {}), **flat}  # the event's own fields win over config keys
    for name, value in flat.items():
        key = mlflow_key(name)
        text = param_text(value)
        known = state.params.get(key, writes.params.get(key))
        if known is not None:
            if known != text:
                writes.param_conflicts.append(key)  # MLflow refuses to change a param
            continue
        if len(state.params) + len(writes.params) >= MAX_PARAMS:
            writes.params_dropped += 1
            continue
        writes.params[key] = text
    state.params.update(writes.params)
    if writes.params_dropped:
        writes.tags["fedrelay.params_dropped"] = str(writes.params_dropped)


def restore_state(
    relay_run_id: str, mlflow_run_id: str, tags: dict[str, str], params: dict[str, str]
) -> RunState:
    """A :class:`RunState` from what the MLflow run holds (after a restart of the bridge)."""
    state = RunState(relay_run_id, mlflow_run_id, params=dict(params))
    try:
        state.cursor = int(tags.get(CURSOR_TAG, "0"))
    except ValueError:
        state.cursor = 0
    try:
        state.errors = int(tags.get(ERRORS_TAG, "0"))
    except ValueError:
        state.errors = 0
    state.early_stopped = EARLY_STOPPED_TAG in tags
    status = tags.get(STATUS_TAG)
    state.status = final_status(status, state.early_stopped) if status else None
    return state
