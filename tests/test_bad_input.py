"""Bad input gets a clear error frame; nobody else's stream loses anything.

Every test runs a valid stream of events on its own run (a paced producer on
one connection, a subscriber on another) while a third connection sends bad
input. At the end the subscriber must hold exactly seq 1..N in order, the
producer must have every ack on the connection it started with, and the bad
connection must still be usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.clients import Collector, ResendingProducer, event, recv_json, wait_for_control
from tests.support.metrics import metric
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until

MAX_FRAME = 4096
MAX_EVENTS = 20
N_GOOD = 500


@pytest.fixture(scope="module")
def limited_relay(tmp_path_factory):
    """One relay for the module, with small frame limits; each test uses its own runs."""
    proc = RelayProcess(
        tmp_path_factory.mktemp("bad_input") / "relay.db",
        args=["--max-frame-bytes", str(MAX_FRAME), "--max-events-per-frame", str(MAX_EVENTS)],
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def relay(limited_relay):
    assert limited_relay.proc.poll() is None, f"relay died: {limited_relay.log()}"
    return limited_relay


def hello_for(producer: str) -> dict:
    """A new producer's greeting: no stored position, and the relay's frame limits."""
    return {
        "op": "hello",
        "producer": producer,
        "last_id": None,
        "max_frame_bytes": MAX_FRAME,
        "max_events_per_frame": MAX_EVENTS,
        "accepts": ["holding"],
    }


def tag() -> str:
    return uuid.uuid4().hex[:10]


def rejected(relay: RelayProcess, code: str) -> float:
    """fedrelay_rejected_total{code=...} as the relay reports it."""
    return metric(relay, f'fedrelay_rejected_total{{code="{code}"}}')


async def frames_until_ack(conn: ClientConnection, upto: int, timeout: float = 10.0) -> list[dict]:
    """Every frame the relay sends up to and including the ack covering ``upto``."""
    frames: list[dict] = []

    async def read() -> None:
        while True:
            msg = await recv_json(conn, timeout)
            frames.append(msg)
            if msg.get("op") == "ack" and msg["upto"] >= upto:
                return

    await asyncio.wait_for(read(), timeout)
    return frames


def errors_in(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f.get("op") == "error"]


class GoodStream:
    """A valid run published on one connection and followed on another.

    The producer sends paced frames from a task. Its last frame waits until
    the test says its bad input is done (:meth:`finish`), so the bad input
    always lands in the middle of a live stream, never after it.
    """

    def __init__(self, relay: RelayProcess, n: int) -> None:
        t = tag()
        self.relay = relay
        self.n = n
        self.run = f"good-{t}"
        self.producer = f"good-producer-{t}"
        events = [event(self.run, i) for i in range(1, n + 1)]
        self.frames = [events[i : i + MAX_EVENTS] for i in range(0, n, MAX_EVENTS)]
        self.sent = 0
        self.replies: list[dict] = []
        self.bad_input_done = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _send(self, conn: ClientConnection) -> None:
        for k, frame in enumerate(self.frames[1:], start=2):
            if k == len(self.frames):
                await self.bad_input_done.wait()
            await conn.send(json.dumps(frame))
            self.sent = k
            await asyncio.sleep(0.004)  # pacing, so the stream spans the test body

    async def _read(self, conn: ClientConnection) -> None:
        # No wait_for here: it can swallow a cancel (3.11), and finish() has the timeout.
        while not self.replies or self.replies[-1].get("upto") != self.n:
            self.replies.append(json.loads(await conn.recv()))

    async def finish(self) -> None:
        """The bad input is done: let the stream run to its end, all acked."""
        self.bad_input_done.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)


@contextlib.asynccontextmanager
async def good_stream(relay: RelayProcess, n: int = N_GOOD):
    """Yields a :class:`GoodStream` under way. On exit, checks the subscriber
    got exactly 1..n in order and the producer every ack, on the connections
    they started with, and neither saw an error."""
    stream = GoodStream(relay, n)
    async with connect(f"{relay.url}/publish?producer={stream.producer}", compression=None) as prod:
        assert await recv_json(prod) == hello_for(stream.producer)
        await prod.send(json.dumps(stream.frames[0]))
        first_ack = await recv_json(prod)  # stored: the run exists and can be subscribed to
        assert first_ack == {"op": "ack", "producer": stream.producer, "upto": MAX_EVENTS}
        async with Collector(relay.url, f"run_id={stream.run}&since=0") as collector:
            stream.tasks = [asyncio.create_task(stream._send(prod)), asyncio.create_task(stream._read(prod))]
            try:
                await until(lambda: stream.sent >= len(stream.frames) // 5, timeout=10)
                yield stream
                await stream.finish()
            finally:
                for task in stream.tasks:
                    task.cancel()
                # Collect their outcome: an exception never retrieved is logged, with a
                # traceback, whenever the task is garbage-collected, and under CPython
                # 3.11.7 that can crash pytest's own failure report (python/cpython#106905).
                await asyncio.gather(*stream.tasks, return_exceptions=True)
            await collector.wait_for(n, timeout=20)
            assert collector.seqs() == list(range(1, n + 1))
            assert [e["id"] for e in collector.events] == list(range(1, n + 1))
            assert {(e["run_id"], e["producer"]) for e in collector.events} == {(stream.run, stream.producer)}
            assert [c["op"] for c in collector.controls] == ["subscribed"]
            assert collector.closed is None
    assert {r["op"] for r in stream.replies} == {"ack"}, stream.replies
    uptos = [r["upto"] for r in stream.replies]
    assert uptos == sorted(uptos) and uptos[-1] == n


# -- /publish ----------------------------------------------------------------


def ev(run: str, **fields: Any) -> dict[str, Any]:
    """A valid event (id 7) with some fields replaced."""
    base = event(run, 7)
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()
ID_7_OR_NONE = object()
"""Refused while parsing the frame, before the event's id is known; or per event, with it."""


def data(run: str, **payload: Any) -> dict[str, Any]:
    return ev(run, data={"round": 1, "client_id": "c1", **payload})


# (frame builder given a fresh run id, code, detail pattern, id the error should carry)
PUBLISH_CASES = [
    pytest.param(lambda r: "{not json", "bad_json", r"not valid JSON", None, id="not-json"),
    pytest.param(lambda r: "42", "bad_frame", r"event object or an array", None, id="number"),
    pytest.param(lambda r: '"x"', "bad_frame", r"event object or an array", None, id="string"),
    pytest.param(lambda r: "null", "bad_frame", r"event object or an array", None, id="null"),
    pytest.param(lambda r: "[]", "bad_frame", r"empty array", None, id="empty-array"),
    pytest.param(
        lambda r: json.dumps([event(r, i) for i in range(1, MAX_EVENTS + 2)]),
        "too_many_events",
        rf"{MAX_EVENTS + 1} events in one frame; at most {MAX_EVENTS}",
        None,
        id="too-many-events",
    ),
    pytest.param(
        lambda r: "[" * 2000 + "]" * 2000, "bad_json", r"nested too deeply", None, id="deep-nesting"
    ),
    pytest.param(
        lambda r: json.dumps(ev(r, type="bogus")), "unknown_type", r"unknown event type 'bogus'", 7,
        id="unknown-type",
    ),
    pytest.param(
        lambda r: json.dumps(ev(r, type=_DROP)), "missing_type", r"'type'", 7, id="missing-type"
    ),
    pytest.param(lambda r: json.dumps(ev(r, type=3)), "missing_type", r"'type'", 7, id="type-not-str"),
    pytest.param(
        lambda r: json.dumps(data(r, round="3")), "invalid_event", r"data\.round", 7, id="round-as-string"
    ),
    pytest.param(
        lambda r: json.dumps(ev(r, data={"client_id": "c1"})), "invalid_event", r"data\.round.*required", 7,
        id="missing-required-field",
    ),
    pytest.param(
        lambda r: json.dumps(ev(r, data=[1, 2])), "invalid_event", r"data", 7, id="data-not-object"
    ),
    pytest.param(
        lambda r: json.dumps(ev(r, timestamp="yesterday")), "invalid_event", r"timestamp", 7,
        id="bad-timestamp",
    ),
    pytest.param(lambda r: json.dumps(ev(r, id=0)), "invalid_event", r"\bid\b", 0, id="id-zero"),
    pytest.param(
        lambda r: json.dumps(ev(r, seqq=1)), "invalid_event", r"seqq", 7, id="unknown-envelope-field"
    ),
    pytest.param(
        lambda r: json.dumps(data(r, metrics={"loss": "low"})), "invalid_event", r"metrics\.loss", 7,
        id="metric-not-number",
    ),
    pytest.param(
        lambda r: json.dumps(data(r, pad="x" * 8000)), "too_large",
        rf"frame of \d+ bytes; at most {MAX_FRAME}", None, id="oversize-8k",
    ),
    pytest.param(
        # 2000 four-byte characters: 8 KB of UTF-8 in about 2100 characters.
        lambda r: json.dumps(data(r, pad="\U0001f600" * 2000), ensure_ascii=False),
        "too_large",
        rf"frame of \d+ bytes; at most {MAX_FRAME}",
        None,
        id="oversize-8k-multibyte",
    ),
    pytest.param(
        lambda r: json.dumps(data(r, metrics={"loss": float("nan")})), "non_finite", r"NaN", ID_7_OR_NONE,
        id="nan",
    ),
    pytest.param(
        lambda r: json.dumps(data(r, metrics={"loss": float("inf")})), "non_finite", r"Infinity",
        ID_7_OR_NONE, id="infinity",
    ),
    pytest.param(
        lambda r: json.dumps(data(r, deep={"x": [1, {"y": float("-inf")}]})), "non_finite", r"-Infinity",
        ID_7_OR_NONE, id="minus-infinity-nested",
    ),
    pytest.param(
        lambda r: json.dumps(data(r, metrics={"loss": 1.0})).replace("1.0", "1e400"), "non_finite",
        r"1e400 overflows", ID_7_OR_NONE, id="1e400",
    ),
    pytest.param(
        # An integer literal beyond a double's range is as infinite to a JSON reader as 1e400.
        lambda r: json.dumps(data(r, metrics={"loss": 10**400})), "non_finite", r"overflows",
        ID_7_OR_NONE, id="integer-overflowing-a-double",
    ),
    pytest.param(lambda r: json.dumps(ev(r, run_id="has space")), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-space"),
    pytest.param(lambda r: json.dumps(ev(r, run_id="a" * 129)), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-129"),
    pytest.param(lambda r: json.dumps(ev(r, run_id=r + "\n")), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-newline"),
    pytest.param(lambda r: json.dumps(ev(r, run_id="")), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-empty"),
    pytest.param(lambda r: json.dumps(ev(r, run_id="a/b")), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-slash"),
    pytest.param(lambda r: json.dumps(ev(r, run_id=42)), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-number"),
    pytest.param(lambda r: json.dumps(ev(r, run_id=_DROP)), "bad_run_id", r"1-128 characters", 7,
                 id="run-id-missing"),
    pytest.param(lambda r: json.dumps(ev(r)).encode(), "binary_frame", r"text frame", None, id="binary"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "code", "detail", "err_id"), PUBLISH_CASES)
async def test_bad_publish_frame_is_refused_and_the_stream_goes_on(relay, build, code, detail, err_id):
    before = rejected(relay, code)
    async with good_stream(relay):
        target = f"target-{tag()}"
        name = f"bad-{tag()}"
        async with connect(f"{relay.url}/publish?producer={name}", compression=None) as conn:
            hello = await recv_json(conn)
            assert hello == hello_for(name)
            await conn.send(build(target))
            # The same connection goes on: a valid event after the bad frame is stored and acked.
            await conn.send(json.dumps(event(target, 1000)))
            frames = await frames_until_ack(conn, 1000)
        errors = errors_in(frames)
        assert len(errors) == 1, frames
        error = errors[0]
        assert error["code"] == code, error
        assert re.search(detail, error["detail"]), error
        if err_id is ID_7_OR_NONE:
            assert error.get("id") in (None, 7), error
        else:
            assert error.get("id") == err_id, error
        assert "index" not in error  # a single event (or a whole frame), not an array position
        # Acks only ever cover ids this producer sent; the last one covers the valid event.
        assert [f["upto"] for f in frames if f.get("op") == "ack"][-1] == 1000
        assert {f["op"] for f in frames} <= {"error", "ack"}
    # Nothing of the bad frame was stored; the valid event was.
    status, page = relay.get_json(f"/api/runs/{target}/events")
    assert status == 200
    assert [(e["seq"], e["id"], e["producer"]) for e in page["events"]] == [(1, 1000, name)]
    assert rejected(relay, code) == before + 1


async def test_array_mixing_valid_and_invalid_events_keeps_the_valid_ones(relay):
    async with good_stream(relay):
        target = f"target-{tag()}"
        frame = [
            event(target, 1),
            event(target, 2, kind="bogus"),
            event(target, 3),
            {k: v for k, v in event(target, 4).items() if k not in ("type", "id")},
            {**event(target, 5), "data": {"round": "x", "client_id": "c1"}},
        ]
        assert len(frame) <= MAX_EVENTS
        async with connect(f"{relay.url}/publish?producer=mixed-{target}", compression=None) as conn:
            await recv_json(conn)  # hello
            await conn.send(json.dumps(frame))
            frames = await frames_until_ack(conn, 5)
        errors = errors_in(frames)
        assert [(e["code"], e["index"], e.get("id")) for e in errors] == [
            ("unknown_type", 1, 2),
            ("missing_type", 3, None),
            ("invalid_event", 4, 5),
        ]
        assert "bogus" in errors[0]["detail"]
        assert "round" in errors[2]["detail"]
        assert frames[-1] == {"op": "ack", "producer": f"mixed-{target}", "upto": 5}
    status, page = relay.get_json(f"/api/runs/{target}/events")
    assert status == 200
    assert [(e["seq"], e["id"]) for e in page["events"]] == [(1, 1), (2, 3)]


async def test_nan_refuses_only_its_own_event_in_an_array(relay):
    """Each event of a frame is validated on its own (docs/protocol.md): a NaN
    loss in one event of a batch (a diverging run) must not take the batch's
    other events with it."""
    async with good_stream(relay):
        target = f"target-{tag()}"
        bad = json.dumps(data(target, metrics={"loss": 0.5}) | {"id": 2}).replace("0.5", "NaN")
        frame = "[" + ",".join([json.dumps(event(target, 1)), bad, json.dumps(event(target, 3))]) + "]"
        async with connect(f"{relay.url}/publish?producer=nan-{target}", compression=None) as conn:
            await recv_json(conn)  # hello
            await conn.send(frame)
            await conn.send(json.dumps(event(target, 4)))
            frames = await frames_until_ack(conn, 4)
        errors = errors_in(frames)
        assert [(e["code"], e.get("index"), e.get("id")) for e in errors] == [("non_finite", 1, 2)], errors
    status, page = relay.get_json(f"/api/runs/{target}/events")
    assert status == 200
    assert [e["id"] for e in page["events"]] == [1, 3, 4]


async def test_bad_producer_name_is_refused_with_an_error_then_closed(relay):
    async with good_stream(relay), connect(f"{relay.url}/publish?producer=has%20space") as conn:
        error = await recv_json(conn)
        assert error["op"] == "error" and error["code"] == "bad_producer"
        assert "1-128 characters" in error["detail"]
        with pytest.raises(ConnectionClosed) as closed:
            await recv_json(conn)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@pytest.mark.parametrize("path", ["/publish", "/subscribe?run_id=x", "/"])
async def test_frame_past_four_times_the_limit_closes_with_1009(relay, path):
    async with good_stream(relay):
        async with connect(relay.url + path, compression=None) as conn:
            await conn.send(json.dumps({"type": "status", "pad": "x" * (4 * MAX_FRAME + 100)}))
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # the hello / an error frame may come first
                    await recv_json(conn)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


# -- /subscribe --------------------------------------------------------------

# query (with {run} = the good run), code, detail pattern
QUERY_CASES = [
    pytest.param("run_id={run}&since=-1", "bad_since", r"whole number", id="since-negative"),
    pytest.param("run_id={run}&since=abc", "bad_since", r"whole number.*'abc'", id="since-abc"),
    pytest.param("run_id={run}&since=", "bad_since", r"whole number", id="since-empty"),
    pytest.param("run_id={run}&since=1.5", "bad_since", r"whole number", id="since-float"),
    pytest.param("run_id={run}&since=99999999", "bad_since", r"past run", id="since-past-last-seq"),
    pytest.param("run_id=has%20space", "bad_run_id", r"1-128 characters", id="run-id-space"),
    pytest.param("run_id=" + "a" * 129, "bad_run_id", r"1-128 characters", id="run-id-129"),
    pytest.param("run_id=abc%0A", "bad_run_id", r"1-128 characters", id="run-id-newline"),
    pytest.param("run_id=", "bad_run_id", r"1-128 characters", id="run-id-empty"),
    pytest.param("run_id=nope-{run}&since=3", "bad_since", r"past run 'nope-", id="since-no-run"),
]


@pytest.mark.parametrize(("query", "code", "detail"), QUERY_CASES)
async def test_bad_subscribe_query_gets_error_and_connection_stays_usable(relay, query, code, detail):
    before = rejected(relay, code)
    async with good_stream(relay) as stream, Collector(relay.url, query.format(run=stream.run)) as bad:
        run = stream.run
        error = await wait_for_control(bad, "error")
        assert error["code"] == code, error
        assert re.search(detail, error["detail"]), error
        # Nothing was subscribed; the connection still takes control frames.
        await bad.conn.send(json.dumps({"op": "ping"}))
        await wait_for_control(bad, "pong")
        await bad.conn.send(json.dumps({"op": "subscribe", "run_id": run, "since": 0}))
        subscribed = await wait_for_control(bad, "subscribed")
        assert subscribed["run_id"] == run and subscribed["since"] == 0
        # This connection gets the whole run, once, like the good subscriber.
        await stream.finish()
        await bad.wait_for(N_GOOD)
        assert bad.seqs() == list(range(1, N_GOOD + 1))
        assert [c["op"] for c in bad.controls] == ["error", "pong", "subscribed"]
    assert rejected(relay, code) == before + 1


async def test_a_run_not_started_yet_is_waited_for_beside_a_running_one(relay):
    async with good_stream(relay) as stream:
        run = stream.run
        later = f"later-{tag()}"
        async with Collector(relay.url, f"run_id={later}&run_id={run}&since=0") as sub:
            await until(lambda: len(sub.controls) == 2, timeout=10)
            assert sub.controls[0] == {"op": "subscribed", "run_id": later, "since": 0, "last_seq": 0}
            assert sub.controls[1]["run_id"] == run
            await stream.finish()
            await sub.wait_for(N_GOOD)
            assert sub.seqs(run) == list(range(1, N_GOOD + 1))
            await ResendingProducer(relay.url, f"p-{later}").publish_all([event(later, i) for i in (1, 2)])
            await sub.wait_for(N_GOOD + 2)
            assert sub.seqs(later) == [1, 2]
            assert [c["op"] for c in sub.controls] == ["subscribed", "subscribed"]


# control frame builder (given the good run), code, detail pattern
CONTROL_CASES = [
    pytest.param(lambda r: "{nope", "bad_json", r"not valid JSON", id="not-json"),
    pytest.param(lambda r: "[]", "bad_frame", r'"op"', id="array"),
    pytest.param(lambda r: "42", "bad_frame", r'"op"', id="number"),
    pytest.param(lambda r: '{"op": 5}', "bad_frame", r'"op"', id="op-not-string"),
    pytest.param(lambda r: '{"run_id": "x"}', "bad_frame", r'"op"', id="no-op"),
    pytest.param(lambda r: '{"op": "bogus"}', "bad_op", r"unknown op 'bogus'", id="unknown-op"),
    pytest.param(lambda r: '{"op": "subscribe"}', "bad_run_id", r"run_id", id="subscribe-no-run"),
    pytest.param(lambda r: '{"op": "subscribe", "run_id": "a b"}', "bad_run_id", r"1-128", id="bad-run-id"),
    pytest.param(lambda r: '{"op": "subscribe", "run_id": "nope-x1", "since": 1}', "bad_since", r"nope-x1",
                 id="since-no-run"),
    pytest.param(lambda r: json.dumps({"op": "subscribe", "run_id": r, "since": -1}), "bad_since",
                 r"whole number", id="since-negative"),
    pytest.param(lambda r: json.dumps({"op": "subscribe", "run_id": r, "since": "3"}), "bad_since",
                 r"whole number", id="since-string"),
    pytest.param(lambda r: json.dumps({"op": "subscribe", "run_id": r, "since": 99999999}), "bad_since",
                 r"past run", id="since-past-last-seq"),
    pytest.param(lambda r: json.dumps({"op": "subscribe", "run_id": r, "since": 1.0}).replace("1.0", "NaN"),
                 "non_finite", r"NaN", id="since-nan"),
    pytest.param(lambda r: json.dumps({"op": "ping", "pad": "x" * 8000}), "too_large", r"at most 4096",
                 id="oversize"),
    pytest.param(lambda r: b'{"op": "ping"}', "binary_frame", r"text frame", id="binary"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "code", "detail"), CONTROL_CASES)
async def test_bad_control_frame_gets_error_and_subscription_goes_on(relay, build, code, detail):
    async with good_stream(relay) as stream, Collector(relay.url, f"run_id={stream.run}&since=0") as sub:
        run = stream.run
        await wait_for_control(sub, "subscribed")
        await sub.conn.send(build(run))
        error = await wait_for_control(sub, "error")
        assert error["code"] == code, error
        assert re.search(detail, error["detail"]), error
        await sub.conn.send(json.dumps({"op": "ping"}))
        await wait_for_control(sub, "pong")
        # The subscription this connection already had goes on untouched.
        await stream.finish()
        await sub.wait_for(N_GOOD)
        assert sub.seqs() == list(range(1, N_GOOD + 1))
        assert [c["op"] for c in sub.controls] == ["subscribed", "error", "pong"]


# -- / (compatibility) -------------------------------------------------------


class RootClient:
    """A root-path connection that records everything it receives."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.frames: list[dict] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.conn:
                self.frames.append(json.loads(frame))

    def of_type(self, kind: str) -> list[dict]:
        return [f for f in self.frames if f.get("type") == kind]


ROOT_CASES = [
    pytest.param("{nope", "bad_json", r"not valid JSON", id="not-json"),
    pytest.param("[1, 2]", "not_object", r"JSON object", id="array"),
    pytest.param('{"data": {}}', "missing_type", r"'type'", id="missing-type"),
    pytest.param('{"type": 3, "data": {}}', "missing_type", r"'type'", id="type-not-text"),
    pytest.param(json.dumps({"type": "custom", "data": {"pad": "x" * 8000}}), "too_large",
                 r"at most 4096", id="oversize"),
    pytest.param(b'{"type": "ping"}', "binary_frame", r"text frame", id="binary"),
]  # fmt: skip


@pytest.mark.parametrize(("frame", "code", "detail"), ROOT_CASES)
async def test_bad_root_frame_gets_legacy_error_and_connection_stays_open(relay, frame, code, detail):
    # The root connection is open before the good run starts and stays open after it ended:
    # it must see the whole run live, its own bad frame in the middle costing it nothing.
    async with connect(relay.url + "/", compression=None) as conn:
        root = RootClient(conn)

        def good_seqs() -> list[int]:
            return [f["data"]["seq"] for f in root.frames if f.get("data", {}).get("run_id") == run]

        async with good_stream(relay) as stream:
            run = stream.run
            await conn.send(frame)
            await until(lambda: root.of_type("error"), timeout=5, what="the legacy error")
            error = root.of_type("error")[0]
            assert set(error) == {"type", "data"}
            assert error["data"]["code"] == code, error
            assert re.search(detail, error["data"]["detail"]), error
            await conn.send(json.dumps({"type": "ping"}))
            await until(lambda: root.of_type("pong"), timeout=5, what="the pong")
            side = f"root-{tag()}"
            await conn.send(json.dumps({"type": "custom", "data": {"run_id": side, "n": 1}}))
            await until(lambda: relay.get(f"/api/runs/{side}")[0] == 200, timeout=5, what="the side run")
        await until(lambda: len(good_seqs()) >= N_GOOD, timeout=10, what="the good run at the root")
        assert good_seqs() == list(range(1, N_GOOD + 1))
        assert len(root.of_type("error")) == 1
    await asyncio.wait_for(root.task, 5)
    status, page = relay.get_json(f"/api/runs/{side}/events")
    assert status == 200
    assert [(e["type"], e["data"]) for e in page["events"]] == [("custom", {"run_id": side, "n": 1})]
