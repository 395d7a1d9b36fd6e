"""The relay reaches below websockets' public API (fanout.py, connection.py); these fail loudly,
naming the websockets version and what changed, when a release moves what it relies on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import websockets
from websockets.asyncio.client import connect

from fedrelay.relay.websockets_check import TESTED_MAJORS, missing_internals
from tests.support.clients import Collector, ResendingProducer, event


def test_the_internals_the_relay_uses_are_there():
    missing = missing_internals()
    assert missing == [], (
        f"websockets {websockets.__version__} changed what fedrelay uses below its public API: "
        f"{missing}. Adapt fedrelay/relay/fanout.py and connection.py, then the range in pyproject.toml"
    )
    assert int(websockets.__version__.split(".")[0]) in TESTED_MAJORS, (
        f"websockets {websockets.__version__} is not a major the relay was tested with ({TESTED_MAJORS})"
    )


def test_a_relay_on_a_websockets_without_them_refuses_to_start(tmp_path):
    """As a future release would: ServerConnection.send_data and Assembler.paused gone."""
    code = textwrap.dedent(
        f"""
        import sys
        import websockets.asyncio.connection as connection
        import websockets.asyncio.messages as messages
        del connection.Connection.send_data
        source = messages.Assembler.__init__
        def __init__(self, *args, **kwargs):
            source(self, *args, **kwargs)
        messages.Assembler.__init__ = __init__
        from fedrelay.cli import main
        sys.exit(main(["serve", "--port", "0", "--db", {str(tmp_path / "relay.db")!r}]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"websockets {websockets.__version__}" in out.stderr
    assert "ServerConnection.send_data()" in out.stderr and "Assembler: self.paused" in out.stderr
    assert "Traceback" not in out.stderr


async def test_both_fanout_paths_and_stepped_inflation_deliver_everything(relay_factory):
    """Shared pre-framed writes (no extension) and the protocol's own framing (deflate) side by
    side, and a compressing producer whose frames are fed in steps: every event arrives."""
    relay = relay_factory("--compression")
    total = 3000
    plain = Collector(relay.url, "run_id=*")
    async with plain, connect(f"{relay.url}/subscribe?run_id=*", compression="deflate") as deflated:
        assert deflated.protocol.extensions, "no permessage-deflate negotiated"
        got: list[int] = []

        async def read_deflated() -> None:
            async for frame in deflated:
                msg = json.loads(frame)
                got.extend(e["seq"] for e in (msg if isinstance(msg, list) else [msg]) if "seq" in e)
                if len(got) >= total:
                    return

        reading = asyncio.create_task(read_deflated())
        async with connect(f"{relay.url}/publish?producer=zipped", compression="deflate") as producer:
            assert json.loads(await producer.recv())["op"] == "hello"
            for start in range(1, total + 1, 10):
                await producer.send(json.dumps([event("both", i) for i in range(start, start + 10)]))
            while True:
                reply = json.loads(await asyncio.wait_for(producer.recv(), 20))
                if reply.get("op") == "ack" and reply["upto"] == total:
                    break
        await asyncio.wait_for(reading, 30)
        await plain.wait_for(total)
    assert got == list(range(1, total + 1))
    assert plain.seqs() == list(range(1, total + 1))
    await ResendingProducer(relay.url, "after").publish_all([event("both", total + 1)])
