"""How many of the seed system's real frames a frontend on ``/`` gets, per type.

Usage::

    .venv/bin/python bench/compat_seed.py [--src PATH]

Starts ``fedrelay serve`` from ``PATH`` (a ``src`` directory; default this checkout's), sends
the frames of ``tests/support/seed_system.py`` (a centralized run with early stopping, a
federated run, a failing run, a run whose database was down) as the seed's sender does, one
connection per frame, and counts what a root subscriber receives and could ``JSON.parse``.
Prints a table: type, sent, delivered. Compare two relays with ``--src``, e.g. the main
branch's and this one's. Not a speed benchmark: the counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from tests.support.relay_process import RelayProcess  # noqa: E402
from tests.support.seed_system import SCENARIOS, browser_parse, count_types, send_frames  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

DONE = "compat_seed_done"
"""A last frame of a type no scenario sends: once it arrives, everything before it has."""


async def measure(url: str) -> tuple[Counter[str], Counter[str], int]:
    """(sent per type, delivered and parseable per type, delivered but unparseable)."""
    frames = [frame for build in SCENARIOS.values() for frame in build()]
    delivered: Counter[str] = Counter()
    unparseable = 0
    async with connect(url + "/", max_size=None) as frontend:
        await send_frames(url + "/", [*frames, {"type": DONE, "timestamp": None, "data": {}}])
        while True:
            text = await asyncio.wait_for(frontend.recv(), 30)
            try:
                message = browser_parse(text)
            except ValueError:
                unparseable += 1
                continue
            if message.get("type") == DONE:
                break
            delivered[message.get("type")] += 1
    return count_types(frames), delivered, unparseable


def table(sent: Counter[str], delivered: Counter[str], unparseable: int) -> str:
    rows = ["| type | sent | delivered |", "|---|---:|---:|"]
    for kind in sorted(sent):
        rows.append(f"| {kind} | {sent[kind]} | {delivered[kind]} |")
    rows.append(f"| **all** | **{sum(sent.values())}** | **{sum(delivered.values())}** |")
    if unparseable:
        rows.append(f"\n{unparseable} frames delivered that JSON.parse refuses (lost in a browser too)")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(REPO_DIR / "src"), help="the fedrelay src directory to run")
    args = parser.parse_args()
    env = {"PYTHONPATH": os.path.abspath(args.src)}
    with tempfile.TemporaryDirectory(prefix="compat-seed-") as tmp:
        relay = RelayProcess(Path(tmp) / "relay.db", env=env).start()
        try:
            sent, delivered, unparseable = asyncio.run(measure(relay.url))
        finally:
            relay.stop()
    print(f"fedrelay from {args.src}")
    print(table(sent, delivered, unparseable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
