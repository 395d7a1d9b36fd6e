"""Events reach a real relay in order, once each, stamped; bad input never raises."""

from __future__ import annotations

import math
import threading
from datetime import datetime

import pytest

from tests.support.relay_process import RelayProcess, free_port
from tests.support.stored import stored_events
from tests.support.waiting import wait_until


@pytest.fixture
def relay(backend_relay):
    """Each test that takes ``relay`` on both backends: one SQLite relay, one PostgreSQL relay."""
    return backend_relay


def test_events_arrive_in_order_exactly_once_with_ids_and_timestamps(relay, make_emitter):
    em = make_emitter(relay.url, run_id="order", role="server")
    for i in range(2500):
        em.emit("round_start", {"round": i, "total_rounds": 2500})
    assert em.flush(15)
    events = stored_events(relay, "order")
    assert [e["data"]["round"] for e in events] == list(range(2500))
    assert [e["id"] for e in events] == list(range(1, 2501))
    assert [e["seq"] for e in events] == list(range(1, 2501))
    assert {e["producer"] for e in events} == {em.producer}
    assert events[0]["source"] == {"role": "server", "client_id": None}
    stamps = [datetime.fromisoformat(e["timestamp"]) for e in events]
    assert all(ts.tzinfo is not None for ts in stamps)
    assert stamps == sorted(stamps)
    stats = em.stats
    assert stats["emitted"] == stats["acked"] == 2500
    assert stats["frames"] < 2500  # batched
    assert em.close(5)


def test_emit_never_raises_on_bad_input_and_counts_it(relay, make_emitter):
    em = make_emitter(relay.url, run_id="bad-input")
    em.emit("no_such_type", {"x": 1})
    em.emit("status", ["not", "a", "dict"])
    em.emit("status", {"message": "hi"}, run_id="spaces are not allowed")
    em.emit("status", {"message": "hi"}, run_id="x" * 129)
    em.emit("status", {"message": "hi"}, role="janitor")
    em.emit({"unhashable": 1}, {})  # type: ignore[arg-type]
    em.emit("epoch_end", {"epoch": 1, "metrics": {"loss": math.nan, "acc": math.inf, "f1": 0.5}})
    em.emit("epoch_end", {"epoch": 2, "metrics": {"loss": -math.inf}, "extra": [math.nan, 1.0]})
    em.emit("round_start", {"round": "three"})  # the relay refuses it; still acked
    em.emit("status", {"message": "last"}, run_id=7)
    assert em.flush(10)
    stats = em.stats
    assert stats["invalid"] == 5
    assert stats["errors"] == 1
    assert stats["non_finite"] == 4
    assert stats["emitted"] == 4
    wait_until(lambda: em.stats["refused"] == 1, 5, what="the relay's error frame")
    events = stored_events(relay, "bad-input")
    assert [e["data"]["epoch"] for e in events] == [1, 2]
    assert events[0]["data"]["metrics"] == {"loss": None, "acc": None, "f1": 0.5}
    assert events[1]["data"]["extra"] == [None, 1.0]
    assert stored_events(relay, "7")[0]["data"] == {"message": "last"}


def test_data_dict_is_copied_at_emit(relay, make_emitter):
    em = make_emitter(relay.url, run_id="copy")
    metrics = {"round": 1, "loss": 0.5}
    em.emit("round_start", metrics)
    metrics["round"] = 2  # a trainer reusing its dict
    assert em.flush(10)
    assert stored_events(relay, "copy")[0]["data"] == {"round": 1, "loss": 0.5}


def test_several_threads_emit_concurrently(relay, make_emitter):
    em = make_emitter(relay.url, run_id="threads")
    per_thread, threads = 600, 4
    start = threading.Barrier(threads)

    def work(client: int) -> None:
        start.wait()
        for i in range(per_thread):
            em.emit("client_progress", {"round": 1, "client_id": client, "local_epoch": i}, client_id=client)

    workers = [threading.Thread(target=work, args=(c,)) for c in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert em.flush(15)
    events = stored_events(relay, "threads")
    assert len(events) == per_thread * threads
    assert sorted(e["id"] for e in events) == list(range(1, per_thread * threads + 1))
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    for client in range(threads):
        mine = [e["data"]["local_epoch"] for e in events if e["source"]["client_id"] == client]
        assert mine == list(range(per_thread))


def test_explicit_producer_name_reused_is_not_dropped_as_duplicates(relay, make_emitter):
    first = make_emitter(relay.url, run_id="reuse", producer="trainer-a")
    for i in range(5):
        first.emit("epoch_end", {"epoch": i})
    assert first.close(10)
    second = make_emitter(relay.url, run_id="reuse", producer="trainer-a")
    for i in range(5, 10):
        second.emit("epoch_end", {"epoch": i})
    assert second.flush(10)
    assert second.stats["renamed"] == 1
    assert second.producer.startswith("trainer-a-")
    events = stored_events(relay, "reuse")
    assert [e["data"]["epoch"] for e in events] == list(range(10))
    assert [e["producer"] for e in events] == ["trainer-a"] * 5 + [second.producer] * 5


def test_frames_fit_the_relays_limits_and_an_oversize_event_arrives_as_an_error(relay_factory, make_emitter):
    """The relay's hello names its limits; an event over them becomes an error event with its id."""
    relay = relay_factory("--max-frame-bytes", "4096", "--max-events-per-frame", "5")
    em = make_emitter(relay.url, run_id="limits", role="client", client_id=3)
    for i in range(100):
        em.emit("status", {"message": "x" * 100, "i": i})
    em.emit("status", {"message": "y" * 20_000})  # over 4x the limit: the relay would close on it
    em.emit("status", {"message": "after"})
    assert em.flush(20), em.stats
    em.emit("status", {"message": "z" * 3_000})  # fits a frame, not the relay's stored-event limit
    em.emit("status", {"message": "last"})
    assert em.flush(20), em.stats
    stats = em.stats
    assert (stats["invalid"], stats["refused"], stats["reconnects"]) == (2, 0, 0)
    events = stored_events(relay, "limits")
    assert [e["id"] for e in events] == list(range(1, 105))
    assert [e["type"] for e in events[99:]] == ["status", "error", "status", "error", "status"]
    for stand_in, size in ((events[100], 20_000), (events[102], 3_000)):
        message = stand_in["data"]["message"]
        assert "status event was dropped" in message and "limit of 2048 bytes per event" in message
        assert int(message.split(": ")[1].split(" bytes")[0]) > size
        assert stand_in["timestamp"] and stand_in["source"] == {"role": "client", "client_id": 3}
    assert [e["data"]["message"] for e in (events[101], events[103])] == ["after", "last"]


def test_a_spooled_oversize_event_counts_once_and_frames_follow_the_relays_limits(tmp_path, make_emitter):
    """Spooled under the emitter's own limits, sent to a relay with smaller ones, then to one
    restarted with the defaults: frames shrink, then grow back."""
    port = free_port()
    em = make_emitter(f"ws://127.0.0.1:{port}", run_id="spooled-limits", max_buffer=50, batch_size=100)
    em.emit("status", {"message": "y" * 20_000})  # the oldest: spooled
    for i in range(200):
        em.emit("status", {"message": "x" * 100, "i": i})
    wait_until(lambda: em.stats["spooled"] >= 150, 10, what="events spooled while the relay is down")
    small = RelayProcess(
        tmp_path / "relay.db", port=port, args=["--max-frame-bytes", "4096", "--max-events-per-frame", "5"]
    ).start()
    try:
        assert em.flush(30), em.stats
        assert (em.stats["invalid"], em.stats["refused"]) == (1, 0)  # fitted at every read, counted once
        frames_before = em.stats["frames"]
        assert frames_before >= 200 / 5
        reconnects = em.stats["reconnects"]
    finally:
        small.stop()
    events = None
    default = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        wait_until(lambda: em.stats["reconnects"] > reconnects, 15, what="a session with the restarted relay")
        for i in range(500):
            em.emit("status", {"message": "z", "i": i})
        assert em.flush(30), em.stats
        assert em.stats["frames"] - frames_before < 500 / 5  # batches above the old relay's 5 again
        events = stored_events(default, "spooled-limits")
    finally:
        default.stop()
    assert [e["id"] for e in events] == list(range(1, 702))
    assert events[0]["type"] == "error" and "20" in events[0]["data"]["message"]
    assert {e["type"] for e in events[1:]} == {"status"}
