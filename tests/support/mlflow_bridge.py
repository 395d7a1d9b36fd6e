"""A real MLflow tracking server and a real ``fedrelay bridge mlflow`` process for tests, and what
MLflow should hold for a run, computed from the relay's events independently of the bridge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.support.relay_process import free_port
from tests.support.waiting import wait_until


class MlflowServer:
    """``mlflow server`` with a SQLite backend in its own directory; restartable on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "mlflow-server.log"
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--default-artifact-root", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "ab") as log:
            # Its own process group: the server runs uvicorn in a child, stopped together.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_until(self._healthy, timeout, interval=0.1, what=f"mlflow server on port {self.port}")
        self.starts += 1
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log()}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        wait_until(lambda: not self._answers(), 30, what="the mlflow server's workers to exit")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


class BridgeProcess:
    """``python -m fedrelay bridge mlflow ...`` writing to its own log file."""

    def __init__(self, relay_url: str, tracking_uri: str, *args: str, log_path: Path) -> None:
        self.cmd = [
            sys.executable, "-m", "fedrelay", "bridge", "mlflow", *args,
            "--url", relay_url, "--tracking-uri", tracking_uri,
        ]  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """kill -9: no chance to finish a write."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=20)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- what MLflow must hold -----------------------------------------------------------------------

Series = dict[str, list[tuple[int, float]]]
"""metric key -> [(step, value)], in step order."""

PHASE_KEYS = {"train": "fit", "evaluate": "eval"}


def _numbers(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def expected_run(events: list[dict[str, Any]]) -> tuple[Series, dict[str, Series]]:
    """(the parent run's series, each client's series) a run's stored events must give, each
    point once: rounds (or epochs) as steps, fit./eval./server. keys, clients by their id."""
    parent: dict[str, list[tuple[int, float]]] = defaultdict(list)
    clients: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        d = e["data"]
        if e["type"] == "round_end":
            for source, field in (
                ("fit", "fit_metrics"),
                ("eval", "eval_metrics"),
                ("server", "server_metrics"),
            ):
                for key, value in _numbers(d.get(field)).items():
                    parent[f"{source}.{key}"].append((d["round"], value))
            for key, field in (("round.duration", "duration"), ("round.failures", "num_failures")):
                if isinstance(d.get(field), int | float):
                    parent[key].append((d["round"], float(d[field])))
        elif e["type"] == "status" and isinstance(d.get("server_metrics"), dict):
            for key, value in _numbers(d["server_metrics"]).items():
                parent[f"server.{key}"].append((d.get("round", 0), value))
        elif e["type"] == "epoch_end":
            for key, value in _numbers(d.get("metrics")).items():
                parent[key].append((d["epoch"], value))
        elif e["type"] == "client_complete":
            phase = PHASE_KEYS[d["phase"]]
            for key, value in _numbers(d.get("metrics")).items():
                clients[str(d["client_id"])][f"{phase}.{key}"].append((d["round"], value))
    return (
        {k: sorted(v) for k, v in parent.items()},
        {c: {k: sorted(v) for k, v in s.items()} for c, s in clients.items()},
    )


def recorded_series(client: Any, run_id: str) -> Series:
    """Every metric of an MLflow run with its full history, in step order."""
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def find_runs(client: Any, experiment: str, relay_run_id: str) -> tuple[Any, dict[str, Any]]:
    """(the parent MLflow run of a relay run, its child runs by client id)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`fedrelay.run_id` = '{relay_run_id}'")
    (parent,) = [r for r in runs if r.data.tags.get("fedrelay.kind") == "run"]
    children = {
        r.data.tags["fedrelay.client_id"]: r for r in runs if r.data.tags.get("fedrelay.kind") == "client"
    }
    return parent, children
