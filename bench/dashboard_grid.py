"""The federation health grid at 1,000 clients x 100 rounds, in real headless Chromium.

A generated run (``tests/support/federation_run.py``: 80 % of the clients sampled per round, 1 %
failing, 0.5 % silent, 2 % straggling; train progress, train and evaluate reports, errors from the
client and the server, about 240,000 events) is published to a real relay, then a fresh tab opens
the run's page, per repeat:

- time to the first grid: navigation to the first draw of the grid with rows in it (the run is
  still being caught up then), and to the whole run folded and drawn (every event, every round);
- scrolling: the grid is scrolled by a fixed step every animation frame, down and back up, and the
  time between frames is recorded as the page saw it (requestAnimationFrame deltas: p50, p95,
  max), for a wheel-like step (90 px) and a fling (1,800 px, all rows new each frame);
- one draw: what the grid's draw took (canvas and DOM rows, not the browser's layout and paint) in
  the fling's frames, mean and p95;
- the most rows the DOM held;
- and, once, ``GET /api/runs/{id}/clients`` on that run: the first look (the relay folds the
  whole run off its event loop), a second one (the fold kept), every page of the full report.

    python bench/dashboard_grid.py [--clients 1000] [--rounds 100] [--repeats 3] [--out FILE] [--json FILE]

Figures depend on the machine and its load: run it on an idle one (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402
from tests.support.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.support.federation_run import generated_run, publish_blocking  # noqa: E402
from tests.support.health_page import STATE, frame_times  # noqa: E402
from tests.support.relay_process import RelayProcess  # noqa: E402

FIRST_GRID = f"""() => {{
    const h = {STATE} && {STATE}.health;
    if (h && h.visible().rows.length > 0) {{ window.__firstGrid ??= performance.now(); return true; }}
    return false;
}}"""


def one_repeat(browser, relay: RelayProcess, run_id: str, events: int, clients: int, rounds: int) -> dict:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{relay.http}/#/runs/{run_id}")
        page.wait_for_function(FIRST_GRID, polling="raf", timeout=300_000)
        first = page.evaluate("() => window.__firstGrid")
        page.wait_for_function(
            f"() => {STATE}.lastSeq === {events} && {STATE}.health.rounds === {rounds} && "
            f"{STATE}.health.clients === {clients} && (window.__done ??= performance.now())",
            polling="raf",
            timeout=600_000,
        )
        done = page.evaluate("() => window.__done")
        page.wait_for_timeout(1000)  # the last throttled render
        page.get_by_test_id("health-grid").scroll_into_view_if_needed()
        wheel = frame_times(page, frames=240, step=90)
        fling = frame_times(page, frames=240, step=1800)
        draws = sorted(page.evaluate(f"() => {STATE}.health.visible().drawTimes")[-240:])
        if errors:
            raise RuntimeError(f"JavaScript errors: {errors}")
        return {
            "first_grid_ms": first,
            "complete_ms": done,
            "wheel": wheel,
            "fling": fling,
            "draw_ms": statistics.mean(draws),
            "draw_p95_ms": draws[int(0.95 * (len(draws) - 1))],
            "dom_rows": max(wheel["domRows"], fling["domRows"]),
        }
    finally:
        page.close()


def api_costs(relay: RelayProcess, run_id: str) -> dict:
    """``GET /api/runs/{id}/clients``: the first look (the relay folds the whole run), the second
    (its fold kept, nothing new), and every page of the full report."""

    def timed(target: str) -> tuple[float, dict, int]:
        started = time.perf_counter()
        status, body = relay.get(target)
        elapsed = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"{target}: HTTP {status}")
        return elapsed, json.loads(body), len(body)

    first, page, size = timed(f"/api/runs/{run_id}/clients?cells=0")
    again, _, _ = timed(f"/api/runs/{run_id}/clients?cells=0")
    pages, total, largest, cursor = 0, 0.0, 0, None
    while True:
        elapsed, page, size = timed(f"/api/runs/{run_id}/clients" + (f"?cursor={cursor}" if cursor else ""))
        pages, total, largest = pages + 1, total + elapsed, max(largest, size)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return {"first_s": first, "again_s": again, "pages": pages, "all_pages_s": total, "largest_page": largest}


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown(results: list[dict], info: dict) -> str:
    def col(key: str, sub: str | None = None) -> list[float]:
        return [r[key][sub] if sub else r[key] for r in results]

    rows = [
        ("time to the first grid (ms)", col("first_grid_ms")),
        ("whole run folded and drawn (ms)", col("complete_ms")),
        ("scroll 90 px/frame: frame p50 (ms)", col("wheel", "p50")),
        ("scroll 90 px/frame: frame p95 (ms)", col("wheel", "p95")),
        ("scroll 90 px/frame: frame max (ms)", col("wheel", "max")),
        ("scroll 1,800 px/frame: frame p50 (ms)", col("fling", "p50")),
        ("scroll 1,800 px/frame: frame p95 (ms)", col("fling", "p95")),
        ("scroll 1,800 px/frame: frame max (ms)", col("fling", "max")),
        ("one grid draw while flinging (ms, mean)", col("draw_ms")),
        ("one grid draw while flinging (ms, p95)", col("draw_p95_ms")),
        ("rows in the DOM (most)", col("dom_rows")),
    ]
    lines = [
        f"## Federation health grid, {info['clients']:,} clients x {info['rounds']} rounds "
        "(`bench/dashboard_grid.py`)",
        "",
        f"- date: {info['date']}; machine: {info['cores']} cores, {info['platform']}; "
        f"load average at start {info['load']:.2f}",
        f"- run: {info['events']:,} events ({info['cells']:,} sampled cells), "
        f"published in {info['publish_s']:.1f} s; Chromium {info['chromium']}, viewport 1280 x 900",
        f"- {len(results)} repeats, a fresh tab each; median (min-max)",
        "",
        "| measure | median | min-max |",
        "|---|---|---|",
    ]
    for name, values in rows:
        lines.append(f"| {name} | {median(values):,.1f} | {min(values):,.1f}-{max(values):,.1f} |")
    api = info["api"]
    lines += [
        "",
        f"`GET /api/runs/{{id}}/clients` on the same run (relay and bench on the same machine): first look "
        f"(the relay reads and folds the whole run) **{api['first_s']:.2f} s**, a second look (its fold "
        f"kept) {api['again_s'] * 1000:.0f} ms, every cell: {api['pages']} pages of at most "
        f"{api['largest_page'] / 1024:.0f} KiB in {api['all_pages_s']:.2f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the markdown section here too")
    parser.add_argument("--json", help="write every repeat's figures here")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayProcess(Path(tmp) / "relay.db").start()
        try:
            run = generated_run("grid-bench", clients=args.clients, rounds=args.rounds, seed=1)
            started = time.perf_counter()
            publish_blocking(relay.url, run)
            publish_s = time.perf_counter() - started
            print(f"published {len(run.events):,} events in {publish_s:.1f} s", file=sys.stderr)
            api = api_costs(relay, "grid-bench")
            print(f"api: {json.dumps(api)}", file=sys.stderr)
            results = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
                version = browser.version
                for n in range(args.repeats):
                    results.append(
                        one_repeat(browser, relay, "grid-bench", len(run.events), args.clients, args.rounds)
                    )
                    print(f"repeat {n + 1}: {json.dumps(results[-1])}", file=sys.stderr)
                browser.close()
        finally:
            relay.stop()
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "load": load,
        "clients": args.clients,
        "rounds": args.rounds,
        "events": len(run.events),
        "cells": len(run.cells),
        "publish_s": publish_s,
        "chromium": version,
        "api": api,
    }
    text = markdown(results, info)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "repeats": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
