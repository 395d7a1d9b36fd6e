"""The event store's WAL under steady commits, on a real SQLite file.

Commits run on the event loop, so the store must never let them wait for
the write lock (that wait is a delivery stall for every subscriber), and
the WAL must still start over instead of growing while commits never stop.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

from fedrelay.relay.hub import Run, Sequenced
from fedrelay.relay.store import EventStore


def wal_generation(wal: Path) -> int | None:
    """The WAL header's checkpoint sequence number: it goes up each time the WAL starts over."""
    try:
        header = wal.read_bytes()[:32] if wal.stat().st_size >= 32 else b""
    except OSError:
        return None
    if len(header) < 32:
        return None
    return struct.unpack(">I", header[12:16])[0]


async def test_wal_starts_over_while_commits_keep_coming_and_no_commit_waits_for_the_lock(tmp_path):
    committed: list[int] = []
    run = Run("r", time.time())
    store = EventStore(
        tmp_path / "events.db",
        runs={"r": run},
        on_commit=lambda batch: committed.extend(item.seq for item in batch),
        wal_restart_bytes=256 << 10,
    )
    await store.open()
    wal = tmp_path / "events.db-wal"
    body = json.dumps({"type": "client_progress", "run_id": "r", "data": {"pad": "x" * 300}})
    generations: set[int] = set()
    seq = 0
    deadline = time.monotonic() + 30
    try:
        # One event per commit, commits back to back: the checkpoint never sees a quiet WAL.
        while len(generations) < 3 and time.monotonic() < deadline:
            seq += 1
            store.append([Sequenced("r", seq, "client_progress", "p", seq, time.time(), body)])
            await asyncio.sleep(0)
            if seq % 50 == 0 and (generation := wal_generation(wal)) is not None:
                generations.add(generation)
        pending_deadline = time.monotonic() + 10
        while store.lag and time.monotonic() < pending_deadline:
            await asyncio.sleep(0.01)
    finally:
        left = await store.close()
    assert len(generations) >= 3, f"the WAL never started over: generations {sorted(generations)}"
    assert store.busy_waits == 0, "a commit found the write lock taken: delivery stalled behind a checkpoint"
    assert left == 0
    assert committed == list(range(1, seq + 1))
