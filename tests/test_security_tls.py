"""Pre-auth cost of a TLS relay: connections still in their TLS handshake count against the
per-address limits like unfinished requests do.

They did not: the connection object only heard of a connection once its TLS handshake was done,
so one address could hold any number of handshakes for 10 s each. 15,000 connections from one
address that sent nothing took a relay from 49 MiB to 644 MiB and 5,400 open files (toward the
process's limit, after which nobody can connect), without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import ssl

import pytest
import trustme

from fedrelay.relay.connection import HANDSHAKES_PER_ADDRESS
from tests.support.memory import memory_kib, peak_growth_mib
from tests.support.metrics import parse
from tests.support.raw_http import OTHER
from tests.support.relay_process import RelayProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

EXTRA = 200
"""Connections past the address's handshake slots: each must be closed at accept."""


@pytest.fixture
def tls_relay(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    relay = RelayProcess(
        tmp_path / "relay.db",
        args=["--certfile", str(paths["cert"]), "--keyfile", str(paths["key"])],
        ca_file=paths["ca"],
    )
    try:  # stopped even when it never answers (a relay whose TLS is broken)
        yield relay.start()
    finally:
        relay.stop()


def https_get(relay: RelayProcess, path: str, source: str = OTHER) -> tuple[int, bytes]:
    """GET over TLS from another loopback address than the flood's."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", relay.port, timeout=10, context=relay.ssl_context, source_address=(source, 0)
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def handshake_floods(relay: RelayProcess) -> float:
    status, body = https_get(relay, "/metrics")
    assert status == 200
    return parse(body.decode()).get('fedrelay_handshakes_refused_total{reason="handshake_flood"}', 0.0)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def silent_connection(port: int) -> socket.socket | None:
    """A TCP connection that starts no TLS handshake; None when the relay refused it at once."""
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return None


async def test_connections_in_their_tls_handshake_are_capped_per_address(tls_relay):
    pid = tls_relay.proc.pid
    files_before = open_files(pid)
    rss_before = memory_kib(pid)["VmRSS"]
    total = HANDSHAKES_PER_ADDRESS + EXTRA
    socks = await asyncio.to_thread(lambda: [silent_connection(tls_relay.port) for _ in range(total)])
    try:
        # Well inside the 10 s TLS handshake timeout: the connections past the slots are gone.
        await asyncio.to_thread(
            wait_until,
            lambda: handshake_floods(tls_relay) >= EXTRA,
            8,
            what=f"{EXTRA} TLS connections past the address's handshake slots to be closed at accept",
        )
        held = open_files(pid) - files_before
        growth = peak_growth_mib(pid, rss_before)
        print(f"{total} silent TLS connections: {held} files held, peak RSS growth {growth:.1f} MiB")
        assert held <= HANDSHAKES_PER_ADDRESS + 8
        # Another address is served meanwhile.
        assert (await asyncio.to_thread(https_get, tls_relay, "/healthz"))[0] == 200
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()

    def answered() -> bool:
        with contextlib.suppress(OSError, ssl.SSLError, http.client.HTTPException):
            return https_get(tls_relay, "/healthz", source="127.0.0.1")[0] == 200
        return False

    # The flood's handshakes fail when its sockets close; their slots come back.
    await asyncio.to_thread(wait_until, answered, 10, what="the flood's slots to come back")
    await asyncio.to_thread(
        wait_until, lambda: open_files(pid) <= files_before + 4, 10, what="every flood socket to be closed"
    )
