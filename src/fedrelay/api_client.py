"""GET JSON from a relay's HTTP API (``/api/...``), from whichever of its addresses answers.

``fedrelay export`` and ``fedrelay runs`` read pages. Given several addresses of one relay, a
request that one cannot answer (no connection, a timeout, HTTP 502, 503 or 504 from a node or
from a load balancer in front of it) is asked of the next address, once round the list, and the
last failure is raised: these commands report an unreachable relay at once, as with one
address. Any other HTTP error (401, 404, ...) is the relay's answer, raised as it is.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from .failover import Failover
from .follow import tls_contexts
from .tls import certificate_problem

ASK_ELSEWHERE = frozenset((502, 503, 504))
"""HTTP statuses that say "not this node, not now" rather than answer the request."""
TIMEOUT = 30.0


class ApiClient:
    """Requests to ``bases`` (``http(s)://host:port`` of each address), one at a time.

    Raises :class:`~fedrelay.follow.RelayRefused` at construction when ``ca_file`` cannot be
    loaded; :meth:`get` raises ``urllib.error.URLError`` / ``OSError`` as ``urllib`` does.
    """

    def __init__(self, bases: Sequence[str], token: str | None = None, ca_file: str | None = None) -> None:
        self.relays = Failover(bases, first_delay=0.0, max_delay=0.0)
        self.contexts = tls_contexts(self.relays.urls, ca_file)
        self.token = token
        self.answered_by: str | None = None
        """The base that answered the last request."""
        self.last_tried = self.relays.current
        """The base of the last attempt (the one a raised error came from)."""

    def get(self, path: str) -> Any:
        """The JSON body of ``GET <base><path>``, from the current address or the next ones."""
        while True:
            base = self.last_tried = self.relays.current
            request = urllib.request.Request(base + path)
            if self.token:
                request.add_header("Authorization", f"Bearer {self.token}")
            context = self.contexts[base]
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                if exc.code not in ASK_ELSEWHERE:
                    raise
                self._failed(exc)
            except OSError as exc:  # URLError, timeouts, resets
                if certificate_problem(exc) is not None:
                    raise  # a setting to change, the same on every node
                self._failed(exc)
            else:
                self.relays.connected()
                self.answered_by = base
                return json.loads(body)

    def _failed(self, exc: OSError) -> None:
        self.relays.failed()
        if self.relays.all_failed:
            raise exc
