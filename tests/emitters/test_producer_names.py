"""Protocol decisions A and B, emitter side, against a small real WebSocket peer that speaks them
(``tests/support/publish_peer.py``): a name in use, a name in conflict, the holding report."""

from __future__ import annotations

import threading

import pytest
from websockets.sync.client import connect

from fedrelay.emitters import Emitter
from fedrelay.emitters.sync import sync_spool
from tests.support.publish_peer import PublishPeer
from tests.support.relay_process import free_port
from tests.support.waiting import wait_until


@pytest.fixture
def peer():
    made: list[PublishPeer] = []

    def make(**kwargs) -> PublishPeer:
        made.append(PublishPeer(**kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def ids(peer: PublishPeer, producer: str) -> list[int]:
    return [i for _, i in peer.stored(producer)]


def test_a_name_held_by_another_live_connection_is_left_at_once_when_we_never_sent_under_it(
    peer, make_emitter
):
    relay = peer()
    with connect(f"{relay.url}/publish?producer=shared") as holder:  # another emitter, alive
        holder.recv(timeout=5)
        em = make_emitter(relay.url, run_id="a1", producer="shared")
        for i in range(10):
            em.emit("status", {"i": i})
        assert em.flush(10), em.stats
        assert em.producer.startswith("shared-") and em.stats["renamed"] == 1
        assert relay.refused == [("shared", "producer_in_use")]  # one refusal: no retry under it
        assert ids(relay, em.producer) == list(range(1, 11)) and ids(relay, "shared") == []


def test_our_own_connection_not_yet_noticed_dead_keeps_the_name_until_stale_after(peer, make_emitter):
    relay = peer(stale_after=1.5)
    em = make_emitter(relay.url, run_id="a1", producer="trainer", max_backoff=0.3)
    for i in range(5):
        em.emit("status", {"i": i})
    assert em.flush(10)
    relay.cut("trainer")  # the relay still believes the connection open for 1.5 s
    for i in range(5, 10):
        em.emit("status", {"i": i})
    assert em.flush(20), em.stats
    assert em.producer == "trainer" and em.stats["renamed"] == 0
    assert len(relay.refused) >= 2  # retried under its own name with backoff, then welcomed back
    assert ids(relay, "trainer") == list(range(1, 11))


def test_in_use_past_stale_after_means_someone_else_has_the_name(peer, make_emitter):
    relay = peer(stale_after=0.5)
    em = make_emitter(relay.url, run_id="a1", producer="trainer", max_backoff=0.2)
    em.emit("status", {"i": 0})
    assert em.flush(10)
    relay.cut("trainer")
    relay.hold("trainer")  # another emitter took the name meanwhile
    for i in range(1, 4):
        em.emit("status", {"i": i})
    assert em.flush(20), em.stats
    assert em.producer.startswith("trainer-") and em.stats["renamed"] == 1
    assert len(relay.refused) >= 2  # first retried under its own name, for stale_after
    assert ids(relay, "trainer") == [1] and ids(relay, em.producer) == [2, 3, 4]


def test_a_conflict_resends_the_rest_under_a_fresh_name_and_stores_each_event_once(peer, make_emitter):
    relay = peer(conflict_at={"trainer": 4})
    em = make_emitter(relay.url, run_id="a2", producer="trainer")
    for i in range(10):
        em.emit("status", {"i": i})
    assert em.flush(10), em.stats
    assert relay.refused == [("trainer", "producer_conflict")]
    assert em.producer.startswith("trainer-") and em.stats["renamed"] == 1 and em.stats["refused"] == 0
    assert ids(relay, "trainer") == [1, 2, 3]
    assert ids(relay, em.producer) == list(range(4, 11))
    stored = sorted(e["data"]["i"] for e in relay.events.values())
    assert stored == list(range(10))


def test_holding_is_reported_first_to_a_relay_that_accepts_it(tmp_path, peer, make_emitter):
    port = free_port()
    em = make_emitter(f"ws://127.0.0.1:{port}", run_id="b1", max_buffer=10)
    for i in range(25):
        em.emit("status", {"i": i}, run_id="b1" if i % 5 else "b2")
    assert em.persist(5)  # relay down: all 25 on disk
    relay = peer(port=port, accepts=("holding", "something-later"))
    assert em.flush(20), em.stats
    (holding,) = relay.holdings
    assert holding == (
        em.producer,
        {"op": "holding", "runs": {"b1": {"count": 20, "upto": 25}, "b2": {"count": 5, "upto": 21}}},
    )
    assert relay.first_frames[0] == holding  # before any event
    assert len(relay.stored(em.producer)) == 25


def test_no_holding_for_a_relay_that_does_not_accept_it_or_when_nothing_is_held(peer, make_emitter):
    relay = peer()
    em = make_emitter(relay.url, run_id="b3")
    em.emit("status", {"i": 0})
    assert em.flush(10)
    assert relay.holdings == [] and isinstance(relay.first_frames[0][1], list)
    accepting = peer(accepts=("holding",), stale_after=0.0)
    quiet = make_emitter(accepting.url, run_id="b3", max_backoff=0.2)
    quiet.emit("status", {"i": 0})
    assert quiet.flush(10)
    before = len(accepting.holdings)  # 1 if the event was queued before the first hello
    accepting.cut(quiet.producer)
    wait_until(lambda: quiet.stats["reconnects"] >= 1, 10, what="a new session")
    assert len(accepting.holdings) == before  # everything acked: nothing to report


def test_an_adopted_spool_reports_what_it_is_about_to_deliver(tmp_path, peer, make_emitter):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    dead = make_emitter(url, run_id="b4")
    for i in range(7):
        dead.emit("status", {"i": i})
    assert dead.close(0.2) is False  # relay down: spooled, left for sync
    relay = peer(port=port, accepts=("holding",))
    report = sync_spool(url, tmp_path / "spool", timeout=10)
    assert report.ok, report
    assert relay.holdings == [(dead.producer, {"op": "holding", "runs": {"b4": {"count": 7, "upto": 7}}})]
    assert ids(relay, dead.producer) == list(range(1, 8))


def test_two_emitters_one_name_concurrently_store_everything_once(peer, tmp_path):
    """Decision A end to end on the emitter side: two emitters told to use one name."""
    relay = peer()
    emitters = [
        Emitter(
            relay.url,
            run_id="a3",
            producer="flower-client",
            spool_dir=tmp_path / f"spool{n}",
            max_backoff=0.2,
        )
        for n in range(2)
    ]
    try:
        start = threading.Barrier(2)

        def work(em: Emitter, n: int) -> None:
            start.wait()
            for i in range(300):
                em.emit("status", {"who": n, "i": i})

        threads = [threading.Thread(target=work, args=(em, n)) for n, em in enumerate(emitters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(em.flush(20) for em in emitters), [em.stats for em in emitters]
        names = {em.producer for em in emitters}
        assert len(names) == 2 and "flower-client" in names
        stored = sorted((e["data"]["who"], e["data"]["i"]) for e in relay.events.values())
        assert stored == sorted((n, i) for n in range(2) for i in range(300))
    finally:
        for em in emitters:
            em.close(1)
