"""Flower simulation wall time with and without fedrelay's emitters.

Usage::

    .venv/bin/python bench/flower_overhead.py [--pairs 5] [--rounds 10] [--clients 5] [--out FILE]

Each run is the federated pneumonia demo (``fedrelay.demo.federated``) in a fresh subprocess, so
Ray starts cold every time and neither side inherits the other's warm caches. Runs come in pairs,
one with telemetry (strategy wrapper, client mod, per-epoch reports, all streamed to a local
relay) and one without; the order alternates (AB, BA, ...) so slow drifts of a shared machine hit
both sides alike. Reported: the median of the per-pair ratios, for the strategy's own wall time
(``strategy.start``, the training the user waits for) and for the whole process (with Ray's start
and teardown, which dominate a small simulation and are noisier).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.support, as the tests import it


def child(args: argparse.Namespace) -> None:
    """One simulation; prints a JSON line with its timings."""
    from fedrelay.demo.federated import FederatedConfig, run_federated

    cfg = FederatedConfig(
        rounds=args.rounds, clients=args.clients, url=args.url, telemetry=args.telemetry == 1, seed=0
    )
    started = time.perf_counter()
    out = run_federated(cfg)
    total = time.perf_counter() - started
    print("RESULT " + json.dumps({"strategy": out["strategy_seconds"], "total": total}), flush=True)


def run_one(telemetry: bool, args: argparse.Namespace, url: str, env: dict[str, str]) -> dict[str, float]:
    cmd = [
        sys.executable, __file__, "--child", "--telemetry", str(int(telemetry)), "--url", url,
        "--rounds", str(args.rounds), "--clients", str(args.clients),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process"] = wall
    return result


def table(pairs: list[tuple[dict[str, float], dict[str, float]]], args: argparse.Namespace) -> str:
    def row(key: str, label: str) -> str:
        off = [p[0][key] for p in pairs]
        on = [p[1][key] for p in pairs]
        ratios = [b / a for a, b in zip(off, on, strict=True)]
        med = statistics.median(ratios)
        return (
            f"| {label} | {statistics.median(off):.2f} | {statistics.median(on):.2f} | {med:.4f} "
            f"| {(med - 1) * 100:+.2f}% | {min(ratios):.4f} to {max(ratios):.4f} |"
        )

    lines = [
        f"Flower simulation, {args.clients} clients x {args.rounds} rounds, {len(pairs)} interleaved pairs "
        f"({platform.python_version()}, {os.cpu_count()} CPUs).",
        "",
        "| wall time | without emitters (s, median) | with emitters (s, median) | median ratio | overhead "
        "| ratio range |",
        "|---|---|---|---|---|---|",
        row("strategy", "strategy.start (training)"),
        row("total", "run_simulation (with Ray start/stop)"),
        row("process", "whole process"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--telemetry", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from tests.support.relay_process import RelayProcess

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FEDRELAY_SPOOL_DIR": str(Path(tmp) / "spool")}
        relay = RelayProcess(Path(tmp) / "relay.db").start()
        try:
            pairs = []
            for i in range(args.pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                results = {flag: run_one(flag, args, relay.url, env) for flag in order}
                pairs.append((results[False], results[True]))
                print(
                    f"pair {i + 1}/{args.pairs}: strategy {results[False]['strategy']:.2f}s -> "
                    f"{results[True]['strategy']:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            relay.stop()
    text = table(pairs, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
