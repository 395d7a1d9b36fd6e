"""A real ``fedrelay serve`` process for tests: start, wait, kill, restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from tests.support.waiting import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RelayProcess:
    """``python -m fedrelay serve`` on a free port with a SQLite file, or on a PostgreSQL
    database (``db`` a ``postgresql://`` URL; the log then goes to ``log_dir``)."""

    def __init__(
        self,
        db: Path | str,
        *,
        port: int | None = None,
        args: list[str] = (),
        env=None,
        preexec_fn=None,
        hosts: list[str] | None = ("127.0.0.1",),
        ca_file: Path | str | None = None,
        log_dir: Path | str | None = None,
    ):
        self.db = str(db)
        self.hosts = list(hosts) if hosts is not None else None
        """``--host`` values; None: the relay's default (127.0.0.1 and ::1)."""
        self.ssl_context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        """Set for a relay given ``--certfile``: the test CA that signed it; URLs are then wss/https."""
        self.preexec_fn = preexec_fn
        """Runs in the child before exec: e.g. resource limits for disk-full tests."""
        self.port = port or free_port()
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        if self.db.startswith(("postgresql://", "postgres://")):
            where = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="fedrelay-relay-"))
            self.log_path: Path | None = where / f"relay.{self.port}.log"
        else:
            self.log_path = Path(str(db) + f".{self.port}.log") if self.db != ":memory:" else None

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl_context else 'ws'}://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> RelayProcess:
        hosts = [arg for host in self.hosts or () for arg in ("--host", host)]
        cmd = [
            sys.executable, "-m", "fedrelay", "serve",
            *hosts, "--port", str(self.port), "--db", self.db,
            "--log-level", "warning", *self.args,
        ]  # fmt: skip
        if self.log_path:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=self.preexec_fn
                )
        else:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=self.preexec_fn,
            )
        wait_until(self._healthy, timeout, what=f"relay on port {self.port}")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.log()}")
        try:
            return self.get("/healthz")[0] in (200, 503)
        except OSError:
            return False

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.http + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.ssl_context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str, headers: dict[str, str] | None = None):
        status, body = self.get(path, headers)
        return status, json.loads(body)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""
