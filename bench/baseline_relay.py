"""Baseline relays the bench compares fedrelay against.

``naive``: for every frame a producer sends, ``await ws.send(frame)`` to
each subscriber in turn, the way a first hand-written relay usually looks.
``broadcast``: the same, but one ``websockets.broadcast`` call per frame,
which writes to every socket synchronously without awaiting.

Both forward the producer's raw bytes: no validation, sequencing, storage or
acks. ``/publish`` connections are producers, ``/subscribe`` connections are
subscribers (query strings ignored). The only thing they add is one
``{"op": "subscribed"}`` frame when a subscriber is registered, so the load
generator has the same readiness signal as with fedrelay and never starts
publishing before the relay knows about every subscriber.

Run: ``python bench/baseline_relay.py --mode naive --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

SUBSCRIBED = b'{"op": "subscribed", "run_id": "*", "since": 0, "last_seq": 0}'


class Relay:
    """Holds the subscriber set and the fan-out policy of one mode."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.subscribers: set[ServerConnection] = set()

    async def handler(self, ws: ServerConnection) -> None:
        """Route by path: producers publish, subscribers wait for frames."""
        path = ws.request.path.split("?", 1)[0] if ws.request else ""
        if path == "/publish":
            await self.produce(ws)
        elif path == "/subscribe":
            await self.subscribe(ws)
        else:
            await ws.close(1008, "unknown path")

    async def subscribe(self, ws: ServerConnection) -> None:
        """Register, confirm, then just hold the connection open."""
        self.subscribers.add(ws)
        try:
            await ws.send(SUBSCRIBED, text=True)
            await ws.wait_closed()
        finally:
            self.subscribers.discard(ws)

    async def produce(self, ws: ServerConnection) -> None:
        """Forward every frame as received, still UTF-8 encoded."""
        try:
            while True:
                frame = await ws.recv(decode=False)
                if self.mode == "broadcast":
                    websockets.broadcast(self.subscribers, frame, text=True)
                else:
                    await self.send_each(frame)
        except ConnectionClosed:
            return

    async def send_each(self, frame: bytes) -> None:
        """The naive fan-out: one awaited send per subscriber."""
        for sub in list(self.subscribers):
            try:
                await sub.send(frame, text=True)
            except ConnectionClosed:
                self.subscribers.discard(sub)


async def main(mode: str, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    relay = Relay(mode)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    async with serve(relay.handler, host, port, compression=None, max_size=None, backlog=1024):
        with contextlib.suppress(asyncio.CancelledError):
            await stop


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=["naive", "broadcast"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    uvloop.run(main(args.mode, args.host, args.port))
