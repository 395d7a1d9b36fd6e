"""Plain HTTP on the relay's port: health, metrics, the runs API, the dashboard."""

from __future__ import annotations

import http.client
import json
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import fedrelay
from tests.support.clients import Collector, ResendingProducer, event
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until

METRIC_NAMES = [
    "fedrelay_connections",
    "fedrelay_events_in_total",
    "fedrelay_events_out_total",
    "fedrelay_duplicates_total",
    "fedrelay_rejected_total",
    "fedrelay_slow_consumers_total",
    "fedrelay_handshakes_refused_total",
    "fedrelay_store_commits_total",
    "fedrelay_store_lag_events",
    "fedrelay_store_failing",
    "fedrelay_runs",
    "fedrelay_producers",
    "fedrelay_producers_forgotten_total",
]


@pytest.fixture
def relay(backend_relay):
    """Each test that takes ``relay`` on both backends: one SQLite relay, one PostgreSQL relay.
    The read-only checks on ``shared_relay`` (input validation, the dashboard's files) and the
    tests that build an SQLite file stay on SQLite."""
    return backend_relay


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory):
    """One relay for the read-only checks, with run "x" (3 events) in it."""
    import asyncio

    proc = RelayProcess(tmp_path_factory.mktemp("http") / "relay.db").start()
    asyncio.run(ResendingProducer(proc.url, "p").publish_all([event("x", i) for i in range(1, 4)]))
    yield proc
    proc.stop()


def raw_get(relay: RelayProcess, target: str) -> tuple[int, dict[str, str], bytes]:
    """GET with the request target sent exactly as given (no client-side normalizing)."""
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=5)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def publish(relay: RelayProcess, name: str, events: list[dict], batch: int = 500) -> ResendingProducer:
    producer = ResendingProducer(relay.url, name)
    await producer.publish_all(events, batch=batch)
    assert producer.errors == []
    return producer


def ev(run: str, i: int, kind: str, **data) -> dict:
    return {"type": kind, "run_id": run, "id": i, "data": data}


# -- /healthz and /metrics ---------------------------------------------------


async def test_healthz_reports_status_version_runs_and_store(relay):
    status, headers, body = raw_get(relay, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["version"] == fedrelay.__version__
    assert health["runs"] == 0
    # Uptime counts: a later answer reports more of it (a constant would never get there).
    first = health["uptime"]
    assert isinstance(first, float | int) and first >= 0
    await until(lambda: relay.get_json("/healthz")[1]["uptime"] > first, timeout=10)
    assert health["store"] == {"path": relay.db, "lag": 0, "error": None, "repaired_runs": []}
    await publish(relay, "p", [event("a", 1), event("b", 2)])
    assert relay.get_json("/healthz")[1]["runs"] == 2


async def test_metrics_count_real_traffic(relay):
    status, headers, body = raw_get(relay, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    assert scrape(relay)["fedrelay_events_in_total"] == 0

    total = 250
    batch = 50
    await publish(relay, "trainer", [event("m", 1)])
    async with Collector(relay.url, "run_id=m&since=0") as sub:
        await sub.wait_for(1)
        assert scrape(relay)['fedrelay_connections{endpoint="subscribe"}'] == 1
        await publish(relay, "trainer", [event("m", i) for i in range(2, total + 1)], batch=batch)
        await sub.wait_for(total)
        # The same producer name resending what is stored: dropped, counted.
        await publish(relay, "trainer", [event("m", i) for i in range(1, 41)], batch=20)
        # One invalid event, one refused handshake.
        async with connect(f"{relay.url}/publish?producer=bad") as conn:
            assert json.loads(await conn.recv())["op"] == "hello"
            await conn.send(json.dumps(ev("m", 1, "bogus")))
            reply = json.loads(await conn.recv())
            assert reply["op"] == "error" and reply["code"] == "unknown_type"
        with pytest.raises(InvalidStatus):
            await connect(f"{relay.url}/publish", origin="https://evil.example")
        m = scrape(relay)
        assert m["fedrelay_events_in_total"] == total
        assert m["fedrelay_events_out_total"] == total  # one subscriber, each event once
        assert m["fedrelay_duplicates_total"] == 40
        assert m['fedrelay_rejected_total{code="unknown_type"}'] == 1
        assert m['fedrelay_handshakes_refused_total{reason="origin"}'] == 1
        assert m["fedrelay_slow_consumers_total"] == 0
        # A frame's events are committed together (group commit): at most one commit per frame
        # that stored anything, far fewer than the events (counting events would give 250).
        frames_stored = 1 + -(-(total - 1) // batch)
        assert 1 <= m["fedrelay_store_commits_total"] <= frames_stored < total
        assert m["fedrelay_store_lag_events"] == 0
        assert m["fedrelay_store_failing"] == 0
        assert m["fedrelay_runs"] == 1
        assert m["fedrelay_producers"] == 1  # "trainer"; "bad" stored nothing
        assert m["fedrelay_producers_forgotten_total"] == 0
        assert m['fedrelay_connections{endpoint="subscribe"}'] == 1
        assert sub.seqs() == list(range(1, total + 1))
    await until(lambda: scrape(relay)['fedrelay_connections{endpoint="subscribe"}'] == 0, timeout=5)
    assert scrape(relay)['fedrelay_connections{endpoint="publish"}'] == 0


# -- /api/runs ----------------------------------------------------------------


async def test_runs_list_newest_first_with_status_from_events(relay):
    assert relay.get_json("/api/runs") == (200, {"runs": [], "next_cursor": None})
    await publish(relay, "a", [ev("run-a", 1, "training_start", experiment_name="exp", num_rounds=3)])
    await publish(relay, "b", [ev("run-b", 1, "training_start", training_mode="centralized", max_epochs=5)])
    await publish(relay, "c", [ev("run-c", 1, "training_start")])
    await publish(relay, "d", [ev("run-d", 1, "training_start")])

    status, listing = relay.get_json("/api/runs")
    assert status == 200
    assert [r["run_id"] for r in listing["runs"]] == ["run-d", "run-c", "run-b", "run-a"]
    assert {r["status"] for r in listing["runs"]} == {"running"}

    await publish(
        relay,
        "a",
        [
            ev("run-a", 2, "round_end", round=1, total_rounds=3),
            ev("run-a", 3, "training_end", best_round=1, best_metric_name="loss", best_metric_value=0.25),
        ],
    )
    await publish(
        relay, "b", [ev("run-b", 2, "epoch_end", epoch=2), ev("run-b", 3, "training_end", status="failed")]
    )
    await publish(relay, "d", [ev("run-d", 2, "training_end", status="stopped")])

    status, listing = relay.get_json("/api/runs")
    assert status == 200
    by_id = {r["run_id"]: r for r in listing["runs"]}
    assert [r["run_id"] for r in listing["runs"]] == ["run-d", "run-c", "run-b", "run-a"]
    assert {k: r["status"] for k, r in by_id.items()} == {
        "run-a": "completed",
        "run-b": "failed",
        "run-c": "running",
        "run-d": "stopped",
    }

    status, run_a = relay.get_json("/api/runs/run-a")
    assert status == 200
    assert run_a == by_id["run-a"]
    assert run_a["last_seq"] == 3 and run_a["first_seq"] == 1
    assert run_a["experiment_name"] == "exp"
    assert run_a["num_rounds"] == 3 and run_a["round"] == 1
    assert run_a["best_round"] == 1 and run_a["best_metric_value"] == 0.25
    assert run_a["started_at"] is not None
    assert run_a["ended_at"] >= run_a["started_at"]
    run_b = relay.get_json("/api/runs/run-b")[1]
    assert run_b["training_mode"] == "centralized" and run_b["epoch"] == 2 and run_b["max_epochs"] == 5
    assert relay.get_json("/api/runs/run-c")[1]["ended_at"] is None

    status, missing = relay.get_json("/api/runs/no-such-run")
    assert status == 404
    assert missing["error"] == "not found"
    assert "no-such-run" in missing["detail"]


def listing(relay: RelayProcess, query: str) -> tuple[list[str], str | None]:
    status, page = relay.get_json(f"/api/runs?{query}")
    assert status == 200, page
    assert set(page) == {"runs", "next_cursor"}
    return [r["run_id"] for r in page["runs"]], page["next_cursor"]


def every_page(relay: RelayProcess, query: str) -> tuple[list[str], int]:
    """Follow next_cursor to the end; returns the run ids and the number of requests."""
    ids, cursor, requests = [], None, 0
    while True:
        page, cursor = listing(relay, query + (f"&cursor={cursor}" if cursor else ""))
        ids.extend(page)
        requests += 1
        if cursor is None:
            return ids, requests


async def test_runs_are_listed_a_page_at_a_time_with_filters(relay):
    """The contract the dashboard's runs list builds on: newest first, ``limit`` per page,
    an opaque ``next_cursor`` until the last page, filters by status, mode, name and time."""
    events = []
    for i in range(25):
        run = f"r{i:02d}"
        mode = "federated" if i % 2 else "centralized"
        events.append(
            ev(run, 100 * i + 1, "training_start", training_mode=mode, experiment_name=f"Exp-{i % 5}")
        )
        if i % 3 == 0:
            events.append(ev(run, 100 * i + 2, "training_end", status="failed" if i % 2 else "completed"))
    await publish(relay, "lister", events, batch=1)  # one frame per event: creation order is r00..r24
    newest_first = [f"r{i:02d}" for i in range(24, -1, -1)]

    first, cursor = listing(relay, "limit=10")
    assert first == newest_first[:10] and cursor is not None
    assert every_page(relay, "limit=10") == (newest_first, 3)
    assert listing(relay, "")[0] == newest_first  # default limit 100
    assert listing(relay, "limit=5000")[0] == newest_first  # limit is capped at 1000, not refused

    completed = [r for r in newest_first if int(r[1:]) % 3 == 0 and int(r[1:]) % 2 == 0]
    failed = [r for r in newest_first if int(r[1:]) % 3 == 0 and int(r[1:]) % 2 == 1]
    assert every_page(relay, "status=completed&limit=2")[0] == completed
    assert every_page(relay, "status=completed,failed&limit=3")[0] == sorted(
        completed + failed, key=newest_first.index
    )
    assert listing(relay, "status=running")[0] == [r for r in newest_first if int(r[1:]) % 3]
    assert listing(relay, "mode=federated")[0] == [r for r in newest_first if int(r[1:]) % 2]
    assert listing(relay, "q=exp-3")[0] == ["r23", "r18", "r13", "r08", "r03"]  # name, any case
    assert listing(relay, "q=R1")[0] == [f"r{i}" for i in range(19, 9, -1)]  # run id, any case
    assert listing(relay, "mode=centralized&q=exp-0&status=completed")[0] == ["r00"]
    newest = relay.get_json("/api/runs?limit=1")[1]["runs"][0]
    assert listing(relay, f"updated_since={newest['updated_at']}")[0] == ["r24"]
    assert listing(relay, "updated_since=0")[0] == newest_first

    for bad in ["limit=0", "limit=-1", "limit=x", "status=done", "status=", "mode=fed", "q=" + "a" * 201,
                "updated_since=soon", "updated_since=nan", "cursor=@@@", "cursor=" + "A" * 12]:  # fmt: skip
        status, answer = relay.get_json(f"/api/runs?{bad}")
        assert status == 400 and answer["error"] == "bad request", (bad, status, answer)


async def test_a_listing_of_fifty_thousand_runs_stays_small_per_request(tmp_path):
    """50,000 runs (the old answer was all of them: 10.5 MiB, ~270 ms on the loop): every page
    is at most MAX_PAGE_BYTES, and a filter that matches nothing answers in steps of the scan
    budget, not by walking every run in one request."""
    import sqlite3

    from fedrelay.relay.runs_listing import MAX_PAGE_BYTES, SCAN_BUDGET
    from fedrelay.relay.store import _SCHEMA

    db = tmp_path / "runs.db"
    count = 50_000
    with sqlite3.connect(db) as conn:
        conn.executescript(_SCHEMA)
        conn.executemany(
            "INSERT INTO runs (run_id, status, created_at, updated_at, last_seq, info)"
            " VALUES (?, ?, ?, ?, 0, ?)",
            [
                (f"run-{i:05d}", "completed", 1e9 + i, 1e9 + i, json.dumps({"experiment_name": "x" * 300}))
                for i in range(count)
            ],
        )
    conn.close()
    relay = RelayProcess(db).start()
    try:
        ids, cursor = [], None
        while True:
            status, body = relay.get(f"/api/runs?limit=1000{f'&cursor={cursor}' if cursor else ''}")
            assert status == 200 and len(body) <= MAX_PAGE_BYTES
            page = json.loads(body)
            ids.extend(r["run_id"] for r in page["runs"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert ids == [f"run-{i:05d}" for i in range(count - 1, -1, -1)]
        nothing, requests = every_page(relay, "q=no-such-name")
        assert nothing == [] and requests == -(-count // SCAN_BUDGET)
    finally:
        relay.stop()


STALL_AFTER = 0.5


def status_as_due(relay: RelayProcess, run_id: str) -> str:
    """The run's status, checked against its own ``updated_at``: "running" is due if the run had
    been silent for at most STALL_AFTER s when the answer came, "stalled" if it had been silent
    for longer already when the request left; in between either is right. So a slow machine
    cannot make this fail, and a stall that comes early or never clears still does."""
    asked = time.time()
    status, run = relay.get_json(f"/api/runs/{run_id}")
    answered = time.time()
    assert status == 200, run
    silent_since = run["updated_at"]
    if answered - silent_since <= STALL_AFTER:  # the relay's "now" was earlier than the answer
        assert run["status"] == "running", run
    elif asked - silent_since > STALL_AFTER:  # ...and later than the request
        assert run["status"] == "stalled", run
    return run["status"]


async def test_silent_running_run_shows_as_stalled(relay_factory):
    relay = relay_factory("--stall-after", str(STALL_AFTER))
    await publish(relay, "p", [ev("quiet", 1, "training_start")])
    status_as_due(relay, "quiet")
    await until(lambda: status_as_due(relay, "quiet") == "stalled", timeout=10)
    # A new event makes it running again (as due: the check above holds for every read).
    await publish(relay, "p", [ev("quiet", 2, "round_start", round=1)])
    status_as_due(relay, "quiet")
    await publish(relay, "p", [ev("quiet", 3, "training_end")])
    await until(lambda: relay.get_json("/api/runs")[1]["runs"][0]["status"] == "completed", timeout=5)


async def test_events_are_paged_with_since_limit_and_next_since(relay):
    await publish(relay, "pager", [event("pages", i) for i in range(1, 26)], batch=7)
    seen = []
    since = 0
    pages = 0
    while True:
        status, page = relay.get_json(f"/api/runs/pages/events?since={since}&limit=10")
        assert status == 200
        assert page["run_id"] == "pages"
        assert len(page["events"]) <= 10
        if not page["events"]:
            assert page["next_since"] == since
            break
        assert page["next_since"] == page["events"][-1]["seq"]
        seen.extend(page["events"])
        since = page["next_since"]
        pages += 1
    assert pages == 3
    assert [e["seq"] for e in seen] == list(range(1, 26))
    assert [e["id"] for e in seen] == list(range(1, 26))
    assert {(e["producer"], e["run_id"], e["type"]) for e in seen} == {("pager", "pages", "client_progress")}
    # Defaults: from the start, up to 1000.
    assert [e["seq"] for e in relay.get_json("/api/runs/pages/events")[1]["events"]] == list(range(1, 26))
    assert relay.get_json("/api/runs/pages/events?since=25")[1] == {
        "run_id": "pages",
        "events": [],
        "next_since": 25,
    }
    assert relay.get_json("/api/runs/pages/events?since=500")[1]["next_since"] == 500


async def test_events_of_some_types_only(relay):
    """``type=log``: the log panel pages a run's log records without reading its other events."""
    events = [
        ev("typed", i, "log", level="info", message=f"line {i}") if i % 3 == 0 else event("typed", i)
        for i in range(1, 31)
    ]
    events.append(ev("typed", 31, "error", message="boom"))
    await publish(relay, "typer", events)
    logs = [e["id"] for e in events if e["type"] == "log"]  # one producer: seq == id

    status, page = relay.get_json("/api/runs/typed/events?type=log&limit=4")
    assert status == 200 and [e["seq"] for e in page["events"]] == logs[:4]
    assert {e["type"] for e in page["events"]} == {"log"} and page["next_since"] == logs[3]
    rest = relay.get_json(f"/api/runs/typed/events?type=log&since={page['next_since']}")[1]
    assert [e["seq"] for e in rest["events"]] == logs[4:]
    # Several types, comma-separated or repeated; a type the run never had is no error.
    for query in ("type=log,error", "type=log&type=error", "type=error,log,round_metrics"):
        page = relay.get_json(f"/api/runs/typed/events?{query}")[1]
        assert [e["seq"] for e in page["events"]] == [*logs, 31], query
    # Malformed: an empty name, a name over 128 characters, more than 16 names.
    for query in ("type=", "type=log,", "type=" + "x" * 129, "type=" + ",".join(f"t{i}" for i in range(17))):
        status, body = relay.get_json(f"/api/runs/typed/events?{query}")
        assert status == 400 and "type" in body["detail"], query


async def test_events_page_is_capped_at_10000(relay):
    total = 10_005
    await publish(relay, "bulk", [event("big", i) for i in range(1, total + 1)], batch=1000)
    status, page = relay.get_json("/api/runs/big/events?limit=50000")
    assert status == 200
    assert len(page["events"]) == 10_000
    assert page["events"][0]["seq"] == 1 and page["events"][-1]["seq"] == 10_000
    assert page["next_since"] == 10_000
    status, rest = relay.get_json(f"/api/runs/big/events?since={page['next_since']}&limit=10000")
    assert [e["seq"] for e in rest["events"]] == list(range(10_001, total + 1))


@pytest.mark.parametrize(
    "query",
    [
        "since=-1",
        "since=abc",
        "since=1.5",
        "since=1e3",
        "since=",
        "since=%2B1",
        "since=99999999999999999999",
        "limit=0",
        "limit=-1",
        "limit=ten",
        "limit=",
        "limit=2.0",
        "since=1&limit=0",
    ],
)
async def test_bad_since_or_limit_is_400(shared_relay, query):
    status, body = shared_relay.get_json(f"/api/runs/x/events?{query}")
    assert status == 400
    assert body["error"] == "bad request"
    assert "since" in body["detail"] and "limit" in body["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/has%20space",
        "/api/runs/has%20space/events",
        "/api/runs/" + "a" * 129,
        "/api/runs/",
        "/api/runs/a%0Ab",
        "/api/runs/%2e%2e",
        "/api/runs/a*b/events",
    ],
)
async def test_bad_run_id_is_400(shared_relay, path):
    status, headers, body = raw_get(shared_relay, path)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "run_id must be 1-128 characters" in json.loads(body)["detail"]


# -- the dashboard and static files -------------------------------------------


async def test_root_serves_the_dashboard(shared_relay):
    relay = shared_relay
    status, headers, body = raw_get(relay, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert body.lstrip().lower().startswith(b"<!doctype html")
    assert b"</html>" in body.lower()
    assert raw_get(relay, "/static/index.html")[2] == body


@pytest.mark.parametrize(
    "target",
    [
        "/static/../__init__.py",
        "/static/../http.py",
        "/static/../../__init__.py",
        "/static/../../../../../../../../etc/passwd",
        "/static/%2e%2e/http.py",
        "/static/%2E%2E/%2E%2E/__init__.py",
        "/static/..%2fhttp.py",
        "/static/..%2Fhttp.py",
        "/static/%2e%2e%2fhttp.py",
        "/static/%252e%252e/http.py",
        "/static/..%5chttp.py",
        "/static/..\\http.py",
        "/static/..\\..\\__init__.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/index.html/../../http.py",
        "/static/./../http.py",
        "/static/..",
        "/static/.",
        "/static/",
        "/static/..;/http.py",
        "/static/%00../http.py",
    ],
)
async def test_static_never_serves_a_file_outside_the_package(shared_relay, target):
    status, headers, body = raw_get(shared_relay, target)
    assert status == 404, body[:200]
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "not found"


@pytest.mark.parametrize(
    "target",
    ["/nope", "/api", "/api/", "/api/nope", "/api/runs/x/nope", "/api/runs/x/events/more", "/healthz/x",
     "/metricsx", "/publish", "/subscribe", "/index.html"],
)  # fmt: skip
async def test_unknown_path_is_404(shared_relay, target):
    assert shared_relay.get("/api/runs/x")[0] == 200
    status, headers, body = raw_get(shared_relay, target)
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "not found"


async def test_websocket_to_an_unknown_path_is_404(shared_relay):
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{shared_relay.url}/nope")
    assert refused.value.response.status_code == 404
