"""Subscribers and readers given several addresses of a relay: ``fedrelay tail``, ``export``,
``runs``, the bridge's feed and ``fedrelay.js`` (under Node), against real relay processes.

Two SQLite relays are two relays, not one. Where a test moves a subscriber from one to the other
mid-run, both are given the same events by one producer in the same order, so their seqs agree as
the nodes of one relay's do; the second has them all before the first is killed, as a node of one
relay would (a relay refuses a ``since`` past what it has handed out).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from fedrelay.bridge.feed import Feed, FeedConnection
from tests.support.node import node_command
from tests.support.relay_process import RelayProcess, free_port
from tests.support.stored import stored_events
from tests.support.training import BackgroundProducer, federated_run


def dead_url() -> str:
    return f"ws://127.0.0.1:{free_port()}"


def fedrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", *args], capture_output=True, text=True, timeout=60
    )


def seqs_printed(stdout: str) -> list[int]:
    return [int(line.split()[0].lstrip("#")) for line in stdout.splitlines() if line.startswith("#")]


def test_tail_export_and_runs_read_through_the_second_address_when_the_first_is_down(relay, tmp_path):
    events = federated_run("second-up", rounds=3, clients=2)
    BackgroundProducer(relay.url, events, pace=0, batch=100).start().join()
    expected = stored_events(relay, "second-up")
    dead = dead_url()

    tail = fedrelay("tail", "second-up", "--url", f"{dead},{relay.url}", "--once")
    assert tail.returncode == 0, tail.stderr
    assert seqs_printed(tail.stdout) == list(range(1, len(expected) + 1))
    assert f"cannot connect to {dead}/subscribe; resuming on {relay.url}/subscribe" in tail.stderr

    out = tmp_path / "run.jsonl"
    export = fedrelay("export", "second-up", "--url", dead, "--url", relay.url, "--out", str(out))
    assert export.returncode == 0, export.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected

    runs = fedrelay("runs", "--url", f"{dead},{relay.http}", "--json")
    assert runs.returncode == 0, runs.stderr
    assert [run["run_id"] for run in json.loads(runs.stdout)] == ["second-up"]

    nowhere = fedrelay("export", "second-up", "--url", f"{dead},{dead_url()}")
    assert nowhere.returncode == 1 and "cannot read from" in nowhere.stderr


def two_relays_with_one_history(tmp_path, run_id: str) -> tuple[RelayProcess, RelayProcess, list, object]:
    """``second`` holds the whole run; ``first`` receives the same events paced (still streaming)."""
    first = RelayProcess(tmp_path / "first.db").start()
    second = RelayProcess(tmp_path / "second.db").start()
    events = federated_run(run_id, rounds=8, clients=3)
    BackgroundProducer(second.url, events, pace=0, batch=100).start().join()
    streaming = BackgroundProducer(first.url, events, pace=0.05, batch=4).start()
    return first, second, events, streaming


def finish(first: RelayProcess, streaming: BackgroundProducer) -> RelayProcess:
    """Bring the killed relay back so that the paced producer ends; the caller stops it."""
    back = RelayProcess(first.db, port=first.port).start()
    streaming.join(60)
    return back


def test_tail_moves_to_the_next_address_when_its_relay_is_killed_and_resumes_from_its_last_seq(tmp_path):
    first, second, events, streaming = two_relays_with_one_history(tmp_path, "moved")
    back = None
    tail = subprocess.Popen(
        [sys.executable, "-m", "fedrelay", "tail", "moved", "--url", first.url, "--url", second.url,
         "--until-end", "--plain"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    readers = ThreadPoolExecutor(2)  # communicate() would lose what readline() buffered
    try:
        assert tail.stdout is not None and tail.stderr is not None
        lines = [tail.stdout.readline() for _ in range(20)]  # the run is still streaming into first
        first.kill()
        out, err = readers.submit(tail.stdout.read), readers.submit(tail.stderr.read)
        printed = "".join(lines) + out.result(60)
        assert tail.wait(10) == 0, err.result(10)
        assert seqs_printed(printed) == list(range(1, len(events) + 1)), "each seq once, in order"
        moved = f"connection lost to {first.url}/subscribe; resuming on {second.url}/subscribe"
        assert moved in err.result(10)
        back = finish(first, streaming)
    finally:
        tail.kill()
        readers.shutdown(wait=False)
        for proc in (first, second, back):
            if proc is not None:
                proc.stop()


async def test_the_bridge_feed_follows_through_the_second_address_when_the_first_is_down(relay):
    events = federated_run("fed-feed", rounds=2, clients=2)
    await asyncio.to_thread(BackgroundProducer(relay.url, events, pace=0, batch=100).start().join)
    recorded: list[int] = []

    async def record(run_id: str, batch: list[dict]) -> int:
        recorded.extend(e["seq"] for e in batch)
        if len(recorded) == len(events):
            connection.stopped = True
        return batch[-1]["seq"]

    connection = FeedConnection([dead_url(), relay.url], Feed(["fed-feed"]), record)
    await asyncio.wait_for(connection.run(), 30)
    assert recorded == list(range(1, len(events) + 1))
    assert connection.url == relay.url and connection.connects == 1


async def node_follow(url: str, run_id: str, count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *node_command("follow_run.mjs", url, run_id, str(count)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_fedrelay_js_follows_through_the_second_address_when_the_first_is_down(relay):
    events = federated_run("js-second", rounds=2, clients=2)
    await asyncio.to_thread(BackgroundProducer(relay.url, events, pace=0, batch=100).start().join)
    proc = await node_follow(f"{dead_url()},{relay.url}", "js-second", len(events))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == 0, (lines, err.decode()[-2000:])
    assert [line["seq"] for line in lines if "seq" in line] == list(range(1, len(events) + 1))
    assert lines[-1]["done"] and lines[-1]["connects"] == 1


async def test_fedrelay_js_moves_on_when_its_relay_is_killed_and_resumes_each_run_from_its_last_seq(tmp_path):
    first, second, events, streaming = await asyncio.to_thread(
        two_relays_with_one_history, tmp_path, "js-moved"
    )
    back = None
    try:
        proc = await node_follow(f"{first.url},{second.url}", "js-moved", len(events))
        assert proc.stdout is not None
        seqs: list[int] = []
        while len(seqs) < 20:
            line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            seqs.extend([line["seq"]] if "seq" in line else [])
        await asyncio.to_thread(first.kill)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert proc.returncode == 0, (lines, err.decode()[-2000:])
        seqs.extend(line["seq"] for line in lines if "seq" in line)
        assert seqs == list(range(1, len(events) + 1)), "each seq once, in order, across the move"
        assert lines[-1]["done"] and lines[-1]["connects"] == 2
        back = await asyncio.to_thread(finish, first, streaming)
    finally:
        for relay in (first, second, back):
            if relay is not None:
                await asyncio.to_thread(relay.stop)
