"""What ``emit()`` costs the training loop, against the hand-rolled alternative.

Both senders publish to the same real relay (``fedrelay serve --db :memory:``,
a subprocess), in the same run:

- ``Emitter.emit()``: validate, stamp, enqueue; a background thread sends.
- the hand-rolled pattern this project replaces: open a WebSocket to ``/``
  for every message, send ``{"type", "timestamp", "data"}``, close.

Each call is timed alone with ``perf_counter_ns``; the table gives the
median and p99 per call, and checks that the relay stored every event.

    python bench/emitter_bench.py [--calls 200000] [--baseline-calls 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

from websockets.sync.client import connect

from fedrelay.emitters import Emitter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_relay(port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fedrelay", "serve", "--db", ":memory:", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"relay exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)  # polling a starting process; nothing to wait on
    proc.kill()
    raise SystemExit("relay did not start within 30 s")


def stored(port: int, run_id: str, expected: int = 0, timeout: float = 10.0) -> int:
    """Events the relay stored for ``run_id``, polled until ``expected`` or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs/{run_id}", timeout=10) as resp:
            count = int(json.loads(resp.read())["last_seq"])
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def payload(i: int) -> dict:
    return {
        "round": i // 100,
        "client_id": i % 8,
        "local_epoch": i % 100,
        "metrics": {"loss": 0.5 / (1 + i), "accuracy": 0.9, "precision": 0.8, "recall": 0.7},
    }


def bench_emitter(url: str, calls: int, spool_dir: str) -> dict:
    em = Emitter(url, run_id="bench-emitter", spool_dir=spool_dir, role="client", client_id=1)
    em.emit("training_start", {"experiment_name": "bench"})
    em.flush(10)  # connected and warm before timing
    samples = [0] * calls
    clock = time.perf_counter_ns
    emit = em.emit
    started = time.perf_counter()
    for i in range(calls):
        data = payload(i)
        t0 = clock()
        emit("client_progress", data)
        samples[i] = clock() - t0
    loop_s = time.perf_counter() - started
    flushed = em.flush(120)
    total_s = time.perf_counter() - started
    stats = em.stats
    em.close(10)
    return {
        "samples": samples,
        "loop_s": loop_s,
        "total_s": total_s,
        "flushed": flushed,
        "stats": stats,
        "expected": calls + 1,
    }


def bench_connect_per_message(url: str, calls: int) -> dict:
    samples = [0] * calls
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for i in range(calls):
        data = payload(i) | {"run_id": "bench-baseline"}
        t0 = clock()
        message = {"type": "client_progress", "timestamp": datetime.now(UTC).isoformat(), "data": data}
        with connect(f"{url}/", compression=None, proxy=None) as ws:
            ws.send(json.dumps(message))
        samples[i] = clock() - t0
    return {"samples": samples, "loop_s": time.perf_counter() - started, "expected": calls}


def timer_floor(n: int = 100_000) -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples)


def table(emitter: dict, baseline: dict, port: int, floor: float) -> str:
    def row(name: str, result: dict, delivered: int) -> str:
        s = result["samples"]
        return (
            f"| {name} | {len(s):,} | {statistics.median(s) / 1000:.2f} | {percentile(s, 0.99) / 1000:.2f} "
            f"| {percentile(s, 0.999) / 1000:.1f} | {len(s) / result['loop_s']:,.0f} "
            f"| {delivered:,}/{result['expected']:,} |"
        )

    stats = emitter["stats"]
    lines = [
        "| sender | calls | median µs/call | p99 µs/call | p99.9 µs/call | calls/s in the loop "
        "| stored by relay |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row(
            "`Emitter.emit()` (background sender)",
            emitter,
            stored(port, "bench-emitter", emitter["expected"]),
        ),
        row(
            "new WebSocket per message (hand-rolled)",
            baseline,
            stored(port, "bench-baseline", baseline["expected"]),
        ),
        "",
        f"perf_counter_ns floor: {floor:.0f} ns (included above). Emitter: all acked "
        f"{emitter['total_s']:.2f} s after the first timed emit (flushed: {emitter['flushed']}), "
        f"{stats['frames']:,} frames, {stats['spooled']:,} spooled, {stats['dropped']} dropped. "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000, help="emit() calls to time")
    parser.add_argument("--baseline-calls", type=int, default=300, help="connect-per-message sends to time")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()

    port = free_port()
    relay = start_relay(port)
    try:
        url = f"ws://127.0.0.1:{port}"
        floor = timer_floor()
        with TemporaryDirectory() as spool_dir:
            emitter = bench_emitter(url, args.calls, spool_dir)
        baseline = bench_connect_per_message(url, args.baseline_calls)
        report = table(emitter, baseline, port, floor)
    finally:
        relay.terminate()
        relay.wait(20)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
