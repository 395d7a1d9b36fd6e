"""Who may connect: tokens and browser origins, checked on the handshake."""

from __future__ import annotations

import hmac
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
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https"):
        return False
    if parts.hostname is not None and (
        parts.hostname in _LOOPBACK_HOSTS or f"[{parts.hostname}]" in _LOOPBACK_HOSTS
    ):
        return True
    return host_header is not None and parts.netloc.lower() == host_header.lower()
