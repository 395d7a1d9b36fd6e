"""POST one JSON body to one webhook: a small HTTP/1.1 client on asyncio streams.

Small on purpose: one request per connection (``Connection: close``), a timeout on the
whole exchange, a capped read of the answer, and no redirects followed at all (a 3xx is
a failed attempt that says where it pointed). The URL is configuration and holds a
secret in Slack's and Discord's case (the path is the token), so only :attr:`Webhook.label`
(its host) ever reaches logs and metrics. No proxy support: the relay connects directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ... import __version__

MAX_RESPONSE_BYTES = 64 * 1024
"""Bytes of an answer read at most: the status line and headers (the body is never read)."""
MAX_LINE_BYTES = 8 * 1024


class WebhookError(ValueError):
    """A webhook URL the relay cannot use."""


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook URL, parsed once; ``label`` is what logs and metrics show."""

    url: str = field(repr=False)
    scheme: str
    host: str
    port: int
    target: str = field(repr=False)
    """The request target (path and query): the secret part."""
    label: str
    id: str
    """Stable, URL-free key of this webhook in the outbox (a hash of the URL)."""

    @classmethod
    def parse(cls, url: str) -> Webhook:
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise WebhookError(f"an alert webhook is no valid URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookError("an alert webhook must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise WebhookError(
                f"alert webhook on {parts.hostname}: user:password@ in the URL is not supported"
            )
        if any(ord(ch) < 33 or ord(ch) == 127 for ch in url.strip()):
            raise WebhookError(f"alert webhook on {parts.hostname}: the URL has spaces or control characters")
        default = 443 if parts.scheme == "https" else 80
        port = port or default
        host = parts.hostname
        label = host if port == default else f"{host}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        digest = hashlib.blake2b(url.strip().encode(), digest_size=8).hexdigest()
        return cls(url.strip(), parts.scheme, host, port, target, label, digest)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    retry_after: float | None = None
    location_host: str | None = None
    """For a 3xx: the host it pointed to (never followed)."""


async def post_json(
    hook: Webhook,
    body: bytes,
    *,
    idempotency_key: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """One POST; raises ``OSError`` (refused, reset, TLS), ``TimeoutError`` or ``ValueError``
    (an answer that is no HTTP) for a failed attempt."""
    async with asyncio.timeout(timeout):
        context = (tls or ssl.create_default_context()) if hook.scheme == "https" else None
        reader, writer = await asyncio.open_connection(
            hook.host,
            hook.port,
            ssl=context,
            server_hostname=hook.host if context else None,
            limit=MAX_LINE_BYTES,
        )
        try:
            head = (
                f"POST {hook.target} HTTP/1.1\r\n"
                f"Host: {hook.host_header}\r\n"
                f"User-Agent: fedrelay/{__version__}\r\n"
                "Content-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Idempotency-Key: {idempotency_key}\r\n"
                "Accept: */*\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
            return await _read_answer(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    """The status line and headers, at most ``MAX_RESPONSE_BYTES`` of them; the body is not
    needed and not read."""
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise ValueError("the answer's status line is too long") from None
    except asyncio.IncompleteReadError:
        raise ValueError("the connection closed without an answer") from None
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError("the answer is not HTTP")
    status = int(parts[1])
    headers: dict[str, str] = {}
    read = len(line)
    while read < MAX_RESPONSE_BYTES:
        try:
            raw = await reader.readuntil(b"\r\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            break  # the status is what matters
        read += len(raw)
        if raw == b"\r\n":
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    location = None
    if 300 <= status < 400 and "location" in headers:
        location = urlsplit(headers["location"]).hostname or "(same host)"
    return Answer(status, _retry_after(headers.get("retry-after")), location)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the HTTP-date form is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None
