"""A real ``haproxy`` process running ``deploy/haproxy.cfg`` in front of relay processes.

The configuration is the one docker-compose.yml mounts, with the relays' service addresses
(``relay-1:8765``) and the bind address replaced: nothing else changes, so what is tested is what
ships. Debian's ``haproxy`` package provides the binary (``make test`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.relay_process import free_port
from tests.support.waiting import wait_until

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"


def haproxy_binary() -> str:
    """The haproxy executable; fails (never skips) when it is missing."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail("these tests need HAProxy: make test installs it (apt-get install haproxy)")
    return found


def render(config: str, servers: dict[str, str], bind: str) -> str:
    """``config`` with each ``server NAME NAME:8765`` address and the ``bind`` line replaced."""
    for name, address in servers.items():
        config, count = re.subn(
            rf"(server {re.escape(name)} ){re.escape(name)}:8765\b", rf"\g<1>{address}", config
        )
        assert count, f"no server {name} in the configuration"
    config, count = re.subn(r"(?m)^(\s*bind )\S+", rf"\g<1>{bind}", config)
    assert count == 1, "one bind line expected"
    return config


class HaproxyProcess:
    """``haproxy -db`` (foreground) with a rendered copy of the shipped configuration."""

    def __init__(self, workdir: Path, servers: dict[str, str]) -> None:
        self.port = free_port()
        self.path = workdir / "haproxy.cfg"
        self.path.write_text(render(CONFIG.read_text(), servers, f"127.0.0.1:{self.port}"))
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HaproxyProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self.path)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._listening, 10, what="haproxy listening")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
