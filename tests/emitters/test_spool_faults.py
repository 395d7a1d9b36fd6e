"""The spool and the sender when things go wrong: damaged segments, crashes, full disks, races."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import threading

import pytest

from fedrelay.emitters.sync import sync_spool
from tests.support.cutting_proxy import CuttingProxy
from tests.support.relay_process import RelayProcess, free_port
from tests.support.spool import spooled_count
from tests.support.stored import stored_events
from tests.support.waiting import wait_until


def segment_ids(path) -> set[int]:
    first, last, _ = (int(part) for part in path.name.split(".")[0].split("-"))
    return set(range(first, last + 1))


def test_unreadable_segments_are_set_aside_and_the_rest_delivered(tmp_path, make_emitter):
    """A missing, an empty and a truncated segment of a live emitter: 3 counted, the rest sent."""
    port = free_port()
    spool = tmp_path / "spool"
    em = make_emitter(f"ws://127.0.0.1:{port}", run_id="bad-seg", max_buffer=100, batch_size=50)
    for i in range(1000):
        em.emit("status", {"message": "m", "i": i})
    wait_until(lambda: em.stats["queued"] == 0 and em.stats["spooled"] >= 900, 10, what="spill")
    segments = [p for p in sorted(spool.glob("*/*.seg")) if len(segment_ids(p)) >= 10]
    assert len(segments) >= 10
    missing, empty, cut = segments[1], segments[3], segments[5]
    lost = segment_ids(missing) | segment_ids(empty) | segment_ids(cut)
    missing.unlink()
    empty.write_bytes(b"")  # what a power loss leaves of a renamed, never fsynced file
    data = cut.read_bytes()
    cut.write_bytes(data[: data.rindex(b"\n", 0, len(data) // 2) + 5])  # cut mid-line
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        assert em.flush(10), em.stats
        stats = em.stats
        assert stats["bad_segments"] == 3
        assert stats["reconnects"] == 0  # no session was lost over it
        events = stored_events(relay, "bad-seg")
        expected = sorted(set(range(1, 1001)) - lost)
        assert [e["id"] for e in events] == expected  # in order, once each
        assert [e["data"]["i"] for e in events] == [i - 1 for i in expected]
        assert sorted(p.name for p in spool.glob("*/*.seg.bad")) == sorted(
            [empty.name + ".bad", cut.name + ".bad"]
        )
        assert em.close(5)
    finally:
        relay.stop()


def test_sync_skips_an_empty_segment_and_delivers_the_rest(tmp_path, make_emitter):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    em = make_emitter(url, run_id="power-loss", batch_size=100)
    for i in range(500):
        em.emit("status", {"message": "m", "i": i})
    assert em.close(timeout=0.3) is False
    segments = sorted(spool.glob("*/*.seg"))
    assert len(segments) == 5
    segments[0].write_bytes(b"")
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        report = sync_spool(url, spool, timeout=5)
        assert report.ok, report
        assert (report.delivered, report.bad_segments, report.remaining) == (400, 1, 0)
        events = stored_events(relay, "power-loss")
        assert [e["id"] for e in events] == list(range(101, 501))
        assert spooled_count(spool) == 0
    finally:
        relay.stop()


MAX_BACKOFF = 1.6
"""Large enough that the schedule doubles four times before the cap: 0.1, 0.2, 0.4, 0.8, 1.6 s."""


def backoff_floor(failures: int) -> float:
    """The shortest wait after ``failures`` failures in a row that docs/emitters.md allows:
    min(max_backoff, 0.1 * 2**(failures - 1)), jittered by a factor in [0.5, 1.0]."""
    return 0.5 * min(MAX_BACKOFF, 0.1 * 2 ** (failures - 1))


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param("accept", id="connections-fail"),
        pytest.param("hello", id="sessions-fail"),
    ],
)
def test_reconnects_back_off_on_the_documented_schedule(relay, make_emitter, cut):
    """Every connection is cut: at once (the relay looks down), or right after the relay's hello
    (a flaky proxy). The gap before each new attempt is at least the schedule's lower bound for
    that many failures in a row, so it grows until the cap: no reconnect spin, and no backoff
    capped short of the schedule. Only lower bounds are checked: load only lengthens gaps.

    The one event is one the relay refuses (``round`` is not an integer): nothing is stored, so
    no ``hello`` reports progress and every session counts as one more failure in a row."""
    proxy = CuttingProxy(relay.port, cut=cut)
    attempts = 6
    try:
        em = make_emitter(proxy.url, run_id="spin", max_backoff=MAX_BACKOFF)
        em.emit("round_end", {"round": "not a number"})
        wait_until(lambda: len(proxy.accepted) >= attempts, 30, what=f"{attempts} connection attempts")
    finally:
        proxy.close()
    times = proxy.accepted[:attempts]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    floors = [backoff_floor(n) for n in range(1, attempts)]
    short = [(n, round(gap, 3), floor) for n, (gap, floor) in enumerate(zip(gaps, floors, strict=True), 1)]
    assert all(gap >= floor for _, gap, floor in short), f"(failures, gap s, floor s): {short}"
    assert proxy.cuts >= attempts - 1  # each attempt before the last was cut
    assert relay.get("/api/runs/spin")[0] == 404  # refused, so nothing counted as progress


CRASHING_PRODUCER = textwrap.dedent(
    """
    import sys
    from fedrelay.emitters import Emitter
    from fedrelay.emitters.spool import Spool

    Spool.remove = lambda self, segments: None  # as if killed after the relay stored, before the ack trimmed
    url, spool = sys.argv[1], sys.argv[2]
    em = Emitter(url, run_id="crash-dup", producer="trainer-x", spool_dir=spool, max_backoff=0.2)
    for i in range(20):
        em.emit("status", {"message": "m", "i": i})
    assert em.persist(10)  # relay down: all 20 on disk, nothing sent yet
    print("spooled", flush=True)
    assert em.flush(30)  # the relay is up: sent from the spool and stored
    print("acked", flush=True)
    sys.stdin.read()  # until kill -9
    """
)


def test_explicit_name_spool_is_not_delivered_twice_after_kill_9(tmp_path):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PRODUCER, url, str(spool)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    relay = None
    try:
        assert child.stdout.readline().strip() == "spooled"
        relay = RelayProcess(tmp_path / "relay.db", port=port).start()
        assert child.stdout.readline().strip() == "acked"
        child.kill()
        child.wait(10)
        assert len(stored_events(relay, "crash-dup")) == 20
        assert spooled_count(spool) == 20  # the dead producer's spool, ids the relay already has

        report = sync_spool(url, spool, timeout=10)
        assert report.ok, report
        events = stored_events(relay, "crash-dup")
        assert [(e["producer"], e["id"]) for e in events] == [("trainer-x", i) for i in range(1, 21)]
        assert spooled_count(spool) == 0
    finally:
        child.kill()
        child.wait(10)
        if relay is not None:
            relay.stop()


def test_emit_racing_close_restarts_cleanly(tmp_path, make_emitter):
    """emit() from another thread the moment close() marks the emitter closed."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    runs = [f"race{n}" for n in range(3)]
    for run in runs:
        em = make_emitter(url, run_id=run, max_backoff=0.2)
        for i in range(2000):
            em.emit("status", {"message": "before", "i": i})
        ready = threading.Event()

        def racer(em=em, ready=ready) -> None:
            ready.set()
            while not em._closed:  # the closer just flipped it: emit right now
                pass
            for i in range(2000, 2100):
                em.emit("status", {"message": "after", "i": i})

        thread = threading.Thread(target=racer)
        thread.start()
        ready.wait(5)
        assert em.close(timeout=0.2) is False
        thread.join(10)
        assert em.stats["errors"] == 0
        assert em.close(timeout=0.2) is False  # the restarted sender spools its own events
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        report = sync_spool(url, spool, timeout=10)
        assert report.ok, report  # in particular no spool still locked by a leaked fd
        for run in runs:
            events = stored_events(relay, run)
            assert sorted(e["data"]["i"] for e in events) == list(range(2100)), run
            for producer in {e["producer"] for e in events}:
                ids = [e["id"] for e in events if e["producer"] == producer]
                assert ids == list(range(1, len(ids) + 1)), (run, producer)
        assert spooled_count(spool) == 0
    finally:
        relay.stop()


DISK_FULL_PRODUCER = textwrap.dedent(
    """
    import json, resource, signal, sys, threading
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # meta.json fits, no segment does
    from fedrelay.emitters import Emitter

    em = Emitter(sys.argv[1], run_id="disk-full", spool_dir=sys.argv[2], max_buffer=100, max_backoff=0.2)
    for i in range(20000):
        em.emit("status", {"message": "m" * 50, "i": i})
    idle = threading.Event()
    while em.stats["queued"]:
        idle.wait(0.01)
    core = em._sender.core
    print(json.dumps({**em.stats, "in_memory": len(core.inflight) + len(core.unsent)}), flush=True)
    sys.stdin.readline()  # the relay is up now
    print(json.dumps({"flushed": em.flush(10)}), flush=True)
    em.close(2)
    """
)


def test_disk_full_keeps_memory_bounded_and_drops_the_oldest(tmp_path):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    child = subprocess.Popen(
        [sys.executable, "-c", DISK_FULL_PRODUCER, url, str(tmp_path / "spool")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    relay = None
    try:
        stats = json.loads(child.stdout.readline())
        assert stats["in_memory"] == 100
        assert stats["dropped"] == 19900
        assert stats["spooled"] == 0
        assert 1 <= stats["errors"] <= 30  # retried about once a second, not per event
        relay = RelayProcess(tmp_path / "relay.db", port=port).start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline()) == {"flushed": True}
        child.wait(20)
        events = stored_events(relay, "disk-full")
        assert [e["data"]["i"] for e in events] == list(range(19900, 20000))
    finally:
        child.kill()
        child.wait(10)
        if relay is not None:
            relay.stop()


def test_no_usable_spool_dir_follows_the_same_policy(tmp_path, make_emitter):
    port = free_port()
    (tmp_path / "a-file").write_text("not a directory")
    em = make_emitter(
        f"ws://127.0.0.1:{port}", run_id="no-spool", max_buffer=100, spool_dir=tmp_path / "a-file" / "spool"
    )
    for i in range(1000):
        em.emit("status", {"message": "m", "i": i})
    wait_until(lambda: em.stats["queued"] == 0 and em.stats["dropped"] == 900, 10, what="drops")
    assert em.persist(2) is False  # 100 events only in memory
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        assert em.flush(10), em.stats
        assert [e["data"]["i"] for e in stored_events(relay, "no-spool")] == list(range(900, 1000))
        assert em.stats["dropped"] == 900
    finally:
        relay.stop()


def test_nested_metrics_mutated_after_emit_are_sent_as_emitted(relay, make_emitter):
    em = make_emitter(relay.url, run_id="nested")
    metrics: dict[str, float] = {}
    seen: list[int] = []
    for epoch in range(300):
        metrics["loss"] = 1.0 / (epoch + 1)
        metrics[f"m{epoch}"] = epoch  # grows: "dictionary changed size" in the sender, unless copied
        seen.append(epoch)
        em.emit("epoch_end", {"epoch": epoch, "metrics": metrics, "config": {"seen": seen}})
    assert em.flush(10)
    events = stored_events(relay, "nested")
    assert [e["data"]["epoch"] for e in events] == list(range(300))
    for event in events:
        epoch = event["data"]["epoch"]
        assert event["data"]["metrics"]["loss"] == 1.0 / (epoch + 1)
        assert len(event["data"]["metrics"]) == epoch + 2
        assert len(event["data"]["config"]["seen"]) >= epoch + 1  # two levels down: not copied
    assert em.stats["errors"] == 0


def test_persist_spools_everything_unacked_then_delivers_it(tmp_path, make_emitter):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    em = make_emitter(url, run_id="persist")
    assert em.persist(1) is True  # nothing emitted: nothing to do
    for i in range(50):
        em.emit("status", {"message": "m", "i": i})
    assert em.persist(5) is True
    assert spooled_count(spool) == 50 and em.stats["spooled"] == 50
    meta = json.loads((spool / em.producer / "meta.json").read_text())
    assert meta["producer"] == em.producer and meta["run_id"] == "persist"
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    try:
        assert em.flush(10), em.stats
        assert spooled_count(spool) == 0  # acked: trimmed
        assert [e["data"]["i"] for e in stored_events(relay, "persist")] == list(range(50))
        em.emit("status", {"message": "m", "i": 50})
        assert em.flush(10)
        assert em.persist(2) is True  # everything acked: nothing left only in memory
        assert spooled_count(spool) == 0
        assert em.close(5)
    finally:
        relay.stop()
