"""Start, probe and stop the relays under test, each in its own process.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RELAY_KINDS = ("naive", "broadcast", "fedrelay")


@dataclass
class HttpResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Relay:
    """A running relay process and how to reach it."""

    kind: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def url(self, path: str) -> str:
        return f"ws://{HOST}:{self.port}{path}"

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


def relay_command(kind: str, port: int, workdir: Path) -> list[str]:
    """The command line that starts one relay kind."""
    if kind == "fedrelay":
        db = workdir / "relay.db"
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
            str(db),
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
    check = healthz_ok if relay.kind == "fedrelay" else tcp_accepts
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.process.returncode is not None:
            raise RuntimeError(f"{relay.kind} exited with {relay.process.returncode}:\n{relay.log_tail()}")
        if await check(relay.port):
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
async def running_relay(kind: str, workdir: Path, ready_timeout: float = 30.0) -> AsyncIterator[Relay]:
    """Start a relay, wait until it is ready, and always stop it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"{kind}.log"
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            *relay_command(kind, port, workdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=REPO_DIR,
            env=relay_env(),
        )
    relay = Relay(kind, port, process, log_path)
    try:
        await wait_ready(relay, ready_timeout)
        yield relay
    finally:
        await stop_process(process)


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
