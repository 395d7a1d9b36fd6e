"""Where an emitter sends and spools: arguments first, then the environment.

Kept apart from the client so that ``fedrelay sync`` resolves exactly the
same defaults as the emitters whose spool it delivers.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

DEFAULT_URL = "ws://127.0.0.1:8765"


def resolve_url(url: str | None) -> str:
    """The relay's base URL: argument, ``FEDRELAY_URL``, or the local default."""
    return url or os.environ.get("FEDRELAY_URL") or DEFAULT_URL


def resolve_token(token: str | None) -> str | None:
    """The publish token: argument, ``FEDRELAY_PUBLISH_TOKEN`` or ``FEDRELAY_TOKEN``."""
    return token or os.environ.get("FEDRELAY_PUBLISH_TOKEN") or os.environ.get("FEDRELAY_TOKEN") or None


def publish_url(base: str, producer: str) -> str:
    """``<base>/publish?producer=NAME``; accepts http(s) and an existing ``/publish``."""
    parts = urlsplit(base.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith("/publish"):
        path = path[: -len("/publish")]
    query = f"producer={quote(producer, safe='')}"
    if parts.query:
        query = f"{parts.query}&{query}"
    return urlunsplit((scheme, parts.netloc, f"{path}/publish", query, ""))


def default_spool_dir() -> Path:
    """``FEDRELAY_SPOOL_DIR``, else the XDG data dir (no platformdirs: server-only)."""
    env = os.environ.get("FEDRELAY_SPOOL_DIR")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "fedrelay" / "spool"


def resolve_spool_dir(spool_dir: str | os.PathLike[str] | None) -> Path:
    return Path(spool_dir).expanduser() if spool_dir else default_spool_dir()


def new_name(prefix: str = "em") -> str:
    """A producer name no other emitter will ever use."""
    return f"{prefix}-{uuid.uuid4().hex}"


def new_run_id() -> str:
    """A run id for a plain script or a Lightning fit that was given none."""
    return f"run-{uuid.uuid4().hex[:12]}"
