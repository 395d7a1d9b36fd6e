"""``GET /api/runs/{id}/clients``: a federation health report as pages of at most
:data:`MAX_PAGE_BYTES`, with no I/O.

A page holds, in this order and as far as it fits: per-client rates (``clients``), then rounds
(``rounds``: each round's summary, then its cells unless ``cells=0``). The rest is reached by
following ``next_cursor``; a round whose cells do not fit in one page continues on the next, with
its summary repeated. Every item is small (a cell's failure detail is capped, a round lists at
most 50 stragglers by id), so every page makes progress. On a live run, pages are judged at
different moments: each is consistent in itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..federation import DEFAULT_FACTOR, DEFAULT_MIN_GAP, HealthReport

MAX_PAGE_BYTES = 1 << 20
"""Bytes of JSON per page (ASCII: characters are bytes)."""
MAX_FACTOR = 1000.0
MAX_MIN_GAP = 86400.0


class BadQuery(ValueError):
    """A query the API refuses (HTTP 400), saying what to fix."""


@dataclass(frozen=True, slots=True)
class HealthQuery:
    factor: float = DEFAULT_FACTOR
    min_gap: float = DEFAULT_MIN_GAP
    cells: bool = True
    section: str = "c"
    """Where the page starts: ``c`` (clients, at ``index``) or ``r`` (round ``round``, cell ``index``)."""
    round: int = 0
    index: int = 0


def parse_query(query: Mapping[str, list[str]]) -> HealthQuery:
    def one(key: str) -> str | None:
        values = query.get(key)
        return values[0] if values else None

    factor = _number(one("factor"), "factor", DEFAULT_FACTOR, 1.0, MAX_FACTOR)
    min_gap = _number(one("min_gap"), "min_gap", DEFAULT_MIN_GAP, 0.0, MAX_MIN_GAP)
    cells = one("cells")
    if cells not in (None, "0", "1"):
        raise BadQuery("cells must be 0 (round summaries only) or 1")
    section, number, index = "c", 0, 0
    if (cursor := one("cursor")) is not None:
        section, number, index = _decode_cursor(cursor)
    return HealthQuery(factor, min_gap, cells != "0", section, number, index)


def _number(text: str | None, name: str, default: float, low: float, high: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadQuery(f"{name} must be a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise BadQuery(f"{name} must be between {low:g} and {high:g}")
    return value


def _encode_cursor(section: str, number: int, index: int) -> str:
    return base64.urlsafe_b64encode(f"{section}:{number}:{index}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        section, number, index = raw.split(":")
        if section not in ("c", "r") or not (number.isdigit() and index.isdigit()):
            raise ValueError(raw)
        if len(number) > 18 or len(index) > 18:
            raise ValueError(raw)
        return section, int(number), int(index)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery("cursor is not one this relay handed out; start without it") from None


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def encode_page(run_id: str, report: HealthReport, query: HealthQuery, last_seq: int) -> bytes:
    """One page of the report, as JSON bytes."""
    head = _dumps(
        {
            "run_id": run_id,
            "last_seq": last_seq,
            "straggler_factor": report.factor,
            "straggler_min_seconds": report.min_gap,
            "num_clients": len(report.clients),
            "num_rounds": len(report.rounds),
            "truncated": report.truncated,
        }
    )[:-1]
    budget = MAX_PAGE_BYTES - len(head) - 64
    used = 0
    items = 0
    clients: list[str] = []
    rounds: list[str] = []
    cursor: str | None = None

    def fits(size: int) -> bool:
        return items == 0 or used + size + 1 <= budget

    if query.section == "c":
        for position in range(query.index, len(report.clients)):
            text = _dumps(report.clients[position].as_json())
            if not fits(len(text)):
                cursor = _encode_cursor("c", 0, position)
                break
            clients.append(text)
            used += len(text) + 1
            items += 1
    start_round, start_cell = (query.round, query.index) if query.section == "r" else (0, 0)
    if cursor is None:
        for rnd in report.rounds:
            if rnd.round < start_round:
                continue
            first = start_cell if rnd.round == start_round else 0
            summary = _dumps(rnd.summary())[:-1]
            if not fits(len(summary) + 12):
                cursor = _encode_cursor("r", rnd.round, first)
                break
            used += len(summary) + 12
            items += 1
            cells: list[str] = []
            if query.cells:
                for position, (client_id, cell) in enumerate(rnd.cells.items()):
                    if position < first:
                        continue
                    text = _dumps(client_id) + ":" + _dumps(cell.as_json())
                    if not fits(len(text)):
                        cursor = _encode_cursor("r", rnd.round, position)
                        break
                    cells.append(text)
                    used += len(text) + 1
                    items += 1
            rounds.append(summary + (',"cells":{' + ",".join(cells) + "}}" if query.cells else "}"))
            if cursor is not None:
                break
    return (
        head
        + ',"clients":['
        + ",".join(clients)
        + '],"rounds":['
        + ",".join(rounds)
        + '],"next_cursor":'
        + _dumps(cursor)
        + "}"
    ).encode()
