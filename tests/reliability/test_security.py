"""Security: connection floods, path traversal, oversized requests, cross-site
WebSocket hijacking and DNS rebinding, and secrets in logs, against a real relay
process over real sockets.

What test_access.py already pins (the token matrix, foreign origins on
/publish and /subscribe, tokens absent from the log on token refusals) is
not repeated; this adds the refusal paths it does not reach. Requests a
client library would refuse to send (NUL bytes, 9 KB header lines, a forged
``Host``) are written by hand on raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.reliability.report import record
from tests.support.clients import event, events_in
from tests.support.raw_http import (
    OTHER,
    body_of,
    http_get,
    raw_exchange,
    read_response,
    request,
    scrape_from_other,
    status_of,
)
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until

P = "pub-sec-7c1d93e04fa2"
S = "sub-sec-2b8e55a1c6d0"
WRONG = "wrong-sec-0f0f0f0f0f"
TOKENS = (P, S, WRONG)
LIMIT = 8
FLOOD_EXTRA = 5
ANSWERED_PAST_LIMIT = 64  # fedrelay.relay.server.ANSWERED_PAST_LIMIT, pinned here on purpose

pytestmark = pytest.mark.timeout(60)


# -- raw HTTP --------------------------------------------------------------------


def refused(relay: RelayProcess, reason: str) -> float:
    return scrape_from_other(relay).get(f'fedrelay_handshakes_refused_total{{reason="{reason}"}}', 0.0)


def log_of(relay: RelayProcess) -> str:
    assert relay.log_path is not None
    return relay.log_path.read_text(errors="replace")


def assert_no_secret_in_log(relay: RelayProcess) -> None:
    log = log_of(relay)
    assert "relay listening" in log  # the log is really being written
    for secret in TOKENS:
        assert secret not in log, f"token {secret[:8]}... in the relay log"


async def still_serves(relay: RelayProcess) -> None:
    """A fresh subscriber opens and answers a ping, and /healthz says ok."""
    assert http_get(relay, "/healthz")[0] == 200
    async with connect(f"{relay.url}/subscribe?token={S}", compression=None, open_timeout=5) as conn:
        await conn.send(json.dumps({"op": "ping"}))
        assert json.loads(await asyncio.wait_for(conn.recv(), 5)) == {"op": "pong"}


# -- connection floods -----------------------------------------------------------


async def ping(conn: ClientConnection) -> bool:
    await conn.send(json.dumps({"op": "ping"}))
    while True:
        msg = json.loads(await asyncio.wait_for(conn.recv(), 5))
        if isinstance(msg, dict) and msg.get("op") == "pong":
            return True


async def open_subscriber(relay: RelayProcess, source: str | None = None) -> ClientConnection:
    return await connect(
        f"{relay.url}/subscribe?run_id=*&token={S}",
        compression=None,
        open_timeout=5,
        local_addr=(source, 0) if source else None,
    )


async def refusal_of(relay: RelayProcess) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as exc:
        conn = await open_subscriber(relay)
        await conn.close()
    return exc.value.response.status_code, bytes(exc.value.response.body or b"")


async def test_connection_flood_from_one_address(relay_factory):
    """LIMIT connections from 127.0.0.1 open; more are refused (503, then dropped unread
    past 64 more), the open ones and a stream from another address go on untouched,
    one log line tells, and slots come back once connections close."""
    relay = relay_factory(
        "--max-connections-per-ip", str(LIMIT),
        "--publish-token", P, "--subscribe-token", S, "--log-level", "debug",
    )  # fmt: skip
    run = f"flood-{uuid.uuid4().hex[:8]}"
    producer = await connect(
        f"{relay.url}/publish?producer=p-{run}&token={P}", compression=None, local_addr=(OTHER, 0)
    )
    watcher = await connect(
        f"{relay.url}/subscribe?run_id=*&token={S}", compression=None, local_addr=(OTHER, 0)
    )
    received: list[dict[str, Any]] = []

    async def watch() -> None:
        async for frame in watcher:
            received.extend(e for e in events_in(frame) if e["run_id"] == run)

    watching = asyncio.create_task(watch())
    held: list[ClientConnection] = []
    raw: list[socket.socket] = []
    try:
        assert json.loads(await asyncio.wait_for(producer.recv(), 5))["op"] == "hello"
        sent = 0

        async def publish(count: int) -> None:
            nonlocal sent
            batch = [event(run, sent + i + 1) for i in range(count)]
            sent += count
            await producer.send(json.dumps(batch))

        await publish(20)
        held = [await open_subscriber(relay) for _ in range(LIMIT)]

        # Past the limit: refused with 503 and a body that says why; the token never echoed.
        answers = [await refusal_of(relay) for _ in range(FLOOD_EXTRA)]
        assert {status for status, _ in answers} == {503}, answers
        assert all(b"--max-connections-per-ip" in body for _, body in answers)
        assert all(S.encode() not in body for _, body in answers)
        http_refused = raw_exchange(relay.port, request(f"/api/runs?token={S}"))
        assert status_of(http_refused) == 503  # plain HTTP counts too: a connection is a connection
        await publish(20)

        # A flood: 64 more get their 503 once they speak, the rest are closed unread at once.
        dropped_extra = 10
        for _ in range(ANSWERED_PAST_LIMIT + dropped_extra):
            raw.append(socket.create_connection(("127.0.0.1", relay.port), timeout=5))
        for sock in raw:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request(f"/subscribe?token={S}", upgrade=True))
        statuses = [status_of(read_response(sock)) for sock in raw]
        assert statuses.count(503) >= ANSWERED_PAST_LIMIT - FLOOD_EXTRA - 1, statuses
        assert statuses.count(None) >= dropped_extra, statuses
        assert set(statuses) <= {503, None}, statuses
        await publish(20)

        # What was open keeps working; the other address's stream is whole and in order.
        assert all([await ping(conn) for conn in held])
        await until(lambda: len(received) >= sent, 10, what="the other address's stream")
        assert [e["seq"] for e in received] == list(range(1, sent + 1))
        figures = scrape_from_other(relay)
        answered = figures.get('fedrelay_handshakes_refused_total{reason="ip_limit"}', 0)
        flooded = figures.get('fedrelay_handshakes_refused_total{reason="ip_flood"}', 0)
        assert answered + flooded == FLOOD_EXTRA + 1 + len(raw)
        assert flooded >= dropped_extra
        assert figures['fedrelay_connections{endpoint="subscribe"}'] == LIMIT + 1
        assert http_get(relay, "/healthz")[0] == 200  # from the other address: not refused

        # Once the held connections close, their slots come back.
        for sock in raw:
            sock.close()
        raw = []
        for conn in held:
            await conn.close()
        held = []
        started = time.monotonic()
        held = await asyncio.wait_for(_reopen(relay, LIMIT), 10)
        reopen_s = time.monotonic() - started
        assert all([await ping(conn) for conn in held])

        log = log_of(relay)
        lines = [line for line in log.splitlines() if "refusing connections from 127.0.0.1" in line]
        assert len(lines) == 1, lines  # one line per address per minute, not one per refusal
        assert OTHER not in "".join(lines)
        assert "Traceback" not in log
        assert_no_secret_in_log(relay)
        record(
            "security",
            case="connection_flood",
            limit=LIMIT,
            tried=LIMIT + FLOOD_EXTRA + 1 + len(statuses),
            refused_503=int(answered),
            dropped_unread=int(flooded),
            log_lines=len(lines),
            stream_events=len(received),
            slots_back_s=round(reopen_s, 3),
        )
    finally:
        for sock in raw:
            sock.close()
        for conn in [*held, producer, watcher]:
            await conn.close()
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watching


async def _reopen(relay: RelayProcess, count: int) -> list[ClientConnection]:
    """Open ``count`` connections from 127.0.0.1, retrying while closed slots are freed."""
    opened: list[ClientConnection] = []
    while len(opened) < count:
        try:
            opened.append(await open_subscriber(relay))
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            await asyncio.sleep(0.02)
    return opened


async def test_limit_from_env_flag_wins_and_zero_means_none(relay_factory):
    """FEDRELAY_MAX_CONNECTIONS_PER_IP sets it, the flag overrides it, 0 lifts it, -1 is refused."""
    env = {"FEDRELAY_MAX_CONNECTIONS_PER_IP": "2"}
    from_env = relay_factory("--subscribe-token", S, env=env)
    unlimited = relay_factory("--subscribe-token", S, "--max-connections-per-ip", "0", env=env)
    held: list[ClientConnection] = []
    try:
        held += [await open_subscriber(from_env) for _ in range(2)]
        assert (await refusal_of(from_env))[0] == 503
        many = ANSWERED_PAST_LIMIT + 16  # past where a limit would even drop connections unread
        held += [await open_subscriber(unlimited) for _ in range(many)]
        assert all([await ping(conn) for conn in held[-3:]])
        assert refused(unlimited, "ip_limit") == refused(unlimited, "ip_flood") == 0
    finally:
        for conn in held:
            await conn.close()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrelay",
            "serve",
            "--memory",
            "--port",
            "0",
            "--max-connections-per-ip",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--max-connections-per-ip" in bad.stderr, bad.stderr
    record("security", case="limit_settings", env_limit=2, unlimited_opened=many)


# -- the module's relay: tokens, debug log ------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[RelayProcess]:
    """Both tokens, one extra origin, and the most talkative log level."""
    proc = RelayProcess(
        tmp_path_factory.mktemp("security") / "relay.db",
        args=[
            "--publish-token", P, "--subscribe-token", S,
            "--allow-origin", "https://dash.example", "--log-level", "debug",
        ],
    ).start()  # fmt: skip
    yield proc
    proc.stop()


# -- static files -------------------------------------------------------------------

SECRET = f"fedrelay-secret-{uuid.uuid4().hex}"


@pytest.fixture
def secret_files(tmp_path) -> Iterator[dict[str, Path]]:
    """The same secret next to the static dir, next to the package, and in tmp."""
    static = Path(str(resources.files("fedrelay.relay") / "static"))
    assert (static / "index.html").is_file()
    places = {
        "relay": static.parent / "security-secret.txt",
        "package": static.parent.parent / "security-secret.txt",
        "tmp": tmp_path / "security-secret.txt",
    }
    for path in places.values():
        path.write_text(SECRET)
    try:
        yield places
    finally:
        for path in places.values():
            path.unlink(missing_ok=True)


def traversal_targets(places: dict[str, Path]) -> list[bytes]:
    tmp = str(places["tmp"])
    name = "security-secret.txt"
    targets = [
        f"/static/../{name}",
        f"/static/../../{name}",
        f"/static/vendor/uplot/../../../{name}",
        f"/static/%2e%2e/{name}",
        f"/static/%2E%2E/%2E%2E/{name}",
        f"/static/.%2e/{name}",
        f"/static/..%2f{name}",
        f"/static/..%2F..%2F{name}",
        f"/static/%2e%2e%2f%2e%2e%2f{name}",
        f"/static/%252e%252e/{name}",
        f"/static/..%252f{name}",
        f"/static/..%c0%af{name}",
        f"/static/..%5c{name}",
        f"/static/..\\{name}",
        f"/static/..\\..\\{name}",
        f"/static/....//{name}",
        f"/static/..;/{name}",
        f"/static/.../{name}",
        f"/static/{tmp}",
        f"/static//{tmp}",
        f"/static/{tmp.replace('/', '%2f')}",
        f"/static/file://{tmp}",
        f"/static/~/{name}",
        f"/{name}",
        f"/../{name}",
        f"/%2e%2e/{name}",
        f"http://127.0.0.1/static/../{name}",
        f"//static/../{name}",
        "/static/index.html%00.txt",
        f"/static/vendor/uplot/LICENSE/../../../../{name}",
        f"/api/runs/../../static/../{name}?token={S}",
    ]
    raw = [t.encode() for t in targets]
    raw += [
        b"/static/\x00",
        b"/static/index.html\x00/../../" + name.encode(),
        b"/static/..\x00/" + name.encode(),
        b"/static/\x7f",
        b"/static/\t../" + name.encode(),
    ]
    return raw


async def test_static_files_never_leave_the_static_dir(guarded, secret_files):
    targets = traversal_targets(secret_files)
    statuses: dict[int | None, int] = {}
    for target in targets:
        response = raw_exchange(guarded.port, request(target))
        status = status_of(response)
        statuses[status] = statuses.get(status, 0) + 1
        assert SECRET.encode() not in response, target
        assert status in (400, 404), (target, response[:300])
    # The control: the dashboard itself is served, so the 404s above are not a broken route.
    index = raw_exchange(guarded.port, request("/static/index.html"))
    assert status_of(index) == 200 and b"<html" in body_of(index)
    log = log_of(guarded)
    assert "Traceback" not in log and "process_request failed" not in log
    record(
        "security",
        case="path_traversal",
        tried=len(targets),
        status_404=statuses.get(404, 0),
        status_400=statuses.get(400, 0),
        leaked=0,
    )


async def test_overlong_static_names_are_404_not_a_server_error(relay_factory):
    """A name longer than the filesystem allows is just a file that is not there."""
    relay = relay_factory("--log-level", "debug")  # its own log: a traceback must not fail the others
    targets = [b"/static/" + b"a" * 300, b"/static/" + b"a/" * 3000, b"/static/" + b"b" * 5000 + b".js"]
    statuses = [status_of(raw_exchange(relay.port, request(t))) for t in targets]
    assert statuses == [404] * len(targets), statuses
    assert "process_request failed" not in log_of(relay)


# -- oversized and malformed requests -------------------------------------------------

OVERSIZED = {
    "header line of 9 KB": request("/healthz", "X-Big: " + "a" * 9000),
    "header line of 1 MiB": request("/healthz", "X-Big: " + "a" * (1 << 20)),
    "129 headers": request("/healthz", *(f"X-H{i}: v" for i in range(129))),
    "1000 headers": request("/healthz", *(f"X-H{i}: v" for i in range(1000))),
    "request line of 9 KB": request("/static/" + "a" * 9000),
    "request line of 1 MiB": request("/?token=" + "a" * (1 << 20)),
    "handshake with a 9 KB token": request(f"/subscribe?token={'b' * 9000}", upgrade=True),
    "handshake with a 9 KB Origin": request("/subscribe", "Origin: http://" + "o" * 9000, upgrade=True),
    "two Host headers": request("/api/runs", "Host: evil.example", "Sec-Fetch-Site: same-origin"),
    "header without a colon": request("/healthz", "no colon here"),
    "no CRLF at all": b"GET / HTTP/1.1\nHost: x\n\n",
    "HTTP/0.9": b"GET /\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "chunked request": request("/healthz", "Transfer-Encoding: chunked"),
    "binary garbage": bytes(range(256)) * 8,
}


async def test_oversized_and_malformed_requests_get_4xx_or_a_close(guarded):
    outcomes: dict[str, int | None] = {}
    for name, data in OVERSIZED.items():
        status = status_of(await asyncio.to_thread(raw_exchange, guarded.port, data))
        outcomes[name] = status
        assert status is None or 400 <= status < 500, (name, status)
        assert guarded.proc is not None and guarded.proc.poll() is None, name
    assert outcomes["header line of 9 KB"] == 431
    assert outcomes["129 headers"] == 431
    assert outcomes["request line of 9 KB"] == 414
    assert outcomes["two Host headers"] == 400
    await still_serves(guarded)
    assert "Traceback" not in log_of(guarded)
    record(
        "security",
        case="oversized_requests",
        tried=len(outcomes),
        answered_4xx=sum(1 for s in outcomes.values() if s is not None),
        closed=sum(1 for s in outcomes.values() if s is None),
    )


HANDSHAKE_TIMEOUT = 10.0
"""How long the relay waits for a request (``fedrelay.relay.server.HANDSHAKE_TIMEOUT``)."""
TIMER_SLACK = 0.5
"""How much earlier than its deadline, counted from our connect, the relay's timer may seem to
fire: it starts at accept, on an event loop whose clock is read once per iteration."""


def still_open(sock: socket.socket) -> bool:
    """Nothing from the relay yet, not even a close (peeked without blocking)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # data, or b"" for a close: the relay already answered
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(60)
    return False


def answered_at(sock: socket.socket) -> tuple[bytes, float]:
    """The relay's answer (or close) and when it came; a socket timeout (the relay never closed)
    propagates."""
    answer = read_response(sock)
    return answer, time.monotonic()


async def test_connections_that_never_finish_their_request_are_closed(guarded):
    """Slowloris: half requests (and a TLS hello, which has no line end) on many sockets. The
    relay serves others while all of them are still open, and closes each no earlier than its
    handshake timeout after our connect (and does close it: a generous socket timeout fails the
    test otherwise). Order and lower bounds only: a slow machine cannot make it fail."""
    partial = [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "] * 40
    partial += [b"GET /subscribe?token=" + S.encode()] * 5  # not even a request line
    partial += [bytes.fromhex("16030100a5010000a10303") + b"\x00" * 200] * 5  # TLS to a plain port
    connecting = time.monotonic()  # no timer of the relay's can start before this
    socks = [socket.create_connection(("127.0.0.1", guarded.port), timeout=60) for _ in partial]
    try:
        for sock, data in zip(socks, partial, strict=True):
            sock.sendall(data)
        await still_serves(guarded)
        open_while_served = sum(still_open(sock) for sock in socks)
        answers = await asyncio.gather(*(asyncio.to_thread(answered_at, sock) for sock in socks))
    finally:
        for sock in socks:
            sock.close()
    assert open_while_served == len(socks), f"only {open_while_served} still open when others were served"
    assert all(status_of(answer) in (None, 400, 408) for answer, _ in answers), answers[:3]
    closed_after = [at - connecting for _, at in answers]
    assert min(closed_after) >= HANDSHAKE_TIMEOUT - TIMER_SLACK, sorted(closed_after)[:5]
    record(
        "security",
        case="slow_requests",
        sockets=len(socks),
        closed_s=round(max(closed_after), 1),
    )


# -- cross-site WebSocket hijacking and DNS rebinding ---------------------------------

# Not in test_access.py: the root path and token-in-query variants, and Origins that
# differ from an allowed or loopback one only in a way a sloppy check could miss.
FOREIGN_ORIGINS = [
    "null",
    "http://127.0.0.1.evil.example",
    "http://localhost.evil.example:3000",
    "http://evil-localhost",
    "http://127.0.0.2:3000",
    "http://0.0.0.0:3000",
    "http://localhost.",
    "https://dash.example.evil.example",
    "https://evil.example/https://dash.example",
    "https://dash.example@evil.example",
    "http://dash.example",
    "https://dash.example:444",
    "chrome-extension://abcdefghijklmnop",
    "http://xn--lcalhost-9za.example",
]
PATHS = [f"/publish?token={P}", f"/subscribe?run_id=*&token={S}", f"/?token={P}&token={S}"]


async def test_foreign_origins_with_a_valid_query_token_are_refused(guarded):
    before = refused(guarded, "origin")
    tried = 0
    for path in PATHS:
        for origin in FOREIGN_ORIGINS:
            tried += 1
            with pytest.raises(InvalidStatus) as exc:
                async with connect(guarded.url + path, origin=origin, compression=None, open_timeout=5):
                    pass
            assert exc.value.response.status_code == 403, (path, origin)
            assert P.encode() not in exc.value.response.body and S.encode() not in exc.value.response.body
    assert refused(guarded, "origin") == before + tried
    record("security", case="cross_site_origins", tried=tried, refused=tried)


REBOUND = "rebind.evil.example"


def rebinding_cases(relay: RelayProcess) -> list[tuple[bytes, int]]:
    """Requests to a relay without both tokens, and what each must get."""
    host = f"{REBOUND}:{relay.port}"
    rebound = f"Origin: http://{host}"
    same_origin = "Sec-Fetch-Site: same-origin"
    return [
        # A rebound page: same-origin for the browser, a foreign Host for the relay.
        (request("/subscribe?run_id=*", rebound, host=host, upgrade=True), 403),
        (request(f"/publish?token={P}", rebound, host=host, upgrade=True), 403),
        (request("/", rebound, host=host, upgrade=True), 403),
        (request("/api/runs", same_origin, host=host), 403),
        (request("/", "Sec-Fetch-Site: none", host=host), 403),
        (request("/healthz", rebound, host=host), 403),
        (request("/api/runs", same_origin, host="[bad"), 403),  # not even a name
        # Non-browser clients (no Origin, no Sec-Fetch-*), e.g. behind a proxy that forwards Host:
        (request("/api/runs", host=host), 200),
        (request("/healthz", host="relay.example.com"), 200),
        (request("/subscribe?run_id=*", host=host, upgrade=True), 101),
        # Browsers that name the relay by IP or localhost, as the dashboard does:
        (request("/api/runs", same_origin, host=f"localhost:{relay.port}"), 200),
        (request("/", "Sec-Fetch-Site: none", host=f"127.0.0.1:{relay.port}"), 200),
        (request("/", "Sec-Fetch-Site: none", host=f"[::1]:{relay.port}"), 200),
        (request("/", "Sec-Fetch-Site: none", host=f"app.localhost:{relay.port}"), 200),
        # A loopback page vouches for itself: a rebound page's origin is the attacker's name.
        (request("/subscribe?run_id=*", "Origin: http://localhost:3000", host=host, upgrade=True), 101),
    ]


async def test_dns_rebinding_is_refused_while_a_token_is_missing(guarded, relay_factory):
    """A page on evil.example that re-points its name at 127.0.0.1 is same-origin for the
    browser; only the Host header gives it away. It matters while a role has no token (a
    rebound page has none); browsers must then name the relay by IP, localhost or an
    --allow-origin host. Non-browser clients behind a proxy that forwards Host go on."""
    open_relay = relay_factory("--log-level", "debug")
    half = relay_factory("--publish-token", P, "--log-level", "debug")  # subscribing is open
    tried = refusals = 0
    for relay in (open_relay, half):
        cases = rebinding_cases(relay)
        for data, expected in cases:
            response = await asyncio.to_thread(raw_exchange, relay.port, data, None, 3.0)
            assert status_of(response) == expected, (data[:120], response[:300])
            if expected == 403:
                assert b"DNS rebinding" in body_of(response)
        tried += len(cases)
        refusals += sum(expected == 403 for _, expected in cases)
        assert refused(relay, "host") == sum(expected == 403 for _, expected in cases)
        assert_no_secret_in_log(relay)

    # With both tokens a rebound page has no token: refused for that, as any stranger.
    host = f"{REBOUND}:{guarded.port}"
    for data, expected in [
        (request("/subscribe?run_id=*", f"Origin: http://{host}", host=host, upgrade=True), 401),
        (request("/api/runs", "Sec-Fetch-Site: same-origin", host=host), 401),
        (request("/", "Sec-Fetch-Site: none", host=host), 200),  # the dashboard's page holds no data
    ]:
        assert status_of(await asyncio.to_thread(raw_exchange, guarded.port, data)) == expected
        tried += 1

    # A host the operator allows is a name of the relay.
    named = relay_factory("--allow-origin", "https://relay.example.com")
    for host, expected in [
        ("relay.example.com", 200),
        (f"relay.example.com:{named.port}", 200),
        (REBOUND, 403),
    ]:
        data = request("/", "Sec-Fetch-Site: none", host=host)
        assert status_of(await asyncio.to_thread(raw_exchange, named.port, data)) == expected
        tried += 1
        refusals += expected == 403
    record("security", case="dns_rebinding", tried=tried, refused=refusals)


# -- logs -----------------------------------------------------------------------------


async def test_no_token_in_the_log_after_every_refusal_path(guarded):
    """Runs last: every refusal above (traversal, oversized, origin, rebinding) hit this
    relay at debug level with the tokens in its requests; add the token refusals."""
    for path, headers in [
        (f"/publish?token={S}", None),
        (f"/subscribe?run_id=*&token={P}", None),
        (f"/?token={WRONG}", None),
        ("/publish", [("Authorization", f"Bearer {WRONG}")]),
        ("/publish", [("Authorization", f"Bearer {P}"), ("Authorization", f"Bearer {P}")]),
    ]:
        with contextlib.suppress(InvalidStatus):
            async with connect(guarded.url + path, additional_headers=headers, compression=None):
                pass
    for target in [f"/api/runs?token={WRONG}", f"/api/runs/%00?token={S}", f"/api/runs/x\x00?token={P}"]:
        raw_exchange(guarded.port, request(target.encode()))
    assert_no_secret_in_log(guarded)
    assert "Traceback" not in log_of(guarded)


async def test_an_embedded_relay_at_debug_level_keeps_tokens_out_of_the_log(caplog):
    """websockets logs each request line and header at DEBUG; an application that runs
    the relay in-process with DEBUG on for everything must still not log the tokens."""
    from fedrelay.relay import Relay, RelayConfig

    caplog.set_level(logging.DEBUG)
    relay = Relay(RelayConfig(host="127.0.0.1", port=0, db=":memory:", publish_token=P, subscribe_token=S))
    await relay.start()
    try:
        async with connect(f"{relay.url}/publish?token={P}", compression=None) as conn:
            assert json.loads(await asyncio.wait_for(conn.recv(), 5))["op"] == "hello"
        for headers in ([("Authorization", f"Bearer {WRONG}")], [("Authorization", f"Bearer {S}")]):
            with pytest.raises(InvalidStatus):
                async with connect(f"{relay.url}/publish", additional_headers=headers, compression=None):
                    pass
    finally:
        await relay.stop()
    # The test's own client logs its requests too (websockets.client): not the relay's log.
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records if r.name != "websockets.client")
    assert "relay listening" in text
    for secret in TOKENS:
        assert secret not in text


def test_refusals_are_logged_once_per_address_per_interval_and_ipv6_counts_per_64() -> None:
    """The bookkeeping behind the flood test, over minutes it cannot wait for."""
    from fedrelay.relay.access import ConnectionLimiter, address_key

    limits = ConnectionLimiter(limit=2, log_every=60.0)
    assert [limits.opened("a") for _ in range(3)] == [1, 2, 3]
    assert not limits.over(2) and limits.over(3) and not limits.over(3, slack=1)
    due = [limits.note_refusal("a", t) for t in (0.0, 1.0, 2.0, 59.0, 60.0, 61.0)]
    assert due == [0, None, None, None, 3, None]  # the second line says 3 went unlogged
    assert limits.note_refusal("b", 61.0) == 0  # another address has its own line
    assert limits.quiet_since(100.0) == []
    assert limits.quiet_since(121.0) == [("a", 1)]  # summed up; "b" had nothing more: forgotten
    assert limits.note_refusal("a", 130.0) is None  # that summary was a line: a minute until the next
    assert limits.quiet_since(181.0) == [("a", 1)]
    assert limits.quiet_since(250.0) == []
    assert limits.note_refusal("a", 251.0) == 0 and limits.note_refusal("b", 251.0) == 0  # forgotten
    for _ in range(3):
        limits.closed("a")
    assert limits.open == {}
    assert not ConnectionLimiter(limit=0).over(10**6)  # 0: no limit
    assert address_key(("2001:db8::1", 5, 0, 0)) == address_key(("2001:db8::ffff:2", 6, 0, 0))
    assert address_key(("2001:db8::1", 5, 0, 0)) == "2001:db8::/64"
    assert address_key(("2001:db8:0:1::1", 5, 0, 0)) != address_key(("2001:db8::1", 5, 0, 0))
    assert address_key(("::ffff:10.1.2.3", 5, 0, 0)) == address_key(("10.1.2.3", 5)) == "10.1.2.3"
    assert address_key(("fe80::1%eth0", 5, 0, 2)) == "fe80::/64"
    assert address_key("") == "" and address_key(None) == "None"


def test_an_empty_token_flag_is_refused_not_an_open_relay() -> None:
    """``--publish-token "$TOKEN"`` with TOKEN unset would accept ``?token=``: exit 2 instead."""
    for flag in ("--publish-token", "--subscribe-token"):
        run = subprocess.run(
            [sys.executable, "-m", "fedrelay", "serve", "--memory", "--port", "0", flag, ""],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 2 and f"{flag} is empty" in run.stderr, run.stderr
