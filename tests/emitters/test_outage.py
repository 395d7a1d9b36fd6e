"""Relay down, killed, or slow: every event is stored exactly once in the end."""

from __future__ import annotations

import subprocess
import sys

from tests.support.relay_process import RelayProcess, free_port
from tests.support.spool import spooled_count
from tests.support.stored import stored_events
from tests.support.waiting import wait_until


def run_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", "sync", *args], capture_output=True, text=True, timeout=60
    )


def assert_exactly_once(events: list[dict], total: int) -> None:
    assert sorted(e["data"]["i"] for e in events) == list(range(total))
    assert [e["seq"] for e in events] == list(range(1, total + 1))


def test_relay_down_throughout_then_fedrelay_sync_delivers_once(tmp_path, make_emitter):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    em = make_emitter(url, run_id="offline")
    for i in range(1500):
        em.emit("client_progress", {"round": 1, "client_id": "c1", "i": i})
    assert em.close(timeout=1) is False
    assert spooled_count(spool) == 1500
    assert em.stats["spooled"] == 1500

    down = run_sync("--url", url, "--spool-dir", str(spool))
    assert down.returncode != 0
    assert "cannot connect" in down.stderr and "1500 events stay" in down.stderr

    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        done = run_sync("--url", url, "--spool-dir", str(spool))
        assert done.returncode == 0, done.stderr
        assert "delivered 1500 events" in done.stdout
        assert spooled_count(spool) == 0
        again = run_sync("--url", url, "--spool-dir", str(spool))
        assert again.returncode == 0, again.stderr
        events = stored_events(relay, "offline")
        assert_exactly_once(events, 1500)
        assert {e["producer"] for e in events} == {em.producer}
        assert [e["id"] for e in events] == list(range(1, 1501))
    finally:
        relay.stop()


def test_relay_sigkilled_mid_stream_and_restarted(tmp_path, make_emitter):
    relay = RelayProcess(tmp_path / "relay.db").start()
    try:
        em = make_emitter(relay.url, run_id="crash", batch_size=50)
        total = 0
        for _ in range(2):
            for _ in range(1500):
                em.emit("epoch_end", {"epoch": total, "i": total})
                total += 1
            wait_until(lambda n=total - 1200: em.stats["acked"] >= n, 10, what="some acks")
            relay.kill()  # SIGKILL, with frames in flight
            for _ in range(500):  # emitted while the relay is down
                em.emit("epoch_end", {"epoch": total, "i": total})
                total += 1
            relay.start()
        assert em.flush(20), em.stats
        assert em.stats["reconnects"] >= 2
        assert_exactly_once(stored_events(relay, "crash"), total)
    finally:
        relay.stop()


def test_overflow_spills_to_spool_and_everything_arrives(tmp_path, make_emitter):
    port = free_port()
    spool = tmp_path / "spool"
    em = make_emitter(f"ws://127.0.0.1:{port}", run_id="spill", max_buffer=100)
    for i in range(3000):
        em.emit("client_progress", {"round": 0, "client_id": 3, "i": i})
    wait_until(lambda: em.stats["queued"] == 0 and em.stats["spooled"] >= 2900, 10, what="spill")
    assert spooled_count(spool) >= 2900
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        assert em.flush(20), em.stats
        events = stored_events(relay, "spill")
        assert_exactly_once(events, 3000)
        assert [e["data"]["i"] for e in events] == list(range(3000))  # in order, disk then memory
        assert em.close(5)
        assert spooled_count(spool) == 0
        assert list(spool.iterdir()) == []
    finally:
        relay.stop()


def test_next_emitter_delivers_a_dead_emitters_spool(tmp_path, make_emitter):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    old = make_emitter(url, run_id="handover")
    for i in range(300):
        old.emit("status", {"message": "old", "i": i})
    assert old.close(timeout=0.5) is False
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        new = make_emitter(url, run_id="handover")
        new.emit("status", {"message": "new", "i": 300})
        assert new.flush(10)
        wait_until(lambda: len(stored_events(relay, "handover")) == 301, 15, what="the old spool")
        events = stored_events(relay, "handover")
        assert_exactly_once(events, 301)
        assert {e["producer"] for e in events} == {old.producer, new.producer}
        wait_until(lambda: new.stats["resumed"] == 300, 5, what="resume stats")
        assert new.close(5)
        assert spooled_count(spool) == 0
    finally:
        relay.stop()


def test_sync_leaves_a_running_emitters_spool_alone(tmp_path, make_emitter):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    live = make_emitter(url, run_id="locked", max_buffer=10)
    for i in range(200):
        live.emit("status", {"message": "live", "i": i})
    wait_until(lambda: spooled_count(spool) >= 150, 10, what="spill")
    busy = run_sync("--url", url, "--spool-dir", str(spool))
    assert busy.returncode == 1
    assert "in use by running emitters" in busy.stderr
    assert spooled_count(spool) >= 150
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        assert live.flush(15)  # the owner delivers its own spool
        assert live.close(5)
        assert run_sync("--url", url, "--spool-dir", str(spool)).returncode == 0
        assert_exactly_once(stored_events(relay, "locked"), 200)
    finally:
        relay.stop()


def test_publish_token_from_the_environment(tmp_path, relay_factory, make_emitter, monkeypatch):
    relay = relay_factory("--publish-token", "s3cret")
    monkeypatch.setenv("FEDRELAY_PUBLISH_TOKEN", "s3cret")
    em = make_emitter(relay.url + "/publish", run_id="token")
    em.emit("status", {"message": "authorized"})
    assert em.flush(10)
    assert stored_events(relay, "token")[0]["data"] == {"message": "authorized"}


def test_a_spool_left_after_the_first_session_is_delivered_at_close(tmp_path, make_emitter):
    """A process that died after this emitter's first look at the spool dir (Ray ends a
    simulation's actors before the driver exits) is not left for `fedrelay sync`: the emitter's
    close() delivers it while the relay is reachable."""
    relay = RelayProcess(tmp_path / "relay.db").start()
    try:
        driver = make_emitter(relay.url, run_id="late-orphan")
        driver.emit("status", {"message": "driver", "i": 0})
        assert driver.flush(10)
        # The first session's orphan pass is over (nothing to find) before the actor's spool exists.
        wait_until(lambda: driver._resumer is not None and not driver._resumer.is_alive(), 10)
        dead_port = free_port()
        actor = make_emitter(f"ws://127.0.0.1:{dead_port}", run_id="late-orphan", producer="actor")
        for i in range(1, 51):
            actor.emit("status", {"message": "actor", "i": i})
        assert actor.close(timeout=0.5) is False  # a relay it never reached: all spooled
        spool = tmp_path / "spool"
        assert spooled_count(spool) == 50
        # Re-aim the dead actor's spool at the live relay, as if it had lost its connection to it.
        for meta in spool.glob("*/meta.json"):
            meta.write_text(meta.read_text().replace(f":{dead_port}", f":{relay.port}"))
        assert driver.close(10)
        assert_exactly_once(stored_events(relay, "late-orphan"), 51)
        assert spooled_count(spool) == 0
    finally:
        relay.stop()
