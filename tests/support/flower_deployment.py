"""Flower's Deployment Engine for tests: a SuperLink, SuperNodes and ``flwr run`` on the example
app, every process stopped by PID (with the children Flower spawns), optionally in network
namespaces.

Each test gets its own ``FLWR_HOME``, spool dirs and ports; nothing is looked up by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

import fedrelay

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flwr-quickstart"
BIN = Path(sys.executable).parent
"""Where this interpreter's ``flwr``, ``flower-superlink`` and ``flower-supernode`` live."""
SRC = Path(fedrelay.__file__).resolve().parents[1]
"""The fedrelay under test: every Flower process imports it from here."""
LOCAL_EPOCHS = 2
"""The example's ``local-epochs``: one ``client_progress`` per local epoch."""


def events_per_run(rounds: int, clients: int) -> int:
    """training_start and training_end; per round round_start and round_end; per client and
    round: train (started, one per local epoch, client_complete) and evaluate (started, complete)."""
    return 2 + rounds * (2 + clients * (2 + LOCAL_EPOCHS + 2))


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for Flower's processes: its own FLWR_HOME, no telemetry, no relay settings
    inherited from the test's environment (the run config must carry them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDRELAY_", "FLWR_"))}
    env.pop("SSL_CERT_FILE", None)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONPATH=os.pathsep.join(
            dict.fromkeys([str(SRC), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
        ),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    env.update(extra)
    return env


def copy_app(tmp_path: Path) -> Path:
    """The example app in a scratch dir: Flower may rewrite an app's pyproject.toml."""
    target = tmp_path / "app"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("__pycache__", "*.fab"))
    return target


def write_connection(home: Path, name: str, address: str) -> None:
    """``[superlink.NAME]`` in FLWR_HOME/config.toml: where ``flwr run . NAME`` submits runs."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    )


def run_config_args(values: Mapping[str, str | int]) -> list[str]:
    """``--run-config key=value`` per key, strings as TOML literal strings."""
    args: list[str] = []
    for key, value in values.items():
        text = str(value) if isinstance(value, int) else f"'{value}'"
        args += ["--run-config", f"{key}={text}"]
    return args


def in_netns(netns: str | None, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


class Processes:
    """Processes a test started (or found, like ``flwr run``'s detached SuperLink), stopped at the
    end with every descendant, by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str], netns: str | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(in_netns(netns, cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started.append(proc)
        self.pids.append(proc.pid)
        return proc

    def adopt(self, pid: int) -> None:
        """Stop this process too: one the test did not start but caused."""
        self.pids.append(pid)

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM to each process and the children Flower spawned (SuperExec, ServerApp,
        ClientApps), SIGKILL to what is left after 10 s; reaps what it started."""
        doomed: list[psutil.Process] = []
        for pid in reversed(self.pids):
            doomed += descendants_and_self(pid)
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(doomed, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.started.clear()
        self.pids.clear()


def descendants_and_self(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except psutil.Error:
        return []


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections there (from this network namespace)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def listener_pid(port: int) -> int | None:
    """The process listening on a local TCP port (``flwr run``'s detached SuperLink)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def flower_cmd(tool: str, *args: str) -> list[str]:
    return [str(BIN / tool), *args]


def check_stream(events: list[dict], rounds: int, clients: int) -> str:
    """One run, every expected event exactly once, rounds in order; returns the run id."""
    from collections import Counter

    assert len(events) == events_per_run(rounds, clients), Counter(e["type"] for e in events)
    (run_id,) = {e["run_id"] for e in events}
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    keys = [(e["producer"], e["id"]) for e in events]
    assert len(set(keys)) == len(keys), [k for k, n in Counter(keys).items() if n > 1]
    server = [(e["type"], e["data"].get("round")) for e in events if e["source"]["role"] == "server"]
    assert server == [
        ("training_start", None),
        *[(kind, r) for r in range(1, rounds + 1) for kind in ("round_start", "round_end")],
        ("training_end", None),
    ]
    for r in range(1, rounds + 1):
        begin = next(e["seq"] for e in events if e["type"] == "round_start" and e["data"]["round"] == r)
        (end,) = [e for e in events if e["type"] == "round_end" and e["data"]["round"] == r]
        assert len(end["data"]["participating_clients"]) == clients
        for phase in ("train", "evaluate"):
            done = [e for e in events if e["type"] == "client_complete" and e["data"]["round"] == r
                    and e["data"]["phase"] == phase]  # fmt: skip
            assert sorted(e["data"]["client_id"] for e in done) == list(range(clients)), (r, phase)
            # The mod flushes before the reply leaves: a client's events sit inside their round.
            assert all(begin < e["seq"] < end["seq"] for e in done), (r, phase)
        epochs = [e for e in events if e["type"] == "client_progress" and e["data"]["round"] == r
                  and "local_epoch" in e["data"]]  # fmt: skip
        assert sorted(e["data"]["local_epoch"] for e in epochs) == sorted(
            list(range(1, LOCAL_EPOCHS + 1)) * clients
        )
    assert events[-1]["type"] == "training_end" and events[-1]["data"]["status"] == "completed"
    return run_id


__all__ = [
    "EXAMPLE",
    "Processes",
    "check_stream",
    "copy_app",
    "events_per_run",
    "flower_cmd",
    "flower_env",
    "listener_pid",
    "listening",
    "run_config_args",
    "write_connection",
]
