"""The root path speaks the shape hand-rolled trainers and React frontends use."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.clients import Collector, ResendingProducer, event, recv_json, wait_for_control
from tests.support.waiting import wait_until


@pytest.fixture
def relay(backend_relay):
    """Each test that takes ``relay`` on both backends: one SQLite relay, one PostgreSQL relay."""
    return backend_relay


async def legacy_send(url: str, message: dict) -> None:
    """The hand-rolled sender: a new connection per message."""
    async with connect(url + "/") as conn:
        await conn.send(json.dumps(message))


async def test_legacy_trainer_to_legacy_frontend_round_trip(relay):
    sent = [
        {"type": "training_start", "timestamp": "2026-11-28T10:00:00", "data": {"num_rounds": 2}},
        {
            "type": "round_end",
            "timestamp": "2026-11-28T10:00:05",
            "data": {"round": 1, "fit_metrics": {"loss": 0.5}},
        },
        # Types fedrelay does not know still pass on the root path.
        {"type": "custom_metric", "timestamp": "t", "data": {"value": 3, "nested": {"a": [1, 2]}}},
    ]
    async with connect(relay.url + "/") as frontend, Collector(relay.url, "run_id=*") as modern:
        await wait_for_control(modern, "subscribed")
        for message in sent:
            await legacy_send(relay.url, message)
        received = [await recv_json(frontend) for _ in sent]
        for got, want in zip(received, sent, strict=True):
            # As sent; the run and seq the relay gave it beside, never inside, data.
            assert got == {**want, "run_id": "default", "seq": got["seq"]}
        assert [m["seq"] for m in received] == [1, 2, 3]
        # New-style subscribers see the same events, stored under run "default".
        await modern.wait_for(3)
        assert [e["type"] for e in modern.events] == [m["type"] for m in sent]


async def test_ping_is_answered_not_broadcast(relay):
    async with connect(relay.url + "/") as a, connect(relay.url + "/") as b:
        await a.send(json.dumps({"type": "ping"}))
        assert await recv_json(a) == {"type": "pong"}
        await a.send(json.dumps({"type": "status", "data": {"message": "after ping", "run_id": "r"}}))
        first = await recv_json(b)
        assert first["type"] == "status" and first["data"]["message"] == "after ping"


async def test_published_events_reach_root_connections_in_legacy_shape(relay):
    async with connect(relay.url + "/") as frontend:
        producer = ResendingProducer(relay.url, "modern")
        await producer.publish_all([event("flwr-7", i) for i in range(1, 4)])
        got = [await recv_json(frontend) for _ in range(3)]
        assert [g["data"]["local_epoch"] for g in got] == [1, 2, 3]
        assert all(g["type"] == "client_progress" and g["data"]["run_id"] == "flwr-7" for g in got)
        assert all(set(g) == {"type", "timestamp", "data"} for g in got)


async def test_run_id_inside_data_selects_the_run(relay):
    await legacy_send(
        relay.url, {"type": "round_start", "timestamp": "x", "data": {"round": 1, "run_id": 99}}
    )
    run = await asyncio.to_thread(
        wait_until, lambda: (r := relay.get_json("/api/runs/99"))[0] == 200 and r[1]["last_seq"] == 1 and r[1]
    )
    assert run["round"] == 1 and run["run_id"] == "99"


async def test_what_the_root_path_still_refuses_is_logged_once_a_minute_per_host(relay):
    """Root producers never read replies: the relay's log is the only place a refusal shows."""
    async with connect(relay.url + "/") as conn:
        for frame in ("{nope", "[1]", '{"type": 5}'):
            await conn.send(frame)
        errors = [await recv_json(conn) for _ in range(3)]
    assert [e["data"]["code"] for e in errors] == ["bad_json", "not_object", "missing_type"]
    lines = await asyncio.to_thread(
        wait_until, lambda: [line for line in relay.log().splitlines() if "refused a frame on /" in line]
    )
    assert len(lines) == 1, lines  # the other two are counted for the next line, a minute on
    assert "WARNING" in lines[0] and "from 127.0.0.1:" in lines[0] and "bad_json" in lines[0], lines


async def test_a_refused_browser_origin_is_logged_once_with_the_flag_that_allows_it(relay):
    for origin in ("https://evil.example", "https://evil.example", "https://other.example:8443"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(relay.url + "/", origin=origin):
                pass
        assert refused.value.response.status_code == 403

    def lines() -> list[str]:
        return [line for line in relay.log().splitlines() if "refused a WebSocket from a page" in line]

    found = await asyncio.to_thread(wait_until, lambda: len(lines()) == 2 and lines())
    assert "'https://evil.example'" in found[0] and "--allow-origin https://evil.example " in found[0]
    assert "--allow-origin https://other.example:8443 " in found[1]
