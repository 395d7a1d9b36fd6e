"""A PostgreSQL server of the test's own: Debian's binaries, a throwaway data directory, a free port.

Never the machine's server (5432): tests stop, kill and restart this one. The binaries live in
``/usr/lib/postgresql/<version>/bin`` (not on PATH; ``make test`` installs the package when they
are missing). PostgreSQL refuses to run as root, so under root (CI, the dev machines) the server
runs as the ``postgres`` user the package creates, with its data directory owned by that user
outside pytest's root-only temp tree.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from itertools import count
from pathlib import Path

import psutil

from tests.support.relay_process import free_port
from tests.support.waiting import wait_until

USER = "fedrelay"
"""The superuser initdb creates; relays connect as it (trust auth, 127.0.0.1 only)."""


def pg_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin``, else the directory of ``pg_ctl`` on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3].split(".")[0])
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres") or shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    raise RuntimeError("PostgreSQL's binaries are missing: `make postgres` installs Debian's package")


def _as_owner() -> tuple[Callable[[], None] | None, int | None]:
    """Under root: a preexec_fn that becomes the ``postgres`` user, and its uid (to chown with)."""
    if os.geteuid() != 0:
        return None, None
    owner = pwd.getpwnam("postgres")

    def drop() -> None:
        os.setgroups([])
        os.setgid(owner.pw_gid)
        os.setuid(owner.pw_uid)

    return drop, owner.pw_uid


class PgServer:
    """``postgres`` on 127.0.0.1:``port`` with its own data directory; ``stop()``/``start()`` keep
    the data, ``kill()`` is a crash (SIGKILL), ``close()`` removes everything."""

    def __init__(self, *, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self.bin = pg_bin_dir()
        self.port = port or free_port()
        self.settings = {"fsync": "off", "max_connections": "200", **(settings or {})}
        """Server settings (``-c``); fsync off by default: tests crash relays, not the machine."""
        self._preexec, uid = _as_owner()
        self.base = Path(tempfile.mkdtemp(prefix="fedrelay-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        if uid is not None:
            os.chown(self.base, uid, -1)
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = count(1)

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=self._preexec,
            cwd=self.base,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 30.0) -> PgServer:
        """Start the server (initdb the first time) and wait until it accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        settings = [a for name, value in self.settings.items() for a in ("-c", f"{name}={value}")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.base}",
                 *settings],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._preexec, cwd=self.base,
            )  # fmt: skip
        wait_until(self.ready, timeout, interval=0.05, what=f"PostgreSQL on port {self.port}")
        return self

    def ready(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log()}")
        checked = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER],
            timeout=10,
        )
        return checked.returncode == 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): sessions are cut, the data is kept."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout)

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster (its backends exit when they notice); WAL recovery
        at the next start."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(30)

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, ...): for CPU meters."""
        if not self.running:
            return []
        assert self.proc is not None
        main = psutil.Process(self.proc.pid)
        return [main.pid, *(child.pid for child in main.children(recursive=True))]

    def fresh_db(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the server and remove its data directory."""
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
