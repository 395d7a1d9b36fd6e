"""Apply :class:`~fedrelay.bridge.mlflow_map.Writes` to an MLflow tracking server, in an order that
makes a crash at any point harmless, retrying while the server is away.

Why the order, and not a transaction: MLflow 3.17's SQL store commits a ``log_batch`` in three
transactions (params, then metrics, then tags: ``SqlAlchemyStore.log_batch`` calls
``_log_params``, ``_log_metrics``, ``_set_tags``, each in its own session), and the client splits
a batch over 1000 entities into several requests with the tags in the first. So the bridge sends
at most ``CHUNK`` metrics per call, the child runs' points first, then the parent's, then the
status, and the cursor tag (the last seq recorded) in the very last call. A crash before that
call leaves the cursor behind the points; the restarted bridge writes those events again, and
MLflow drops the identical points (same key, timestamp, step, value: the metrics table's
primary key). Params and tags are idempotent by nature; runs are found by tag before any is
created.

Errors: a server that does not answer, answers 5xx or 429 is waited for (capped backoff, logged
once per outage); other refusals (4xx) are logged and that write is skipped, so one bad value
cannot stop a run's recording.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .mlflow_map import (
    CLIENT_TAG,
    KIND_TAG,
    PARENT_TAG,
    RELAY_TAG,
    RUN_TAG,
    Point,
    RunState,
    Writes,
    restore_state,
)

log = logging.getLogger("fedrelay.bridge")

CHUNK = 500
"""Metrics per ``log_batch`` call: under MLflow's 1000, so the client never splits one."""
DEFAULT_EXPERIMENT = "fedrelay"
T = TypeVar("T")


class Stopped(Exception):
    """The bridge is stopping: give up the write in progress (its cursor is not advanced)."""


def transient(exc: BaseException) -> bool:
    """Worth waiting for: the server is away or overloaded, not refusing what we sent."""
    status = getattr(exc, "get_http_status_code", None)
    if callable(status):
        try:
            code = int(status())
        except Exception:
            return True
        return code >= 500 or code == 429
    return True  # connection refused, timeouts, database locked: all go away by themselves


class MlflowSink:
    """One MLflow tracking URI; every method blocks (run it in a thread) and retries as above."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str | None = None,
        relay: str = "",
        clients: str = "runs",
        stopping: threading.Event | None = None,
        max_backoff: float = 10.0,
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.relay = relay
        self.clients = clients
        self.stopping = stopping or threading.Event()
        self.max_backoff = max_backoff
        self._experiments: dict[str, str] = {}
        self._down_since: float | None = None
        self.stats = dict.fromkeys(("batches", "points", "retries", "skipped", "runs_created"), 0)

    # -- retries -----------------------------------------------------------------------------------

    def call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        recover: Callable[[], T | None] | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)``, retried while MLflow is away; raises permanent errors.

        ``recover``, for calls that are not idempotent (creating a run), is asked before each
        retry whether the failed call took effect after all (its answer lost): if it returns
        something, that is the result.
        """
        delay = 0.25
        attempt = 0
        while True:
            if self.stopping.is_set():
                raise Stopped
            try:
                if attempt and recover is not None:
                    found = recover()
                    if found is not None:
                        result = found
                        break
                attempt += 1
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not transient(exc):
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "MLflow at %s unavailable (%s: %s); retrying", self.tracking_uri, what, _short(exc)
                    )
                self.stats["retries"] += 1
                if self.stopping.wait(delay * (0.5 + random.random() / 2)):
                    raise Stopped from None
                delay = min(self.max_backoff, delay * 2)
                continue
            break
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            log.warning("MLflow at %s is back after %.1fs", self.tracking_uri, down)
            self._down_since = None
        return result

    def _skip(self, what: str, exc: Exception) -> None:
        self.stats["skipped"] += 1
        log.error("MLflow refused %s, skipped: %s", what, _short(exc))

    # -- finding runs ------------------------------------------------------------------------------

    def _experiment_ids(self) -> list[str]:
        if self.experiment is not None:
            experiment = self.call("get experiment", self.client.get_experiment_by_name, self.experiment)
            return [experiment.experiment_id] if experiment is not None else []
        ids: list[str] = []
        token = None
        while True:
            page = self.call(
                "list experiments", self.client.search_experiments, max_results=1000, page_token=token
            )
            ids.extend(e.experiment_id for e in page)
            token = page.token
            if not token:
                return ids

    def _search(self, filter_string: str, experiment_ids: list[str] | None = None) -> list[Any]:
        ids = experiment_ids if experiment_ids is not None else self._experiment_ids()
        if not ids:
            return []
        runs: list[Any] = []
        token = None
        while True:
            page = self.call(
                "search runs",
                self.client.search_runs,
                ids,
                filter_string=filter_string,
                max_results=1000,
                page_token=token,
                order_by=["attributes.start_time ASC"],
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def known_runs(self) -> dict[str, int]:
        """relay run id -> cursor, for every run bridged before (one search, at start)."""
        out: dict[str, int] = {}
        for run in self._search(f"tags.`{KIND_TAG}` = 'run'"):
            relay_run = run.data.tags.get(RUN_TAG)
            if relay_run is not None:
                cursor = restore_state(relay_run, run.info.run_id, run.data.tags, {}).cursor
                out[relay_run] = max(cursor, out.get(relay_run, 0))
        return out

    def load(self, relay_run_id: str) -> RunState:
        """The MLflow record of a relay run, or a fresh state (its run is created at the first write)."""
        runs = self._search(f"tags.`{RUN_TAG}` = '{_quote(relay_run_id)}' and tags.`{KIND_TAG}` = 'run'")
        if not runs:
            return RunState(relay_run_id)
        # Two records of one run can only come from a create whose answer was lost: keep the one
        # that got furthest (the other has no points, its creator never learnt its id).
        best = max(runs, key=lambda r: restore_state(relay_run_id, r.info.run_id, r.data.tags, {}).cursor)
        state = restore_state(relay_run_id, best.info.run_id, best.data.tags, best.data.params)
        for child in self._search(
            f"tags.`{PARENT_TAG}` = '{best.info.run_id}' and tags.`{KIND_TAG}` = 'client'",
            [best.info.experiment_id],
        ):
            client = child.data.tags.get(CLIENT_TAG)
            if client is not None:
                state.children.setdefault(client, child.info.run_id)
        return state

    def _experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        experiment = self.call("get experiment", self.client.get_experiment_by_name, name)
        if experiment is None:
            try:
                experiment_id = self.call("create experiment", self.client.create_experiment, name)
            except Exception:  # created meanwhile (another bridge, or our lost answer)
                experiment = self.call("get experiment", self.client.get_experiment_by_name, name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        self._experiments[name] = experiment_id
        return experiment_id

    def _create(
        self, experiment_id: str, tags: dict[str, str], name: str, start_ms: int | None, find: str
    ) -> str:
        """Create a run, unless a lost answer already did: then find it by its tags."""

        def created() -> str | None:
            found = self._search(find, [experiment_id])
            return found[0].info.run_id if found else None

        run_id = self.call(
            "create run",
            lambda: (
                self.client.create_run(
                    experiment_id, start_time=start_ms or None, tags=tags, run_name=name
                ).info.run_id
            ),
            recover=created,
        )
        self.stats["runs_created"] += 1
        return run_id

    def _parent(self, state: RunState, writes: Writes) -> str:
        if state.mlflow_run_id is None:
            name = self.experiment or writes.experiment_name or DEFAULT_EXPERIMENT
            tags = {RUN_TAG: state.relay_run_id, KIND_TAG: "run", RELAY_TAG: self.relay}
            find = f"tags.`{RUN_TAG}` = '{_quote(state.relay_run_id)}' and tags.`{KIND_TAG}` = 'run'"
            state.mlflow_run_id = self._create(
                self._experiment_id(name), tags, state.relay_run_id, writes.start_ms, find
            )
        return state.mlflow_run_id

    def _child(self, state: RunState, parent: str, client: str, start_ms: int | None) -> str:
        child = state.children.get(client)
        if child is None:
            experiment_id = self.call("get run", self.client.get_run, parent).info.experiment_id
            tags = {
                RUN_TAG: state.relay_run_id,
                KIND_TAG: "client",
                CLIENT_TAG: client,
                PARENT_TAG: parent,
            }
            find = f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{CLIENT_TAG}` = '{_quote(client)}'"
            child = self._create(experiment_id, tags, f"client {client}", start_ms, find)
            state.children[client] = child
        return child

    # -- writing -----------------------------------------------------------------------------------

    def apply(self, state: RunState, writes: Writes) -> None:
        """Children's points and tags, the parent's params and points, the status, then the cursor."""
        from mlflow.entities import Param

        parent = self._parent(state, writes)
        for client in sorted(set(writes.client_metrics) | set(writes.client_tags)):
            child = self._child(state, parent, client, writes.client_start_ms.get(client))
            self._log(child, writes.client_metrics.get(client, []), writes.client_tags.get(client, {}))
        if writes.param_conflicts:
            log.warning(
                "run %s: params %s changed values; MLflow keeps the first ones",
                state.relay_run_id,
                ", ".join(writes.param_conflicts[:10]),
            )
        params = [Param(k, v) for k, v in writes.params.items()]
        for i in range(0, len(params), 100):
            self._batch(parent, [], params[i : i + 100], [], "params")
        if writes.terminate is None:
            self._log(parent, writes.metrics, writes.tags)
            return
        self._log(parent, writes.metrics, {})
        status, end_ms = writes.terminate
        for run_id in (parent, *state.children.values()):
            try:
                self.call("set status", self.client.set_terminated, run_id, status, end_time=end_ms or None)
            except Stopped:
                raise
            except Exception as exc:
                self._skip(f"the status of MLflow run {run_id}", exc)
        self._log(parent, [], writes.tags)

    def _log(self, run_id: str, points: list[Point], tags: dict[str, str]) -> None:
        """Points in chunks, the tags with the last chunk (so they commit after every point)."""
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(p.key, p.value, p.timestamp, p.step) for p in points]
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        chunks = [metrics[i : i + CHUNK] for i in range(0, len(metrics), CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            self._batch(run_id, chunk, [], tag_list if i == len(chunks) - 1 else [], "points")
        self.stats["points"] += len(metrics)

    def _batch(self, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any], what: str) -> None:
        if not (metrics or params or tags):
            return
        try:
            self.call("log batch", self.client.log_batch, run_id, metrics=metrics, params=params, tags=tags)
            self.stats["batches"] += 1
        except Stopped:
            raise
        except Exception as exc:
            self._skip(f"{what} of MLflow run {run_id}", exc)


def _quote(value: str) -> str:
    """A value inside MLflow's single-quoted filter strings."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
