"""Which run a root-path frame belongs to when it names none.

Hand-rolled trainers often put ``run_id`` on some frames only (the seed
system's Lightning callback sends it with ``training_start`` and
``training_end`` but not with ``epoch_end``), and open a new connection per
frame, so neither the frame nor its connection says which run it is part of.
The client's host does: a frame without a run id goes to the last run a frame
from the same host named, while that run is still running and got an event in
the last :data:`FOLLOW_FOR` seconds; otherwise to ``default``. Sans-I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..schemas.compat import ROOT_DEFAULT_RUN

FOLLOW_FOR = 3600.0
"""Seconds of silence after which a host's run no longer takes its unnamed frames."""
MAX_HOSTS = 4096
"""Hosts remembered, least recently seen dropped first: at most ~1 MiB."""


class RootRuns:
    """The last run each client host named on the root path."""

    def __init__(self, max_hosts: int = MAX_HOSTS) -> None:
        self.max_hosts = max_hosts
        self._last: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def named(self, host: str, run_id: str) -> None:
        """A frame from ``host`` named ``run_id``."""
        self._last[host] = run_id
        self._last.move_to_end(host)
        while len(self._last) > self.max_hosts:
            self._last.popitem(last=False)

    def unnamed(self, host: str, following: Callable[[str], bool]) -> str:
        """The run for a frame from ``host`` that names none: the host's last run if
        ``following(run_id)`` says it may still take frames, else ``default``."""
        run_id = self._last.get(host)
        if run_id is not None and following(run_id):
            self._last.move_to_end(host)
            return run_id
        return ROOT_DEFAULT_RUN
