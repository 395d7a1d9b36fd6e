"""A small relay client to run inside a network namespace (``ip netns exec NS python -m ...``).

    health URL --ca CA                       wait for /healthz over https
    subscribe URL --ca CA --token T --out F  write every event of every run to F (JSON lines) until
                                             one of type --until arrives; F.ready once subscribed
    publish URL --ca CA --token T --producer P --count N --run R
                                             publish N events and wait for the ack
    untrusted URL                            exit 0 when the default (system) CAs refuse the relay
    listening HOST:PORT                      wait until a TCP port accepts connections

A plain websockets client with an ``ssl`` context: what the test checks is the relay's TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect


def _context(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


def health(args: argparse.Namespace) -> int:
    http = "https" + args.url[len("wss") :]
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            with urllib.request.urlopen(f"{http}/healthz", timeout=2, context=_context(args.ca)) as answer:
                if answer.status == 200:
                    return 0
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"no relay at {http}: {exc}", file=sys.stderr)
                return 1
        time.sleep(0.1)


def listening(args: argparse.Namespace) -> int:
    host, _, port = args.url.rpartition(":")
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return 0
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"nothing listens on {args.url}: {exc}", file=sys.stderr)
                return 1
        time.sleep(0.1)


async def subscribe(args: argparse.Namespace) -> int:
    out = Path(args.out)
    headers = {"Authorization": f"Bearer {args.token}"}
    async with connect(
        f"{args.url}/subscribe?run_id=*", ssl=_context(args.ca), additional_headers=headers
    ) as ws:
        with out.open("w") as sink:
            async with asyncio.timeout(args.timeout):
                async for frame in ws:
                    message = json.loads(frame)
                    if isinstance(message, dict) and message.get("op") == "subscribed":
                        Path(f"{out}.ready").touch()
                        continue
                    for event in message if isinstance(message, list) else [message]:
                        if "op" in event:
                            continue
                        sink.write(json.dumps(event) + "\n")
                        sink.flush()
                        if event.get("type") == args.until:
                            return 0
    return 2


async def publish(args: argparse.Namespace) -> int:
    url = f"{args.url}/publish?producer={args.producer}"
    headers = {"Authorization": f"Bearer {args.token}"}
    events = [
        {"type": "client_progress", "run_id": args.run, "id": i, "data": {"round": 1, "client_id": i}}
        for i in range(1, args.count + 1)
    ]
    async with connect(url, ssl=_context(args.ca), additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["op"] == "hello"
        await ws.send(json.dumps(events))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
    print(json.dumps(reply))
    return 0 if reply == {"op": "ack", "producer": args.producer, "upto": args.count} else 1


async def untrusted(args: argparse.Namespace) -> int:
    try:
        async with connect(
            f"{args.url}/subscribe?run_id=*", ssl=ssl.create_default_context(), open_timeout=10
        ):
            pass
    except ssl.SSLCertVerificationError as exc:
        print(f"refused: {exc}")
        return 0
    print("connected without trusting the relay's CA", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="wss_client")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("health", "subscribe", "publish", "untrusted", "listening"):
        command = commands.add_parser(name)
        command.add_argument("url")
        if name in ("health", "subscribe", "publish"):
            command.add_argument("--ca", required=True)
        command.add_argument("--timeout", type=float, default=60.0)
        if name in ("subscribe", "publish"):
            command.add_argument("--token", required=True)
        if name == "subscribe":
            command.add_argument("--out", required=True)
            command.add_argument("--until", default="training_end")
        if name == "publish":
            command.add_argument("--producer", required=True)
            command.add_argument("--run", required=True)
            command.add_argument("--count", type=int, default=3)
    args = parser.parse_args()
    if args.command in ("health", "listening"):
        return {"health": health, "listening": listening}[args.command](args)
    return asyncio.run(
        {"subscribe": subscribe, "publish": publish, "untrusted": untrusted}[args.command](args)
    )


if __name__ == "__main__":
    sys.exit(main())
