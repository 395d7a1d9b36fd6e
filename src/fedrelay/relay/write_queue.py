"""The write-behind queue both event logs commit from, without I/O.

Producers never wait for the database: accepted events queue here and the log's one writer
task takes batches off the front (:meth:`WriteQueue.next_batch`), commits them its own way and
reports back (:meth:`WriteQueue.committed`, then :meth:`WriteQueue.notify`). Backpressure
(:meth:`WriteQueue.full`, :meth:`WriteQueue.wait_for_room`) and acks
(:meth:`WriteQueue.after_commit`) read the same counters, so SQLite and PostgreSQL hold and
release producers alike. :class:`QueuedWrites` gives both logs the write half of the
:class:`~fedrelay.relay.eventlog.EventLog` interface, forwarded to their queue once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable

from .hub import Sequenced

log = logging.getLogger("fedrelay.store")

MAX_BATCH_CHARS = 4 << 20
"""Characters of events per commit (with ``max_batch`` events)."""


class WriteQueue:
    """Events accepted and not committed, runs to save, and who waits for which commit."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.pending: deque[Sequenced] = deque()
        """Accepted events, oldest first; a log that repairs them in place adjusts ``pending_chars``."""
        self.pending_chars = 0
        self.runs_to_save: set[str] = set()
        """Runs whose row changed without a new event (their ledger): written by the next commit."""
        self.closing = False
        self.wakeup = asyncio.Event()
        """Set when there is something to write (or the log closes): the writer waits on it."""
        self.progress = asyncio.Event()
        """Set after each commit (and at close): producers held by backpressure look again."""
        self._appended = 0
        self._committed = 0
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()

    @property
    def lag(self) -> int:
        """Events accepted but not yet committed."""
        return len(self.pending)

    @property
    def lag_chars(self) -> int:
        """...and their size in characters: the memory they hold."""
        return self.pending_chars

    def append(self, items: list[Sequenced]) -> None:
        if not items:
            return
        self.pending.extend(items)
        self.pending_chars += sum(len(item.body) for item in items)
        self._appended += len(items)
        self.wakeup.set()

    def save_runs(self, run_ids: Iterable[str]) -> None:
        """Write these runs (status, summary, ledger) soon, even if no event of theirs is queued."""
        before = len(self.runs_to_save)
        self.runs_to_save.update(run_ids)
        if len(self.runs_to_save) > before:
            self.wakeup.set()

    def queued_producers(self) -> set[str]:
        """Producers with events accepted and not committed yet."""
        return {item.producer for item in self.pending}

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything appended so far is committed."""
        if self._appended == self._committed:
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._waiters.append((self._appended, callback))

    async def all_committed(self) -> None:
        """Wait until everything appended so far is committed."""
        done = asyncio.get_running_loop().create_future()
        self.after_commit(lambda: done.done() or done.set_result(None))
        await done

    def full(self, limit: int, limit_chars: int) -> bool:
        return len(self.pending) > limit or self.pending_chars > limit_chars

    async def wait_for_room(self, limit: int, limit_chars: int, writer: asyncio.Task[None] | None) -> None:
        """Hold a producer while more than ``limit`` events (or chars) wait for the database,
        unless the log is closing or its ``writer`` task is gone (nothing would make room)."""
        while self.full(limit, limit_chars) and not self.closing and writer is not None and not writer.done():
            self.progress.clear()
            await self.progress.wait()

    def begin_close(self) -> None:
        """Release producers held by backpressure and wake the writer: shutdown has begun."""
        self.closing = True
        self.wakeup.set()
        self.progress.set()

    def next_batch(self) -> list[Sequenced]:
        """The oldest pending events, at most ``max_batch`` and ``MAX_BATCH_CHARS`` (but one at
        least): one commit is one delivery, and a delivery is written to every subscriber at
        once, so this bounds what a burst adds to a subscriber's queue in one go."""
        if self.pending_chars <= MAX_BATCH_CHARS:  # the usual case: no need to add sizes up
            return list(itertools.islice(self.pending, self.max_batch))
        batch: list[Sequenced] = []
        chars = 0
        for item in itertools.islice(self.pending, self.max_batch):
            chars += len(item.body)
            if batch and chars > MAX_BATCH_CHARS:
                break
            batch.append(item)
        return batch

    def committed(self, count: int) -> None:
        """The oldest ``count`` events are committed: drop them and let held producers look again.

        The commit's callbacks run apart, in :meth:`notify`: a log first delivers the batch
        (and PostgreSQL prunes), so an ack never goes out before the delivery.
        """
        for _ in range(count):
            self.pending_chars -= len(self.pending.popleft().body)
        self._committed += count
        self.progress.set()

    def notify(self) -> None:
        """Run the :meth:`after_commit` callbacks whose events are all committed now."""
        while self._waiters and self._waiters[0][0] <= self._committed:
            callback = self._waiters.popleft()[1]
            try:
                callback()
            except Exception:
                log.exception("store: a commit callback failed")


class QueuedWrites:
    """The write and backpressure methods of an event log that commits from ``self.queue``
    with one writer task, ``self._writer``: the same for SQLite and PostgreSQL."""

    queue: WriteQueue
    _writer: asyncio.Task[None] | None
    failing: str | None

    @property
    def lag(self) -> int:
        """Events accepted but not yet committed."""
        return self.queue.lag

    @property
    def lag_chars(self) -> int:
        """...and their size in characters: the memory they hold."""
        return self.queue.lag_chars

    def append(self, items: list[Sequenced]) -> None:
        """Queue events for the next commit."""
        self.queue.append(items)

    def save_runs(self, run_ids: Iterable[str]) -> None:
        """Write these runs (status, summary, ledger) soon, even if no event of theirs is queued."""
        self.queue.save_runs(run_ids)

    def queued_producers(self) -> set[str]:
        """Producers with events accepted and not committed yet."""
        return self.queue.queued_producers()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything appended so far is committed."""
        self.queue.after_commit(callback)

    async def all_committed(self) -> None:
        """Wait until everything appended so far is committed."""
        await self.queue.all_committed()

    def full(self, limit: int, limit_chars: int) -> bool:
        return self.queue.full(limit, limit_chars)

    async def wait_for_room(self, limit: int, limit_chars: int) -> None:
        """Hold a producer while more than ``limit`` events (or chars) wait for the database."""
        await self.queue.wait_for_room(limit, limit_chars, self._writer)

    def begin_close(self) -> None:
        """Release producers held by backpressure: shutdown has begun."""
        self.queue.begin_close()

    async def _finish_writes(self, timeout: float) -> int:
        """Stop taking writes and let the writer commit what is pending (within ``timeout``);
        returns how many accepted events were left uncommitted (logged: they are lost)."""
        self.begin_close()
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._writer, timeout)
        left = self.queue.lag
        if left:
            log.error("store: %d accepted events not committed at shutdown (%s)", left, self.failing)
        return left
