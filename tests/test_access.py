"""Tokens and browser origins, checked on the handshake.

Observed and pinned here:
- ``/publish`` takes the publish token, ``/subscribe`` and ``/api/...`` the
  subscribe token, as ``Authorization: Bearer`` or ``?token=``. When both are
  sent, the header is the one checked.
- ``/`` publishes and receives: it gets each role whose token it presents
  (publish, subscribe), and is refused only when it presents neither. A
  browser that must present both repeats ``?token=``; a header wins over
  the query. A receive-only root connection that publishes gets a
  ``forbidden`` error.
- ``/healthz``, ``/metrics`` and the dashboard page need no token.
- Origin is checked before the token: a foreign page gets 403 even with a
  valid token.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.metrics import metric
from tests.support.relay_process import RelayProcess

P = "pub-tok-3f9a1c7e55d2"
S = "sub-tok-82b4d6e0a913"
WRONG = "not-the-token-0000"
DASH = "https://dash.example"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A relay with both tokens and one extra origin, logging as much as it can."""
    proc = RelayProcess(
        tmp_path_factory.mktemp("access") / "relay.db",
        args=["--publish-token", P, "--subscribe-token", S, "--allow-origin", DASH, "--log-level", "debug"],
    ).start()
    yield proc
    proc.stop()


async def open_and_greet(url: str, path: str, headers=None, origin=None) -> Any:
    """Open a WebSocket and return the relay's first answer on it (raises InvalidStatus if refused)."""
    async with connect(url + path, additional_headers=headers, origin=origin, compression=None) as conn:
        if not path.startswith(("/publish", "/subscribe")):  # there the relay speaks first
            await conn.send(json.dumps({"type": "ping"}))
        return json.loads(await asyncio.wait_for(conn.recv(), 5))


EXPECTED_GREETING = {"/publish": "hello", "/subscribe?run_id=*": "subscribed", "/": "pong"}


def greeting_kind(msg: dict) -> str:
    return msg.get("op") or msg.get("type")


async def refused_status(url: str, path: str, headers=None, origin=None) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await open_and_greet(url, path, headers, origin)
    return refused.value.response.status_code


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def with_token(path: str, token: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}token={token}"


# -- the token matrix ----------------------------------------------------------

# endpoint, how the token is presented (path suffix, headers), opens?
MATRIX = [
    # /publish: the publish token only
    ("/publish", None, None, False),
    ("/publish", None, bearer(WRONG), False),
    ("/publish", None, bearer(S), False),
    ("/publish", S, None, False),
    ("/publish", P[:-1], None, False),
    ("/publish", P + "x", None, False),
    ("/publish", None, bearer(P), True),
    ("/publish", P, None, True),
    ("/publish", None, [("Authorization", f"bearer {P}")], True),
    ("/publish", P, [("Authorization", "Basic dXNlcjpwYXNz")], True),
    ("/publish", P, bearer(WRONG), False),  # the header is what counts
    ("/publish", None, [("Authorization", P)], False),  # no scheme
    # /subscribe: the subscribe token only
    ("/subscribe?run_id=*", None, None, False),
    ("/subscribe?run_id=*", None, bearer(P), False),
    ("/subscribe?run_id=*", P, None, False),
    ("/subscribe?run_id=*", WRONG, None, False),
    ("/subscribe?run_id=*", None, bearer(S), True),
    ("/subscribe?run_id=*", S, None, True),
    # /: each role whose token it presents; refused with neither
    ("/", None, None, False),
    ("/", WRONG, None, False),
    ("/", None, bearer(WRONG), False),
    ("/", WRONG, bearer(WRONG), False),
    ("/", P, None, True),
    ("/", S, None, True),
    ("/", None, bearer(P), True),
    ("/", None, bearer(S), True),
    ("/", S, bearer(P), True),
]


@pytest.mark.parametrize(("path", "query_token", "headers", "opens"), MATRIX)
async def test_token_matrix(guarded, path, query_token, headers, opens):
    target = with_token(path, query_token) if query_token is not None else path
    if opens:
        msg = await open_and_greet(guarded.url, target, headers)
        assert greeting_kind(msg) == EXPECTED_GREETING[path], msg
    else:
        before = metric(guarded, 'fedrelay_handshakes_refused_total{reason="token"}')
        assert await refused_status(guarded.url, target, headers) == 401
        assert metric(guarded, 'fedrelay_handshakes_refused_total{reason="token"}') == before + 1


async def test_refusal_does_not_echo_the_token(guarded):
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{guarded.url}/publish?token={S}", additional_headers=bearer(S))
    body = refused.value.response.body
    assert refused.value.response.status_code == 401
    assert b"token" in body.lower()
    assert S.encode() not in body and P.encode() not in body


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/api/runs", None, 401),
        ("/api/runs", bearer(P), 401),
        ("/api/runs", bearer(WRONG), 401),
        (f"/api/runs?token={P}", None, 401),
        ("/api/runs", bearer(S), 200),
        (f"/api/runs?token={S}", None, 200),
        ("/api/runs/nope/events", None, 401),
        ("/api/runs/nope", bearer(S), 404),  # past the token check
        # Not behind a token:
        ("/healthz", None, 200),
        ("/metrics", None, 200),
        ("/", None, 200),
    ],
)
async def test_http_routes_and_tokens(guarded, target, headers, status):
    got, body = guarded.get(target, dict(headers or []))
    assert got == status, body[:200]
    if status == 401:
        assert json.loads(body)["error"] == "unauthorized"
    if target.startswith("/api/runs") and status == 200:
        assert "runs" in json.loads(body)


async def test_root_opens_when_both_tokens_are_the_same(relay_factory):
    relay = relay_factory("--publish-token", P, "--subscribe-token", P)
    assert greeting_kind(await open_and_greet(relay.url, "/", bearer(P))) == "pong"
    assert greeting_kind(await open_and_greet(relay.url, with_token("/", P))) == "pong"
    assert await refused_status(relay.url, "/", bearer(WRONG)) == 401


async def root_roles(relay: RelayProcess, path: str, headers=None) -> tuple[bool, bool]:
    """(may publish, receives) for a root connection, observed through the relay."""
    run = f"roles-{abs(hash((path, str(headers)))) % 10**8}"
    async with (
        connect(relay.url + path, additional_headers=headers, compression=None) as root,
        connect(
            f"{relay.url}/publish?producer=p-{run}", additional_headers=bearer(P), compression=None
        ) as publisher,
    ):

        async def until_pong() -> list[dict]:
            await root.send(json.dumps({"type": "ping"}))
            frames = []
            while (frame := json.loads(await asyncio.wait_for(root.recv(), 5))).get("type") != "pong":
                frames.append(frame)
            return frames

        await root.send(json.dumps({"type": "status", "timestamp": None, "data": {"run_id": run}}))
        errors = [f["data"]["code"] for f in await until_pong() if f.get("type") == "error"]
        assert errors in ([], ["forbidden"]), errors
        await asyncio.wait_for(publisher.recv(), 5)  # hello
        await publisher.send(json.dumps({"type": "status", "run_id": run, "id": 1, "data": {}}))
        await asyncio.wait_for(publisher.recv(), 5)  # ack: stored, so delivered by now
        received = any(f.get("data", {}).get("run_id") == run for f in await until_pong())
    stored = relay.get_json(f"/api/runs/{run}/events?since=0&token={S}")[1]["events"]
    published = any(e["producer"] != f"p-{run}" for e in stored)
    assert published == (errors == []), stored
    return published, received


@pytest.mark.parametrize(
    ("query", "headers", "roles"),
    [
        (f"?token={P}&token={S}", None, (True, True)),
        (f"?token={P}", None, (True, False)),
        (f"?token={S}", None, (False, True)),
        (f"?token={P}", bearer(S), (False, True)),  # the header wins
    ],
)
async def test_root_gets_the_roles_of_the_tokens_it_presents(guarded, query, headers, roles):
    assert await root_roles(guarded, "/" + query, headers) == roles


async def test_with_only_a_publish_token_root_needs_it_and_subscribe_is_open(relay_factory):
    relay = relay_factory("--publish-token", P)
    assert greeting_kind(await open_and_greet(relay.url, "/", bearer(P))) == "pong"
    assert await root_roles(relay, "/") == (False, True)
    assert await root_roles(relay, "/", bearer(P)) == (True, True)
    assert greeting_kind(await open_and_greet(relay.url, "/subscribe?run_id=*")) == "subscribed"
    assert relay.get("/api/runs")[0] == 200
    assert await refused_status(relay.url, "/publish") == 401


async def test_tokens_from_environment_variables(relay_factory):
    env_p, env_s = "env-pub-6b1e2c", "env-sub-9d7f0a"
    relay = relay_factory(env={"FEDRELAY_PUBLISH_TOKEN": env_p, "FEDRELAY_SUBSCRIBE_TOKEN": env_s})
    assert await refused_status(relay.url, "/publish") == 401
    assert greeting_kind(await open_and_greet(relay.url, "/publish", bearer(env_p))) == "hello"
    assert await refused_status(relay.url, "/subscribe?run_id=*", bearer(env_p)) == 401
    subscribed = await open_and_greet(relay.url, f"/subscribe?run_id=*&token={env_s}")
    assert greeting_kind(subscribed) == "subscribed"
    assert relay.get("/api/runs")[0] == 401
    assert relay.get("/api/runs", {"Authorization": f"Bearer {env_s}"})[0] == 200
    # Without --allow-origin, an origin the guarded relay allows is refused here.
    assert await refused_status(relay.url, "/publish", bearer(env_p), origin=DASH) == 403


async def test_flag_wins_over_environment_variable(relay_factory):
    relay = relay_factory("--publish-token", "flag-pub-1a2b", env={"FEDRELAY_PUBLISH_TOKEN": "env-pub-3c4d"})
    assert await refused_status(relay.url, "/publish", bearer("env-pub-3c4d")) == 401
    assert greeting_kind(await open_and_greet(relay.url, "/publish", bearer("flag-pub-1a2b"))) == "hello"


async def test_two_authorization_headers_on_a_handshake_are_refused_not_a_server_error(guarded):
    """Two Authorization headers are a client's mistake (or probing): answer
    400/401 as for two Origin headers, not 500 with a traceback in the log."""
    assert await refused_status(guarded.url, "/publish", bearer(P) + bearer(P)) in (400, 401)


async def test_two_authorization_headers_on_the_api_are_refused_not_a_server_error(guarded):
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=5)
    try:
        conn.putrequest("GET", "/api/runs")
        conn.putheader("Authorization", f"Bearer {S}")
        conn.putheader("Authorization", f"Bearer {S}")
        conn.endheaders()
        assert conn.getresponse().status in (400, 401)
    finally:
        conn.close()


# -- origins -------------------------------------------------------------------

ORIGINS = [
    ("https://evil.example", False),
    ("http://evil.example:3000", False),
    ("http://localhost.evil.example", False),
    ("http://localhost@evil.example", False),
    ("http://evil.example/localhost", False),
    ("http://127.0.0.1.evil.example", False),
    ("null", False),
    ("file://", False),
    ("ws://localhost:3000", False),
    ("https://dash.example:8443", False),
    ("http://dash.example", False),
    ("http://localhost:3000", True),
    ("https://localhost", True),
    ("http://127.0.0.1:5173", True),
    ("http://[::1]:8080", True),
    (DASH, True),
]


@pytest.mark.parametrize(("origin", "allowed"), ORIGINS)
@pytest.mark.parametrize("path", ["/publish", "/subscribe?run_id=*"])
async def test_origins(guarded, path, origin, allowed):
    headers = bearer(P if path == "/publish" else S)
    if allowed:
        msg = await open_and_greet(guarded.url, path, headers, origin=origin)
        assert greeting_kind(msg) == EXPECTED_GREETING[path]
    else:
        before = metric(guarded, 'fedrelay_handshakes_refused_total{reason="origin"}')
        assert await refused_status(guarded.url, path, headers, origin=origin) == 403
        assert metric(guarded, 'fedrelay_handshakes_refused_total{reason="origin"}') == before + 1


async def test_same_origin_and_origin_checked_before_token(guarded):
    own = f"http://127.0.0.1:{guarded.port}"
    assert greeting_kind(await open_and_greet(guarded.url, "/publish", bearer(P), origin=own)) == "hello"
    # A foreign page learns nothing about tokens: 403 with or without one.
    assert await refused_status(guarded.url, "/publish", None, origin="https://evil.example") == 403
    assert await refused_status(guarded.url, "/", bearer(P), origin="https://evil.example") == 403


async def test_several_origin_headers_are_refused(guarded):
    headers = [*bearer(P), ("Origin", "http://localhost:3000"), ("Origin", "https://evil.example")]
    assert await refused_status(guarded.url, "/publish", headers) == 403


async def test_allow_any_origin(relay_factory):
    relay = relay_factory("--allow-origin", "*")
    hello = await open_and_greet(relay.url, "/publish", origin="https://evil.example")
    assert greeting_kind(hello) == "hello"


# -- logs ------------------------------------------------------------------------


async def test_tokens_never_reach_the_log(guarded):
    """Runs last in this module: every attempt above went through this relay."""
    for target, headers in [
        (f"/publish?token={P}", None),
        (f"/publish?token={S}", None),
        (f"/subscribe?run_id=*&token={P}", None),
        ("/", bearer(S)),
        ("/publish", bearer(WRONG)),
    ]:
        with contextlib.suppress(InvalidStatus):
            await open_and_greet(guarded.url, target, headers)
    guarded.get(f"/api/runs?token={P}")
    guarded.get("/api/runs", {"Authorization": f"Bearer {S}"})
    assert guarded.log_path is not None
    log = guarded.log_path.read_text(errors="replace")
    assert "relay listening" in log  # the debug-level log is really being written
    for secret in (P, S, WRONG):
        assert secret not in log
