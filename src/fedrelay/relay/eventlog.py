"""What the relay needs from its event log, whichever database holds it.

The server, the HTTP API and the health reader talk to the log through this
interface only, never through a backend's attributes. Two backends implement it:
:class:`~fedrelay.relay.store.EventStore` (one relay, one SQLite file; the hub hands
out seqs, since one process owns the file) and
:class:`~fedrelay.relay.pg.log.PgEventLog` (several relays on one PostgreSQL
database; seqs come from the committing transaction). Either way every committed
batch reaches the hub through one path, the ``on_commit`` callback the relay gives
the log, in seq order per run: for PostgreSQL that includes other nodes' batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .hub import Run, Sequenced
from .ledger import RunLedger

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str) -> bool:
    """Whether a ``--db`` value names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(POSTGRES_SCHEMES)


RUN_COLUMNS = "run_id, status, created_at, updated_at, started_at, ended_at, {seq}, first_seq, info, ledger"
"""The runs table's columns a start reads back, in :func:`restored_run`'s order (``{seq}``: the
column holding the seq the row summarises, named differently by the two logs)."""


def restored_run(row: Sequence[Any]) -> Run:
    """A run as its row in the runs table keeps it (both logs store the same summary)."""
    run = Run(
        run_id=row[0],
        status=row[1],
        created_at=row[2],
        updated_at=row[3],
        started_at=row[4],
        ended_at=row[5],
        info=json.loads(row[8]),
        ledger=RunLedger.from_json(row[9]),
    )
    run.last_seq = row[6]
    run.first_seq = row[7]
    return run


@dataclass(slots=True)
class Restored:
    """What a relay start reads back: runs and dedup positions."""

    runs: list[Run]
    producers: dict[str, int]
    forgotten: int = 0
    """Producers deleted at start for being idle past ``forget_producers_after``."""


class StoreError(RuntimeError):
    """The database cannot be opened or used."""


CommitFeed = Callable[[list[Sequenced]], None]
"""Called with every committed batch (events of one or more runs, in seq order per run)."""


class EventLog(Protocol):
    """Append with dedup and per-run seq; read pages; positions; health; backpressure."""

    path: str
    """What to show for the database in /healthz and logs (never a password)."""
    shared: bool
    """True when other relay processes write the same log (seqs come from the database)."""
    failing: str | None
    """The last write error while commits are failing, else None (/healthz answers 503)."""
    repaired_runs: list[dict[str, Any]]
    commits: int

    async def open(self) -> Restored: ...

    async def follow(self) -> None:
        """Start the commit feed, once the hub holds what :meth:`open` restored: a shared log
        first delivers what other nodes committed past the restored run summaries."""
        ...

    def begin_close(self) -> None: ...

    async def close(self, timeout: float = 10.0) -> int:
        """Commit what is pending, close; returns how many accepted events were not stored."""
        ...

    # -- writes and backpressure
    @property
    def lag(self) -> int: ...

    def append(self, items: list[Sequenced]) -> None:
        """Queue events for the next commit (dedup on (producer, producer_id) at commit)."""
        ...

    def save_runs(self, run_ids: Iterable[str]) -> None: ...

    def queued_producers(self) -> set[str]: ...

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything appended so far is committed (acks)."""
        ...

    async def all_committed(self) -> None: ...

    def full(self, limit: int, limit_chars: int) -> bool: ...

    async def wait_for_room(self, limit: int, limit_chars: int) -> None: ...

    # -- reads
    async def read(
        self,
        run_id: str,
        after: int,
        upto: int,
        limit: int,
        max_bytes: int = 4 << 20,
        *,
        queue: str = ...,
        wanted: Callable[[], bool] | None = None,
        types: tuple[str, ...] = (),
    ) -> list[tuple[int, str]] | None: ...

    async def stored_versions(self, producer: str, ids: list[int]) -> dict[int, tuple[int, float, str]]: ...

    async def last_seq(self, run_id: str) -> int:
        """The highest seq stored for ``run_id`` (0 for a run with none)."""
        ...

    async def producer_position(self, producer: str) -> int | None:
        """The highest id stored for ``producer`` (``hello.last_id``), or None."""
        ...

    # -- housekeeping
    async def forget_producers(
        self,
        *,
        seen: Iterable[str],
        keep: Callable[[str], bool],
        on_forgotten: Callable[[list[str]], None],
    ) -> int | None: ...
