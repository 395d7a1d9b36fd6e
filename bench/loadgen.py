"""Subscriber load-generator worker: a separate process holding raw subscribers.

Why a process: the relay under test, the producer and the subscribers must
not share an interpreter (one GIL would make the relay look slower than it
is), and spreading subscribers over more than one worker lets the load
generator use both cores when the relay leaves room.

Protocol: one JSON object per line on stdin, one JSON answer per line on
stdout.

- ``{"cmd": "connect", "host", "port", "path", "n", "latency": bool,
  "client": "raw"|"websockets"}``: open ``n`` subscribers and answer once
  every one is subscribed.
- ``{"cmd": "finish", "expect": N, "timeout": s, "lat_file": path|null}``:
  wait until every subscriber has ``N`` events (or the timeout), write the
  latency samples (int64 ns pairs: sent_ns, latency_ns) to ``lat_file``, close them all and answer
  with a summary.
- ``{"cmd": "quit"}``: exit.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from array import array
from collections import Counter
from typing import Any

import uvloop

from rawws import RawSubscriber, close_all, connect_many
from wsclient import WsSubscriber, connect_ws_many

Subscriber = RawSubscriber | WsSubscriber


def raise_fd_limit() -> None:
    """Allow a few thousand sockets: the memory scenario opens 1,000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def reply(message: dict[str, Any]) -> None:
    """Answer the orchestrator on stdout, one line per message."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def wait_all(subs: list[Subscriber], expect: int, timeout: float) -> bool:
    """Wait until every open subscriber has ``expect`` events, bounded in time."""
    waiters = [sub.wait_count(expect) for sub in subs]
    if not waiters:
        return True
    done, pending = await asyncio.wait(waiters, timeout=timeout)
    for fut in pending:
        fut.cancel()
    for fut in done:
        fut.exception()  # closed connections are reported via close codes
    return not pending


def summarize(subs: list[Subscriber], expect: int) -> dict[str, Any]:
    """Aggregate per-subscriber counters into one small answer."""
    counts = [s.count for s in subs]
    firsts = [s.first_ns for s in subs if s.first_ns]
    lasts = [s.last_ns for s in subs if s.last_ns]
    closes = Counter(f"{s.close_code} {s.close_reason}".strip() for s in subs if s.close_code)
    controls = [c for s in subs for c in s.controls if c.get("op") not in (None, "subscribed")]
    return {
        "subs": len(subs),
        "total": sum(counts),
        "min_count": min(counts, default=0),
        "max_count": max(counts, default=0),
        "complete": sum(1 for c in counts if c >= expect),
        "frames": sum(s.frames for s in subs),
        "reads": sum(s.reads for s in subs),
        "first_ns": min(firsts, default=0),
        "last_ns": max(lasts, default=0),
        "closes": dict(closes),
        "unexpected_controls": controls[:5],
        "unexpected_control_count": len(controls),
    }


def write_latencies(subs: list[Subscriber], path: str | None) -> int:
    """Dump all (sent_ns, latency_ns) pairs to a file; returns how many pairs."""
    if not path:
        return 0
    samples = array("q")
    for sub in subs:
        if sub.latencies is not None:
            samples.extend(sub.latencies)
    with open(path, "wb") as handle:
        samples.tofile(handle)
    return len(samples) // 2


async def handle_connect(cmd: dict[str, Any]) -> tuple[list[Subscriber], dict[str, Any]]:
    """Open the subscribers of one scenario run."""
    started = time.monotonic()
    connect = connect_ws_many if cmd.get("client") == "websockets" else connect_many
    subs, errors = await connect(
        cmd["host"],
        cmd["port"],
        cmd["path"],
        cmd["n"],
        timeout=cmd.get("timeout", 30.0),
        record_latency=cmd.get("latency", False),
    )
    answer = {
        "ok": not errors,
        "connected": len(subs),
        "errors": errors[:5],
        "error_count": len(errors),
        "connect_s": time.monotonic() - started,
    }
    return subs, answer


async def handle_finish(subs: list[Subscriber], cmd: dict[str, Any]) -> dict[str, Any]:
    """Drain, summarize, dump latencies and close."""
    expect = cmd["expect"]
    all_done = await wait_all(subs, expect, cmd.get("timeout", 10.0))
    answer = summarize(subs, expect)
    answer["all_done"] = all_done
    answer["latency_samples"] = write_latencies(subs, cmd.get("lat_file"))
    await close_all(subs)
    return answer


async def serve_commands() -> None:
    """Read commands from stdin until ``quit`` or EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    subs: list[Subscriber] = []
    reply({"ready": True})
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "connect":
            await close_all(subs)
            subs, answer = await handle_connect(cmd)
            reply(answer)
        elif cmd["cmd"] == "finish":
            reply(await handle_finish(subs, cmd))
            subs = []
        elif cmd["cmd"] == "quit":
            break
        else:
            reply({"ok": False, "errors": [f"unknown command {cmd['cmd']!r}"]})
    await close_all(subs)


if __name__ == "__main__":
    raise_fd_limit()
    uvloop.run(serve_commands())
