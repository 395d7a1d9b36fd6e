"""Turns per key: at most ``limit`` holders per key at a time, the others wait in order.

The catch-up reader serves one read at a time, first come first served. Without a bound per
client address, one address with thousands of subscriptions (1024 runs per connection, many
connections) put thousands of reads in that line at once, and a subscriber from anywhere else
waited behind all of them. With a few turns per address, the others wait in their own
address's line instead, and the reader's line holds at most a few reads of each address.
A holder gives its turn back however it ends (done, failed, cancelled); a read that never
returned once kept its turn for ever, so catch-up reads are bounded (``store_reads.bounded``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class TurnsPerKey:
    """``async with turns.turn(key):`` at most ``limit`` at a time per key; no state for idle keys."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lines: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        """key -> (its semaphore, [holders and waiters]); gone when nobody holds or waits."""

    @asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = (asyncio.Semaphore(self.limit), [0])
        semaphore, users = line
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if not users[0] and self._lines.get(key) is line:
                del self._lines[key]

    def __len__(self) -> int:
        """Keys with a holder or a waiter."""
        return len(self._lines)
