"""Log lines about misbehaving peers, bounded in rate and in memory. Sans-I/O.

Root-path producers never read replies, so a refused frame is only visible
in the relay's log; a peer that sends junk in a loop must still not flood it.
"""

from __future__ import annotations

from collections import OrderedDict


class LogThrottle:
    """At most one line per key per ``every`` seconds, counting the lines held back.

    Keeps at most ``max_keys`` keys (the least recently logged go first), so a
    flood from many addresses costs bounded memory; a key forgotten that way
    just logs again sooner.
    """

    def __init__(self, every: float, max_keys: int) -> None:
        self.every = every
        self.max_keys = max_keys
        self._keys: OrderedDict[str, list[float]] = OrderedDict()  # key -> [next allowed, held back]

    def __len__(self) -> int:
        return len(self._keys)

    def allow(self, key: str, now: float) -> int | None:
        """None: stay quiet (counted). Otherwise log now; the value is how many were held back."""
        entry = self._keys.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return None
        held = int(entry[1]) if entry is not None else 0
        self._keys[key] = [now + self.every, 0]
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return held


class OncePer:
    """Remembers up to ``limit`` keys: ``first(key)`` is True the first time only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self.overflowed = False

    def first(self, key: str) -> bool:
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            if self.overflowed:
                return False
            self.overflowed = True  # one last line says that more are not listed
            return True
        self._seen.add(key)
        return True
