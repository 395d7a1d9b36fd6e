"""Soak the relay: 1,000 subscribers on one run, 100 more runs, slow consumers, for minutes.

Usage::

    .venv/bin/python bench/soak.py --duration 600 [--subscribers 1000] [--runs 100] [--rate 10]

The same load as ``tests/reliability/test_soak.py`` (which runs it for ~60 s in CI), from
``tests/reliability/soakload.py``, against a fresh ``fedrelay serve`` process; longer, and
with a results table: RSS and fds over time, latency, delivered/lost/duplicated, slow
consumers cut. Exits 1 when an expectation broke (loss, duplicate, leak, a slow consumer not
cut, a normal one cut). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import uvloop

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from tests.reliability.soakload import (  # noqa: E402
    FD_MARGIN,
    SoakConfig,
    SoakResult,
    raise_fd_limit,
    relay_args,
    run_soak,
)
from tests.support.relay_process import RelayProcess  # noqa: E402

RSS_ROWS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of publishing (300)")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s, help="seconds before measuring")
    parser.add_argument("--subscribers", type=int, default=defaults.subscribers, help="on the fan-out run")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="other runs, published at once")
    parser.add_argument("--subs-per-run", type=int, default=defaults.subs_per_run)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="events/s to the fan-out run")
    parser.add_argument("--run-rate", type=float, default=defaults.run_rate, help="events/s per other run")
    parser.add_argument("--heavy-rate", type=float, default=defaults.heavy_rate, help="events/s, heavy run")
    parser.add_argument("--never-readers", type=int, default=defaults.never_readers)
    parser.add_argument("--slow-readers", type=int, default=defaults.slow_readers)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--workdir", type=Path, help="SQLite file and relay log (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures and samples here")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        duration_s=args.duration,
        warmup_s=args.warmup,
        subscribers=args.subscribers,
        rate=args.rate,
        runs=args.runs,
        subs_per_run=args.subs_per_run,
        run_rate=args.run_rate,
        heavy_rate=args.heavy_rate,
        never_readers=args.never_readers,
        slow_readers=args.slow_readers,
        sample_every_s=args.sample_every,
        window_s=max(10.0, min(60.0, (args.duration - args.warmup) / 6)),
        prefix=f"soak-{uuid.uuid4().hex[:6]}",
    )


def render(cfg: SoakConfig, result: SoakResult, extra_args: list[str]) -> str:
    """Markdown: the load, the headline figures, RSS and fds over time."""
    growth = result.rss_growth_mib
    lines = [
        f"## Soak: {result.duration_s:.0f} s, {result.subscribers} subscribers, {result.runs} runs",
        "",
        f"Load: fan-out run {cfg.subscribers} subscribers at {cfg.rate:g} events/s; {cfg.runs} runs x "
        f"{cfg.subs_per_run} subscribers at {cfg.run_rate:g} events/s each; heavy run "
        f"({cfg.heavy_pad} B padding) {cfg.heavy_subscribers} subscribers at {cfg.heavy_rate:g} events/s "
        f"plus {cfg.never_readers} never-reading and {cfg.slow_readers} slow-reading consumers. "
        f"Relay flags: `{' '.join(extra_args)}`. Warm-up {cfg.warmup_s:g} s, RSS windows "
        f"{cfg.window_s:g} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| events published | {result.events_published:,} |",
        f"| events delivered (normal subscribers) | {result.events_delivered:,} |",
        f"| lost / duplicated / other run | {result.lost} / {result.duplicated} / {result.foreign} |",
        f"| normal subscribers closed or disturbed | {result.normal_closed} |",
        f"| slow consumers cut (log) / 1013 frame read / metric | {result.slow_cut} of "
        f"{result.slow_consumers} / {result.slow_1013} / {result.slow_cut_metric:g} |",
        f"| slow consumers cut after (s from first event) | "
        f"{', '.join(f'{t:g}' for t in result.slow_cut_after_s) or '-'} |",
        f"| latency p50 / p99 / max (ms, {result.latency_samples:,} samples after warm-up) | "
        f"{result.p50_ms:.2f} / {result.p99_ms:.2f} / {result.max_ms:.1f} |",
        f"| relay RSS first window / last window / peak (MiB) | {result.rss_start_mib:.1f} / "
        f"{result.rss_end_mib:.1f} / {result.rss_peak_mib:.1f} (growth {growth:+.1f} MiB, "
        f"{100 * growth / result.rss_start_mib:+.1f}%) |",
        f"| relay fds idle / peak / after close (margin {FD_MARGIN}) | {result.fds_idle} / "
        f"{result.fds_peak} / {result.fds_end} |",
        f"| CPU, % of one core: relay / load generator | {result.relay_cpu_pct:.0f} / "
        f"{result.client_cpu_pct:.0f} |",
        f"| connect all / drain after publishing (s) | {result.connect_s:.1f} / {result.drain_s:.1f} |",
        "",
        "| t (s) | relay RSS (MiB) | relay fds |",
        "|---:|---:|---:|",
    ]
    step = max(1, -(-len(result.samples) // RSS_ROWS))
    shown = result.samples[::step]
    if result.samples and shown[-1] is not result.samples[-1]:
        shown.append(result.samples[-1])
    lines += [f"| {s.t_s:.0f} | {s.rss_kib / 1024:.1f} | {s.fds} |" for s in shown]
    lines += ["", "Problems: " + ("; ".join(result.problems) if result.problems else "none")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from(args)
    cfg.validate()
    raise_fd_limit()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedrelay-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}", file=sys.stderr)
    extra = relay_args(cfg)
    relay = RelayProcess(workdir / "relay.db", args=extra).start()
    try:
        assert relay.proc is not None and relay.log_path is not None
        result = uvloop.run(run_soak(cfg, relay.port, relay.proc.pid, relay.log_path))
    finally:
        code = relay.stop()
    if code != 0:
        result.problems.append(f"relay exited with {code} (1 = accepted events not stored)")
    print(render(cfg, result, extra))
    if args.json:
        payload = {
            "figures": result.figures(),
            "config": asdict(cfg),
            "samples": [asdict(s) for s in result.samples],
        }
        args.json.write_text(json.dumps({**payload, "problems": result.problems}, indent=1))
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
