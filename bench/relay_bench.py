"""Benchmark fedrelay against two minimal websockets relays on this machine.

Usage::

    .venv/bin/python bench/relay_bench.py [--scenario NAME ...] [--repeat N] [--quick]
        [--relays naive broadcast fedrelay fedrelay-pg fedrelay-pg3] [--out bench/RESULTS.md]

``fedrelay`` is one relay on SQLite, ``fedrelay-pg`` one on PostgreSQL, ``fedrelay-pg3`` three on
one PostgreSQL database with producers and subscribers on different nodes; the bench starts its
own PostgreSQL server for them.

Each repeat starts a fresh relay process per relay kind, in a rotating
order, so slow drifts of a shared machine hit every relay alike; tables
report medians over repeats. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import uvloop
import websockets

from harness import LoadGenPool
from pg import DEFAULTS as PG_DEFAULTS
from pg import pg_bin, start_pg
from relays import PG_NODES, RELAY_KINDS, Relay, fedrelay_available, is_fedrelay, running_relay
from report import Results, render
from scenarios import SCENARIOS, Config, Ctx

FEDRELAYS = tuple(kind for kind in RELAY_KINDS if is_fedrelay(kind))
SCENARIO_RELAYS = {
    "fanout": RELAY_KINDS,
    "latency": RELAY_KINDS,
    "latency_low": RELAY_KINDS,
    "ingest": FEDRELAYS,
    "catchup": FEDRELAYS,
    "memory": ("naive", "broadcast", "fedrelay"),
}
"""Which relays each scenario makes sense for (baselines keep no history, send no acks; the
memory per connection is the relay process's, whatever its store)."""

CLIENTS = {
    "raw": "raw asyncio WebSocket client on uvloop",
    "websockets": "websockets asyncio client on uvloop",
}

RUN_TIMEOUT = 180.0
"""Upper bound for one scenario run on one relay, start-up included."""

EXPLANATIONS = {
    "fanout": "1 producer, {subscribers} subscribers; the producer stays at most {fanout_window} "
    "events ahead of one designated subscriber; bounded at {fanout_events:,} events or "
    "{fanout_seconds:g} s. Metric: events received by all subscribers / time from the "
    "first send to the last receive.",
    "latency": "{latency_rate} events/s to {subscribers} subscribers for {latency_seconds:g} s "
    "after {latency_warmup_s:g} s of warm-up; latency = receive time - send time "
    "(CLOCK_MONOTONIC, same machine), every event at every subscriber.",
    "latency_low": "{latency_low_rate} events/s to {subscribers} subscribers for "
    "{latency_low_seconds:g} s after {latency_warmup_s:g} s of warm-up: the same "
    "measurement at a rate where no relay is near one full core.",
    "ingest": "{ingest_producers} producers x {ingest_rate} events/s for {ingest_seconds:g} s "
    "(one event per frame, acks tracked) plus 1 subscriber. Backlog = events sent - "
    "events acked, sampled every 0.5 s; settle = time after sending stopped until "
    "every event was acked.",
    "catchup": "{catchup_events:,} events stored first (array frames of {catchup_batch}); then a "
    "new subscriber with since=0. Time from TCP connect to its last event; then every "
    "frame is decoded and seq must be exactly 1..N.",
    "memory": "{memory_connections:,} idle subscribers; relay RSS after minus before (after "
    "opening and closing 20 warm-up connections) / connections.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fedrelay benchmark (loopback only)")
    parser.add_argument(
        "--scenario", nargs="+", choices=list(SCENARIOS), default=None, help="scenarios to run (default: all)"
    )
    parser.add_argument("--relays", nargs="+", choices=RELAY_KINDS, default=list(RELAY_KINDS))
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--loadgen-procs",
        type=int,
        default=1,
        help="subscriber load-generator processes (default 1, see README)",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "websockets"],
        default="raw",
        help="subscriber client in the load generators (default raw)",
    )
    parser.add_argument("--all-relays", action="store_true", help="also run ingest against the baselines")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a scenario size, e.g. --set latency_rate=250 (see Config)",
    )
    parser.add_argument(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the bench's PostgreSQL server, e.g. --pg-set synchronous_commit=off",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--json", type=Path, help="write every repeat's raw numbers here")
    parser.add_argument("--workdir", type=Path, help="logs and databases (default: temp dir)")
    return parser.parse_args(argv)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """``--set field=value``: change one Config field, keeping its type."""
    for item in overrides:
        name, _, value = item.partition("=")
        if not hasattr(config, name):
            raise SystemExit(f"--set: unknown field {name!r}; known: {', '.join(vars(config))}")
        setattr(config, name, type(getattr(config, name))(value))
    return config


def raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one; relays and workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rotated(items: list[str], shift: int) -> list[str]:
    """Rotate the relay order each repeat so none always runs first or last."""
    if not items:
        return items
    shift %= len(items)
    return items[shift:] + items[:shift]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def run_once(ctx: Ctx, scenario: str, kind: str, rep: int) -> dict[str, Any]:
    """Start the relay, run one scenario once, always stop the relay."""
    run: Callable[[Ctx, Relay], Awaitable[dict[str, Any]]] = SCENARIOS[scenario]
    workdir = ctx.workdir / f"{scenario}-{kind}-r{rep}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            async with running_relay(kind, workdir, pg=ctx.pg) as relay:
                result = await run(ctx, relay)
                if relay.exit_codes:
                    result.setdefault("problems", []).append(
                        f"relay exited with {relay.exit_codes} during the run"
                    )
    except Exception as exc:  # one failed run must not stop the bench
        result = {"error": f"{type(exc).__name__}: {exc}"[:600]}
    result["wall_s"] = time.monotonic() - started
    log(f"{scenario:8s} {kind:12s} r{rep}: {summary_of(scenario, result)}")
    return result


def summary_of(scenario: str, result: dict[str, Any]) -> str:
    """One short log line per run, to follow progress."""
    if "error" in result:
        return "ERROR " + result["error"][:300]
    key = {
        "fanout": "delivered_per_s",
        "latency": "p99_ms",
        "latency_low": "p99_ms",
        "ingest": "max_backlog",
        "catchup": "time_ms",
        "memory": "kib_per_conn",
    }[scenario]
    extra = f" problems={result['problems']}" if result.get("problems") else ""
    return f"{key}={result.get(key)} ({result['wall_s']:.1f}s){extra}"


async def run_all(args: argparse.Namespace, config: Config, workdir: Path) -> Results:
    """Every scenario x repeat x relay, relays interleaved within a repeat."""
    repeat = args.repeat or (1 if args.quick else 3)
    relays = list(args.relays)
    if any(is_fedrelay(kind) for kind in relays):
        ok, why = await fedrelay_available()
        if not ok:
            log(f"fedrelay not available, skipped: {why.strip()[:300]}")
            relays = [kind for kind in relays if not is_fedrelay(kind)]
    pg = None
    if any(kind in PG_NODES for kind in relays):
        settings = dict(item.partition("=")[::2] for item in args.pg_set)
        try:
            pg = await asyncio.to_thread(start_pg, settings)
            log(f"PostgreSQL on port {pg.port}, data in {pg.data}")
        except Exception as exc:  # no PostgreSQL here: the other relays still run
            log(f"PostgreSQL not available, PostgreSQL relays skipped: {exc}"[:400])
            relays = [kind for kind in relays if kind not in PG_NODES]
    pool = await LoadGenPool.start(args.loadgen_procs, workdir, args.client)
    ctx = Ctx(config, pool, workdir, pg=pg)
    results: Results = {}
    try:
        for scenario in args.scenario or list(SCENARIOS):
            allowed = RELAY_KINDS if args.all_relays else SCENARIO_RELAYS[scenario]
            kinds = [k for k in relays if k in allowed]
            if not kinds:
                continue
            results[scenario] = {k: [] for k in kinds}
            for rep in range(1, repeat + 1):
                for kind in rotated(kinds, rep - 1):
                    results[scenario][kind].append(await run_once(ctx, scenario, kind, rep))
    finally:
        await pool.close()
        if pg is not None:
            await asyncio.to_thread(pg.remove)
    return results


def header(args: argparse.Namespace, config: Config, skipped_fedrelay: bool) -> list[str]:
    """Title, machine, command and conditions of this run."""
    cpu_freq = psutil.cpu_freq()
    command = "python bench/relay_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "# fedrelay benchmark results",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {psutil.cpu_count()} cores"
        + (f" @ {cpu_freq.max or cpu_freq.current:.0f} MHz" if cpu_freq else "")
        + f", {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        f"- Python {platform.python_version()}, websockets {websockets.__version__}, "
        f"uvloop {uvloop.__version__}; load average at start {os.getloadavg()[0]:.2f}",
        f"- command: `{command.strip()}`",
        f"- {args.repeat or (1 if args.quick else 3)} repeats, medians shown; "
        f"subscribers spread over {args.loadgen_procs} load-generator process(es) "
        f"({CLIENTS[args.client]})",
        "- CPU % is % of one core (100 = one core busy); for the PostgreSQL relays it is every relay "
        "process plus PostgreSQL's server processes.",
    ]
    pg_kinds = [kind for kind in args.relays if kind in PG_NODES]
    if pg_kinds:
        settings = {**PG_DEFAULTS, **dict(item.partition("=")[::2] for item in args.pg_set)}
        lines.append(
            f"- {', '.join(pg_kinds)}: the bench's own PostgreSQL {pg_version()} on 127.0.0.1 "
            f"(settings {', '.join(f'{k}={v}' for k, v in settings.items())}, the rest default); "
            "fedrelay-pg3: producers publish to nodes 1 and 3, subscribers read from node 2"
        )
    if skipped_fedrelay:
        lines.append("- **fedrelay was not available: baselines only.**")
    return lines


def pg_version() -> str:
    try:
        out = subprocess.run([str(pg_bin() / "postgres"), "--version"], capture_output=True, text=True)
    except (OSError, RuntimeError):
        return "(not found)"
    found = re.search(r"\d+(\.\d+)*", out.stdout)  # "postgres (PostgreSQL) 15.20 (Debian ...)"
    return found.group(0) if found else "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = apply_overrides(Config.quick() if args.quick else Config(), args.set)
    raise_fd_limit()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"logs and databases in {workdir}")
    started = time.monotonic()
    results = uvloop.run(run_all(args, config, workdir))
    ran_fed = any("fedrelay" in by for by in results.values())
    skipped = "fedrelay" in args.relays and not ran_fed

    def explain(scenario: str) -> list[str]:
        return [f"- setup: {EXPLANATIONS[scenario].format(**vars(config))}"]

    text = render(results, header(args, config, skipped), explain)
    text += f"\nTotal bench time: {time.monotonic() - started:.0f} s.\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
