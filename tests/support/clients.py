"""Small WebSocket clients for tests: a subscriber that collects events and a
producer that keeps events until acked and resends them, as emitters do."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.waiting import until


def event(run_id: str, i: int, kind: str = "client_progress", **data: Any) -> dict[str, Any]:
    payload = {"round": 1, "client_id": "c1", "local_epoch": i, "metrics": {"loss": 1.0 / (i + 1)}}
    payload.update(data)
    return {"type": kind, "run_id": run_id, "id": i, "data": payload}


async def recv_json(conn: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame on ``conn``, parsed; a relay that says nothing for ``timeout`` s fails."""
    return json.loads(await asyncio.wait_for(conn.recv(), timeout))


def events_in(frame: str) -> list[dict[str, Any]]:
    """The events a subscriber frame carries (one object or an array)."""
    msg = json.loads(frame)
    if isinstance(msg, list):
        return msg
    if "op" in msg:
        return []
    return [msg]


class Collector:
    """Subscribes and records every event and control frame it receives."""

    def __init__(self, url: str, query: str) -> None:
        self.url = f"{url}/subscribe?{query}"
        self.events: list[dict[str, Any]] = []
        self.controls: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self.conn: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self.conn = await connect(self.url, compression=None, max_size=None)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None and self._task is not None
        await self.conn.close()
        await asyncio.wait_for(self._task, 10)

    async def _read(self) -> None:
        assert self.conn is not None
        try:
            async for frame in self.conn:
                msg = json.loads(frame)
                if isinstance(msg, dict) and "op" in msg:
                    self.controls.append(msg)
                else:
                    self.events.extend(msg if isinstance(msg, list) else [msg])
        except ConnectionClosed as exc:
            self.closed = exc

    def seqs(self, run_id: str | None = None) -> list[int]:
        return [e["seq"] for e in self.events if run_id is None or e["run_id"] == run_id]

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        """Await ``count`` events; a subscription the relay closed meanwhile fails at once."""

        def reached() -> bool:
            if len(self.events) >= count:
                return True
            if self._task is not None and self._task.done():
                raise AssertionError(f"subscriber closed after {len(self.events)} events: {self.closed}")
            return False

        await until(reached, timeout, interval=0.01, what=f"{count} events at {self.url}")


async def wait_for_control(collector: Collector, op: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first control frame with this ``op`` the collector received."""

    def found() -> dict[str, Any] | None:
        return next((msg for msg in collector.controls if msg.get("op") == op), None)

    return await until(found, timeout, interval=0.01, what=f"a {op!r} frame at {collector.url}")


class ResumingSubscriber:
    """Follows one run across relay restarts, resuming from its last seq."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.events: list[dict[str, Any]] = []
        self.connections = 0
        self.gaps: list[dict[str, Any]] = []

    async def follow(self, until_count: int, timeout: float = 60.0) -> None:
        async def loop() -> None:
            while len(self.events) < until_count:
                since = self.events[-1]["seq"] if self.events else 0
                try:
                    async with connect(
                        f"{self.url}/subscribe?run_id={self.run_id}&since={since}",
                        compression=None,
                        open_timeout=2,
                    ) as conn:
                        self.connections += 1
                        async for frame in conn:
                            msg = json.loads(frame)
                            if isinstance(msg, dict) and msg.get("op") == "error":
                                break  # refused (a since this relay never handed out): retry
                            if isinstance(msg, dict) and msg.get("op") == "gap":
                                self.gaps.append(msg)
                            self.events.extend(events_in(frame))
                            if len(self.events) >= until_count:
                                return
                except (TimeoutError, OSError, ConnectionClosed):
                    pass
                await asyncio.sleep(0.02)

        await asyncio.wait_for(loop(), timeout)


class ResendingProducer:
    """Publishes with ids, keeps events until acked, resends after reconnects."""

    def __init__(self, url: str, name: str, pace: float = 0.0) -> None:
        self.url = f"{url}/publish?producer={name}"
        self.pace = pace
        """Seconds between frames: spreads a stream over time so faults land mid-run."""
        self.connections = 0
        self.unacked: dict[int, dict[str, Any]] = {}
        self.acked = 0
        self.errors: list[dict[str, Any]] = []

    async def publish_all(self, events: list[dict[str, Any]], batch: int = 50, timeout: float = 60.0) -> None:
        """Send everything, surviving relay restarts, until all is acked."""
        for e in events:
            self.unacked[e["id"]] = e
        deadline = asyncio.get_running_loop().time() + timeout
        while self.unacked:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{len(self.unacked)} events never acked")
            try:
                async with connect(self.url, compression=None, open_timeout=2) as conn:
                    self.connections += 1
                    reader = asyncio.create_task(self._read_acks(conn))
                    resend = sorted(self.unacked)
                    to_send = [self.unacked[i] for i in resend]
                    for start in range(0, len(to_send), batch):
                        await conn.send(json.dumps(to_send[start : start + batch]))
                        if self.pace:
                            await asyncio.sleep(self.pace)
                    while self.unacked and not reader.done():
                        if asyncio.get_running_loop().time() > deadline:
                            raise TimeoutError(f"{len(self.unacked)} events never acked")
                        await asyncio.sleep(0.01)
                    reader.cancel()
            except (TimeoutError, OSError, ConnectionClosed):
                await asyncio.sleep(0.05)

    async def _read_acks(self, conn: ClientConnection) -> None:
        try:
            async for frame in conn:
                msg = json.loads(frame)
                if msg.get("op") == "ack":
                    self.acked = max(self.acked, msg["upto"])
                    for i in [i for i in self.unacked if i <= msg["upto"]]:
                        del self.unacked[i]
                elif msg.get("op") == "error":
                    self.errors.append(msg)
        except ConnectionClosed:
            return
