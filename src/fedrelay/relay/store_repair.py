"""Keeping the ``runs`` table and the events it summarises consistent.

A run's next seq comes from its ``runs`` row. A row behind the events it
summarises (a restored backup, a hand edit, another tool's inserts) makes the
next commit of that run collide with a stored seq; retried as is, that one
batch would block every run for ever. At start the rows are reconciled with
the events table; at run time a colliding run's queued events are moved past
the stored ones. These functions work on the writer's connection and on
plain data; the store decides when to call them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from ..schemas.wire import encode
from .hub import Run, Sequenced

_NEXT_RUN = "SELECT run_id FROM events WHERE run_id > ? ORDER BY run_id LIMIT 1"
_TOP_SEQ = "SELECT max(seq) FROM events WHERE run_id = ?"
_FIRST_ROW = "SELECT seq, received_at FROM events WHERE run_id = ? ORDER BY seq LIMIT 1"
_LAST_ROW = "SELECT received_at FROM events WHERE run_id = ? ORDER BY seq DESC LIMIT 1"


def reconcile_runs(db: sqlite3.Connection, runs: dict[str, Run]) -> list[Run]:
    """Raise ``last_seq`` to the highest stored seq and add the runs that have events but
    no row; returns the runs changed (to be written back).

    The run ids come from a skip scan of the events' primary key (one index seek per
    run, not a pass over every event), so a start with 50,000 runs and millions of
    events stays short. A run rebuilt from its events alone has no summary (status
    ``running``, no experiment name) until new events arrive.
    """
    changed: list[Run] = []
    run_id = ""
    while (row := db.execute(_NEXT_RUN, (run_id,)).fetchone()) is not None:
        run_id = row[0]
        top = db.execute(_TOP_SEQ, (run_id,)).fetchone()[0]
        run = runs.get(run_id)
        if run is None:
            first_seq, created_at = db.execute(_FIRST_ROW, (run_id,)).fetchone()
            updated_at = db.execute(_LAST_ROW, (run_id,)).fetchone()[0]
            run = Run(run_id, created_at=created_at, updated_at=updated_at, first_seq=first_seq)
            run.last_seq = top
            runs[run_id] = run
            changed.append(run)
        elif run.last_seq < top:
            run.last_seq = top
            changed.append(run)
    return changed


def colliding_runs(db: sqlite3.Connection, batch: Iterable[Sequenced]) -> dict[str, int]:
    """Runs of ``batch`` whose seqs are already taken in the table: run id -> highest stored seq."""
    lowest: dict[str, int] = {}
    for item in batch:
        lowest.setdefault(item.run_id, item.seq)
    taken: dict[str, int] = {}
    for run_id, seq in lowest.items():
        top = db.execute(_TOP_SEQ, (run_id,)).fetchone()[0]
        if top is not None and top >= seq:
            taken[run_id] = top
    return taken


def renumber(pending: Iterable[Sequenced], run_id: str, first_seq: int) -> tuple[int, int]:
    """Give the queued events of ``run_id`` new seqs from ``first_seq`` on, in their order.

    Returns (events moved, change in their encoded size). Nobody has seen these
    events: they are not committed, so no subscriber or ack knows their old seqs.
    """
    moved = grown = 0
    seq = first_seq
    for item in pending:
        if item.run_id != run_id:
            continue
        event: dict[str, Any] = json.loads(item.body)
        event["seq"] = seq
        body = encode(event)
        grown += len(body) - len(item.body)
        item.seq, item.body, item._legacy = seq, body, None
        seq += 1
        moved += 1
    return moved, grown
