"""Start, probe and stop the relays under test, each in its own process.

``fedrelay-pg`` is one relay on PostgreSQL, ``fedrelay-pg3`` three relays on one database: the
bench's own PostgreSQL server (``pg.py``) gets a fresh database per run.

Readiness is a real check (TCP accept for the baselines, ``GET /healthz``
for fedrelay) polled until a deadline, never a fixed sleep: a fixed sleep
is either too short on a loaded machine or wastes the time budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RELAY_KINDS = ("naive", "broadcast", "fedrelay", "fedrelay-pg", "fedrelay-pg3")
PG_NODES = {"fedrelay-pg": 1, "fedrelay-pg3": 3}
"""Relay processes of each PostgreSQL kind, all on one database."""


def is_fedrelay(kind: str) -> bool:
    """fedrelay on either store: validation, seqs, storage, acks, an HTTP API."""
    return kind.startswith("fedrelay")


@dataclass
class HttpResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Relay:
    """A running relay (one process, or the nodes of a cluster) and how to reach it.

    In a cluster, producers publish to node 0 (and node 2, ...) and subscribers read from node 1,
    so every delivery crosses nodes through PostgreSQL.
    """

    kind: str
    port: int
    """Node 0: where producers publish, and the API is asked."""
    process: asyncio.subprocess.Process
    log_path: Path
    nodes: list[tuple[int, asyncio.subprocess.Process]] = field(default_factory=list)
    db_pids: list[int] = field(default_factory=list)
    """PostgreSQL's server processes: their CPU is the relay's store work, as SQLite's is in-process."""

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [(self.port, self.process)]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pids(self) -> list[int]:
        """Every process that does the relay's work (its nodes and their database server)."""
        return [process.pid for _, process in self.nodes] + self.db_pids

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.pid)

    @property
    def sub_port(self) -> int:
        """Where subscribers connect: node 1 of a cluster, else the relay."""
        return self.nodes[1][0] if len(self.nodes) > 1 else self.port

    def url(self, path: str, producer: int = 0) -> str:
        """A producer's address: node 0, or (the ``producer``-th) spread over every node but 1."""
        ports = [port for i, (port, _) in enumerate(self.nodes) if i != 1 or len(self.nodes) == 1]
        return f"ws://{HOST}:{ports[producer % len(ports)]}{path}"

    @property
    def exit_codes(self) -> list[int]:
        return [process.returncode for _, process in self.nodes if process.returncode is not None]

    def log_tail(self, lines: int = 30) -> str:
        """The end of the relay's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """Ask the kernel for an unused loopback port."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def relay_command(kind: str, port: int, workdir: Path, db: str | None = None) -> list[str]:
    """The command line that starts one relay kind (``db``: a PostgreSQL URL for the pg kinds)."""
    if is_fedrelay(kind):
        db = db or str(workdir / "relay.db")
        return [
            sys.executable,
            "-m",
            "fedrelay",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--db",
            db,
        ]
    if kind in ("naive", "broadcast"):
        script = BENCH_DIR / "baseline_relay.py"
        return [sys.executable, str(script), "--mode", kind, "--host", HOST, "--port", str(port)]
    raise ValueError(f"unknown relay kind {kind!r}")


def relay_env() -> dict[str, str]:
    """Make ``python -m fedrelay`` work whether or not the package is installed."""
    env = dict(os.environ)
    src = str(REPO_DIR / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


async def http_get(port: int, path: str, timeout: float = 5.0) -> HttpResponse:
    """A tiny HTTP/1.1 GET over loopback (no client library needed)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 else 0
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return HttpResponse(status, body)


def dechunk(body: bytes) -> bytes:
    """Decode a chunked transfer-encoded body."""
    out, pos = bytearray(), 0
    while pos < len(body):
        line_end = body.index(b"\r\n", pos)
        size = int(body[pos:line_end].split(b";")[0], 16)
        if size == 0:
            break
        out += body[line_end + 2 : line_end + 2 + size]
        pos = line_end + 2 + size + 2
    return bytes(out)


async def tcp_accepts(port: int) -> bool:
    """True once something accepts TCP connections on the port."""
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(HOST, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def healthz_ok(port: int) -> bool:
    """True once fedrelay answers ``GET /healthz`` with 200."""
    try:
        return (await http_get(port, "/healthz", timeout=1.0)).status == 200
    except (OSError, TimeoutError, ValueError):
        return False


async def wait_ready(relay: Relay, timeout: float) -> None:
    """Poll the readiness check until it passes, the process dies or time runs out."""
    check = healthz_ok if is_fedrelay(relay.kind) else tcp_accepts
    deadline = time.monotonic() + timeout
    waiting = [port for port, _ in relay.nodes]
    while time.monotonic() < deadline:
        if relay.exit_codes:
            raise RuntimeError(f"{relay.kind} exited with {relay.exit_codes}:\n{relay.log_tail()}")
        waiting = [port for port in waiting if not await check(port)]
        if not waiting:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{relay.kind} not ready after {timeout:.0f}s:\n{relay.log_tail()}")


async def stop_process(process: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if the process ignores it."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def running_relay(
    kind: str, workdir: Path, ready_timeout: float = 30.0, pg: Any = None
) -> AsyncIterator[Relay]:
    """Start a relay (every node of a cluster), wait until it is ready, and always stop it
    afterwards. The PostgreSQL kinds need ``pg`` (a running ``pg.PgServer``): a fresh database."""
    workdir.mkdir(parents=True, exist_ok=True)
    count = PG_NODES.get(kind, 1)
    db = None
    if kind in PG_NODES:
        if pg is None:
            raise RuntimeError(f"{kind} needs the bench's PostgreSQL server")
        db = await asyncio.to_thread(pg.fresh_db, "bench")
    log_path = workdir / f"{kind}.log"
    nodes: list[tuple[int, asyncio.subprocess.Process]] = []
    try:
        with open(log_path, "ab") as log:
            for _ in range(count):
                port = free_port()
                process = await asyncio.create_subprocess_exec(
                    *relay_command(kind, port, workdir, db),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=REPO_DIR,
                    env=relay_env(),
                )
                nodes.append((port, process))
        db_pids = pg.pids() if kind in PG_NODES else []
        relay = Relay(kind, nodes[0][0], nodes[0][1], log_path, nodes, db_pids)
        await wait_ready(relay, ready_timeout)
        relay.db_pids = pg.pids() if kind in PG_NODES else []  # the nodes' backends are up now
        yield relay
    finally:
        await asyncio.gather(*(stop_process(process) for _, process in nodes))


async def fedrelay_available() -> tuple[bool, str]:
    """Whether ``python -m fedrelay serve --help`` works yet, and why not."""
    if not (REPO_DIR / "src" / "fedrelay" / "cli.py").exists():
        return False, "src/fedrelay/cli.py does not exist"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fedrelay",
        "serve",
        "--help",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO_DIR,
        env=relay_env(),
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()
        return False, "serve --help timed out"
    if process.returncode != 0:
        return False, out.decode(errors="replace")[-500:]
    return True, ""
