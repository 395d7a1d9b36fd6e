"""A relay that cannot be reached never slows training: not in a fresh process either.

Each process here is a new Python interpreter, as Flower's Deployment Engine starts one per
message. The relay is either a closed port or a blackhole (connects hang: a host that drops
packets). A wait that should not happen would last a minute (``connect_timeout``,
``reach_timeout`` and ``settle``'s timeout are set that long), so the subprocess timeouts below
catch it without asserting durations; the child reports why its wait stopped (``silent``: no TCP
connect answered within ``connect_budget``; ``unreachable``: known down, the mark).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.blackhole import Blackhole
from tests.support.relay_process import RelayProcess, free_port
from tests.support.spool import spooled_count
from tests.support.stored import stored_events
from tests.support.waiting import wait_until

CHILD = textwrap.dedent(
    """
    import json, sys
    from fedrelay.emitters import Emitter

    url, spool, reach_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    em = Emitter(url, run_id="reach", spool_dir=spool, connect_timeout=60, close_timeout=60,
                 reach_timeout=reach_timeout, max_backoff=60)
    for i in range(5):
        em.emit("status", {"message": "m", "i": i})
    result = {"settled": em.settle(60), "spooled": em.stats["spooled"], "producer": em.producer,
              "why": em._sender.stopped_waiting}
    print(json.dumps(result), flush=True)
    # exit: close() at exit must not wait for the relay either
    """
)


def child(url: str, spool, reach_timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(spool), str(reach_timeout)],
        capture_output=True,
        text=True,
        timeout=30,  # a wait for the relay would last 60 s
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def blackhole():
    hole = Blackhole()
    yield hole
    hole.close()


def mark_of(spool, port: int):
    return spool / f".reach-ws-127.0.0.1-{port}"


def test_a_blackholed_relay_costs_a_fresh_process_the_connect_budget_and_the_next_nothing(
    blackhole, tmp_path, make_emitter
):
    spool = tmp_path / "spool"
    # reach_timeout is 60 s: only the connect budget (10 ms) can end this wait in time
    first = child(blackhole.url, spool, reach_timeout=60)
    assert first == {"settled": False, "spooled": 5, "producer": first["producer"], "why": "silent"}
    assert mark_of(spool, blackhole.port).exists(), "the next processes need not even dial"
    for _ in range(2):
        later = child(blackhole.url, spool, reach_timeout=60)
        assert (later["settled"], later["why"]) == (False, "unreachable")
    assert spooled_count(spool) == 15  # nothing lost: all on disk for a later process or sync

    port = blackhole.port
    blackhole.close()  # the host answers again: a relay on the same address
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        em = make_emitter(f"ws://127.0.0.1:{port}", run_id="reach")
        em.emit("status", {"message": "back", "i": 5})  # read the mark: no wait until it connects
        wait_until(lambda: not mark_of(spool, port).exists(), 10, what="the mark removed")
        assert em.settle(10) is True
        wait_until(lambda: len(stored_events(relay, "reach")) == 16, 15, what="the spools delivered later")
    finally:
        relay.stop()


def test_a_relay_that_is_up_is_waited_for_in_a_fresh_process(tmp_path, relay):
    result = child(relay.url, tmp_path / "spool", reach_timeout=60)
    assert (result["settled"], result["spooled"], result["why"]) == (True, 0, None)
    assert len(stored_events(relay, "reach")) == 5, "acked before settle() returned"


def test_with_several_addresses_a_silent_one_stops_waits_but_marks_nothing(blackhole, tmp_path, relay):
    spool = tmp_path / "spool"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, f"{blackhole.url},{relay.url}", str(spool), "60"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["settled"], result["why"]) == (False, "silent")
    assert not list(spool.glob(".reach-*")), "the relay's other address may answer: no mark"
    assert spooled_count(spool) == 5


def test_a_closed_port_is_known_unreachable_after_the_first_failed_connect(tmp_path):
    spool = tmp_path / "spool"
    port = free_port()
    result = child(f"ws://127.0.0.1:{port}", spool, reach_timeout=60)  # refused in microseconds
    assert result["settled"] is False and result["spooled"] == 5
    assert mark_of(spool, port).exists()


def test_the_first_emitter_that_connects_clears_the_mark_and_delivers_what_waited(tmp_path, make_emitter):
    spool = tmp_path / "spool"
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    child(url, spool, reach_timeout=60)
    assert mark_of(spool, port).exists()
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        em = make_emitter(url, run_id="reach")
        em.emit("status", {"message": "back", "i": 5})
        wait_until(lambda: not mark_of(spool, port).exists(), 10, what="the mark removed")
        assert em.settle(10) is True
        wait_until(lambda: len(stored_events(relay, "reach")) == 6, 15, what="the dead process's spool")
        assert sorted(e["data"]["i"] for e in stored_events(relay, "reach")) == list(range(6))
    finally:
        relay.stop()


def test_settle_spools_without_waiting_for_the_disk_and_the_sender_syncs_soon_after(tmp_path, make_emitter):
    em = make_emitter(f"ws://127.0.0.1:{free_port()}", run_id="sync-later", max_backoff=0.2)
    em.emit("status", {"message": "m", "i": 0})
    wait_until(lambda: em.last_error, 10, what="a failed connect")
    assert em.settle(5) is False
    assert spooled_count(tmp_path / "spool") == 1  # renamed into place: survives the process
    spool = em._sender.spool
    wait_until(lambda: not spool.unsynced, 10, what="the sender's fsync")  # and a power loss, soon
