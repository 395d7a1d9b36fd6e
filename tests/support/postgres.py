"""A throwaway PostgreSQL server for tests and the bench, from Debian's binaries.

Its own data directory (initdb, trust auth), its own port on 127.0.0.1, never the machine's
server. ``stop()`` and ``start()`` let a test take the database away and bring it back. As root
(containers, CI) the server runs as the ``postgres`` user, since PostgreSQL refuses root; its
directory is then one of its own under /tmp (pytest's tmp dirs are private to root). The
binaries live in ``/usr/lib/postgresql/<version>/bin``, not on PATH (``make test`` installs the
package when they are missing).
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil

from tests.support.relay_process import free_port


def pg_bin() -> Path:
    """The directory of initdb/pg_ctl: Debian's newest ``/usr/lib/postgresql/<version>/bin``, or
    whatever is on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3].split(".")[0])
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path is None:
        raise RuntimeError("PostgreSQL server binaries not found: `make postgres` installs them")
    return Path(on_path).parent


class PgServer:
    """``PgServer(tmp_dir).start()``; ``url(dbname)``, ``fresh_db()``, ``stop()``, ``start()``,
    ``remove()``. ``settings`` are server settings (``-c``); fsync is off unless they say
    otherwise: tests crash relays and the server, not the machine."""

    def __init__(self, base: Path | None = None, *, settings: dict[str, str] | None = None) -> None:
        self.bin = pg_bin()
        self.as_user: str | None = None
        """The account the server runs as when the tests run as root."""
        if os.geteuid() == 0:
            self.as_user = "postgres"
            base = Path(tempfile.mkdtemp(prefix="fedrelay-pg-"))
            entry = pwd.getpwnam(self.as_user)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        elif base is None:
            base = Path(tempfile.mkdtemp(prefix="fedrelay-pg-"))
        self.base = base
        self.data = base / "pgdata"
        self.sockets = base / "pgsock"
        self.port = free_port()
        self.user = self.as_user or getpass.getuser()
        self.settings = {"fsync": "off", **(settings or {})}
        self._names = itertools.count(1)
        self._initialised = False

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> None:
        command = ["runuser", "-u", self.as_user, "--", *args] if self.as_user else list(args)
        done = subprocess.run(command, capture_output=True, env={**os.environ, "LC_ALL": "C"}, cwd=self.base)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")

    def start(self) -> PgServer:
        if not self._initialised:
            self._run("mkdir", "-p", str(self.sockets))
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user,
                "-E", "UTF8", "--no-sync",
            )  # fmt: skip
            self._initialised = True
        settings = "".join(f" -c {name}={value}" for name, value in self.settings.items())
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1{settings}"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.data.parent / "pg.log"),
            "-o", options, "-w", "-t", "30", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop if running and delete the data directory."""
        if self._initialised:
            with contextlib.suppress(RuntimeError):  # already stopped
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def fresh_db(self, prefix: str = "t") -> str:
        """A new, empty database on this server; returns its URL."""
        name = f"{prefix}{os.getpid()}_{next(self._names)}"
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, ...), for CPU meters; none
        while the server is down."""
        try:
            main = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))
            return [main.pid, *(child.pid for child in main.children(recursive=True))]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []
