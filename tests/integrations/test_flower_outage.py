"""Issue 3's outage criteria with a real Flower simulation (Ray) and real relay processes.

1. Relay down for the whole run: the demo trains to the same result as with a relay, its events
   wait in the spool, and ``fedrelay sync`` (run twice) stores each of them exactly once.
2. Relay SIGKILLed after round 1 and restarted on the same database and port: a subscriber that
   resumes from its last seq ends with every event exactly once, in order, as stored.

Every demo subprocess has its own spool dir (``demo_env``), so nothing leaks between runs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.support.clients import ResumingSubscriber
from tests.support.demo import TINY, final_metrics, run_demo, run_demo_without_relay, run_sync
from tests.support.relay_process import RelayProcess, free_port
from tests.support.spool import spooled_count
from tests.support.stored import assert_gap_free, of_type, run_status, stored_events
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)

ROUNDS, CLIENTS = 2, 2
ARGS = ["--rounds", str(ROUNDS), "--clients", str(CLIENTS), "--seed", "7", *TINY]
PER_CLIENT_ROUND = 5
"""client_progress started (train, evaluate), client_progress local_epoch 1, client_complete x2."""
TOTAL = 3 + ROUNDS * (2 + CLIENTS * PER_CLIENT_ROUND)
"""training_start, status (round 0 evaluation), training_end, and per round round_start, round_end
and the clients' events."""


def assert_complete_run(events: list[dict[str, Any]]) -> str:
    """Every event of one demo run exactly once; returns the run id.

    Seq order is the relay's arrival order: across producers (server, Ray actors) it need not be
    the order of emission when delivery was delayed, so order is checked per producer.
    """
    assert len(events) == TOTAL, Counter(e["type"] for e in events)
    (run_id,) = {e["run_id"] for e in events}
    assert_gap_free(events)
    keys = [(e["producer"], e["id"]) for e in events]
    assert len(set(keys)) == TOTAL, [k for k, n in Counter(keys).items() if n > 1]
    for producer in {p for p, _ in keys}:
        ids = [i for p, i in keys if p == producer]
        assert ids == sorted(ids), producer  # each emitter's events arrive in emission order

    server = [e for e in events if e["source"]["role"] == "server"]
    assert [(e["type"], e["data"].get("round")) for e in server] == [
        ("training_start", None),
        ("status", 0),
        *[(kind, r) for r in range(1, ROUNDS + 1) for kind in ("round_start", "round_end")],
        ("training_end", None),
    ]
    assert len({e["producer"] for e in server}) == 1
    assert server[0]["data"]["num_rounds"] == ROUNDS and server[0]["data"]["num_clients"] == CLIENTS
    for r in range(1, ROUNDS + 1):
        for phase in ("train", "evaluate"):
            done = of_type(events, "client_complete", round=r, phase=phase)
            assert sorted(e["data"]["client_id"] for e in done) == list(range(CLIENTS)), (r, phase)
            started = of_type(events, "client_progress", round=r, phase=phase, status="started")
            assert sorted(e["data"]["client_id"] for e in started) == list(range(CLIENTS)), (r, phase)
        epochs = [e for e in of_type(events, "client_progress", round=r) if "local_epoch" in e["data"]]
        assert sorted(e["data"]["client_id"] for e in epochs) == list(range(CLIENTS)), r
        (end,) = of_type(events, "round_end", round=r)
        assert len(end["data"]["participating_clients"]) == CLIENTS and end["data"]["num_failures"] == 0
    assert not of_type(events, "error")
    end = server[-1]["data"]
    assert end["status"] == "completed" and end["rounds_completed"] == ROUNDS
    return run_id


def result_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What training produced, as the events tell it (no timings)."""
    end = of_type(events, "training_end")[0]["data"]
    return {
        "best": (end["best_round"], end["best_metric_name"], end["best_metric_value"]),
        "server_metrics": {
            e["data"]["round"]: e["data"]["server_metrics"] for e in of_type(events, "round_end")
        },
    }


async def test_relay_down_whole_run_same_result_then_sync_delivers_each_event_once(relay, tmp_path):
    # The reference: the same seed and flags with the relay up.
    code, log = await run_demo(tmp_path / "reference", "--relay", relay.url, *ARGS)
    assert code == 0, log
    reference = stored_events(relay, relay.get_json("/api/runs")[1]["runs"][0]["run_id"])
    assert_complete_run(reference)
    assert spooled_count(tmp_path / "reference" / "spool") == 0

    # Nothing listens on this port for the whole run, and the demo may not start a relay there.
    offline = tmp_path / "offline"
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    code, log = await run_demo_without_relay(offline, "--relay", url, *ARGS)
    assert code == 0, log
    assert "started a relay" not in log
    assert final_metrics(log) == final_metrics((tmp_path / "reference" / "demo.log").read_text())
    assert spooled_count(offline / "spool") == TOTAL

    down = RelayProcess(offline / "relay.db", port=port).start()
    try:
        code, out, err = await run_sync(offline, url)
        assert code == 0, (out, err)
        assert f"delivered {TOTAL} events" in out, out
        assert spooled_count(offline / "spool") == 0
        events = stored_events(down, down.get_json("/api/runs")[1]["runs"][0]["run_id"])
        run_id = assert_complete_run(events)
        assert result_of(events) == result_of(reference)
        assert run_status(down, run_id) == "completed"

        code, out, err = await run_sync(offline, url)  # again: nothing left, nothing changes
        assert code == 0, (out, err)
        assert stored_events(down, run_id) == events
        assert [r["run_id"] for r in down.get_json("/api/runs")[1]["runs"]] == [run_id]
    finally:
        down.stop()


async def test_relay_sigkilled_after_round_one_and_restarted_subscriber_sees_each_event_once(tmp_path):
    relay = RelayProcess(tmp_path / "relay.db").start()
    try:
        demo = asyncio.create_task(run_demo(tmp_path, "--relay", relay.url, *ARGS))

        def runs() -> list[dict[str, Any]]:
            return relay.get_json("/api/runs")[1]["runs"]

        await until(lambda: demo.done() or runs(), timeout=120, interval=0.05, what="the run to start")
        assert not demo.done(), await demo
        (run,) = runs()
        live = ResumingSubscriber(relay.url, run["run_id"])
        follow = asyncio.create_task(live.follow(TOTAL, timeout=240))

        await until(lambda: follow.done() or of_type(live.events, "round_end", round=1), timeout=120)
        assert not follow.done()
        relay.kill()  # SIGKILL: no goodbye to anyone, round 2 is on its way
        seen_before_kill = len(live.events)
        assert not demo.done() and seen_before_kill < TOTAL, "the kill must land mid-run"
        await asyncio.to_thread(relay.start)  # same db, same port

        code, log = await demo
        assert code == 0, log
        done, _ = await asyncio.wait({follow}, timeout=30)
        assert done, (len(live.events), spooled_count(tmp_path / "spool"))  # spooled: not delivered live
        follow.result()
        events = live.events
        run_id = assert_complete_run(events)
        assert live.connections >= 2 and not live.gaps
        assert stored_events(relay, run_id) == events
        assert run_status(relay, run_id) == "completed"
        assert spooled_count(tmp_path / "spool") == 0  # delivered live, nothing left for sync
    finally:
        relay.stop()
