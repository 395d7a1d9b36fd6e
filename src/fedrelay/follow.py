"""Follow runs on a relay from Python, resuming from the last seq after any disconnect.

The terminal view (``fedrelay tail``) is built on this; it is the Python twin of
``/static/fedrelay.js``: every event reaches ``on_event`` once, in seq order per run,
across relay restarts, network drops and slow-consumer cuts (close code 1013). Given
several addresses of one relay, it moves to the next after a connection that cannot
be made or a session lost (:mod:`fedrelay.failover`) and resumes there from the same
seqs: the nodes of one relay give every event the same seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .failover import Failover, parse_urls
from .tls import certificate_problem, context_for, explain_ca_file, explain_certificate

FIRST_DELAY = 0.25
"""Seconds before the first reconnect of a follower; doubled per failed round up to its max."""
SLOW_CONSUMER = 1013
CLOSE_TIMEOUT = 2.0
"""Seconds a clean close may wait for the relay's answer before the connection is dropped."""


class RelayRefused(Exception):
    """The relay answered the handshake with an HTTP error (a wrong token, a bad origin), or its
    TLS certificate does not verify: retrying cannot help, the user must change a setting."""


def ws_base(url: str) -> str:
    """``http://h:p/x`` or ``ws://h:p`` -> ``ws://h:p``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def http_base(url: str) -> str:
    return "http" + ws_base(url)[2:]


def tls_contexts(urls: Sequence[str], ca_file: str | None) -> dict[str, ssl.SSLContext | None]:
    """A verifying context per address (None for plain ws:// and http://); raises
    :class:`RelayRefused` when ``ca_file`` cannot be loaded."""
    try:
        return {url: context_for(url, ca_file) for url in urls}
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise RelayRefused(explain_ca_file(ca_file, exc)) from None


def events_of(msg: Any) -> list[dict[str, Any]]:
    if isinstance(msg, list):
        return msg
    if isinstance(msg, dict) and "op" not in msg:
        return [msg]
    return []


class Follower:
    """Subscribes to runs (or ``"*"``) and keeps a cursor per run for resuming.

    ``url`` is one address of the relay or several (a list, or comma-separated).
    ``on_event(event)`` and ``on_control(frame)`` may return True to stop following.
    ``on_note(text)`` hears about reconnects and gaps.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        runs: list[str] | str,
        *,
        since: int = 0,
        token: str | None = None,
        on_event: Callable[[dict[str, Any]], bool | None],
        on_control: Callable[[dict[str, Any]], bool | None] = lambda frame: None,
        on_note: Callable[[str], None] = lambda text: None,
        max_backoff: float = 5.0,
        ca_file: str | None = None,
    ) -> None:
        urls = parse_urls(url)
        if not urls:
            raise ValueError("no relay address given")
        self.relays = Failover(
            [ws_base(u) + "/subscribe" for u in urls], first_delay=FIRST_DELAY, max_delay=max_backoff
        )
        self.ca_file = ca_file
        self.ssl = tls_contexts(self.relays.urls, ca_file)
        self.all = runs == "*"
        self.cursors: dict[str, int] = {} if self.all else dict.fromkeys(runs, since)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.on_event, self.on_control, self.on_note = on_event, on_control, on_note
        self.connects = 0
        self._stop = False

    @property
    def url(self) -> str:
        """The ``/subscribe`` address in use, or tried next."""
        return self.relays.current

    async def run(self) -> None:
        """Follow until a callback asks to stop; raises :class:`RelayRefused` on an HTTP refusal.

        An exception from a callback (``BrokenPipeError`` from a print, say) ends the run: only
        failures of the connection itself are retried.
        """
        while not self._stop:
            code = None
            conn = await self._connect()
            if conn is not None:
                self.connects += 1
                self.relays.connected()
                try:
                    await self._session(conn)
                    await self._hang_up(conn)
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else None
                except BaseException:
                    # Cancelled (Ctrl-C under asyncio.run) or a callback raised: drop the connection
                    # at once. A closing handshake would wait for the relay's close frame, queued
                    # behind everything it already sent; with no reader, reading stops once
                    # max_queue frames wait, and close() lasts until close_timeout.
                    conn.transport.abort()
                    raise
            if self._stop:
                return
            left = self.url
            if code == SLOW_CONSUMER:  # not the node's failure: back to it at once
                delay = 0.05 * (0.5 + random.random() / 2)
            else:
                delay = self.relays.failed(progress=conn is not None)
            if self.url == left:
                self.on_note(f"connection lost; resuming in {delay:.1f}s from {self._where()}")
            else:
                what = "connection lost" if conn is not None else "cannot connect"
                self.on_note(f"{what} to {left}; resuming on {self.url} in {delay:.1f}s from {self._where()}")
            await asyncio.sleep(delay)

    async def _connect(self) -> ClientConnection | None:
        """An open connection, or None to retry later."""
        try:
            return await connect(
                self.url,
                ssl=self.ssl[self.url],
                additional_headers=self.headers,
                open_timeout=5,
                close_timeout=CLOSE_TIMEOUT,
                max_size=None,
                compression=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (400, 401, 403):
                raise RelayRefused(f"the relay refused the connection: HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:  # InvalidMessage: closed mid-handshake
            problem = certificate_problem(exc)
            if problem is not None:
                raise RelayRefused(explain_certificate(self.url, problem, self.ca_file)) from None
        return None

    def _where(self) -> str:
        if self.all:
            return "now (all runs)"
        return ", ".join(f"{run} seq {seq}" for run, seq in self.cursors.items())

    async def _session(self, conn) -> None:
        if self.all:
            await conn.send(json.dumps({"op": "subscribe", "run_id": "*"}))
        for run_id, seq in self.cursors.items():
            # A run with no event yet is waited for by the relay: no polling here.
            await conn.send(json.dumps({"op": "subscribe", "run_id": run_id, "since": seq}))
        async for frame in conn:
            msg = json.loads(frame)
            if isinstance(msg, dict) and "op" in msg:
                self._control(msg)
                if self.on_control(msg):
                    return self.stop()
                continue
            for event in events_of(msg):
                run_id, seq = event.get("run_id"), event.get("seq")
                if isinstance(seq, int):
                    if seq <= self.cursors.get(run_id, 0):
                        continue  # already delivered
                    self.cursors[run_id] = seq
                if self.on_event(event):
                    return self.stop()

    async def _hang_up(self, conn: ClientConnection) -> None:
        """Close cleanly once the session is over, reading and dropping what is still in flight.

        The relay's close frame comes after every frame it sent before reading ours; without a
        reader, reading stays paused once ``max_queue`` frames wait, and ``close()`` would only
        end at ``close_timeout``.
        """

        async def discard() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for _ in conn:
                    pass

        reader = asyncio.create_task(discard())
        try:
            await conn.close()
        finally:
            reader.cancel()

    def _control(self, msg: dict[str, Any]) -> None:
        run_id = msg.get("run_id")
        if msg.get("op") == "gap":
            self.cursors[run_id] = msg["resume_from"] - 1
            self.on_note(f"run {run_id}: history before seq {msg['resume_from']} is gone (retention)")

    def stop(self) -> None:
        self._stop = True
