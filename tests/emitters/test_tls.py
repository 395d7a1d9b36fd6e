"""wss:// and https:// with certificates verified: emitters and every CLI client, against a real
relay behind a TLS-terminating proxy with a test CA (how relays run behind Caddy or nginx)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from tests.support.spool import spooled_count
from tests.support.stored import stored_events
from tests.support.tls_proxy import TlsProxy
from tests.support.waiting import wait_until


@pytest.fixture
def proxy(relay, tmp_path):
    proxy = TlsProxy(relay.port, tmp_path)
    yield proxy
    proxy.close()


def fedrelay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_an_emitter_publishes_over_wss_with_the_ca_that_signed_the_relay(relay, proxy, make_emitter):
    em = make_emitter(proxy.wss, run_id="tls", ca_file=proxy.ca_file)
    for i in range(50):
        em.emit("status", {"message": "m", "i": i})
    assert em.flush(15), em.stats
    assert [e["data"]["i"] for e in stored_events(relay, "tls")] == list(range(50))
    assert proxy.handshakes >= 1


def test_a_certificate_that_does_not_verify_is_one_error_and_the_events_wait_on_disk(
    relay, proxy, make_emitter, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="fedrelay.emitter")
    spool = tmp_path / "spool"
    em = make_emitter(proxy.wss, run_id="untrusted")  # the system trust store: not our test CA
    for i in range(20):
        em.emit("status", {"message": "m", "i": i})
    wait_until(lambda: em.stats["reconnects"] == 0 and em.last_error, 10, what="a failed connect")
    wait_until(lambda: len(caplog.records) >= 1, 10, what="the certificate error")
    assert em.settle(10) is False  # known unreachable: no wait, leftovers spooled
    assert spooled_count(spool) == 20
    wait_until(lambda: proxy.connections >= 3, 10, what="retries")  # it keeps trying, quietly
    assert proxy.handshakes == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    text = errors[0].getMessage()
    assert f"certificate of {proxy.wss} does not verify" in text and "FEDRELAY_CA_FILE" in text
    assert "does not verify" in em.last_error
    em.close(1)

    untrusted = fedrelay("sync", "--url", proxy.wss, "--spool-dir", str(spool))
    assert untrusted.returncode == 1
    assert "does not verify" in untrusted.stderr and "20 events stay" in untrusted.stderr
    trusted = fedrelay("sync", "--url", proxy.wss, "--spool-dir", str(spool), "--ca-file", str(proxy.ca_file))
    assert trusted.returncode == 0, trusted.stderr
    assert [e["data"]["i"] for e in stored_events(relay, "untrusted")] == list(range(20))


def test_cli_clients_verify_the_relays_certificate(relay, proxy, make_emitter):
    em = make_emitter(relay.url, run_id="cli-tls")
    em.emit("training_start", {"experiment_name": "x"})
    em.emit("training_end", {"status": "completed"})
    assert em.flush(10)
    commands = {
        "runs": ("runs", "--url", proxy.https, "--json"),
        "tail": ("tail", "cli-tls", "--once", "--url", proxy.wss),
        "export": ("export", "cli-tls", "--url", proxy.https),
    }
    for name, args in commands.items():
        refused = fedrelay(*args)
        assert refused.returncode == 1, (name, refused.stdout, refused.stderr)
        assert "does not verify" in refused.stderr and "--ca-file" in refused.stderr, (name, refused.stderr)
        assert "Traceback" not in refused.stderr
        trusted = fedrelay(*args, "--ca-file", str(proxy.ca_file))
        assert trusted.returncode == 0, (name, trusted.stderr)
        assert "cli-tls" in trusted.stdout or "training_end" in trusted.stdout, (name, trusted.stdout)
        from_env = fedrelay(*args, env={"FEDRELAY_CA_FILE": str(proxy.ca_file)})
        assert from_env.returncode == 0, (name, from_env.stderr)
    missing = fedrelay("runs", "--url", proxy.https, "--ca-file", str(proxy.ca_file) + ".missing")
    assert missing.returncode == 1 and "cannot load the CA file" in missing.stderr
