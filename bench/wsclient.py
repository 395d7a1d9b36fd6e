"""The same subscriber on the ``websockets`` client, to measure what the raw one saves.

Only used with ``relay_bench.py --client websockets``: it does the same
per-message work as ``rawws.RawSubscriber`` (count the marker, regex the
``sent_ns``; no JSON decoding of events), so the difference in load
generator CPU and in measured latency is the client library's own cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from array import array
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rawws import EVENT_MARKER, MAX_CONTROLS_KEPT, SENT_NS_RE


class WsSubscriber:
    """A ``websockets`` client subscriber exposing ``RawSubscriber``'s counters."""

    def __init__(self, ws: ClientConnection, record_latency: bool) -> None:
        loop = asyncio.get_running_loop()
        self.ws = ws
        self.count = 0
        self.frames = 0
        self.reads = 0
        self.first_ns = 0
        self.last_ns = 0
        self.latencies: array[int] | None = array("q") if record_latency else None
        self.controls: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.subscribed: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._want = 0
        self._want_fut: asyncio.Future[None] | None = None
        self._closer: asyncio.Future[None] | None = None
        self._task = asyncio.create_task(self._read_loop())

    def wait_count(self, target: int) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        if self.count >= target:
            fut.set_result(None)
        elif self.closed.done():
            fut.set_exception(ConnectionError("connection closed"))
        else:
            self._want, self._want_fut = target, fut
        return fut

    def close(self) -> None:
        self._closer = asyncio.ensure_future(self._close())

    def abort(self) -> None:
        self._task.cancel()
        self.ws.transport.abort()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.ws.recv(decode=False)
                self._message(data, time.monotonic_ns())
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
        finally:
            for fut in (self.subscribed, self._want_fut):
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
                    fut.exception()
            self.closed.set_result(None)

    def _message(self, data: bytes, now: int) -> None:
        self.frames += 1
        self.reads += 1  # the library hides socket reads: one per message
        events = data.count(EVENT_MARKER)
        if not events:
            message = json.loads(data)
            if isinstance(message, dict):
                if len(self.controls) < MAX_CONTROLS_KEPT:
                    self.controls.append(message)
                if message.get("op") == "subscribed" and not self.subscribed.done():
                    self.subscribed.set_result(message)
            return
        if not self.count:
            self.first_ns = now
        self.count += events
        self.last_ns = now
        if self.latencies is not None:
            for sent in SENT_NS_RE.findall(data):
                sent_ns = int(sent)
                if sent_ns:
                    self.latencies.append(sent_ns)
                    self.latencies.append(now - sent_ns)
        if self._want_fut is not None and self.count >= self._want:
            if not self._want_fut.done():
                self._want_fut.set_result(None)
            self._want_fut = None


async def connect_ws_many(
    host: str,
    port: int,
    path: str,
    count: int,
    *,
    timeout: float = 30.0,
    record_latency: bool = False,
    concurrency: int = 50,
) -> tuple[list[WsSubscriber], list[str]]:
    """Open ``count`` websockets-client subscribers and wait for ``subscribed``."""
    gate = asyncio.Semaphore(concurrency)
    subs: list[WsSubscriber] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    ws = await connect(
                        f"ws://{host}:{port}{path}", compression=None, max_size=None, max_queue=None
                    )
                    sub = WsSubscriber(ws, record_latency)
                    await sub.subscribed
                subs.append(sub)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))
    return subs, errors
