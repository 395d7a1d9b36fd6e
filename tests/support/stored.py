"""What a relay stored, read back through its HTTP API as any client would."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.support.relay_process import RelayProcess

PAGE = 10_000
"""The API's largest page: a run longer than this takes several requests."""


def stored_events(
    relay: RelayProcess, run_id: str, *, since: int = 0, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every stored event of ``run_id`` after ``since``, in seq order, page by page to the end
    (a single request would stop at one page). A run the relay does not know holds none."""
    events: list[dict[str, Any]] = []
    while True:
        status, page = relay.get_json(f"/api/runs/{run_id}/events?since={since}&limit={PAGE}", headers)
        if status == 404 and not events:
            return events
        assert status == 200, page
        if not page["events"]:
            return events
        events.extend(page["events"])
        since = page["next_since"]


def run_status(relay: RelayProcess, run_id: str) -> str:
    """The run's status as ``/api/runs/{run_id}`` reports it (the run must exist)."""
    status, body = relay.get_json(f"/api/runs/{run_id}")
    assert status == 200, body
    return body["status"]


def assert_gap_free(events: list[dict[str, Any]]) -> None:
    """Seqs 1..N, each once."""
    seqs = [e["seq"] for e in events]
    duplicates = [s for s, n in Counter(seqs).items() if n > 1]
    assert not duplicates, f"duplicate seqs {duplicates}"
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def of_type(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    """The events of type ``kind`` whose data has the given values."""
    return [e for e in events if e["type"] == kind and all(e["data"].get(k) == v for k, v in match.items())]
