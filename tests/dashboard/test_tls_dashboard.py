"""The dashboard served over TLS (`fedrelay serve --certfile --keyfile`) streams over wss://.

Chromium does not know the test CA: certificate errors are ignored in this module's own browser,
which still has to speak TLS to the page, the API and the WebSocket (plain ws:// from an https://
page would be blocked as mixed content, and the relay has no plain listener anyway).
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import trustme
from websockets.asyncio.client import connect

from tests.support.browser import CHROMIUM_ARGS, chromium_path
from tests.support.dashboard import STATE, wait
from tests.support.relay_process import RelayProcess
from tests.support.training import federated_run


@pytest.fixture(scope="module")
def tls_browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-tls-profile")),
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_ARGS,
            ignore_https_errors=True,
        )
        yield context
        context.close()


@pytest.fixture
def tls_relay(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    relay = RelayProcess(
        tmp_path / "relay.db",
        args=["--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem")],
        ca_file=tmp_path / "ca.pem",
    ).start()
    yield relay
    relay.stop()


async def publish_over_tls(relay: RelayProcess, events: list[dict]) -> None:
    async with connect(f"{relay.url}/publish?producer=tls-producer", ssl=relay.ssl_context) as conn:
        assert json.loads(await conn.recv())["op"] == "hello"
        await conn.send(json.dumps(events))
        assert json.loads(await conn.recv()) == {"op": "ack", "producer": "tls-producer", "upto": len(events)}


def test_the_dashboard_over_https_streams_over_wss(tls_relay, tls_browser):
    run_id = "fed-tls"
    events = federated_run(run_id, rounds=2, clients=2)
    page = tls_browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{tls_relay.http}/#/runs/{run_id}")
        wait(page, f"() => {STATE}.connection === 'open'")
        worker = threading.Thread(target=lambda: asyncio.run(publish_over_tls(tls_relay, events)))
        worker.start()
        worker.join(30)
        wait(page, f"() => {STATE}.lastSeq === {len(events)} && {STATE}.status === 'completed'")
        assert page.evaluate("() => location.protocol") == "https:"
        assert page.get_by_test_id("connection").inner_text() == "live"
    finally:
        page.close()
    assert not errors, errors
