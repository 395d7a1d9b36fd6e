"""Jepsen-style faults against real processes: a relay, emitters, a Flower simulation, subscribers.

Every test draws its fault moments from ``random.Random`` seeded per session: the seed is printed
and recorded; ``FEDRELAY_FAULT_SEED=N`` replays it (timing still varies: the moments are drawn
as event counts and delays, the processes are real). ``checker.check`` then holds the store and
every subscriber to: every emitted event exactly once, seqs 1..N without a gap, content as
emitted, each producer's ids in order.

1. A Flower demo run while the relay is SIGKILLed and restarted (same db, same port) >= 3 times.
2. The relay SIGSTOPped past its ping timeout (and a producer too), then SIGCONT.
3. Producer processes SIGKILLed mid-stream: what the documented contract says survives does.
4. Subscribers dropped (abruptly or cleanly) dozens of times and resumed with ``since``.
5. The disk filling up under the running relay (RLIMIT_FSIZE via prlimit), and the database
   read-only at start and while running (``chattr +i`` where it works, else permission bits that
   apply to the relay: ``tests/support/file_faults.py``; never skipped).

``FEDRELAY_RELIABILITY_SCALE=N`` runs each scenario N times, each on a fresh relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.reliability.checker import (
    Progress,
    Verdict,
    check,
    demo_expected,
    demo_key,
    producer_expected,
    producer_key,
)
from tests.reliability.report import record, scale
from tests.support.clients import events_in
from tests.support.demo import TINY, demo_env, final_metrics, run_sync
from tests.support.file_faults import ignore_sigxfsz, method, read_only, relay_preexec
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.spool import spooled_count
from tests.support.stored import run_status, stored_events
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FEDRELAY_FAULT_SEED") or random.SystemRandom().randrange(2**32))
"""One seed per session; each test derives its own generator from it and its name."""


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    print(f"\nFEDRELAY_FAULT_SEED={SEED} replays {request.node.name}")
    return random.Random(f"{SEED}:{request.node.name}")


class FreshDb:
    """Each round's ``--db`` on one backend: a fresh SQLite file in the round's work dir, or a
    fresh database of the suite's own PostgreSQL."""

    def __init__(self, backend: str, pg_server: Any = None) -> None:
        self.backend = backend
        self.pg_server = pg_server

    def __call__(self, work: Path) -> str:
        return str(work / "relay.db") if self.pg_server is None else self.pg_server.fresh_db()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request: pytest.FixtureRequest) -> FreshDb:
    """A scenario on each backend (the figures it records name which)."""
    if request.param == "sqlite":
        return FreshDb("sqlite")
    return FreshDb("postgresql", request.getfixturevalue("pg_server"))


HTTP_POLL = 0.02
"""Seconds between checks that cost an HTTP request to the relay under test."""


async def http(relay: RelayProcess, path: str) -> tuple[int, Any]:
    """``relay.get_json`` off the loop: a frozen relay must not freeze the test's subscribers."""
    return await asyncio.to_thread(relay.get_json, path)


async def stored_count(relay: RelayProcess, run_id: str) -> int:
    status, body = await http(relay, f"/api/runs/{run_id}")
    return body["last_seq"] if status == 200 else 0


async def fault_pause(rng: random.Random, low: float, high: float) -> None:
    """The random moment of a fault: a drawn delay, not a wait for a condition."""
    await asyncio.sleep(rng.uniform(low, high))


def rounds() -> int:
    """How many times a scenario runs: once in CI, ``scale()`` times in the longer run (each
    round on a fresh relay, so memory stays that of one round)."""
    return max(1, round(scale()))


@dataclass
class Tally:
    """Figures summed over a test's rounds, for :func:`record`."""

    verdict: Verdict = field(default_factory=Verdict)
    faults: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, **figures: Any) -> None:
        for name, value in figures.items():
            self.extra[name] = self.extra.get(name, 0) + value

    def record(self, name: str, started: float) -> None:
        record(
            name,
            seed=SEED,
            rounds=rounds(),
            faults=self.faults,
            events_checked=self.verdict.events_checked,
            lost=self.verdict.lost,
            duplicated=self.verdict.duplicated,
            seconds=round(time.monotonic() - started, 1),
            **self.extra,
        )


# -- subscribers ---------------------------------------------------------------------------------


@dataclass
class Follower:
    """Follows one run, resuming from its last seq after every disconnect.

    ``plan`` (optional) decides each connection's life: (events to take, seconds to live,
    abrupt) after which it drops the connection itself, abruptly (TCP abort) or with a close
    handshake. ``ping`` makes the client detect a frozen relay (websockets keepalive); the
    close it then attempts waits no longer than the ping timeout (not websockets' 10 s).
    """

    url: str
    run_id: str
    name: str
    ping: tuple[float, float] | None = None
    plan: Callable[[], tuple[int | None, float | None, bool]] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    lost: int = 0
    """Connections that ended in an error while being read (a keepalive giving up, a reset)."""
    drops: int = 0
    drop_times: list[float] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)

    async def follow(self, total: int, timeout: float) -> None:
        await asyncio.wait_for(self._loop(total), timeout)

    async def _loop(self, total: int) -> None:
        interval, ping_timeout = self.ping or (None, None)
        while len(self.events) < total:
            since = self.events[-1]["seq"] if self.events else 0
            take, life, abrupt = self.plan() if self.plan else (None, None, False)
            try:
                async with connect(
                    f"{self.url}/subscribe?run_id={self.run_id}&since={since}",
                    compression=None,
                    open_timeout=2,
                    ping_interval=interval,
                    ping_timeout=ping_timeout,
                    close_timeout=ping_timeout or 10,
                    max_size=None,
                    max_queue=None,  # else a clean close waits 10 s behind unread frames (client-side)
                ) as conn:
                    self.connections += 1
                    try:
                        dropping = await self._read(conn, total, since + take if take else None, life)
                    except BaseException:
                        self.lost += 1
                        raise
                    if dropping:
                        self.drops += 1
                        self.drop_times.append(time.monotonic())
                        if abrupt:
                            conn.transport.abort()
            except (TimeoutError, OSError, ConnectionClosed, InvalidHandshake):
                pass
            if len(self.events) < total:
                await asyncio.sleep(0.01)  # reconnect pacing, as any client would

    async def _read(self, conn: Any, total: int, until_seq: int | None, life: float | None) -> bool:
        """Take frames until done; True when the plan says drop now."""
        deadline = None if life is None else asyncio.get_running_loop().time() + life
        while len(self.events) < total:
            try:
                async with asyncio.timeout_at(deadline):
                    frame = await conn.recv()
            except TimeoutError:
                return True
            msg = json.loads(frame)
            if isinstance(msg, dict) and msg.get("op") == "error":
                return False  # refused (a since this relay never handed out): retry shortly
            if isinstance(msg, dict) and msg.get("op") == "gap":
                self.gaps.append(msg)
            self.events.extend(events_in(frame))
            if until_seq is not None and self.events and self.events[-1]["seq"] >= until_seq:
                return len(self.events) < total
        return False


def drop_plan(rng: random.Random, mean_events: int) -> Callable[[], tuple[int | None, float | None, bool]]:
    """Connection lives drawn from ``rng``: by event count or by time, dropped abruptly or cleanly."""

    def plan() -> tuple[int | None, float | None, bool]:
        abrupt = rng.random() < 0.5
        if rng.random() < 0.7:
            return rng.randint(1, 2 * mean_events), None, abrupt
        return None, rng.uniform(0.005, 0.2), abrupt

    return plan


# -- producer processes --------------------------------------------------------------------------


@dataclass
class Producer:
    """``python -m tests.reliability.checker``: an Emitter in its own process, reporting progress."""

    proc: asyncio.subprocess.Process
    progress: Progress
    p: int
    count: int
    name: str = ""

    @classmethod
    async def start(
        cls, tmp: Path, url: str, run_id: str, p: int, count: int, *, spool: Path, **options: Any
    ) -> Producer:
        path = tmp / f"progress-{p}"
        Progress(path, create=True).close()
        args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items()]
        with open(tmp / f"producer-{p}.log", "ab") as log:  # the child keeps its own copy of the fd
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.reliability.checker", url, str(spool), run_id, str(p),
                str(count), f"--progress={path}", *args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT,
                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
            )  # fmt: skip
        producer = cls(proc, Progress(path), p, count)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        producer.name = json.loads(line)["producer"]
        return producer

    async def finish(self, timeout: float = 90) -> dict[str, Any]:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.close()  # a --hold producer ends once it has reported
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        code = await asyncio.wait_for(self.proc.wait(), 10)
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert code == 0 and report["flushed"], (code, report, SEED)
        return report

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    async def reap(self) -> None:
        with suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.progress.close()


# -- 1. a Flower run, the relay SIGKILLed at random moments ---------------------------------------

ROUNDS, CLIENTS = 5, 2
DEMO_ARGS = ["--rounds", str(ROUNDS), "--clients", str(CLIENTS), "--seed", "7", "--no-start-relay", *TINY]
DEMO_TOTAL = len(demo_expected(ROUNDS, CLIENTS))


async def start_demo(work: Path, *args: str) -> asyncio.subprocess.Process:
    """``python -m fedrelay.demo`` as ``helpers.run_demo`` runs it, but with a handle to kill it
    if the test fails (a Ray simulation must not outlive its test)."""
    with open(work / "demo.log", "wb") as out:  # the child keeps its own copy of the fd
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedrelay.demo", *args,
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=demo_env(work),
        )  # fmt: skip


async def demo_result(work: Path, proc: asyncio.subprocess.Process, timeout: float = 240) -> tuple[int, str]:
    code = await asyncio.wait_for(proc.wait(), timeout)
    return code, (work / "demo.log").read_text(errors="replace")


@dataclass
class DemoOutcome:
    kills: int
    synced: int
    verdict: Verdict


async def demo_under_kills(work: Path, rng: random.Random, kills: int) -> DemoOutcome:
    """One demo run; the relay SIGKILLed ``kills`` times after event counts drawn from ``rng``."""
    work.mkdir(parents=True)
    relay = RelayProcess(work / "relay.db").start()
    proc = await start_demo(work, "--relay", relay.url, *DEMO_ARGS)
    demo = asyncio.create_task(demo_result(work, proc))
    following: list[asyncio.Task[None]] = []
    try:
        listing = await until(
            lambda: demo.done() or relay.get_json("/api/runs")[1]["runs"],
            120,
            interval=HTTP_POLL,
            what="the run to start",
        )
        assert not demo.done(), await demo
        run_id = listing[0]["run_id"]
        followers = [
            Follower(relay.url, run_id, "plain"),
            Follower(relay.url, run_id, "pinging", ping=(0.5, 1.0)),
        ]
        following = [asyncio.create_task(f.follow(DEMO_TOTAL, timeout=240)) for f in followers]
        # In the first half of the events: an outage no longer slows training down (emitters
        # spool instead of waiting), so what the relay has seen lags the run by the outage and the
        # reconnect backoff; the second half is the run's margin for that.
        marks = sorted(rng.sample(range(2, DEMO_TOTAL // 2), kills))
        print(f"{work.name}: SIGKILL after {marks} events seen")
        for mark in marks:
            await until(
                lambda m=mark: demo.done() or len(followers[0].events) >= m, 120, what=f"{mark} events"
            )
            await fault_pause(rng, 0.0, 0.3)
            assert not demo.done(), f"kill at {mark} events would land after the run (seed {SEED})"
            relay.kill()
            assert relay.proc.returncode == -signal.SIGKILL, relay.log()  # it was running: killed, not gone
            await fault_pause(rng, 0.0, 1.0)  # down for a random while
            await asyncio.to_thread(relay.start)  # same db, same port
        code, log = await demo
        assert code == 0, log[-6000:]
        # Ray ends its actors when the simulation ends: what they had not delivered is spooled.
        synced = spooled_count(work / "spool")
        code, out, err = await run_sync(work, relay.url)
        assert code == 0, (out, err)
        assert spooled_count(work / "spool") == 0
        done, _ = await asyncio.wait(following, timeout=60)
        assert len(done) == len(following), [(f.name, len(f.events)) for f in followers]
        for task in done:
            task.result()
        stored = stored_events(relay, run_id)
        views = {f.name: f.events for f in followers}
        verdict = check(demo_expected(ROUNDS, CLIENTS), stored, views, key=demo_key)
        verdict.assert_ok(f"{work.name}, seed {SEED}")
        # Content from another channel: the demo prints the final server metrics.
        (last,) = [e for e in stored if e["type"] == "round_end" and e["data"]["round"] == ROUNDS]
        assert {k: round(v, 4) for k, v in last["data"]["server_metrics"].items()} == final_metrics(log)
        assert run_status(relay, run_id) == "completed"
        assert all(f.connections >= 2 and not f.gaps for f in followers)
        return DemoOutcome(len(marks), synced, verdict)
    finally:
        for task in [demo, *following]:
            task.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        relay.stop()


@pytest.mark.timeout(200 * rounds())
async def test_flower_run_survives_relay_sigkills_at_random_moments(tmp_path: Path, rng: random.Random):
    """Kills land mid-run (checked); the spools the Ray actors leave are synced afterwards."""
    started = time.monotonic()
    tally = Tally()
    for n in range(rounds()):
        outcome = await demo_under_kills(tmp_path / f"run{n}", rng, kills=3)
        tally.verdict.add(outcome.verdict)
        tally.faults += outcome.kills
        tally.add(delivered_by_sync=outcome.synced)
    tally.record("faults:relay_sigkill_flower", started)


# -- 2. the relay frozen past its ping timeout ----------------------------------------------------


@pytest.mark.timeout(90 * rounds())
async def test_relay_sigstopped_past_its_ping_timeout(tmp_path: Path, rng: random.Random):
    """A frozen relay looks alive to TCP; its peers' keepalives decide. Nothing lost either way.

    The producer is frozen once too: the relay's own keepalive then cuts it, and the emitter
    resends what was not acked after SIGCONT.
    """
    started = time.monotonic()
    tally = Tally()
    for n in range(rounds()):
        await frozen_round(tmp_path / f"round{n}", rng, tally)
    tally.record("faults:relay_sigstop", started)


def check_producer_run(
    relay: RelayProcess, run_id: str, count: int, tally: Tally | None, followers: list[Any] = ()
) -> Verdict:
    """One producer's ids 1..count exactly once in the store and at every follower."""
    stored = stored_events(relay, run_id)
    verdict = check(
        producer_expected(1, count),
        stored,
        {f.name: f.events for f in followers},
        key=producer_key,
        exact=True,
        id_is_index=True,
    )
    if tally is not None:
        tally.verdict.add(verdict)
    verdict.assert_ok(f"seed {SEED}")
    return verdict


def publishers(relay: RelayProcess) -> float:
    """Open /publish connections, as the relay counts them."""
    return scrape(relay).get('fedrelay_connections{endpoint="publish"}', 0.0)


async def frozen_round(work: Path, rng: random.Random, tally: Tally) -> None:
    """~10 s of a 2,500 events/s stream: the relay frozen twice, then the producer once, each time
    until a keepalive gave up on the frozen side (then a random while longer)."""
    work.mkdir(parents=True)
    relay = RelayProcess(work / "relay.db", args=["--ping-interval", "1", "--ping-timeout", "1"]).start()
    count, stops = 24_000, 2
    producer = await Producer.start(
        work, relay.url, "frozen", 1, count, spool=work / "spool", rate=2500, max_buffer=5000, hold=True
    )
    following: list[asyncio.Task[None]] = []
    try:
        await until(lambda: relay.get_json("/api/runs")[1]["runs"], 30, interval=HTTP_POLL, what="the run")
        followers = [
            Follower(relay.url, "frozen", "plain"),
            Follower(relay.url, "frozen", "pinging", ping=(0.5, 1.0)),
        ]
        following = [asyncio.create_task(f.follow(count, timeout=80)) for f in followers]
        pid = relay.proc.pid
        for _ in range(stops):
            await fault_pause(rng, 0.2, 1.2)
            before = await stored_count(relay, "frozen")
            lost = followers[1].lost
            relay.proc.send_signal(signal.SIGSTOP)
            tally.faults += 1
            # Frozen past the ping timeout: until the pinging subscriber's keepalive gave up (a
            # subscriber that had every event already never does: the freeze came too late).
            await until(
                lambda b=lost: followers[1].lost > b, 30, what="the pinging subscriber's keepalive giving up"
            )
            await fault_pause(rng, 0.0, 1.0)
            relay.proc.send_signal(signal.SIGCONT)
            if producer.progress.get("emitted") < count:
                await until(
                    lambda b=before: relay.get_json("/api/runs/frozen")[1]["last_seq"] > b,
                    30,
                    interval=HTTP_POLL,
                    what="the stream to resume",
                )
        # The producer freezes: the relay's keepalive cuts it, and the emitter comes back.
        await fault_pause(rng, 0.2, 1.2)
        await until(lambda: publishers(relay) == 1, 30, interval=HTTP_POLL, what="the producer connected")
        producer.kill(signal.SIGSTOP)
        tally.faults += 1
        await until(
            lambda: publishers(relay) == 0,
            30,
            interval=HTTP_POLL,
            what="the relay's keepalive cutting the frozen producer",
        )
        await fault_pause(rng, 0.0, 1.0)
        producer.kill(signal.SIGCONT)
        await until(lambda: publishers(relay) == 1, 30, interval=HTTP_POLL, what="the producer reconnecting")
        report = await producer.finish()
        await asyncio.wait_for(asyncio.gather(*following), 60)
        check_producer_run(relay, "frozen", count, tally, followers)
        assert relay.proc.pid == pid and relay.proc.poll() is None  # frozen, never restarted
        assert followers[1].lost >= stops  # it gave up on the frozen relay each time
        tally.add(
            emitter_reconnects=report["stats"]["reconnects"],
            pinging_subscriber_connections=followers[1].connections,
        )
    finally:
        for task in following:
            task.cancel()
        await producer.reap()
        code = relay.stop()
    assert code == 0, relay.log()


# -- 3. producers SIGKILLed mid-stream ------------------------------------------------------------


def spooled_ids(spool: Path, producer: str) -> set[int]:
    """Ids in the segments renamed into place: what the emitter had made durable."""
    ids: set[int] = set()
    for seg in (spool / producer).glob("*.seg"):
        first, last, _ = (int(x) for x in seg.stem.split("-"))
        ids.update(range(first, last + 1))
    return ids


@pytest.mark.timeout(90 * rounds())
async def test_producer_sigkilled_mid_stream_keeps_its_durability_contract(
    tmp_path: Path, rng: random.Random, new_db: FreshDb
):
    """docs/emitters.md: acked events are stored; spooled ones (segment renamed into place, or
    ``persist()`` returned True) are delivered by the next Emitter on the spool dir or by
    ``fedrelay sync``; only events still in memory may die with the process, and since the spool
    always holds the oldest, those are the newest: what survives of a producer is ids 1..M, each
    once, with M at least the durable point. Each next producer process adopts the spool of the
    one killed before it; ``fedrelay sync`` delivers what is left after the last kill."""
    started = time.monotonic()
    tally = Tally()
    tally.extra["backend"] = new_db.backend
    for n in range(rounds()):
        await producer_kill_round(tmp_path / f"round{n}", rng, tally, new_db)
    tally.record("faults:producer_sigkill", started)


async def producer_kill_round(work: Path, rng: random.Random, tally: Tally, new_db: FreshDb) -> None:
    """Three producers of 60,000 events on one spool dir, each SIGKILLed 0-1 s after it started."""
    work.mkdir(parents=True)
    relay = RelayProcess(new_db(work), log_dir=work).start()
    spool = work / "spool"
    kills, count = 3, 60_000
    durable: dict[int, int] = {}
    emitted: dict[int, int] = {}
    mid_stream = 0
    producers: list[Producer] = []
    try:
        for p in range(1, kills + 1):
            options: dict[str, Any] = {"max_buffer": rng.choice([100, 1000, 5000])}
            if rng.random() < 0.5:
                options["persist_every"] = rng.choice([250, 2000])
            producer = await Producer.start(
                work, relay.url, "killed", p, count, spool=spool, hold=True, **options
            )
            producers.append(producer)
            await fault_pause(rng, 0.0, 1.0)  # it emits at full speed, then drains: ~2 s in all
            producer.kill()
            await producer.proc.wait()
            tally.faults += 1
            # The durable point at the kill: in a segment, persisted, or stored (acks come later).
            at_kill = [e for e in stored_events(relay, "killed") if e["producer"] == producer.name]
            on_disk = spooled_ids(spool, producer.name)
            emitted[p] = producer.progress.get("emitted")
            durable[p] = max(
                [producer.progress.get("persisted"), *on_disk, *(e["id"] for e in at_kill)], default=0
            )
            mid_stream += len(at_kill) < count and emitted[p] > 0
            print(
                f"producer {p} {options}: killed after {emitted[p]} emits, {len(at_kill)} stored, "
                f"durable up to {durable[p]}"
            )
            assert_no_duplicates(stored_events(relay, "killed"))  # never, at any moment
        code, out, err = await run_sync(work, relay.url)
        assert code == 0, (out, err)
        stored = stored_events(relay, "killed")
        expected: dict[Any, dict[str, Any]] = {}
        may_lose: set[Any] = set()
        for p in emitted:
            # emit() returned for 1..emitted (one more may have returned before the counter moved)
            expected.update(producer_expected(p, emitted[p] + 1))
            may_lose.update((p, i) for i in range(durable[p] + 1, emitted[p] + 2))
        verdict = check(expected, stored, key=producer_key, exact=True, may_lose=may_lose, id_is_index=True)
        tally.verdict.add(verdict)
        verdict.assert_ok(f"seed {SEED}")
        assert mid_stream == kills, f"only {mid_stream} of {kills} kills landed mid-stream"
        lost_by_design = 0
        for p, producer in enumerate(producers, 1):
            ids = [e["id"] for e in stored if e["producer"] == producer.name]
            assert len({e["producer"] for e in stored if e["data"]["p"] == p}) <= 1  # never renamed
            assert ids == list(range(1, len(ids) + 1)), f"producer {p}: not a prefix (seed {SEED})"
            assert durable[p] <= len(ids) <= emitted[p] + 1, (p, durable[p], len(ids), emitted[p])
            lost_by_design += emitted[p] - min(len(ids), emitted[p])
        assert spooled_count(spool) == 0
        tally.add(
            emitted=sum(emitted.values()),
            lost_from_memory_by_design=lost_by_design,
            mid_stream_kills=mid_stream,
        )
    finally:
        for producer in producers:
            await producer.reap()
        relay.stop()


def assert_no_duplicates(events: list[dict[str, Any]]) -> None:
    keys = [producer_key(e) for e in events]
    assert len(set(keys)) == len(keys), f"duplicates in the store (seed {SEED})"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


# -- 4. subscribers dropped and resumed -----------------------------------------------------------


@pytest.mark.timeout(90 * rounds())
async def test_subscribers_dropped_and_resumed_dozens_of_times(
    tmp_path: Path, rng: random.Random, new_db: FreshDb
):
    """A small replay ring makes resumes page from the store while commits land, and switch to
    live mid-stream: the hand-over the protocol promises is gap-free and duplicate-free."""
    started = time.monotonic()
    tally = Tally()
    tally.extra["backend"] = new_db.backend
    for n in range(rounds()):
        await drop_round(tmp_path / f"round{n}", rng, tally, new_db)
    tally.record("faults:subscriber_drops", started)


async def drop_round(work: Path, rng: random.Random, tally: Tally, new_db: FreshDb) -> None:
    """Three subscribers dropping at random moments while at least 60,000 events stream; the
    stream goes on until two dozen drops have landed in it, however slow this machine is."""
    work.mkdir(parents=True)
    relay = RelayProcess(new_db(work), args=["--replay-size", "200"], log_dir=work).start()
    count, in_stream = 60_000, 24
    followers = [
        Follower(relay.url, "dropped", f"s{n}", plan=drop_plan(random.Random(rng.random()), count // 600))
        for n in range(3)
    ]
    # Followed with no end: how many events the stream holds is known once it ended.
    following = [asyncio.create_task(f.follow(2**62, timeout=200)) for f in followers]
    # 15,000 events/s (bursts of 50 at full speed): ~4 s for the first 60,000, during which
    # dozens of drops land; the subscribers' JSON parsing in this process is the limit.
    producer = await Producer.start(
        work, relay.url, "dropped", 1, count, spool=work / "spool", rate=15_000, until_stdin_closes=True
    )
    try:
        await until(
            lambda: sum(f.drops for f in followers) >= in_stream,
            60,
            interval=0.01,
            what=f"{in_stream} drops while the stream flows",
        )
        report = await producer.finish()  # closes its stdin: the stream ends
        streamed_until = time.monotonic()
        emitted = report["emitted"]
        await until(
            lambda: all(len(f.events) >= emitted for f in followers) or any(t.done() for t in following),
            80,
            interval=0.05,
            what="every subscriber at the end of the stream",
        )
        for task in following:
            if task.done():
                task.result()  # a follower that ended early: its error
            task.cancel()
        check_producer_run(relay, "dropped", emitted, tally, followers)
        while_streaming = sum(t < streamed_until for f in followers for t in f.drop_times)
        assert all(f.drops >= 12 for f in followers), [f.drops for f in followers]
        assert while_streaming >= in_stream, while_streaming
        assert not any(f.gaps for f in followers)
        tally.faults += sum(f.drops for f in followers)
        tally.add(drops_while_streaming=while_streaming)
    finally:
        for task in following:
            task.cancel()
        await producer.reap()
        relay.stop()


# -- 5. disk full, read-only database -------------------------------------------------------------


def file_sizes(relay: RelayProcess) -> int:
    paths = [relay.db, relay.db + "-wal", relay.db + "-shm", str(relay.log_path)]
    return max(os.path.getsize(p) for p in paths if os.path.exists(p))


def assert_logged_once_per_episode(log: str) -> None:
    """A failing store says so once, then once more when it works again: not every second."""
    pairs = [
        ("store: commit failed", "store: commits work again"),
        ("store: WAL checkpoint failed", "store: WAL checkpoints work again"),
    ]
    failing = {fail: False for fail, _ in pairs}
    for line in log.splitlines():
        if " relay on ws://" in line:  # a restarted process starts afresh
            failing = dict.fromkeys(failing, False)
        for fail, recovered in pairs:
            if fail in line:
                assert not failing[fail], f"logged again while failing: {line}\n{log[-3000:]}"
                failing[fail] = True
            elif recovered in line:
                failing[fail] = False


async def wait_failing(relay: RelayProcess, timeout: float = 60) -> dict[str, Any]:
    """The body of the first ``/healthz`` that answers 503."""

    def degraded() -> dict[str, Any] | None:
        status, body = relay.get_json("/healthz")
        return body if status == 503 else None

    return await until(degraded, timeout, interval=HTTP_POLL, what="a failing store")


async def assert_no_acked_but_unstored(relay: RelayProcess, producer: Producer, run_id: str) -> None:
    """Acks only cover committed events: every id the producer saw acked can be read back now."""
    acked = producer.progress.get("acked")
    stored = {e["id"] for e in await asyncio.to_thread(stored_events, relay, run_id)}
    missing = set(range(1, acked + 1)) - stored
    assert not missing, f"{len(missing)} acked events not stored, e.g. {sorted(missing)[:5]} (seed {SEED})"


@pytest.mark.timeout(100 * rounds())
async def test_disk_full_under_a_running_relay_then_cleared(tmp_path: Path, rng: random.Random):
    """The relay's RLIMIT_FSIZE is lowered from outside (prlimit) at a random moment, to just
    above the files' current size: the next WAL writes fail with EFBIG. Each fault ends either
    by raising the limit again (the relay recovers by itself) or by SIGKILL and a restart
    (accepted but uncommitted events die; the emitter resends them)."""
    started = time.monotonic()
    tally = Tally()
    for n in range(rounds()):
        await disk_full_round(tmp_path / f"round{n}", rng, tally)
    tally.record("faults:disk_full", started)


async def disk_full_round(work: Path, rng: random.Random, tally: Tally) -> None:
    """A 3,000 events/s stream; the disk fills twice: cleared once by itself, once by a restart."""
    work.mkdir(parents=True)
    relay = RelayProcess(work / "relay.db", preexec_fn=ignore_sigxfsz).start()
    count = 40_000
    producer = await Producer.start(
        work, relay.url, "full", 1, count, spool=work / "spool", rate=3000, max_buffer=4000
    )
    try:
        await until(lambda: relay.get_json("/api/runs")[1]["runs"], 30, interval=HTTP_POLL, what="the run")
        for ending in ("limit raised", "killed and restarted"):
            await fault_pause(rng, 0.2, 1.5)
            limit = file_sizes(relay) + rng.randint(0, 200_000)
            resource.prlimit(relay.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            tally.faults += 1
            health = await wait_failing(relay)
            assert "file size limit" in health["store"]["error"], health  # says why, not just "I/O"
            assert scrape(relay)["fedrelay_store_failing"] == 1
            for _ in range(3):
                await assert_no_acked_but_unstored(relay, producer, "full")
                await fault_pause(rng, 0.1, 0.5)
            assert relay.proc.poll() is None, relay.log()  # failing, not crashed
            if ending == "limit raised":
                resource.prlimit(relay.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            else:
                relay.kill()
                await asyncio.to_thread(relay.start)
            await until(
                lambda: relay.get("/healthz")[0] == 200,
                30,
                interval=HTTP_POLL,
                what=f"the store to recover ({ending})",
            )
        report = await producer.finish(timeout=120)
        check_producer_run(relay, "full", count, tally)
        assert relay.log_path is not None
        log = relay.log_path.read_text()
        assert "commit failed, will retry" in log and "commits work again" in log, log[-3000:]
        assert "Traceback" not in log
        assert_logged_once_per_episode(log)
        tally.add(emitter_reconnects=report["stats"]["reconnects"])
    finally:
        await producer.reap()
        relay.stop()


def serve_once(db: Path) -> subprocess.CompletedProcess[str]:
    """``fedrelay serve`` as a process that permission bits apply to (see ``file_faults``)."""
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", "serve", "--port", "0", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        preexec_fn=relay_preexec("modes"),
    )


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_database_at_start_is_a_clear_error(tmp_path: Path, what: str):
    """``fedrelay serve`` on a database it cannot write exits 1 with one line saying why. The
    file or directory is made read-only with permission bits (what an operator meets), which
    apply to the relay on every machine (``file_faults.relay_preexec``)."""
    db = tmp_path / "data" / "relay.db"
    db.parent.mkdir()
    relay = RelayProcess(db).start()  # a real database, cleanly closed
    relay.stop()
    target = db if what == "file" else db.parent
    with read_only(target, "modes"):
        out = serve_once(db)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert "cannot open the event store" in out.stderr, out.stderr
    assert ("read-only" if what == "file" else "cannot create files") in out.stderr, out.stderr
    record(
        f"faults:read_only_at_start_{what}", faults=1, exit_code=out.returncode, message=out.stderr.strip()
    )


@pytest.mark.timeout(120)
async def test_database_becomes_read_only_while_running(tmp_path: Path, rng: random.Random):
    """The WAL file made read-only under the running relay (``chattr +i`` where it works, else
    modes plus a file size limit: ``tests/support/file_faults.py``): 503 and a log line saying
    the file is read-only, no crash, and once it is writable again everything lands exactly once."""
    chosen = method(tmp_path)
    print(f"read-only by {chosen}")
    started = time.monotonic()
    relay = RelayProcess(tmp_path / "relay.db", preexec_fn=relay_preexec(chosen)).start()
    count = 20_000
    producer = await Producer.start(
        tmp_path, relay.url, "ro", 1, count, spool=tmp_path / "spool", rate=3000, max_buffer=4000
    )
    try:
        await until(lambda: relay.get_json("/api/runs")[1]["runs"], 30, interval=HTTP_POLL, what="the run")
        await fault_pause(rng, 0.3, 1.5)
        files = [Path(relay.db), Path(relay.db + "-wal"), Path(str(relay.log_path))]
        with read_only(Path(relay.db + "-wal"), chosen, holder=relay.proc.pid, files=files):
            health = await wait_failing(relay)
            assert "read-only" in health["store"]["error"], health
            await assert_no_acked_but_unstored(relay, producer, "ro")
            await fault_pause(rng, 0.5, 2.0)
            assert relay.proc.poll() is None
        await until(
            lambda: relay.get("/healthz")[0] == 200, 30, interval=HTTP_POLL, what="the store to recover"
        )
        await producer.finish()
        verdict = check_producer_run(relay, "ro", count, None)
        assert relay.log_path is not None
        log = relay.log_path.read_text()
        assert "Traceback" not in log
        assert_logged_once_per_episode(log)
    finally:
        await producer.reap()
        relay.stop()
    record(
        "faults:read_only_while_running",
        seed=SEED,
        method=chosen,
        faults=1,
        events_checked=verdict.events_checked,
        lost=verdict.lost,
        duplicated=verdict.duplicated,
        seconds=round(time.monotonic() - started, 1),
    )


# -- the checker itself -------------------------------------------------------------------------


def test_the_checker_catches_loss_duplication_disorder_and_changed_content():
    """A checker that cannot fail proves nothing: each kind of damage is counted or reported."""
    expected = producer_expected(1, 5)

    def ev(seq: int, i: int, **data: Any) -> dict[str, Any]:
        return {"seq": seq, "producer": "p", "id": i, "data": {**expected[(1, i)], **data}}

    good = [ev(n, n) for n in range(1, 6)]
    assert check(expected, good, {"s": list(good)}, key=producer_key, exact=True).problems == []

    def verdict(stored: list[dict[str, Any]], view: list[dict[str, Any]] | None = None) -> Verdict:
        return check(
            expected, stored, {"s": view if view is not None else stored}, key=producer_key, exact=True
        )

    lost = verdict([ev(n, n) for n in range(1, 5)])
    assert lost.lost == 1 and lost.problems
    twice = verdict([*good, ev(6, 3)])
    assert twice.duplicated == 1 and twice.problems
    assert verdict(good, [*good[:2], *good[3:]]).lost == 1  # a subscriber skipped seq 3
    assert verdict(good, [*good, good[-1]]).duplicated == 1  # ...or got seq 5 twice
    assert verdict(good, [good[1], good[0], *good[2:]]).problems  # ...or out of order
    assert verdict([*good[:2], ev(4, 3), *good[3:]]).problems  # a seq gap in the store
    assert verdict([*good[:4], ev(5, 5, loss=0.5)]).problems  # content not as emitted
    assert check(expected, good[:3], key=producer_key, may_lose={(1, 4), (1, 5)}).lost == 0
