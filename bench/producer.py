"""Bench producers: build events, publish them, and follow fedrelay's acks.

Producers use the ``websockets`` client (few connections, modest rates);
only subscribers need the raw client. A background task drains whatever
the relay sends back (``hello``, ``ack``, ``error``) so the relay never
blocks on a full producer socket; the baselines send nothing back and the
task just waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from array import array
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

MAX_ERRORS_KEPT = 10


def event(run_id: str, event_id: int, sent_ns: int) -> dict[str, Any]:
    """One ``client_progress`` event; ``sent_ns`` is CLOCK_MONOTONIC (0 = no sample)."""
    return {
        "type": "client_progress",
        "run_id": run_id,
        "id": event_id,
        "data": {
            "round": 1 + event_id // 1000,
            "client_id": f"c{event_id % 10}",
            "local_epoch": 1,
            "metrics": {"loss": 0.5, "accuracy": 0.75},
            "sent_ns": sent_ns,
        },
    }


def encode(obj: Any) -> str:
    """Compact JSON, as an emitter would send it."""
    return json.dumps(obj, separators=(",", ":"))


class Producer:
    """One publishing connection with its own ``id`` counter and ack tracking."""

    def __init__(self, ws: ClientConnection, name: str, run_id: str, track_acks: bool) -> None:
        self.ws = ws
        self.name = name
        self.run_id = run_id
        self.next_id = 1
        self.acked = 0
        self.hello: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.ack_latency_ns = array("q")
        self.close_info = ""
        self._track = track_acks
        self._pending: deque[tuple[int, int]] = deque()
        self._ack_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(
        cls, url: str, name: str, run_id: str, *, track_acks: bool = False, timeout: float = 10.0
    ) -> Producer:
        """Connect without compression (nobody compresses in this bench)."""
        ws = await asyncio.wait_for(
            connect(url, compression=None, max_size=None, open_timeout=timeout), timeout
        )
        return cls(ws, name, run_id, track_acks)

    async def send_event(self, sent_ns: int | None = None) -> int:
        """Publish one event; ``sent_ns`` defaults to now. Returns its id."""
        event_id = self.next_id
        self.next_id += 1
        now = time.monotonic_ns()
        payload = encode(event(self.run_id, event_id, now if sent_ns is None else sent_ns))
        if self._track:
            self._pending.append((event_id, now))
        await self.ws.send(payload)
        return event_id

    async def send_batch(self, count: int) -> int:
        """Publish ``count`` events in one JSON-array frame. Returns the last id."""
        first = self.next_id
        self.next_id += count
        batch = [event(self.run_id, i, 0) for i in range(first, first + count)]
        if self._track:
            self._pending.append((first + count - 1, time.monotonic_ns()))
        await self.ws.send(encode(batch))
        return first + count - 1

    async def send_raw(self, obj: Any) -> None:
        """Publish an arbitrary (non-bench) event, e.g. the run's first event."""
        if isinstance(obj, dict) and "id" not in obj:
            obj = {**obj, "id": self.next_id}
        if isinstance(obj, dict):
            self.next_id = max(self.next_id, obj["id"] + 1)
        await self.ws.send(encode(obj))

    async def wait_acked(self, upto: int, timeout: float) -> bool:
        """Wait until an ack covers ``upto``; False on timeout or close."""
        if self.acked >= upto:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._ack_waiters.append((upto, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except (TimeoutError, ConnectionError):
            return False

    @property
    def sent(self) -> int:
        return self.next_id - 1

    async def close(self) -> None:
        """Close the connection and stop the reader."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader

    async def _read_loop(self) -> None:
        """Drain relay frames; record hello, acks and errors."""
        try:
            async for message in self.ws:
                self._on_message(json.loads(message))
        except ConnectionClosed as exc:
            self.close_info = f"{exc.rcvd.code if exc.rcvd else None} {exc}"
        finally:
            for _, fut in self._ack_waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("producer connection closed"))
                    fut.exception()

    def _on_message(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        op = message.get("op")
        if op == "ack":
            self._on_ack(int(message["upto"]))
        elif op == "hello":
            self.hello = message
        else:
            self.error_count += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(message)

    def _on_ack(self, upto: int) -> None:
        """Advance the ack mark, time acked events, wake waiters."""
        self.acked = max(self.acked, upto)
        now = time.monotonic_ns()
        while self._pending and self._pending[0][0] <= upto:
            self.ack_latency_ns.append(now - self._pending.popleft()[1])
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._ack_waiters:
            if fut.done():
                continue
            if upto >= target:
                fut.set_result(None)
            else:
                still.append((target, fut))
        self._ack_waiters = still
