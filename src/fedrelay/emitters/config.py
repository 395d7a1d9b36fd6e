"""Where an emitter sends and spools: arguments first, then the environment.

Kept apart from the client so that ``fedrelay sync`` resolves exactly the
same defaults as the emitters whose spool it delivers. The relay's addresses
say where they came from (``RelayUrls.source``): they are logged once per
process with their source, because a URL silently taken from the wrong place
(a stale environment under ``flwr run``) only shows as events missing from
the relay.

A relay may have several addresses (the nodes of one relay on one database,
comma-separated in ``FEDRELAY_URL`` or a list in code). Its spool directory and
its reachability mark are named after the *first* address: a single address
keeps the names it always had, and a list that starts with the same node
shares the directory; spools found under the other addresses' directories are
delivered too (:func:`orphan_roots`), so reordering a list loses nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ..client_settings import publish_token, relay_urls_and_source
from ..failover import parse_urls
from ..tls import CA_FILE_ENV as CA_FILE_ENV  # the emitter settings, in one place
from ..tls import resolve_ca_file as resolve_ca_file

SPOOL_ENV = "FEDRELAY_SPOOL_DIR"
_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9.-]+")


@dataclass(frozen=True)
class RelayUrls:
    """A relay's addresses, in the order they are tried, and where they came from (for the log)."""

    urls: tuple[str, ...]
    source: str

    @property
    def first(self) -> str:
        return self.urls[0]


def resolve_urls_setting(url: str | Sequence[str] | None, source: str = "argument") -> RelayUrls:
    """The relay's addresses: argument (``source`` names it), ``FEDRELAY_URL``, or the local default.

    A string may list several, comma-separated; so may each item of a list.
    """
    return RelayUrls(*relay_urls_and_source(url, source))


def resolve_urls(url: str | Sequence[str] | None) -> tuple[str, ...]:
    """The relay's addresses: argument, ``FEDRELAY_URL``, or the local default."""
    return resolve_urls_setting(url).urls


def resolve_token(token: str | None) -> str | None:
    """The publish token: argument, ``FEDRELAY_PUBLISH_TOKEN`` or ``FEDRELAY_TOKEN``."""
    return publish_token(token)


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


def share_a_node(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two address lists name the same relay: an address in common (each address is a
    node of exactly one relay, so lists that overlap are two views of one relay)."""
    return not {relay_key(url) for url in a}.isdisjoint(relay_key(url) for url in b)


def relays_key(urls: Sequence[str]) -> str:
    """A file name for a list of addresses: :func:`relay_key` of a single one; for several, the
    first's key and a hash of them all, in any order (``@ws-a-8765+1f2e3d4c``)."""
    if len(urls) == 1:
        return relay_key(urls[0])
    keys = sorted({relay_key(url) for url in urls})
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:8]
    return f"{relay_key(urls[0])}+{digest}"


def spool_urls(meta: dict[str, Any], fallback: Sequence[str]) -> tuple[str, ...]:
    """The addresses a spool was written for: its ``meta.json``'s ``urls`` (or the single ``url``
    of older versions), else ``fallback``."""
    urls = parse_urls(meta.get("urls") or meta.get("url") or None)
    return urls or tuple(fallback)


def orphan_roots(spool_dir: str | os.PathLike[str] | None, urls: Sequence[str]) -> list[Path]:
    """Where spools left for this relay may be: its own directory (the first address's), the other
    addresses' directories, and the shared directory of the old layout, when nothing chose one;
    else the chosen directory only. Callers take only spools whose addresses share a node with
    ``urls`` (:func:`share_a_node`)."""
    roots = [resolve_spool_dir(spool_dir, urls[0])]
    if spool_dir or os.environ.get(SPOOL_ENV):
        return roots
    for url in urls[1:]:
        root = default_spool_dir(url)
        if root not in roots:
            roots.append(root)
    legacy = legacy_spool_dir(spool_dir)
    if legacy is not None and legacy not in roots:
        roots.append(legacy)
    return roots


def new_name(prefix: str = "em") -> str:
    """A producer name no other emitter will ever use."""
    return f"{prefix}-{uuid.uuid4().hex}"


def new_run_id() -> str:
    """A run id for a plain script or a Lightning fit that was given none."""
    return f"run-{uuid.uuid4().hex[:12]}"
