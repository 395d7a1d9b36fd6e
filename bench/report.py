"""Turn per-repeat results into markdown: medians, spreads and ratios.

Medians, because the machine is shared and noisy; ratios are only taken
between relays measured in the same invocation (interleaved repeats), never
against numbers from another run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness import median

Results = dict[str, dict[str, list[dict[str, Any]]]]
"""scenario -> relay -> one dict per repeat (``{"error": ...}`` when it failed)."""


@dataclass
class Column:
    header: str
    key: str
    fmt: str = "{:.1f}"
    spread: bool = False


COLUMNS: dict[str, list[Column]] = {
    "fanout": [
        Column("delivered events/s (median, min-max)", "delivered_per_s", "{:,.0f}", True),
        Column("published events/s", "publish_per_s", "{:,.0f}"),
        Column("events published", "published", "{:,.0f}"),
        Column("subs complete", "complete_subs", "{:.0f}"),
        Column("WS frames/event", "frames_per_event", "{:.2f}"),
        Column("WS frames/socket read", "frames_per_read", "{:.2f}"),
        Column("relay CPU %", "relay_cpu", "{:.0f}"),
        Column("subscriber-gen CPU %", "loadgen_cpu", "{:.0f}"),
        Column("producer+pacer CPU %", "driver_cpu", "{:.0f}"),
        Column("machine busy % (of all cores)", "machine_busy", "{:.0f}"),
    ],
    "latency": [
        Column("p50 ms", "p50_ms", "{:.2f}", True),
        Column("p99 ms", "p99_ms", "{:.2f}", True),
        Column("p99.9 ms", "p999_ms", "{:.2f}"),
        Column("max ms", "max_ms", "{:.1f}", True),
        Column("p99 first quarter ms", "p99_first_ms", "{:.1f}"),
        Column("p99 last quarter ms", "p99_last_ms", "{:.1f}"),
        Column("share > 5 ms", "over_5ms", "{:.2%}"),
        Column("relay stalls/s", "stalls_per_s", "{:.1f}"),
        Column("median s between stalls", "stall_period_s", "{:.2f}"),
        Column("samples / expected", "samples_ratio", "{:.4f}"),
        Column("publish rate /s", "rate", "{:.0f}"),
        Column("WS frames/event", "frames_per_event", "{:.2f}"),
        Column("WS frames/socket read", "frames_per_read", "{:.2f}"),
        Column("relay CPU %", "relay_cpu", "{:.0f}"),
        Column("subscriber-gen CPU %", "loadgen_cpu", "{:.0f}"),
        Column("machine busy % (of all cores)", "machine_busy", "{:.0f}"),
    ],
    "ingest": [
        Column("events sent", "sent", "{:,.0f}"),
        Column("acked when sending stopped", "acked_at_end", "{:,.0f}"),
        Column("acked after settle", "acked_final", "{:,.0f}"),
        Column("stored last_seq", "last_seq", "{:,.0f}"),
        Column("settle s", "settle_s", "{:.2f}"),
        Column("max backlog (sent-acked)", "max_backlog", "{:,.0f}"),
        Column("max backlog s of load", "backlog_s", "{:.2f}"),
        Column("ack p50 ms", "ack_p50_ms", "{:.1f}"),
        Column("ack p99 ms", "ack_p99_ms", "{:.1f}", True),
        Column("ack max ms", "ack_max_ms", "{:.0f}"),
        Column("relay CPU % mean", "relay_cpu", "{:.0f}", True),
        Column("relay CPU % max 0.5 s", "relay_cpu_max", "{:.0f}"),
        Column("machine busy % (of all cores)", "machine_busy", "{:.0f}"),
        Column("subscriber got / expected", "sub_ratio", "{:.4f}"),
    ],
    "catchup": [
        Column("events", "events", "{:,.0f}"),
        Column("time to all ms (median, min-max)", "time_ms", "{:.0f}", True),
        Column("after subscribed ms", "after_subscribed_ms", "{:.0f}"),
        Column("frames", "frames", "{:,.0f}"),
        Column("events/frame", "events_per_frame", "{:.0f}"),
        Column("seq 1..N ok", "seq_ok", "{}"),
        Column("client JSON decode ms", "decode_ms", "{:.0f}"),
        Column("relay CPU % during", "relay_cpu", "{:.0f}"),
        Column("history publish events/s", "publish_per_s", "{:,.0f}"),
    ],
    "memory": [
        Column("connections", "connections", "{:,.0f}"),
        Column("RSS before MiB", "rss_before_mib", "{:.1f}"),
        Column("RSS after MiB", "rss_after_mib", "{:.1f}"),
        Column("KiB per connection (median, min-max)", "kib_per_conn", "{:.1f}", True),
        Column("open fds after", "fds_after", "{:.0f}"),
        Column("relay fd limit", "fd_limit", "{:.0f}"),
        Column("connect s", "connect_s", "{:.2f}"),
    ],
}

COLUMNS["latency_low"] = COLUMNS["latency"]

TITLES = {
    "fanout": "Fan-out throughput",
    "latency": "Delivery latency",
    "latency_low": "Delivery latency below saturation",
    "ingest": "Ingest (fedrelay stores every event)",
    "catchup": "Catch-up of a stored run",
    "memory": "Memory per idle subscriber connection",
}


def derived(row: dict[str, Any]) -> dict[str, Any]:
    """Add ratios the tables show but the runs do not compute."""
    row = dict(row)
    if "samples" in row and row.get("expected"):
        row["samples_ratio"] = row["samples"] / row["expected"]
    if "sub_received" in row and row.get("sub_expected"):
        row["sub_ratio"] = row["sub_received"] / row["sub_expected"]
    if row.get("max_backlog") is not None and row.get("rate"):
        row["backlog_s"] = row["max_backlog"] / row["rate"]
        if row.get("acked_final") != row.get("sent"):
            row["backlog_s"] = math.inf  # not everything was acked: a backlog that never cleared
    return row


def values(runs: list[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in runs if "error" not in r and r.get(key) is not None]


def cell(runs: list[dict[str, Any]], col: Column) -> str:
    """Median (and min-max) of one metric over the repeats."""
    vals = values(runs, col.key)
    if not vals:
        return "-"
    if isinstance(vals[0], bool):
        return f"{sum(vals)}/{len(vals)}"
    mid = median(vals)
    if math.isnan(mid):
        return "-"
    text = col.fmt.format(mid)
    if col.spread and len(vals) > 1:
        text += f" ({col.fmt.format(min(vals))}-{col.fmt.format(max(vals))})"
    return text


def table(scenario: str, by_relay: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One markdown table: a row per relay, medians over repeats."""
    cols = COLUMNS[scenario]
    lines = [
        "| relay | repeats | " + " | ".join(c.header for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for relay, runs in by_relay.items():
        rows = [derived(r) for r in runs]
        ok = sum(1 for r in rows if "error" not in r)
        lines.append(f"| {relay} | {ok}/{len(rows)} | " + " | ".join(cell(rows, c) for c in cols) + " |")
    return lines


def ratio_line(
    by_relay: dict[str, list[dict[str, Any]]], key: str, num: str, den: str, label: str, fmt: str = "{:.2f}"
) -> str | None:
    """``num / den`` of the medians, when both relays ran."""
    a = median(values(by_relay.get(num, []), key))
    b = median(values(by_relay.get(den, []), key))
    if math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return f"- {label}: {num} / {den} = **{fmt.format(a / b)}**"


def ratios(scenario: str, by_relay: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Ratios against the baselines measured in the same run."""
    specs: dict[str, list[tuple[str, str, str, str]]] = {
        "fanout": [
            ("delivered_per_s", "fedrelay", "broadcast", "delivered events/s"),
            ("delivered_per_s", "fedrelay", "naive", "delivered events/s"),
            ("delivered_per_s", "broadcast", "naive", "delivered events/s"),
        ],
        "latency": [
            ("p99_ms", "fedrelay", "broadcast", "p99 latency"),
            ("p50_ms", "fedrelay", "broadcast", "p50 latency"),
            ("relay_cpu", "fedrelay", "broadcast", "relay CPU"),
        ],
        "latency_low": [
            ("p99_ms", "fedrelay", "broadcast", "p99 latency"),
            ("p50_ms", "fedrelay", "broadcast", "p50 latency"),
        ],
        "memory": [("kib_per_conn", "fedrelay", "broadcast", "KiB per connection")],
    }
    for key, label in {
        "fanout": [("delivered_per_s", "delivered events/s")],
        "latency": [("p99_ms", "p99 latency"), ("p50_ms", "p50 latency"), ("relay_cpu", "relay CPU")],
        "latency_low": [("p99_ms", "p99 latency"), ("p50_ms", "p50 latency")],
        "ingest": [("ack_p99_ms", "ack p99"), ("relay_cpu", "relay CPU (with PostgreSQL's)")],
        "catchup": [("time_ms", "catch-up time")],
    }.get(scenario, []):
        for kind in ("fedrelay-pg", "fedrelay-pg3"):  # against the SQLite relay of the same run
            specs.setdefault(scenario, []).append((key, kind, "fedrelay", label))
    out = []
    for key, num, den, label in specs.get(scenario, []):
        line = ratio_line(by_relay, key, num, den, label)
        if line:
            out.append(line)
    return out


TARGETS: dict[str, list[tuple[str, str, float, str]]] = {
    "latency": [
        ("fedrelay", "p99_ms", 5.0, "fedrelay p99 < 5 ms"),
        ("fedrelay-pg3", "p99_ms", 20.0, "fedrelay-pg3 p99 < 20 ms across nodes"),
    ],
    "latency_low": [("fedrelay", "p99_ms", 5.0, "fedrelay p99 < 5 ms")],
    "catchup": [
        (kind, "time_ms", 1000.0, f"{kind} catch-up < 1 s")
        for kind in ("fedrelay", "fedrelay-pg", "fedrelay-pg3")
    ],
    "ingest": [
        (kind, "backlog_s", 0.5, f"{kind} ingest with no backlog (max sent-acked < 0.5 s of the load)")
        for kind in ("fedrelay-pg", "fedrelay-pg3")
    ],
}
"""The issues' targets (#2, #3, #15): relay, metric, limit (median below it), label."""


def targets(scenario: str, by_relay: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The issues' targets, checked against the medians of the relays that ran."""
    out = []
    for kind, key, limit, label in TARGETS.get(scenario, []):
        if kind not in by_relay:
            continue
        value = median(values([derived(r) for r in by_relay[kind]], key))
        if math.isnan(value):
            out.append(f"- target {label}: no data")
            continue
        verdict = "met" if value < limit else "MISSED"
        out.append(f"- target {label}: median {value:.2f} -> **{verdict}**")
    return out


def problems(by_relay: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Errors and anomalies of each repeat, so they are not hidden by medians."""
    out = []
    for relay, runs in by_relay.items():
        for i, run in enumerate(runs, 1):
            if "error" in run:
                out.append(f"- {relay} repeat {i}: ERROR {run['error']}")
            for problem in run.get("problems", []):
                out.append(f"- {relay} repeat {i}: {problem}")
            if run.get("steal", 0) > 5:
                out.append(f"- {relay} repeat {i}: hypervisor steal {run['steal']:.0f}% of CPU time")
            if run.get("seq_ok") is False:
                out.append(f"- {relay} repeat {i}: seq check failed: {run.get('seq_detail')}")
    return out


def render(results: Results, header: list[str], extra: Callable[[str], list[str]]) -> str:
    """The whole markdown document."""
    lines = list(header)
    for scenario, by_relay in results.items():
        lines += ["", f"## {TITLES[scenario]} (`{scenario}`)", ""]
        lines += table(scenario, by_relay)
        notes = ratios(scenario, by_relay) + targets(scenario, by_relay) + extra(scenario)
        issues = problems(by_relay)
        if notes:
            lines += ["", *notes]
        if issues:
            lines += ["", "Anomalies:", "", *issues]
    return "\n".join(lines) + "\n"
