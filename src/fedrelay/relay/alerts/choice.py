"""Which :class:`~.outbox.AlertLog` a relay keeps its alerts in: the one its ``--db`` names."""

from __future__ import annotations

from ..eventlog import StoreError, is_postgres_url
from .outbox import AlertLog, MemoryAlertLog, SqliteAlertLog
from .settings import AlertSettings


def alert_log_for(db: str, *, in_memory: bool, settings: AlertSettings) -> AlertLog:
    """Memory for ``--memory``, the PostgreSQL tables for a ``postgresql://`` URL (shared by
    every relay on the database), else the SQLite file's tables."""
    if in_memory:
        return MemoryAlertLog()
    if is_postgres_url(db):
        try:  # asyncpg only where PostgreSQL is used
            from ..pg.alerts import PgAlertLog
        except ImportError as exc:
            need = "a PostgreSQL --db needs asyncpg: pip install 'fedrelay[server]'"
            raise StoreError(f"{need} ({exc})") from exc
        return PgAlertLog(db, lease=settings.claim_lease, targets=[hook.id for hook in settings.webhooks])
    return SqliteAlertLog(db)
