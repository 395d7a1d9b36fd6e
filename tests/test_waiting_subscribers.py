"""Subscribing to a run before its first event, and ``since`` past the run's last seq.

A frontend knows its run id when it starts the training and subscribes at once: the relay
waits for the run (``subscribed`` with ``last_seq`` 0), then delivers from seq 1 live. Neither
side polls: the relay counts one connection and one subscription.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from fedrelay.follow import Follower
from tests.support.clients import Collector, ResendingProducer, event, until, wait_for_control
from tests.support.metrics import scrape
from tests.support.node import node_command
from tests.support.waiting import wait_until


@pytest.fixture
def relay(backend_relay):
    """Each test that takes ``relay`` on both backends: one SQLite relay, one PostgreSQL relay."""
    return backend_relay


N = 25
QUIET = 1.5
"""Seconds a waiting client is watched before its run starts: the clients used to ask again
every second. An observation window for a thing that must not happen, not a synchronisation."""


def counter(relay, name: str) -> float:
    return scrape(relay).get(name, 0.0)


def subscriptions(relay) -> dict[str, float]:
    return {
        start: counter(relay, f'fedrelay_subscriptions_total{{start="{start}"}}')
        for start in ("live", "catch_up", "waiting")
    }


async def test_python_follower_joins_before_the_run_and_gets_it_all_live_without_polling(relay):
    got: list[int] = []
    controls: list[dict] = []

    def on_event(e: dict) -> bool:
        got.append(e["seq"])
        return len(got) == N

    follower = Follower(relay.url, ["later"], on_event=on_event, on_control=controls.append)
    task = asyncio.create_task(follower.run())
    await asyncio.to_thread(wait_until, lambda: subscriptions(relay)["waiting"] == 1, what="the waiting join")
    assert controls == [{"op": "subscribed", "run_id": "later", "since": 0, "last_seq": 0}]
    assert relay.get_json("/api/runs")[1]["runs"] == []  # waiting for a run is no run
    assert relay.get("/api/runs/later")[0] == 404
    await asyncio.sleep(QUIET)
    assert subscriptions(relay)["waiting"] == 1 and follower.connects == 1

    await ResendingProducer(relay.url, "later-producer").publish_all(
        [event("later", i) for i in range(1, N + 1)]
    )
    await asyncio.wait_for(task, 20)
    assert got == list(range(1, N + 1))
    assert follower.connects == 1 and len(controls) == 1
    assert subscriptions(relay) == {"live": 0, "catch_up": 0, "waiting": 1}
    assert counter(relay, 'fedrelay_connections_opened_total{endpoint="subscribe"}') == 1


async def test_fedrelay_js_joins_before_the_run_and_gets_it_all_live_without_polling(relay):
    command = node_command("follow_run.mjs", relay.url, "js-later", str(N))
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) == {"open": True}
    await asyncio.to_thread(wait_until, lambda: subscriptions(relay)["waiting"] == 1, what="the waiting join")
    await asyncio.sleep(QUIET)
    await ResendingProducer(relay.url, "js-producer").publish_all(
        [event("js-later", i) for i in range(1, N + 1)]
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == 0, (lines, err.decode()[-2000:])
    assert [line["seq"] for line in lines[:-1]] == list(range(1, N + 1))
    done = lines[-1]
    assert done["done"] and done["connects"] == 1
    assert done["controls"] == [{"op": "subscribed", "run_id": "js-later", "since": 0, "last_seq": 0}]
    assert subscriptions(relay) == {"live": 0, "catch_up": 0, "waiting": 1}
    assert counter(relay, 'fedrelay_connections_opened_total{endpoint="subscribe"}') == 1


async def test_since_past_the_stored_seq_waits_for_seqs_handed_out_and_refuses_others(sqlite_relay):
    """Seqs 4 and 5 are handed out but not yet stored (an outside tool holds the write lock):
    ``since=5`` waits and then gets 6 on, never 4 or 5; ``since=6`` names a seq no event here
    has had (another relay's, a lost store's): refused, since events that will get seq 6 here
    would be skipped."""
    relay = sqlite_relay  # SQLite only: it holds the relay's writes with a lock on the SQLite file
    run = "held"
    producer = ResendingProducer(relay.url, "held-producer")
    await producer.publish_all([event(run, i) for i in (1, 2, 3)])
    lock = sqlite3.connect(relay.db, timeout=10, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the relay's commits now wait
    try:
        sending = asyncio.create_task(producer.publish_all([event(run, i) for i in (4, 5)]))
        await asyncio.to_thread(
            wait_until, lambda: counter(relay, "fedrelay_store_lag_events") == 2, what="two events held"
        )
        async with (
            Collector(relay.url, f"run_id={run}&since=5") as waiting,
            Collector(relay.url, f"run_id={run}&since=6") as ahead,
            Collector(relay.url, f"run_id={run}&since=0") as everything,
        ):
            assert await wait_for_control(waiting, "subscribed") == {
                "op": "subscribed", "run_id": run, "since": 5, "last_seq": 3,
            }  # fmt: skip
            refused = await wait_for_control(ahead, "error")
            assert refused["code"] == "bad_since" and "past run 'held''s last seq 3" in refused["detail"]
            await everything.wait_for(3)
            lock.execute("ROLLBACK")
            await sending
            await everything.wait_for(5)
            await producer.publish_all([event(run, 6)])
            await everything.wait_for(6)
            await until(lambda: len(waiting.events) >= 1, timeout=10)
            assert everything.seqs() == [1, 2, 3, 4, 5, 6]
            assert waiting.seqs() == [6]
            assert ahead.events == [] and [c["op"] for c in ahead.controls] == ["error"]
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()


def test_a_relay_without_ipv6_still_starts_on_127_0_0_1(tmp_path):
    """In a network namespace where ::1 does not exist, the default hosts lose ::1, with a warning."""
    script = tmp_path / "check.sh"
    script.write_text(
        "set -e\n"
        "ip link set lo up\n"
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1\n"
        f'"$PYTHON" -m fedrelay serve --port 18765 --db "{tmp_path}/relay.db" > "{tmp_path}/out" 2>&1 &\n'
        "pid=$!\n"
        '"$PYTHON" -c "import time, urllib.request\n'
        "for _ in range(300):\n"
        "    try:\n"
        "        print(urllib.request.urlopen('http://127.0.0.1:18765/healthz', timeout=1).status); break\n"
        "    except OSError: time.sleep(0.05)\n"
        '"\n'
        "kill $pid; wait $pid || true\n"
    )
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        done = subprocess.run(
            ["unshare", "-n", "sh", str(script)], capture_output=True, text=True, env=env, timeout=60
        )
    except FileNotFoundError:
        pytest.fail(
            "unshare(1) (util-linux) is not installed: this test needs it to start a relay without IPv6"
        )
    if "Operation not permitted" in done.stderr:
        pytest.fail("no permission for a network namespace (run the suite as root, as make test does in CI)")
    log = (tmp_path / "out").read_text()
    assert done.stdout.strip() == "200", (done.stdout, done.stderr, log)
    assert "cannot listen on [::1]" in log and "listening on 127.0.0.1 only" in log, log
    assert "relay on ws://127.0.0.1:18765" in log, log
