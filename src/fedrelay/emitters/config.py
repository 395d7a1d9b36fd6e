"""Where an emitter sends and spools: arguments first, then the environment.

Kept apart from the client so that ``fedrelay sync`` resolves exactly the
same defaults as the emitters whose spool it delivers. Each resolved value
says where it came from (``Setting.source``): the relay URL actually used is
logged once per process with its source, because a URL silently taken from
the wrong place (a stale environment under ``flwr run``) only shows as
events missing from the relay.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from ..tls import CA_FILE_ENV as CA_FILE_ENV  # the emitter settings, in one place
from ..tls import resolve_ca_file as resolve_ca_file

DEFAULT_URL = "ws://127.0.0.1:8765"
URL_ENV = "FEDRELAY_URL"
SPOOL_ENV = "FEDRELAY_SPOOL_DIR"
_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9.-]+")


@dataclass(frozen=True)
class Setting:
    """A resolved setting and where it came from (shown in logs, never the value of a secret)."""

    value: str | None
    source: str


def resolve_url_setting(url: str | None, source: str = "argument") -> Setting:
    """The relay's base URL: argument (``source`` names it), ``FEDRELAY_URL``, or the local default."""
    if url:
        return Setting(url, source)
    env = os.environ.get(URL_ENV)
    if env:
        return Setting(env, URL_ENV)
    return Setting(DEFAULT_URL, "default")


def resolve_url(url: str | None) -> str:
    """The relay's base URL: argument, ``FEDRELAY_URL``, or the local default."""
    return resolve_url_setting(url).value or DEFAULT_URL


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


def relay_key(url: str) -> str:
    """A file name for one relay: ``@ws-127.0.0.1-8765``, ``@wss-relay.example.com-443-fl``.

    Scheme, host, port and path only: a query (``?token=``) never ends up in a directory
    name. The ``@`` keeps it apart from producer directories, whose names cannot hold one.
    """
    parts = urlsplit(url.strip() if "://" in url else f"ws://{url.strip()}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme) or "ws"
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if scheme == "wss" else 80)
    path = parts.path.rstrip("/")
    if path.endswith("/publish"):
        path = path[: -len("/publish")]
    text = "-".join(x for x in (scheme, (parts.hostname or "").lower(), str(port), path.strip("/")) if x)
    return "@" + _UNSAFE_IN_NAMES.sub("_", text)[:200]


def spool_root() -> Path:
    """The shared data directory spools live under: ``$XDG_DATA_HOME/fedrelay/spool``.

    Up to 0.x every emitter spooled directly here; now each relay URL has its own
    directory inside (see :func:`resolve_spool_dir`), and what is left here is the old layout.
    """
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "fedrelay" / "spool"


def default_spool_dir(url: str | None = None) -> Path:
    """``FEDRELAY_SPOOL_DIR``, else the directory of ``url``'s relay under :func:`spool_root`.

    Without ``url``: the root itself (kept for callers of the old signature).
    """
    env = os.environ.get(SPOOL_ENV)
    if env:
        return Path(env).expanduser()
    root = spool_root()
    return root / relay_key(url) if url else root


def resolve_spool_dir(spool_dir: str | os.PathLike[str] | None, url: str | None = None) -> Path:
    """The spool directory: argument, ``FEDRELAY_SPOOL_DIR``, or one per relay URL."""
    return Path(spool_dir).expanduser() if spool_dir else default_spool_dir(url)


def legacy_spool_dir(spool_dir: str | os.PathLike[str] | None) -> Path | None:
    """The shared directory of the old layout, searched too when nothing chose a directory."""
    if spool_dir or os.environ.get(SPOOL_ENV):
        return None
    return spool_root()


def same_relay(a: str, b: str) -> bool:
    """Whether two URLs name the same relay (scheme, host, port and path)."""
    return relay_key(a) == relay_key(b)


def new_name(prefix: str = "em") -> str:
    """A producer name no other emitter will ever use."""
    return f"{prefix}-{uuid.uuid4().hex}"


def new_run_id() -> str:
    """A run id for a plain script or a Lightning fit that was given none."""
    return f"run-{uuid.uuid4().hex[:12]}"
