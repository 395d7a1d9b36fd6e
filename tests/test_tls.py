"""Relay TLS (`fedrelay serve --certfile --keyfile`): a real relay process with a test CA (trustme).

Publish and subscribe over wss://, /healthz, the dashboard and the API over https://, all on the
one port; a client that does not trust the CA is refused by its own TLS check; plain ws:// gets no
answer; bad certificate or key files stop the relay at start with a sentence naming the flag.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import urllib.request

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from tests.support.clients import event
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess, free_port
from tests.support.waiting import wait_until

PUBLISH, SUBSCRIBE = "pub-tok3n", "sub-tok3n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path):
    """A server certificate for 127.0.0.1 and localhost, its key, and the CA that signed it."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(paths["cert"], append=True)
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    return paths


@pytest.fixture
def tls_relay(tls_files, tmp_path):
    relay = RelayProcess(
        tmp_path / "relay.db",
        args=[
            "--certfile", str(tls_files["cert"]), "--keyfile", str(tls_files["key"]),
            "--publish-token", PUBLISH, "--subscribe-token", SUBSCRIBE,
        ],
        ca_file=tls_files["ca"],
    ).start()  # fmt: skip
    yield relay
    relay.stop()


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fedrelay serve`` expected to stop at start: its exit code and what it said."""
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", "serve", "--memory", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


async def test_publish_subscribe_health_and_dashboard_over_tls(tls_relay):
    assert tls_relay.url.startswith("wss://") and tls_relay.http.startswith("https://")
    trusted = tls_relay.ssl_context
    async with connect(
        f"{tls_relay.url}/publish?producer=tls-p",
        ssl=trusted,
        additional_headers={"Authorization": f"Bearer {PUBLISH}"},
    ) as producer:
        hello = json.loads(await producer.recv())
        assert hello["op"] == "hello" and hello["producer"] == "tls-p"
        await producer.send(json.dumps([event("tls-run", i) for i in (1, 2, 3)]))
        assert json.loads(await producer.recv()) == {"op": "ack", "producer": "tls-p", "upto": 3}

    async with connect(
        f"{tls_relay.url}/subscribe?run_id=tls-run&token={SUBSCRIBE}", ssl=trusted
    ) as subscriber:
        frames = [json.loads(await asyncio.wait_for(subscriber.recv(), 10)) for _ in range(2)]
    assert frames[0]["op"] == "subscribed"
    assert [e["seq"] for e in frames[1]] == [1, 2, 3]

    status, health = tls_relay.get_json("/healthz")
    assert status == 200 and health["status"] == "ok"
    status, page = tls_relay.get("/")
    assert status == 200 and b"<title>fedrelay</title>" in page
    status, script = tls_relay.get("/static/fedrelay.js")
    assert status == 200 and b"wss:" in script
    status, runs = tls_relay.get_json("/api/runs", {"Authorization": f"Bearer {SUBSCRIBE}"})
    assert status == 200 and [r["run_id"] for r in runs["runs"]] == ["tls-run"]


async def test_a_client_that_does_not_trust_the_ca_is_refused_by_its_own_check(tls_relay):
    system_store = ssl.create_default_context()  # the system's CAs: not the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(f"{tls_relay.url}/subscribe?run_id=x&token={SUBSCRIBE}", ssl=system_store):
            pass
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(tls_relay.http + "/healthz", timeout=5, context=system_store)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    # No plain listener beside TLS: a ws:// handshake gets no HTTP answer.
    with pytest.raises((InvalidMessage, ConnectionError, EOFError)):
        async with connect(f"ws://127.0.0.1:{tls_relay.port}/subscribe?run_id=x", open_timeout=10):
            pass
    assert tls_relay.get_json("/healthz")[1]["status"] == "ok"  # and the relay is unharmed


def test_the_printed_url_says_wss_and_https(tls_files, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fedrelay", "serve", "--memory", "--port", str(port),
            "--log-level", "warning",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "FEDRELAY_CERTFILE": str(tls_files["cert"]),
             "FEDRELAY_KEYFILE": str(tls_files["key"])},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert f"relay on wss://127.0.0.1:{port}" in line
    assert f"(dashboard: https://127.0.0.1:{port}/)" in line


def test_unusable_certificate_or_key_stops_the_relay_at_start_naming_the_file(ca, tls_files, tmp_path):
    cert, key = str(tls_files["cert"]), str(tls_files["key"])
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(other_key)
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    unreadable = tmp_path / "missing.pem"

    cases = {
        "mismatch": (["--certfile", cert, "--keyfile", str(other_key)], "does not belong to the certificate"),
        "missing": (
            ["--certfile", str(unreadable), "--keyfile", key],
            f"--certfile {unreadable}: cannot read",
        ),
        "no key": (["--certfile", cert], "holds no PEM private key; give the key with --keyfile"),
        "key is no key": (["--certfile", cert, "--keyfile", str(not_pem)], "holds no PEM private key"),
        "cert is no cert": (["--certfile", str(not_pem), "--keyfile", key], "holds no PEM certificate"),
        "key alone": (["--keyfile", key], "--keyfile / FEDRELAY_KEYFILE needs --certfile"),
    }
    for name, (args, expected) in cases.items():
        result = serve(*args)
        assert result.returncode == 2, (name, result.stderr)
        assert expected in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name


async def test_a_subscriber_that_stops_reading_over_tls_is_cut_like_any_other(tls_files, tmp_path):
    """The send queue bound holds under TLS too: the encrypted transport reports what waits."""
    from tests.support.slow_stream import BATCH, padded, stream_size
    from tests.support.sockets import send_handshake, tiny_receive_socket

    relay = RelayProcess(
        tmp_path / "slow.db",
        args=["--certfile", str(tls_files["cert"]), "--keyfile", str(tls_files["key"]),
              "--max-queue-bytes", "65536"],
        ca_file=tls_files["ca"],
    ).start()  # fmt: skip
    total = stream_size()
    events = [padded("tls-slow", i) for i in range(1, total + 1)]
    sock = None
    try:
        async with connect(f"{relay.url}/publish?producer=p", ssl=relay.ssl_context) as producer:
            await producer.recv()  # hello
            await producer.send(json.dumps(events[:1]))
            await producer.recv()  # the run exists: a subscriber may follow it
            raw = tiny_receive_socket(relay.port)
            sock = relay.ssl_context.wrap_socket(raw, server_hostname="127.0.0.1")
            send_handshake(sock, relay.port, "/subscribe?run_id=tls-slow&since=0")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 101"), head  # and it never reads again
            for start in range(1, total, BATCH):
                await producer.send(json.dumps(events[start : start + BATCH]))
            async with asyncio.timeout(60):
                while json.loads(await producer.recv()).get("upto") != total:
                    pass
        wait_until(lambda: scrape(relay).get("fedrelay_slow_consumers_total", 0) >= 1, 15, what="the cut")
        assert "cut slow consumer" in relay.log()
    finally:
        if sock is not None:
            sock.close()
        relay.stop()
