"""The PostgreSQL schema, versioned: created or migrated at start, in one transaction, under an
advisory lock, so that relays starting together do not race each other through it."""

from __future__ import annotations

from typing import Any

from ..eventlog import StoreError

SCHEMA_LOCK = 0x66656472  # "fedr": the advisory lock key of schema changes
HOUSEKEEPING_LOCK = 0x66656473
"""Held by the one node that does housekeeping (forgetting producers) at a time."""
ADOPT_LOCK = 0x66656474
"""Held (for one transaction) by the node handing itself the claims of nodes gone quiet."""

MIGRATIONS: list[str] = [
    # 1: the log, the runs' counters and summaries, the producers' positions.
    """
    CREATE TABLE runs (
        run_id      TEXT PRIMARY KEY,
        last_seq    BIGINT NOT NULL DEFAULT 0,
        first_seq   BIGINT NOT NULL DEFAULT 1,
        created_at  DOUBLE PRECISION NOT NULL,
        summary_seq BIGINT NOT NULL DEFAULT 0,
        status      TEXT NOT NULL DEFAULT 'running',
        updated_at  DOUBLE PRECISION NOT NULL,
        started_at  DOUBLE PRECISION,
        ended_at    DOUBLE PRECISION,
        info        TEXT NOT NULL DEFAULT '{}',
        ledger      TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE events (
        run_id      TEXT NOT NULL,
        seq         BIGINT NOT NULL,
        type        TEXT NOT NULL,
        producer    TEXT NOT NULL,
        producer_id BIGINT,
        received_at DOUBLE PRECISION NOT NULL,
        body        TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE UNIQUE INDEX events_by_producer ON events (producer, producer_id)
        WHERE producer_id IS NOT NULL;
    CREATE TABLE producers (
        name        TEXT PRIMARY KEY,
        last_id     BIGINT NOT NULL,
        updated_at  DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX producers_by_update ON producers (updated_at);
    """,
    # 2: alerts (relay/pg/alerts.py): claims per (alert, webhook) with the node that sends them,
    # the engine's cursors per run, heartbeats (``alive_at``; ``alive:<node>`` per node).
    """
    CREATE TABLE alert_outbox (
        key         TEXT NOT NULL,
        target      TEXT NOT NULL,
        payload     TEXT NOT NULL,
        state       TEXT NOT NULL DEFAULT 'pending',
        owner       TEXT NOT NULL,
        created_at  DOUBLE PRECISION NOT NULL,
        updated_at  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key, target)
    );
    CREATE INDEX alert_outbox_pending ON alert_outbox (owner, created_at) WHERE state = 'pending';
    CREATE INDEX alert_outbox_settled ON alert_outbox (updated_at) WHERE state <> 'pending';
    CREATE TABLE alert_runs (
        run_id      TEXT PRIMARY KEY,
        seq         BIGINT NOT NULL,
        state       TEXT NOT NULL
    );
    CREATE TABLE alert_meta (
        name        TEXT PRIMARY KEY,
        value       DOUBLE PRECISION NOT NULL
    );
    """,
]
VERSION = len(MIGRATIONS)


async def migrate(conn: Any) -> int:
    """Bring the database to :data:`VERSION`; returns the version found before.

    Refuses (:class:`StoreError`) a database whose schema is newer than this code: an older
    relay must not write a log it does not understand.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if found > VERSION:
            raise StoreError(
                f"the database's schema is version {found}, newer than this relay's ({VERSION}): "
                "upgrade fedrelay on every node before starting this one"
            )
        for version in range(found + 1, VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        return found
