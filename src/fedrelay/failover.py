"""Several addresses of one relay, and which one a client uses: the failover state, without I/O.

A relay may be several processes on one database behind no load balancer, or behind one that
is itself a single point of failure; its clients are then given every node's address
(comma-separated in ``FEDRELAY_URL``, ``--url`` repeated, a list in code). The emitter core, the
subscribe loops (``fedrelay tail``, ``fedrelay bridge``) and the one-shot readers (``export``,
``runs``) all decide the same way, here, so that the rule is tested once (``tests/unit``):

- start at the first address;
- stay on an address while it works: every node serves every client, and a switch costs a new
  connection and a resend (emitters) or a catch-up (subscribers), so a working node is never
  left for a preferred one;
- after a connection that cannot be made, or a session lost, move to the next address, round
  robin (the first again after the last);
- wait between attempts with capped exponential backoff counted in rounds of the list: each
  round waits as one attempt of a single-address client did, so a list of one behaves exactly
  as before and a node that is down costs one short wait, not a backoff step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

ADDRESS_SEPARATOR = ","


def parse_urls(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The addresses in a comma-separated string or a list of them (items may hold commas too):
    stripped, empty ones dropped, each kept once, in order. Empty when nothing is given."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        for part in str(item).split(ADDRESS_SEPARATOR):
            url = part.strip()
            if url and url not in urls:
                urls.append(url)
    return tuple(urls)


def backoff_delay(rounds: int, first: float, cap: float, jitter: float) -> float:
    """Seconds to wait after ``rounds`` failed rounds in a row: ``first`` doubling up to ``cap``,
    scaled by a jitter in [0.5, 1] (``jitter`` in [0, 1]) so that many clients cut off by one
    relay restart do not all come back in the same millisecond."""
    if rounds <= 0:
        return 0.0
    base = min(cap, first * 2 ** min(rounds - 1, 16))
    return base * (0.5 + 0.5 * min(1.0, max(0.0, jitter)))


class Failover:
    """Which address to try next and how long to wait first (see the module docstring).

    ``connected()`` when a connection is made; ``failed(progress=...)`` when one cannot be made
    or a session ends in failure (``progress``: the session achieved something, such as an ack
    or an open subscription, so the backoff starts over). Not thread-safe: its owner serialises.
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        first_delay: float,
        max_delay: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.urls = tuple(urls)
        if not self.urls:
            raise ValueError("no relay address given")
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.index = 0
        self.misses = 0
        """Failures in a row since the last session that made progress: the backoff."""
        self.unreached = 0
        """Failures in a row since the last connection made: reachability."""

    @property
    def current(self) -> str:
        """The address to connect to now."""
        return self.urls[self.index]

    @property
    def several(self) -> bool:
        return len(self.urls) > 1

    @property
    def all_failed(self) -> bool:
        """Every address failed since the last connection: the relay is unreachable from here."""
        return self.unreached >= len(self.urls)

    @property
    def rounds_failed(self) -> int:
        """Whole rounds of the list that failed since the last connection (for giving up)."""
        return self.unreached // len(self.urls)

    def connected(self) -> None:
        self.unreached = 0

    def failed(self, *, progress: bool = False) -> float:
        """Move to the next address; the seconds to wait before connecting to it."""
        if progress:
            self.misses = 0
        self.misses += 1
        self.unreached += 1
        self.index = (self.index + 1) % len(self.urls)
        rounds = -(-self.misses // len(self.urls))
        return backoff_delay(rounds, self.first_delay, self.max_delay, self.jitter())
