"""What the attacks of issue 14 cost a real relay: its peak RSS (VmHWM) over its idle RSS.

Each attack runs against a fresh ``python -m fedrelay serve`` process on a temp SQLite file,
from 127.0.0.1 (one client address), on loopback:

| attack | what the client does |
|---|---|
| bomb | ``--compression``: 32 connections (half /publish, half /subscribe) each write 17 |
| | deflated frames of 4 MiB of spaces at once (~4 KiB each on the wire) |
| bomb-at-limit | the same with frames of exactly ``--max-frame-bytes`` (1 MiB) |
| headers | 2,048 connections each send 1 MiB of request headers and never end the request |
| slowloris | 2,048 connections each send a 50-byte partial request and never finish it |
| unread | 60 requests for a 10,000-event page of 8 KB (4-byte emoji) events, never read |
| idle | 1,000 idle subscribers: the cost of one open connection |
| idle-deflate | the same with ``--compression``, each negotiating permessage-deflate |
| pings | one /subscribe connection sends 125-byte pings for up to 15 s and never reads |

Also ``runs``: the time one ``GET /api/runs`` takes on the event loop with 50,000 runs
(``runs_listing.page`` called in-process, as the relay calls it), for a few queries.

    .venv/bin/python bench/attacks.py [--attack NAME ...] [--out FILE]

Compare a tree before the fix by running the same script with ``PYTHONPATH`` pointing at
that tree's ``src`` (the relay process inherits it). Figures are single runs: on a shared
machine, read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


class Relay:
    def __init__(self, workdir: Path, *args: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = open(workdir / f"relay-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedrelay", "serve", "--port", str(self.port), "--db",
             str(workdir / f"relay-{self.port}.db"), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.healthy():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"relay did not start: {(workdir / f'relay-{self.port}.log').read_text()}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def masked(payload: bytes, rsv1: bool = False) -> bytes:
    size = len(payload)
    first = 0x81 | (0x40 if rsv1 else 0)
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0xFE, size)
    else:
        head = struct.pack("!BBQ", first, 0xFF, size)
    return head + b"\0\0\0\0" + payload  # a zero mask leaves the payload as is


def upgrade(port: int, target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head


def bomb(relay: Relay, frame_bytes: int) -> str:
    socks = []
    for i in range(32):
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        target = f"/publish?producer=bomb-{i}" if i % 2 else "/subscribe?run_id=*"
        sock.sendall(upgrade(relay.port, target, "Sec-WebSocket-Extensions: permessage-deflate\r\n"))
        head = read_head(sock)
        bits = re.search(rb"client_max_window_bits=(\d+)", head)
        deflate = zlib.compressobj(wbits=-int(bits.group(1)) if bits else -15)
        frames = []
        for _ in range(17):
            data = deflate.compress(b" " * frame_bytes) + deflate.flush(zlib.Z_SYNC_FLUSH)
            frames.append(masked(data[:-4], rsv1=True))
        socks.append((sock, b"".join(frames)))
    wire = len(socks[0][1]) // 17
    for sock, data in socks:
        with contextlib.suppress(OSError):
            sock.sendall(data)
    time.sleep(3)  # the relay inflates (or refuses) what it was sent; the peak is what counts
    for sock, _ in socks:
        sock.close()
    return f"32 x 17 frames of {frame_bytes // 1024} KiB inflated, {wire} B on the wire each"


def unfinished(relay: Relay, head: bytes, count: int) -> str:
    socks, refused = [], 0
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            sock.sendall(head)
            socks.append(sock)
        except OSError:
            refused += 1
    time.sleep(2)  # held: the relay has read what it will read of them
    for sock in socks:
        sock.close()
    return f"{count} connections, {len(head)} bytes each; {refused} refused while sending"


def unread(relay: Relay) -> str:
    url = f"ws://127.0.0.1:{relay.port}/publish?producer=emoji"
    note = "\U0001f642" * 2000
    from websockets.sync.client import connect

    with connect(url, compression=None, max_size=None) as conn:
        conn.recv()
        for start in range(1, 3001, 20):
            batch = [
                {"type": "status", "run_id": "emoji", "id": i, "data": {"note": note}}
                for i in range(start, start + 20)
            ]
            conn.send(json.dumps(batch, ensure_ascii=False))
        while json.loads(conn.recv()).get("upto") != 3000:
            pass
    base = memory_kib(relay.proc.pid)["VmRSS"]
    request = b"GET /api/runs/emoji/events?limit=10000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    socks = []
    for _ in range(60):
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        socks.append(sock)
    time.sleep(3)
    for sock in socks:
        sock.close()
    relay.base_kib = base  # type: ignore[attr-defined]
    return "60 requests for a 10,000-event page of 8 KB events, never read"


DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def idle(relay: Relay, extra: str = "") -> str:
    socks = []
    for _ in range(1000):
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        sock.sendall(upgrade(relay.port, "/subscribe?run_id=*", extra))
        read_head(sock)
        socks.append(sock)
    time.sleep(1)
    rss = memory_kib(relay.proc.pid)["VmRSS"]
    for sock in socks:
        sock.close()
    relay.idle_rss = rss  # type: ignore[attr-defined]
    return "1,000 idle subscribers (growth / 1,000 = per connection)"


def pings(relay: Relay) -> str:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    sock.sendall(upgrade(relay.port, "/subscribe?run_id=*"))
    read_head(sock)
    chunk = (bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125) * 512
    sent, started = 0, time.monotonic()
    sock.settimeout(5)
    with contextlib.suppress(OSError):
        while time.monotonic() - started < 15:
            sock.sendall(chunk)
            sent += len(chunk)
    took = time.monotonic() - started
    sock.close()
    return f"{sent / MIB:.0f} MiB of pings in {took:.1f} s, never read"


ATTACKS: dict[str, tuple[list[str], Callable[[Relay], str]]] = {
    "bomb": (["--compression"], lambda r: bomb(r, 4 * MIB)),
    "bomb-at-limit": (["--compression"], lambda r: bomb(r, MIB)),
    "headers": (
        [],
        lambda r: unfinished(
            r, b"GET /subscribe HTTP/1.1\r\nHost: x\r\n" + (b"X-Pad: " + b"a" * 8000 + b"\r\n") * 127, 2048
        ),
    ),
    "slowloris": (
        [],
        lambda r: unfinished(r, b"GET /subscribe HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", 2048),
    ),
    "unread": (["--replay-size", "10"], unread),
    "idle": ([], idle),
    "idle-deflate": (["--compression"], lambda r: idle(r, DEFLATE)),
    "pings": ([], pings),
}


def run_attack(name: str, workdir: Path) -> tuple[str, float, float, str]:
    args, attack = ATTACKS[name]
    relay = Relay(workdir, *args)
    try:
        time.sleep(1)
        base = memory_kib(relay.proc.pid)["VmRSS"]
        what = attack(relay)
        base = getattr(relay, "base_kib", base)
        peak = memory_kib(relay.proc.pid)["VmHWM"]
        serving = relay.healthy()
        if name.startswith("idle"):
            return name, base / 1024, (relay.idle_rss - base) / 1024, what  # type: ignore[attr-defined]
        return (
            name,
            base / 1024,
            (peak - base) / 1024,
            what + ("" if serving else "; relay NOT serving after"),
        )
    finally:
        relay.stop()


def runs_listing_times() -> list[tuple[str, float, float]]:
    """Median and max time of ``page()`` for 50,000 runs, as the relay runs it on its loop."""
    from fedrelay.relay.hub import Run
    from fedrelay.relay.runs_listing import RunOrder, page, parse_query

    now = time.time()
    runs = {}
    for i in range(50_000):
        run = Run(f"run-{i:05d}", created_at=now - 50_000 + i, updated_at=now - 50_000 + i)
        run.info = {
            "experiment_name": f"experiment {i % 97}",
            "training_mode": "federated" if i % 2 else "centralized",
        }
        runs[run.run_id] = run
    order = RunOrder(runs).sync()
    out = []
    for query in ["", "limit=1000", "status=running&q=experiment 5&limit=1000", "q=no-such-name"]:
        parsed = parse_query({k: [v] for k, v in (p.split("=", 1) for p in query.split("&") if p)})
        times = []
        for _ in range(20):
            started = time.perf_counter()
            body = page(order, parsed, now, 300.0)
            times.append(time.perf_counter() - started)
        out.append(
            (
                f"`/api/runs?{query}` ({len(body) // 1024} KiB)",
                statistics.median(times) * 1e3,
                max(times) * 1e3,
            )
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", nargs="*", default=[*ATTACKS, "runs"], choices=[*ATTACKS, "runs"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = ["| attack | idle RSS MiB | peak growth MiB | what |", "|---|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="fedrelay-attacks-") as tmp:
        for name in args.attack:
            if name == "runs":
                continue
            row = run_attack(name, Path(tmp))
            lines.append(f"| {row[0]} | {row[1]:.1f} | {row[2]:.1f} | {row[3]} |")
            print(lines[-1], file=sys.stderr, flush=True)
    if "runs" in args.attack:
        lines += ["", "| 50,000 runs, time on the loop | median ms | max ms |", "|---|---:|---:|"]
        lines += [f"| {what} | {median:.2f} | {worst:.2f} |" for what, median, worst in runs_listing_times()]
    lines.append(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs.")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
