"""The event store's WAL under steady commits, on a real SQLite file.

Commits run on the event loop, so the store must never let them wait for
the write lock (that wait is a delivery stall for every subscriber), and
the WAL must still start over instead of growing while commits never stop,
also while catch-up reads never stop.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

from fedrelay.relay.hub import Run, Sequenced
from fedrelay.relay.store import EventStore

BODY = json.dumps({"type": "client_progress", "run_id": "r", "data": {"pad": "x" * 300}})


def wal_generation(wal: Path) -> int | None:
    """The WAL header's checkpoint sequence number: it goes up each time the WAL starts over."""
    try:
        with wal.open("rb") as handle:
            header = handle.read(32)
    except OSError:
        return None
    if len(header) < 32:
        return None
    return struct.unpack(">I", header[12:16])[0]


async def open_store(path: Path, committed: list[int]) -> EventStore:
    store = EventStore(
        path,
        runs={"r": Run("r", time.time())},
        on_commit=lambda batch: committed.extend(item.seq for item in batch),
        wal_restart_bytes=256 << 10,
    )
    await store.open()
    return store


async def commit_until_the_wal_started_over(store: EventStore, wal: Path, times: int) -> tuple[int, set[int]]:
    """Commit one event per loop turn until the WAL header changed generation ``times`` times
    (or 30 s); returns the last seq and the generations seen."""
    generations: set[int] = set()
    seq = 0
    deadline = time.monotonic() + 30
    while len(generations) <= times and time.monotonic() < deadline:
        seq += 1
        store.append([Sequenced("r", seq, "client_progress", "p", seq, time.time(), BODY)])
        await asyncio.sleep(0)
        if seq % 50 == 0 and (generation := wal_generation(wal)) is not None:
            generations.add(generation)
    pending_deadline = time.monotonic() + 10
    while store.lag and time.monotonic() < pending_deadline:
        await asyncio.sleep(0.01)
    return seq, generations


async def test_wal_starts_over_while_commits_keep_coming_and_no_commit_waits_for_the_lock(tmp_path):
    committed: list[int] = []
    store = await open_store(tmp_path / "events.db", committed)
    try:
        # Commits back to back: the checkpoint never sees a quiet WAL.
        seq, generations = await commit_until_the_wal_started_over(store, tmp_path / "events.db-wal", 2)
    finally:
        left = await store.close()
    assert len(generations) >= 3, f"the WAL never started over: generations {sorted(generations)}"
    assert store.busy_waits == 0, "a commit found the write lock taken: delivery stalled behind a checkpoint"
    assert left == 0
    assert committed == list(range(1, seq + 1))


async def test_wal_starts_over_while_catch_up_reads_never_stop(tmp_path):
    """A read in flight keeps the frames it may need: the short held checkpoint cannot catch
    up, and the store must still bring the WAL back (through the readers' queue)."""
    committed: list[int] = []
    store = await open_store(tmp_path / "events.db", committed)
    reading = True
    pages = 0

    async def read_for_ever() -> None:
        nonlocal pages
        while reading:
            if committed:
                await store.read("r", 0, committed[-1], 2000)
                pages += 1
            else:
                await asyncio.sleep(0.001)

    readers = [asyncio.create_task(read_for_ever()) for _ in range(4)]
    try:
        seq, generations = await commit_until_the_wal_started_over(store, tmp_path / "events.db-wal", 2)
    finally:
        reading = False
        outcomes = await asyncio.gather(*readers, return_exceptions=True)
        left = await store.close()
    failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert not failed, f"catch-up reads failed: {failed!r}"
    assert pages > 10
    assert len(generations) >= 3, f"the WAL never started over: generations {sorted(generations)}"
    assert store.escalated_checkpoints >= 1
    assert left == 0
    assert committed == list(range(1, seq + 1))
