"""Federation health as a few lines of text, for ``fedrelay tail --clients``: per round the
finished / failed / silent counts, the median duration, the stragglers and the critical path;
then the clients that failed or went silent most often. No I/O."""

from __future__ import annotations

from .federation import ClientHealth, HealthReport, RoundHealth

SHOWN_IDS = 5
"""Straggler ids named on a round's line (the count says how many there are)."""
TOP_FAILING = 5


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}s" if value >= 1 else f"{value * 1000:.1f}ms"


def round_line(rnd: RoundHealth) -> str:
    """``round 3: 2 finished, 1 failed, 0 silent, 1 straggler; median 0.52s; critical path 2 (7.10s)``"""
    counts = rnd.summary()
    parts = [f"{counts['finished'] + counts['straggler']} finished", f"{counts['failed']} failed"]
    parts.append(f"{counts['silent']} silent" if rnd.closed else f"{counts['running']} running")
    stragglers = rnd.stragglers
    if stragglers:
        named = ", ".join(stragglers[:SHOWN_IDS]) + (" ..." if len(stragglers) > SHOWN_IDS else "")
        parts.append(f"{len(stragglers)} straggler{'s' if len(stragglers) > 1 else ''} ({named})")
    text = f"round {rnd.round}: " + ", ".join(parts) + f"; median {_seconds(rnd.median)}"
    if rnd.critical_path is not None:
        client, duration = rnd.critical_path
        text += f"; critical path {client} ({_seconds(duration)})"
    return text


def top_failing(report: HealthReport, limit: int = TOP_FAILING) -> list[ClientHealth]:
    """Clients that failed or stayed silent in the most rounds (failures first), then by id."""
    hurt = [c for c in report.clients if c.failed or c.silent]
    hurt.sort(key=lambda c: (-(c.failed + c.silent), -c.failed))
    return hurt[:limit]


def top_failing_line(report: HealthReport, limit: int = TOP_FAILING) -> str:
    """``top failing clients: 1 (failed 2 of 3 rounds), 7 (failed 1, silent 1 of 4 rounds)``"""
    clients = top_failing(report, limit)
    if not clients:
        return "top failing clients: none"
    parts = []
    for client in clients:
        what = [f"{label} {n}" for label, n in (("failed", client.failed), ("silent", client.silent)) if n]
        parts.append(f"{client.client_id} ({', '.join(what)} of {client.sampled - client.running} rounds)")
    return "top failing clients: " + ", ".join(parts)
