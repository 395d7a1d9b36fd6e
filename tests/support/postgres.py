"""A throwaway PostgreSQL server for tests, from Debian's binaries (``postgresql-15``).

Its own data directory (initdb, trust auth), its own port on 127.0.0.1, never the machine's
server. ``stop()`` and ``start()`` let a test take the database away and bring it back. As root
(containers, CI) the server runs as the ``postgres`` user, since PostgreSQL refuses root; its
directory is then one of its own under /tmp (pytest's tmp dirs are private to root).
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

from tests.support.relay_process import free_port

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin")]


def pg_bin() -> Path:
    """The directory of initdb/pg_ctl: Debian's, or whatever is on PATH."""
    for directory in BIN_DIRS:
        if (directory / "pg_ctl").exists():
            return directory
    found = shutil.which("pg_ctl")
    if found is None:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    return Path(found).parent


class PgServer:
    """``PgServer(tmp_dir).start()``; ``url(dbname)``, ``fresh_db()``, ``stop()``, ``start()``."""

    def __init__(self, base: Path) -> None:
        self.bin = pg_bin()
        self.as_user: str | None = None
        """The account the server runs as when the tests run as root."""
        if os.geteuid() == 0:
            self.as_user = "postgres"
            base = Path(tempfile.mkdtemp(prefix="fedrelay-pg-"))
            entry = pwd.getpwnam(self.as_user)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        self.base = base
        self.data = base / "pgdata"
        self.sockets = base / "pgsock"
        self.port = free_port()
        self.user = self.as_user or getpass.getuser()
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
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
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

    def fresh_db(self) -> str:
        """A new, empty database on this server; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)
