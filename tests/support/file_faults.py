"""Faults of a relay's files: a file size limit, and the database made read-only, on any
machine the suite runs on.

Root ignores permission bits, and nothing takes write access away from a file that a process
already has open: a plain ``chmod`` proves nothing in either case. Two methods:

- ``immutable``: ``chattr +i``. Every write to the file then fails, through descriptors opened
  before too (EPERM), as on a file system remounted read-only. Needs root with
  CAP_LINUX_IMMUTABLE and a file system with the attribute: a CI container usually lacks one.
- ``modes``: permission bits, with the relay started so that they apply to it (as root: without
  CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER, see :func:`relay_preexec`). For a file
  the relay already has open, its writes through the open descriptors are stopped by
  RLIMIT_FSIZE at the files' current size: SQLite reports that EFBIG exactly as it reports an
  EPERM ("disk I/O error"), and the relay's diagnosis still finds the file read-only.

:func:`method` picks ``immutable`` where it works, else ``modes``: never a skip.
``FEDRELAY_TEST_READ_ONLY=immutable|modes`` forces one (``immutable`` where it cannot work fails).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Method = Literal["immutable", "modes"]

BYPASS_MODES = (1, 2, 3)
"""CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root ignore permission bits."""
_PR_CAPBSET_DROP = 24
_CAP_VERSION_3 = 0x20080522
LOG_ROOM = 64 << 10
"""Bytes the relay's log may still grow under the file size limit (the failure is logged)."""


def method(where: Path) -> Method:
    """The method that works for files in the directory ``where`` (probed there: whether a file
    system has the immutable attribute depends on the file system)."""
    forced = os.environ.get("FEDRELAY_TEST_READ_ONLY")
    if forced not in (None, "", "immutable", "modes"):
        raise ValueError(f"FEDRELAY_TEST_READ_ONLY must be immutable or modes, not {forced!r}")
    if forced == "modes":
        return "modes"
    problem = _immutable_problem(where)
    if forced == "immutable" and problem:
        raise RuntimeError(f"FEDRELAY_TEST_READ_ONLY=immutable, but {problem}")
    return "modes" if problem else "immutable"


def _immutable_problem(where: Path) -> str | None:
    """Why ``chattr +i`` cannot make a file read-only here (None: it can)."""
    if os.geteuid() != 0:
        return "not root: chattr +i needs CAP_LINUX_IMMUTABLE"
    chattr = shutil.which("chattr")
    if chattr is None:
        return "chattr is not installed"
    with tempfile.NamedTemporaryFile(prefix=".chattr-probe-", dir=where) as probe:
        done = subprocess.run([chattr, "+i", probe.name], capture_output=True, text=True)
        if done.returncode != 0:
            return f"chattr +i fails: {done.stderr.strip()}"
        subprocess.run([chattr, "-i", probe.name], check=True)
    return None


def ignore_sigxfsz() -> None:
    """preexec: writes past RLIMIT_FSIZE fail with EFBIG instead of killing the relay."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def relay_preexec(chosen: Method) -> Callable[[], None]:
    """What the relay process runs before exec: SIGXFSZ ignored (a write past RLIMIT_FSIZE fails
    with EFBIG instead of killing it) and, for ``modes`` as root, the capabilities that bypass
    permission bits dropped for good (from the bounding and inheritable sets, so the exec of
    Python as root does not get them back)."""

    def preexec() -> None:
        ignore_sigxfsz()
        if chosen == "modes" and os.geteuid() == 0:
            _drop_capabilities(BYPASS_MODES)

    return preexec


def _drop_capabilities(caps: tuple[int, ...]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in caps:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two of {effective, permitted, inheritable}
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for cap in caps:
        data[2] &= ~(1 << cap)  # inheritable, low word (these capabilities are all < 32)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def assert_modes_apply(pid: int) -> None:
    """A process that could bypass permission bits would make a read-only test pass for
    nothing: fail instead."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])
    effective = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    bypass = [cap for cap in BYPASS_MODES if effective >> cap & 1]
    assert uid != 0 or not bypass, (
        f"process {pid} runs as root with capabilities {bypass}: modes do not apply"
    )


@contextmanager
def read_only(
    path: Path, chosen: Method, *, holder: int | None = None, files: list[Path] = ()
) -> Iterator[None]:
    """Make ``path`` (a file or a directory) read-only for the relay, then writable again.

    ``holder``: the pid of a relay that already has ``path`` open (started with
    :func:`relay_preexec`); with ``modes`` its writes are then stopped by RLIMIT_FSIZE just above
    the largest of ``files`` (its database, WAL and log), restored on exit.
    """
    if chosen == "immutable":
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        return
    if holder is not None:
        assert_modes_apply(holder)
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    limit = None
    if holder is not None:
        limit = max(f.stat().st_size for f in files if f.exists()) + LOG_ROOM
        resource.prlimit(holder, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        yield
    finally:
        path.chmod(mode)
        if limit is not None:
            resource.prlimit(holder, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
