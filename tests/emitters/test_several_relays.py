"""An emitter given several addresses of a relay: real relay processes, real sockets.

Until the relays share a PostgreSQL store, two relays here are two SQLite files, i.e. two
different relays: the second sees only what reached it. What holds whatever the store: nothing
the emitter counts as acked is lost, everything else reaches the next address, and ``flush()``
ends True. (Exactly once across a real cluster is the cluster tests' subject.)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading

import pytest

from fedrelay.emitters import Emitter
from fedrelay.emitters.config import default_spool_dir
from tests.support.relay_process import RelayProcess, free_port
from tests.support.spool import spooled_count
from tests.support.stored import stored_events
from tests.support.waiting import wait_until


@pytest.fixture
def relay(backend_relay):
    """Each test that takes ``relay`` on both backends; the kill-and-restart and sync tests
    start their SQLite relays themselves."""
    return backend_relay


def dead_url() -> str:
    """An address where nothing listens (connections are refused)."""
    return f"ws://127.0.0.1:{free_port()}"


def test_an_emitter_whose_first_address_is_down_delivers_everything_through_the_second(
    relay, make_emitter, monkeypatch, caplog
):
    first = dead_url()
    monkeypatch.setenv("FEDRELAY_URL", f"{first}, {relay.url}")
    caplog.set_level(logging.INFO, logger="fedrelay.emitter")
    em = make_emitter(None, run_id="second", batch_size=100)
    for i in range(1000):
        em.emit("client_progress", {"round": 1, "client_id": "c1", "i": i})
    assert em.flush(30)

    events = stored_events(relay, "second")
    assert [e["id"] for e in events] == list(range(1, 1001))
    assert [e["data"]["i"] for e in events] == list(range(1000))
    assert em.urls == (first, relay.url) and em.url_source == "FEDRELAY_URL"
    assert em.url == relay.url, "kept the address that works"
    assert em.stats["acked"] == 1000 and em.stats["reconnects"] == 0
    (line,) = [r.getMessage() for r in caplog.records if "publishing to" in r.getMessage()]
    assert f"{first}, {relay.url}" in line and "urls from FEDRELAY_URL" in line
    assert not list((em._spool_root).glob(".reach-*")), "one address answered: no unreachable mark"


def emit_paced(em: Emitter, total: int, stop: threading.Event) -> threading.Thread:
    """Emit ``total`` events, 20 every 10 ms, in a training-like thread."""

    def loop() -> None:
        for i in range(total):
            em.emit("client_progress", {"round": 1, "client_id": "c1", "i": i})
            if i % 20 == 19:
                stop.wait(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_relay_killed_mid_stream_the_emitter_finishes_on_the_next_address_losing_nothing_acked(
    tmp_path, make_emitter
):
    first = RelayProcess(tmp_path / "first.db").start()
    second = RelayProcess(tmp_path / "second.db").start()
    restarted = None
    try:
        em = make_emitter([first.url, second.url], run_id="killed", batch_size=50)
        total = 6000
        emitting = emit_paced(em, total, threading.Event())
        wait_until(lambda: len(stored_events(first, "killed")) >= 500, 30, what="the first relay storing")
        first.kill()  # SIGKILL mid-stream: acks in flight are lost with it
        emitting.join(60)
        assert em.flush(60), em.last_error
        assert em.url == second.url

        restarted = RelayProcess(tmp_path / "first.db").start()  # what the first one had stored
        on_first = [e["id"] for e in stored_events(restarted, "killed")]
        on_second = [e["id"] for e in stored_events(second, "killed")]
        assert on_first == list(range(1, len(on_first) + 1)), "the first relay holds a prefix"
        assert on_second, "the rest went to the second address"
        resumed_from = on_second[0]
        assert on_second == list(range(resumed_from, total + 1)), "from the last ack on, in order"
        assert resumed_from <= len(on_first) + 1, "nothing acked by the first relay is missing"
        assert set(on_first) | set(on_second) == set(range(1, total + 1))
        assert em.stats["acked"] == total and em.stats["dropped"] == 0
    finally:
        for proc in (first, second, restarted):
            if proc is not None:
                proc.stop()


CHILD = textwrap.dedent(
    """
    import json, sys
    from fedrelay.emitters import Emitter

    urls, spool = sys.argv[1].split(","), sys.argv[2]
    em = Emitter(urls, run_id="reach", spool_dir=spool, connect_timeout=60, close_timeout=60,
                 reach_timeout=60, max_backoff=0.2)
    for i in range(5):
        em.emit("status", {"message": "m", "i": i})
    print(json.dumps({"settled": em.settle(60), "url": em.url, "producer": em.producer}), flush=True)
    """
)


def child(urls: list[str], spool) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(urls), str(spool)],
        capture_output=True,
        text=True,
        timeout=30,  # a wait for the relay would last 60 s
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_unreachable_mark_is_about_the_whole_list(tmp_path, relay):
    spool = tmp_path / "marks"
    one, two = dead_url(), dead_url()
    port = one.rsplit(":", 1)[1]
    down = child([one, two], spool)
    assert (down["settled"], down["url"]) == (False, one), "both down: no wait, back to the first"
    marks = [p.name for p in spool.glob(".reach-*")]
    assert len(marks) == 1 and marks[0].startswith(f".reach-ws-127.0.0.1-{port}+"), marks

    up = child([one, relay.url], spool)
    assert (up["settled"], up["url"]) == (True, relay.url)
    assert len(list(spool.glob(".reach-*"))) == 1, "another list's mark is left alone"
    own = [e["data"]["i"] for e in stored_events(relay, "reach") if e["producer"] == up["producer"]]
    assert own == list(range(5))


def test_spools_under_any_address_of_the_relay_are_delivered_by_fedrelay_sync(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDRELAY_SPOOL_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    a, b = dead_url(), dead_url()
    em = Emitter([b, a], run_id="listed", max_backoff=0.2)  # b first: spooled under b's directory
    for i in range(7):
        em.emit("status", {"message": "m", "i": i})
    assert em.close(0.5) is False
    assert spooled_count(default_spool_dir(b)) == 7 and not default_spool_dir(a).exists()

    relay = RelayProcess(tmp_path / "relay.db", port=int(a.rsplit(":", 1)[1])).start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedrelay", "sync", "--url", a, "--url", b],  # a first now
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "delivered 7 events" in done.stdout
        assert [e["data"]["i"] for e in stored_events(relay, "listed")] == list(range(7))
        assert spooled_count(default_spool_dir(b)) == 0
    finally:
        relay.stop()
