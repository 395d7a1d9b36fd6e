"""PgEventLog driven directly on a real database: what one commit statement decides."""

from __future__ import annotations

import asyncio

import asyncpg

from fedrelay.relay.hub import Hub
from fedrelay.relay.pg.log import PgEventLog


def ev(run_id: str, i: int, note: str = "") -> dict:
    data = {"message": note or f"m{i}"}
    return {"type": "status", "run_id": run_id, "id": i, "timestamp": None, "data": data}


async def test_one_batch_with_an_id_twice_and_ids_already_stored(pg_server):
    db = pg_server.fresh_db()
    hub = Hub(assigns_seqs=False)
    log = PgEventLog(db, runs=hub.runs, on_commit=hub.committed)
    await log.open()
    await log.follow()
    try:
        first = hub.accept("p", [ev("a", 1), ev("b", 2), ev("a", 3)]).new
        log.append(first)
        await asyncio.wait_for(log.all_committed(), 10)
        # The same ids again (another node's copy, an emitter whose position was lost) and an
        # id twice within one batch: each stored once, numbering without holes.
        batch = []
        for events in ([ev("a", 3), ev("a", 4)], [ev("b", 2)], [ev("a", 4, "copy"), ev("a", 5)]):
            batch += Hub(assigns_seqs=False).accept("p", events).new  # each its own node
        log.append(batch)
        await asyncio.wait_for(log.all_committed(), 10)
        assert (log.duplicates, log.commits) == (3, 2)
        conn = await asyncpg.connect(db)
        try:
            rows = await conn.fetch("SELECT run_id, seq, producer_id FROM events ORDER BY run_id, seq")
            runs = await conn.fetch("SELECT run_id, last_seq FROM runs ORDER BY run_id")
            position = await conn.fetchval("SELECT last_id FROM producers WHERE name = 'p'")
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [("a", 1, 1), ("a", 2, 3), ("a", 3, 4), ("a", 4, 5), ("b", 1, 2)]
        assert [tuple(r) for r in runs] == [("a", 4), ("b", 1)]
        assert position == 5
        assert (hub.runs["a"].committed_seq, hub.runs["b"].committed_seq) == (4, 1)
        assert "copy" not in (await log.read("a", 2, 4, 10))[0][1]
    finally:
        await log.close()
