"""A producer name shared by two emitters is refused, never silently halved.

Two processes started with the same explicit producer name both saw ``last_id: null``; the
relay dropped whichever copy of each id came second as a duplicate and acked it: 500 of 1,000
events stored, both flush() True, nothing logged. Now (docs/protocol.md):

- a second live ``/publish`` connection under a name gets ``producer_in_use`` (with
  ``stale_after``) instead of ``hello``, and close code 4409; the older connection is pinged
  and closed if it does not answer;
- an id that comes again with another body than the stored one gets ``producer_conflict``:
  the ack covers the ids before it, never it, then 4409; identical resends stay silent,
  also after a relay restart.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.clients import event
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.sockets import send_handshake

pytestmark = pytest.mark.timeout(60)
OTHER = "127.0.0.2"


async def publisher(relay: RelayProcess, name: str, source: str = "127.0.0.1") -> ClientConnection:
    return await connect(
        f"{relay.url}/publish?producer={name}", compression=None, open_timeout=5, local_addr=(source, 0)
    )


async def replies_until_close(conn: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame the relay sends until it closes, and its close code."""
    got: list[dict[str, Any]] = []
    try:
        while True:
            got.append(json.loads(await asyncio.wait_for(conn.recv(), 10)))
    except ConnectionClosed as exc:
        return got, exc.rcvd.code if exc.rcvd else None


async def send_until_acked(conn: ClientConnection, events: list[dict], upto: int) -> list[dict]:
    await conn.send(json.dumps(events))
    got = []
    while not any(m.get("op") == "ack" and m["upto"] >= upto for m in got):
        got.append(json.loads(await asyncio.wait_for(conn.recv(), 10)))
    return got


def stored(relay: RelayProcess, run_id: str) -> list[dict]:
    status, page = relay.get_json(f"/api/runs/{run_id}/events?since=0&limit=10000")
    assert status == 200, page
    return page["events"]


async def test_a_second_live_connection_under_a_name_is_refused(relay_factory):
    relay = relay_factory("--ping-interval", "1", "--ping-timeout", "2")
    first = await publisher(relay, "flower-client")
    try:
        assert json.loads(await first.recv())["op"] == "hello"
        second = await publisher(relay, "flower-client", source=OTHER)
        frames, code = await replies_until_close(second)
        assert code == 4409
        assert [f["op"] for f in frames] == ["error"], frames
        assert frames[0]["code"] == "producer_in_use" and frames[0]["stale_after"] == 3.0, frames
        assert "hello" not in json.dumps(frames)
        # The first connection goes on undisturbed.
        await send_until_acked(first, [event("shared", 1)], 1)
    finally:
        await first.close()
    # Once it is gone, the name is free again.
    again = await publisher(relay, "flower-client", source=OTHER)
    hello = json.loads(await again.recv())
    assert hello["op"] == "hello" and hello["last_id"] == 1
    await again.close()
    figures = scrape(relay)
    assert figures['fedrelay_producer_refusals_total{reason="producer_in_use"}'] == 1
    warning = [line for line in relay.log().splitlines() if "in use" in line]
    assert len(warning) == 1 and "127.0.0.1" in warning[0] and OTHER in warning[0], warning


async def test_an_older_connection_that_does_not_answer_a_ping_is_closed(relay_factory):
    """The same emitter back after a cut the relay has not seen: its old connection is silent."""
    relay = relay_factory()  # pings every 20 s: only the probe can find the silent one in time
    dead = socket.create_connection(("127.0.0.1", relay.port))
    send_handshake(dead, relay.port, "/publish?producer=cut-off")  # then never reads: no pong
    try:
        while True:  # retry as an emitter does until the relay has closed the silent one
            conn = await publisher(relay, "cut-off", source=OTHER)
            first = json.loads(await asyncio.wait_for(conn.recv(), 10))
            if first["op"] == "hello":
                break
            assert first["code"] == "producer_in_use"
            await replies_until_close(conn)
            await asyncio.sleep(0.5)  # the emitter's backoff
        await send_until_acked(conn, [event("cut", 1)], 1)
        await conn.close()
    finally:
        dead.close()
    assert "did not answer a ping" in relay.log()


async def test_an_id_stored_with_another_body_is_a_conflict(backend_db):
    relay = RelayProcess(backend_db).start()
    try:
        original = [event("twins", i) for i in range(1, 11)]
        conn = await publisher(relay, "twin")
        assert json.loads(await conn.recv())["op"] == "hello"
        await send_until_acked(conn, original, 10)
        await conn.close()

        # The same events again, even with their keys in another order: ordinary duplicates.
        conn = await publisher(relay, "twin")
        await conn.recv()
        reordered = [dict(reversed(list(e.items()))) for e in original[5:]]
        got = await send_until_acked(conn, reordered, 10)
        assert [m for m in got if m["op"] == "error"] == []
        await conn.close()

        # Another emitter's events under the name: 8 and 9 match by chance, 10 does not.
        other = [event("twins", 8), event("twins", 9), event("twins", 10, note="other"), event("twins", 11)]
        conn = await publisher(relay, "twin", source=OTHER)
        await conn.recv()
        await conn.send(json.dumps(other))
        frames, code = await replies_until_close(conn)
        assert code == 4409
        assert [(f["op"], f.get("upto"), f.get("code"), f.get("id")) for f in frames] == [
            ("ack", 9, None, None),
            ("error", None, "producer_conflict", 10),
        ], frames
        events = stored(relay, "twins")
        assert [e["id"] for e in events] == list(range(1, 11))
        assert "note" not in events[-1]["data"]  # the first emitter's event 10 stays
        assert "two emitters share this name" in relay.log()
    finally:
        assert relay.stop() == 0

    # After a restart the check still holds: the stored bodies are found by index, not memory.
    relay.start()
    try:
        conn = await publisher(relay, "twin")
        assert json.loads(await conn.recv())["last_id"] == 10
        await conn.send(json.dumps([event("twins", 3, note="other")]))
        frames, code = await replies_until_close(conn)
        assert code == 4409 and frames == [frames[0]] and frames[0]["code"] == "producer_conflict"
        assert frames[0]["id"] == 3
        figures = scrape(relay)
        assert figures['fedrelay_producer_refusals_total{reason="producer_conflict"}'] == 1
    finally:
        relay.stop()
