"""Who may connect: tokens and browser origins, checked on the handshake."""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def presented_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from ``Authorization: Bearer`` or, for browsers, ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token


def presented_tokens(authorization: str | None, query_tokens: list[str]) -> list[str]:
    """The tokens a request presents: the bearer header, else each ``?token=``.

    A header wins over the query, as for :func:`presented_token`; browsers
    cannot set headers, so they may repeat ``token`` (the root path needs
    both a publish and a subscribe token when the two differ).
    """
    header = presented_token(authorization, None)
    if header is not None:
        return [header]
    return query_tokens[:4]


def any_token_ok(expected: str | None, presented: list[str]) -> bool:
    if expected is None:
        return True
    return any(token_ok(expected, token) for token in presented)


def token_ok(expected: str | None, presented: str | None) -> bool:
    if expected is None:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def origin_ok(origin: str | None, host_header: str | None, allowed: list[str]) -> bool:
    """Refuse cross-site pages; allow non-browsers, same origin and loopback.

    A page on evil.example must not be able to open a WebSocket to a relay on
    a researcher's laptop (cross-site WebSocket hijacking). Pages served from
    localhost on any port (a React dev server) are the product's own use.
    """
    if origin is None or origin_vouched(origin, allowed):
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https"):
        return False
    return host_header is not None and parts.netloc.lower() == host_header.lower()


def origin_vouched(origin: str, allowed: list[str]) -> bool:
    """An origin allowed for itself, not for matching the Host: listed, or a loopback page."""
    if "*" in allowed or origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and parts.hostname is not None
        and (parts.hostname in _LOOPBACK_HOSTS or f"[{parts.hostname}]" in _LOOPBACK_HOSTS)
    )


def rebinding_suspect(
    origin: str | None, fetch_site: str | None, host: str | None, allowed: list[str]
) -> bool:
    """A browser request that only DNS rebinding explains (see :func:`host_ok`).

    Browsers send Origin on WebSocket handshakes and Sec-Fetch-Site on every
    request; other clients (emitters, curl, a proxy's health check) send
    neither and may use any Host. A listed or loopback Origin vouches for
    itself: a rebinding page's origin is the attacker's own name.
    """
    if origin is None and fetch_site is None:
        return False
    if origin is not None and origin_vouched(origin, allowed):
        return False
    return not host_ok(host, allowed)


def host_ok(host_header: str | None, allowed: list[str]) -> bool:
    """Refuse DNS rebinding: browsers must name the relay by IP, localhost, or an allowed origin's host.

    A page on evil.example can point evil.example at 127.0.0.1 once it has
    loaded; its requests to the relay are then same-origin for the browser
    and carry ``Host: evil.example``. Attackers cannot make a browser send an
    IP literal or ``localhost`` as the Host of their own page, so those are
    safe; any other name must be one the operator listed with --allow-origin.
    """
    if host_header is None or "*" in allowed:
        return True  # HTTP/1.0 without Host is no browser
    hostname = _hostname(host_header)
    if hostname is None:
        return False
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True  # browsers resolve *.localhost to loopback themselves
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        pass
    return any(_hostname(urlsplit(origin).netloc) == hostname for origin in allowed if "//" in origin)


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:
        return None


def address_key(peername: object) -> str:
    """The address a per-address limit counts: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually holds a whole /64, so counting single IPv6
    addresses would not limit it at all.
    """
    host = peername[0] if isinstance(peername, tuple) and peername else peername
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)  # a Unix socket, or no peer at all
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionLimiter:
    """Open connections per client address, and when to log an address's refusals.

    Refusals are logged once per address per ``log_every`` seconds with a
    count, so a flood cannot flood the log too.
    """

    def __init__(self, limit: int, log_every: float = 60.0) -> None:
        self.limit = limit
        """Connections per address; 0 means no limit."""
        self.log_every = log_every
        self.open: dict[str, int] = {}
        self._noted: dict[str, list[float]] = {}  # address -> [last logged, refusals unlogged]

    def opened(self, key: str) -> int:
        """Count a new connection; returns how many the address now has open."""
        count = self.open.get(key, 0) + 1
        self.open[key] = count
        return count

    def closed(self, key: str) -> None:
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)

    def over(self, count: int, slack: int = 0) -> bool:
        """Whether the ``count``-th open connection is past the limit (plus ``slack``)."""
        return self.limit > 0 and count > self.limit + slack

    def note_refusal(self, key: str, now: float) -> int | None:
        """Count a refusal; when a log line is due, return how many went unlogged before it."""
        entry = self._noted.get(key)
        if entry is None or now - entry[0] >= self.log_every:
            self._noted[key] = [now, 0]
            return int(entry[1]) if entry is not None else 0
        entry[1] += 1
        return None

    def quiet_since(self, now: float) -> list[tuple[str, int]]:
        """Addresses whose next line is due: their unlogged refusals (the line counts as
        logged now); addresses with none are forgotten."""
        due: list[tuple[str, int]] = []
        for key, (at, unlogged) in list(self._noted.items()):
            if now - at < self.log_every:
                continue
            if unlogged:
                due.append((key, int(unlogged)))
                self._noted[key] = [now, 0]
            else:
                del self._noted[key]
        return due
