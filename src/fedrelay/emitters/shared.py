"""One emitter per process, found by URL: ``get_emitter()``.

This lives in an importable module on purpose. Flower runs each ClientApp in
a Ray actor process and pickles functions from ``__main__`` *by value*, so a
module-level emitter in the user's script would be rebuilt (or shared by
accident) in every task; state kept here is created once per process, and
again after a fork, because the key includes the process id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from .client import Emitter
from .config import resolve_token, resolve_urls

_lock = threading.Lock()
_shared: dict[tuple[int, tuple[str, ...], str | None], Emitter] = {}


def get_emitter(url: str | Sequence[str] | None = None, **kwargs: Any) -> Emitter:
    """The process's emitter for this relay (created on first use, closed at exit).

    ``url`` is one address or several (a list, or comma-separated). ``kwargs`` are passed to
    :class:`Emitter` when it is created; later calls with the same addresses (in the same
    order) and token get the same instance whatever they pass.
    """
    key = (os.getpid(), resolve_urls(url), resolve_token(kwargs.get("token")))
    emitter = _shared.get(key)
    if emitter is not None:
        return emitter
    with _lock:
        emitter = _shared.get(key)
        if emitter is None:
            for stale in [k for k in _shared if k[0] != key[0]]:
                del _shared[stale]  # inherited through fork: the parent's, not ours
            emitter = _shared[key] = Emitter(url, **kwargs)
        return emitter


def _rebuild(config: dict[str, Any]) -> Emitter:
    """Unpickling an Emitter in another process gives that process's shared one."""
    return get_emitter(**config)
