"""The soak load: one relay process, a 1,000-subscriber run, 100 more runs, slow consumers.

Shared by ``tests/reliability/test_soak.py`` (bounded, asserts) and ``bench/soak.py``
(longer, prints a table), so both measure the same thing the same way.

Why it looks like this: on a 2-core machine the load generator competes with the relay for
CPU, so subscribers are ``bench/rawws.py`` raw asyncio protocols (no JSON decoding of events,
no task per connection). Each subscriber follows exactly one run and checks its stream in
place with one regex per frame: count, last seq, gaps, duplicates and events of another run.
A sample of subscribers also records receive minus send time (``data.sent_ns`` is
CLOCK_MONOTONIC, which is system-wide on Linux, so relay and client processes share it).

Slow consumers follow a run of larger events (the *heavy* run) with a 4 KiB receive
buffer: some never read after ``subscribed``, some read one small chunk every
``slow_read_every_s``. The relay must cut them (1013) while everyone else, on that run too,
gets every event. A cut client's socket still holds megabytes ahead of the close frame, and
the relay aborts the TCP connection ``close_timeout`` (5 s) after sending it, so each slow
client starts reading fast once the relay's log names its port: it then reads the 1013
close frame when it gets there in time (reported as ``slow_1013``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.producer import Producer, event
from bench.rawws import RawSubscriber, close_all

from tests.support.metrics import parse
from tests.support.waiting import until

HOST = "127.0.0.1"
SEQ_RE = re.compile(rb'"seq": ?(\d+)')
SENT_NS_RE = re.compile(rb'"sent_ns": ?(\d+)')
CUT_LOG_RE = re.compile(r"cut slow consumer \S*:(\d+)")
NS_PER_MS = 1_000_000
SMALL_RCVBUF = 4096
"""Receive buffer of slow consumers: the kernel then holds little for them, so the bytes
waiting in the relay (what ``--max-queue-bytes`` bounds) grow soon after they stop reading."""
MAX_QUEUE_BYTES = 256 << 10
"""The relay's per-subscriber queue bound for the soak: cuts slow consumers within seconds.
A normal subscriber never gets near it: the kernel buffers megabytes before the relay does."""
REPLAY_SIZE = 32
"""Replay ring per run. The default (1000) is a bound too, but 100 runs at 2 events/s take
500 s to fill it: the rings would grow all through a 60 s soak and look like a leak. With 32
every ring is full well inside the warm-up, so what grows afterwards is not bounded."""
RSS_GROWTH_MIB = 2.0
"""Allowed relay RSS growth from the first window after warm-up to the last one, in MiB.
Everything the relay keeps is bounded and full by the end of the warm-up (replay rings of
REPLAY_SIZE events, SQLite's 2 MiB page cache per connection; the slow consumers are cut by
then), so what remains is allocator noise: +0.06 to +0.1 MiB in 60 s and 180 s runs here.
The default replay rings (1000 events) still filling during the soak grow +4.2 MiB in 60 s,
which fails; a leak of 100 bytes per delivery would be ~45 MiB over the measured 45 s."""
RSS_GROWTH_FRACTION = 0.05
"""...or 5% of the relay's RSS, whichever is larger, for bigger relays and longer runs."""
FD_MARGIN = 2
"""File descriptors the relay may hold above its idle count after the soak. The idle count is
taken once the store's reader has opened its files, so a sound relay returns to it exactly;
the margin only absorbs a file SQLite may reopen lazily. A leak of sockets is one fd per lost
close: with 1,300 connections, anything above 0.2% of them shows."""


@dataclass
class SoakConfig:
    """Sizes, rates and bounds of one soak run."""

    duration_s: float = 60.0
    """Seconds of publishing, warm-up included."""
    warmup_s: float = 15.0
    """Replay rings, SQLite page cache and the allocator settle by then; latency and RSS count after."""
    subscribers: int = 1000
    """Subscribers of the fan-out run."""
    rate: float = 10.0
    """Events/s published to the fan-out run."""
    runs: int = 100
    """Other runs, published at once by one producer that multiplexes them."""
    subs_per_run: int = 3
    run_rate: float = 2.0
    """Events/s per run of the ``runs``."""
    heavy_rate: float = 100.0
    """Events/s to the heavy run, which the slow consumers follow."""
    heavy_pad: int = 3500
    """Padding bytes per heavy event: ~3.7 KB, so ~370 KB/s. On loopback the relay's socket
    send buffer autotunes to ``tcp_wmem`` max (4 MiB) even for a peer that does not read, so a
    cut takes ~4.3 MB behind a slow consumer: ~12 s at this rate, inside the warm-up."""
    heavy_subscribers: int = 4
    """Normal subscribers of the heavy run: they must not notice the slow ones."""
    never_readers: int = 3
    slow_readers: int = 3
    slow_read_every_s: float = 0.25
    """One read of at most ~8 KiB (the small receive buffer) per interval: ~32 KB/s."""
    latency_every: int = 20
    """Every n-th fan-out subscriber records latency (plus one per run and the heavy ones)."""
    sample_every_s: float = 2.0
    window_s: float = 10.0
    """RSS window compared: the first after warm-up and the last of the run."""
    drain_timeout_s: float = 30.0
    connect_timeout_s: float = 60.0
    prefix: str = "soak"

    def validate(self) -> None:
        if self.duration_s < self.warmup_s + 2 * self.window_s:
            raise ValueError(
                f"duration {self.duration_s}s must cover warm-up {self.warmup_s}s and two "
                f"{self.window_s}s windows"
            )

    @property
    def connections(self) -> int:
        """Subscriber and producer connections open at once."""
        slow = self.never_readers + self.slow_readers
        return self.subscribers + self.runs * self.subs_per_run + self.heavy_subscribers + slow + 4


@dataclass
class Sample:
    """One reading of the relay process during the load."""

    t_s: float
    rss_kib: int
    fds: int


@dataclass
class SoakResult:
    """What one soak measured; ``problems`` lists every broken expectation."""

    duration_s: float
    subscribers: int
    runs: int
    events_published: int
    events_delivered: int
    events_expected: int
    """Each normal subscriber's run's event count, summed: what exactly-once delivery gives."""
    lost: int
    duplicated: int
    foreign: int
    normal_closed: int
    rss_start_mib: float
    rss_end_mib: float
    rss_peak_mib: float
    fds_idle: int
    fds_peak: int
    fds_end: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    latency_samples: int
    slow_consumers: int
    slow_cut: int
    slow_1013: int
    slow_cut_metric: float
    slow_cut_after_s: list[float]
    """Seconds from the first load event to each slow consumer's cut, as logged."""
    relay_cpu_pct: float
    client_cpu_pct: float
    connect_s: float
    drain_s: float
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_start_mib

    @property
    def rss_allowed_mib(self) -> float:
        return max(RSS_GROWTH_MIB, RSS_GROWTH_FRACTION * self.rss_start_mib)

    def figures(self) -> dict[str, Any]:
        """The headline numbers, for ``record()`` and ``--json``."""
        return {
            "duration_s": round(self.duration_s, 1),
            "subscribers": self.subscribers,
            "runs": self.runs,
            "events_published": self.events_published,
            "events_delivered": self.events_delivered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "rss_start_mib": round(self.rss_start_mib, 1),
            "rss_end_mib": round(self.rss_end_mib, 1),
            "fds_start": self.fds_idle,
            "fds_peak": self.fds_peak,
            "fds_end": self.fds_end,
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "slow_cut": self.slow_cut,
            "slow_consumers": self.slow_consumers,
            "slow_1013": self.slow_1013,
            "relay_cpu_pct": round(self.relay_cpu_pct, 1),
            "client_cpu_pct": round(self.client_cpu_pct, 1),
        }


# -- relay side ----------------------------------------------------------------------------


def relay_args(cfg: SoakConfig) -> list[str]:
    """``fedrelay serve`` flags for the soak (see MAX_QUEUE_BYTES, REPLAY_SIZE)."""
    args = ["--max-queue-bytes", str(MAX_QUEUE_BYTES), "--replay-size", str(REPLAY_SIZE)]
    return args + connection_limit_args(cfg.connections)


def connection_limit_args(needed: int) -> list[str]:
    """Lift a per-IP connection limit, if this relay has one: every client here is 127.0.0.1."""
    help_text = subprocess.run(
        [sys.executable, "-m", "fedrelay", "serve", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    if "--max-connections-per-ip" not in help_text:
        return []
    return ["--max-connections-per-ip", str(max(4096, 2 * needed))]


def raise_fd_limit() -> None:
    """1,300 sockets here and as many in the relay (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def read_rss_kib(pid: int) -> int:
    """VmRSS from /proc/PID/status: resident memory, what a leak grows."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_fds(pid: int) -> int:
    """Open sockets (listening and connected) of a process."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET on the relay, off the event loop."""

    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await asyncio.to_thread(get)


async def metric(port: int, name: str) -> float:
    """One sample of the relay's /metrics, by its full key."""
    status, body = await http_get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse(body.decode()).get(name, 0.0)


async def settled(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> bool:
    """Whether ``predicate`` came true in time: the soak reports what did not settle among its
    problems (with the figures) rather than stopping at the first."""
    try:
        await until(predicate, timeout, interval=interval, what=what)
    except TimeoutError:
        return False
    return True


# -- subscribers ---------------------------------------------------------------------------


class SoakSubscriber(RawSubscriber):
    """Follows one run and checks its stream in place: count, seq order, run, latency.

    ``role``: ``normal`` reads everything; ``never`` stops reading after ``subscribed``;
    ``slow`` reads one chunk per ``read_every_s``. ``drain()`` makes any of them read at
    full speed (to reach the close frame of a cut).
    """

    def __init__(
        self,
        port: int,
        run_id: str,
        *,
        role: str = "normal",
        latency: bool = False,
        read_every_s: float = 0.25,
    ) -> None:
        super().__init__(HOST, port, f"/subscribe?run_id={run_id}&since=0", record_latency=latency)
        self.run_id = run_id
        self.role = role
        self.read_every_s = read_every_s
        self.run_marker = b'"run_id":"' + run_id.encode() + b'"'
        self.last_seq = 0
        self.duplicates = 0
        self.missing = 0
        self.foreign = 0
        self.local_port = 0
        self.draining = False
        self.cut_logged = False
        self.cut_at = 0.0
        """time.monotonic() when the relay's log named this connection as cut."""

    def data_received(self, data: bytes) -> None:
        """Parse, then throttle a slow consumer (pause; a slow one resumes later)."""
        super().data_received(data)
        if self.role == "normal" or self.draining or not self.subscribed.done():
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
            if self.role == "slow":
                asyncio.get_running_loop().call_later(self.read_every_s, self._resume)

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def drain(self) -> None:
        """Read as fast as possible from now on."""
        self.draining = True
        self._resume()

    def _message(self, data: bytes | bytearray, start: int, end: int, now: int) -> None:
        """Check every event's seq (gap, duplicate) and run; sample latency."""
        self.frames += 1
        seqs = SEQ_RE.findall(data, start, end)
        if not seqs:
            self._control(bytes(data[start:end]))
            return
        if not self.count:
            self.first_ns = now
        self.count += len(seqs)
        self.last_ns = now
        if data.count(self.run_marker, start, end) != len(seqs):
            self.foreign += 1
        last = self.last_seq
        for raw in seqs:
            seq = int(raw)
            if seq == last + 1:
                last = seq
            elif seq <= last:
                self.duplicates += 1
            else:
                self.missing += seq - last - 1
                last = seq
        self.last_seq = last
        if self.latencies is not None:
            for raw in SENT_NS_RE.findall(data, start, end):
                sent_ns = int(raw)
                if sent_ns:
                    self.latencies.append(sent_ns)
                    self.latencies.append(now - sent_ns)


async def open_subscriber(sub: SoakSubscriber, timeout: float) -> None:
    """Connect (slow consumers with a small receive buffer), upgrade, wait for ``subscribed``."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if sub.role == "normal":
            await loop.create_connection(lambda: sub, HOST, sub.port)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (HOST, sub.port))
            except BaseException:
                sock.close()
                raise
            await loop.create_connection(lambda: sub, sock=sock)
        await sub.handshake_done
        await sub.subscribed
    assert sub._transport is not None
    sub.local_port = sub._transport.get_extra_info("sockname")[1]


async def open_all(subs: list[SoakSubscriber], timeout: float, concurrency: int = 50) -> None:
    """Open every subscriber, a bounded number of handshakes at a time (no SYN flood)."""
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(sub: SoakSubscriber) -> None:
        async with gate:
            try:
                await open_subscriber(sub, timeout)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(sub) for sub in subs))
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(subs)} subscribers failed to connect: {errors[:3]}")


# -- producers -----------------------------------------------------------------------------


async def publish_paced(
    producer: Producer,
    runs: list[str],
    rate: float,
    start: float,
    stop: float,
    published: dict[str, int],
    pad: int = 0,
    tick: float = 0.02,
) -> None:
    """Publish ``rate`` events/s round-robin over ``runs`` on an absolute schedule until ``stop``.

    Events due in one tick go out as one frame (an array when several): few frames keep the
    producer cheap; ``sent_ns`` is taken just before the send, so latency is not inflated.
    """
    sent = 0
    next_tick = start
    while True:
        now = time.monotonic()
        if now >= stop:
            return
        due = int((now - start) * rate) - sent
        if due > 0:
            sent_ns = time.monotonic_ns()
            batch = []
            for _ in range(due):
                run_id = runs[sent % len(runs)]
                item = event(run_id, producer.next_id, sent_ns)
                if pad:
                    item["data"]["pad"] = "x" * pad
                producer.next_id += 1
                published[run_id] += 1
                batch.append(item)
                sent += 1
            await producer.send_raw(batch[0] if len(batch) == 1 else batch)
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


# -- the soak ------------------------------------------------------------------------------


class CutWatcher:
    """Reads the relay's log for "cut slow consumer HOST:PORT" and drains those clients."""

    def __init__(self, log_path: Path, subs: list[SoakSubscriber]) -> None:
        self.log_path = log_path
        self.by_port = {sub.local_port: sub for sub in subs}
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.cut_ports: set[int] = set()

    def scan(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.log_path, "rb") as log:
            log.seek(self.offset)
            text = log.read()
        if not text:
            return
        complete = text.rfind(b"\n") + 1
        self.offset += complete
        for match in CUT_LOG_RE.finditer(text[:complete].decode("utf-8", "replace")):
            port = int(match.group(1))
            self.cut_ports.add(port)
            sub = self.by_port.get(port)
            if sub is not None and not sub.cut_logged:
                sub.cut_logged = True
                sub.cut_at = time.monotonic()
                sub.drain()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.scan()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
        self.scan()


async def sample_relay(pid: int, t0: float, every: float, out: list[Sample], stop: asyncio.Event) -> None:
    """RSS and fd count every ``every`` seconds until ``stop``."""
    while not stop.is_set():
        out.append(Sample(time.monotonic() - t0, read_rss_kib(pid), fd_count(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted values; NaN when there are none."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return float(sorted_values[int(rank) - 1])


def window_median(samples: list[Sample], lo: float, hi: float) -> float:
    """Median RSS (MiB) of the samples taken in ``[lo, hi]`` seconds."""
    values = sorted(s.rss_kib for s in samples if lo <= s.t_s <= hi)
    if not values:
        return float("nan")
    return values[len(values) // 2] / 1024


async def create_runs(port: int, pid: int, prefix: str, published: dict[str, int]) -> int:
    """Create every run (first event: ``training_start``), then return the relay's idle fd count.

    Counted once the setup connection is gone and the store's reader has opened its files (an
    events API read), so a sound relay returns to exactly this count after the soak.
    """
    sockets_idle = socket_fds(pid)
    name = f"{prefix}-setup"
    setup = await Producer.open(f"ws://{HOST}:{port}/publish?producer={name}", name, prefix)
    try:
        for run_id in published:
            await setup.send_raw(
                {"type": "training_start", "run_id": run_id, "data": {"experiment_name": prefix}}
            )
            published[run_id] += 1
        if not await setup.wait_acked(setup.sent, 30):
            raise RuntimeError(f"the runs were not created: {setup.errors} {setup.close_info}")
    finally:
        await setup.close()
    status, _ = await http_get(port, f"/api/runs/{next(iter(published))}/events?since=0&limit=1")
    if status != 200:
        raise RuntimeError(f"events API answered {status}")
    await until(lambda: socket_fds(pid) <= sockets_idle, 10, interval=0.1, what="the setup socket to close")
    return fd_count(pid)


def check_streams(
    normal: list[SoakSubscriber], slow: list[SoakSubscriber], published: dict[str, int]
) -> tuple[int, int, int, list[str]]:
    """Lost, duplicated and other-run events over all subscribers, and what went wrong."""
    problems: list[str] = []
    lost = duplicated = foreign = 0
    for sub in normal:
        lost += sub.missing + max(0, published[sub.run_id] - sub.last_seq)
        duplicated += sub.duplicates
        foreign += sub.foreign
    for sub in slow:  # what a cut client got before its cut is still gap-free and in order
        duplicated += sub.duplicates
        foreign += sub.foreign
        if sub.missing:
            problems.append(f"slow consumer {sub.local_port} saw a gap of {sub.missing} before its cut")
        if sub.close_code not in (None, 1013):
            problems.append(f"slow consumer {sub.local_port} closed with {sub.close_code} {sub.close_reason}")
    short = [s for s in normal if s.last_seq < published[s.run_id]]
    if short:
        sub = short[0]
        problems.append(
            f"{len(short)} subscribers incomplete, e.g. {sub.run_id} at {sub.last_seq} of "
            f"{published[sub.run_id]} (close {sub.close_code} {sub.close_reason})"
        )
    for name, value in (("lost", lost), ("duplicated", duplicated), ("of another run", foreign)):
        if value:
            problems.append(f"{value} events {name}")
    return lost, duplicated, foreign, problems


def sampled_latencies(subs: list[SoakSubscriber], from_ns: int) -> list[int]:
    """Sorted receive - send times of events sent after ``from_ns``."""
    return sorted(
        lat
        for sub in subs
        if sub.latencies is not None
        for sent_ns, lat in zip(sub.latencies[0::2], sub.latencies[1::2], strict=True)
        if sent_ns >= from_ns
    )


async def run_soak(cfg: SoakConfig, port: int, pid: int, log_path: Path) -> SoakResult:
    """Drive one soak against a running relay (its port, pid and log file).

    A broken expectation goes into ``problems``; a relay that goes away or refuses
    connections raises.
    """
    cfg.validate()
    problems: list[str] = []
    url = f"ws://{HOST}:{port}"
    p = cfg.prefix
    fan_run, heavy_run = f"{p}-fan", f"{p}-heavy"
    small_runs = [f"{p}-r{i:03d}" for i in range(cfg.runs)]
    published = dict.fromkeys([fan_run, heavy_run, *small_runs], 0)
    fds_idle = await create_runs(port, pid, p, published)

    fan = [SoakSubscriber(port, fan_run, latency=i % cfg.latency_every == 0) for i in range(cfg.subscribers)]
    small = [
        SoakSubscriber(port, run_id, latency=j == 0) for run_id in small_runs for j in range(cfg.subs_per_run)
    ]
    heavy = [SoakSubscriber(port, heavy_run, latency=True) for _ in range(cfg.heavy_subscribers)]
    slow = [SoakSubscriber(port, heavy_run, role="never") for _ in range(cfg.never_readers)] + [
        SoakSubscriber(port, heavy_run, role="slow", read_every_s=cfg.slow_read_every_s)
        for _ in range(cfg.slow_readers)
    ]
    normal = fan + small + heavy
    producers: list[Producer] = []
    background: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    samples: list[Sample] = []
    try:
        # Every subscriber connected and subscribed before the first load event.
        connect_started = time.monotonic()
        await open_all(normal + slow, cfg.connect_timeout_s)
        connect_s = time.monotonic() - connect_started
        for name in ("fan", "mux", "heavy"):
            producers.append(await Producer.open(f"{url}/publish?producer={p}-{name}", f"{p}-{name}", p))

        watcher = CutWatcher(log_path, slow)
        t0 = time.monotonic()
        end = t0 + cfg.duration_s
        relay_cpu0, own_cpu0 = cpu_seconds(pid), own_cpu_seconds()
        background += [
            asyncio.create_task(sample_relay(pid, t0, cfg.sample_every_s, samples, stop)),
            asyncio.create_task(watcher.run(stop)),
        ]
        await asyncio.gather(
            publish_paced(producers[0], [fan_run], cfg.rate, t0, end, published),
            publish_paced(producers[1], small_runs, cfg.run_rate * cfg.runs, t0, end, published),
            publish_paced(producers[2], [heavy_run], cfg.heavy_rate, t0, end, published, pad=cfg.heavy_pad),
        )
        load_s = time.monotonic() - t0
        relay_cpu = 100 * (cpu_seconds(pid) - relay_cpu0) / load_s
        client_cpu = 100 * (own_cpu_seconds() - own_cpu0) / load_s
        samples.append(Sample(load_s, read_rss_kib(pid), fd_count(pid)))

        # Drain: every event acked, every normal subscriber at its run's last seq.
        drain_started = time.monotonic()
        for producer in producers:
            if not await producer.wait_acked(producer.sent, cfg.drain_timeout_s):
                problems.append(f"{producer.name}: acked {producer.acked} of {producer.sent}")
            if producer.error_count or producer.close_info:
                problems.append(f"{producer.name}: errors {producer.errors[:2]} {producer.close_info}")
        await settled(  # a subscriber left behind is counted by check_streams below
            lambda: all(s.last_seq >= published[s.run_id] or s.closed.done() for s in normal),
            cfg.drain_timeout_s,
            "every normal subscriber at its run's last seq",
        )
        drain_s = time.monotonic() - drain_started
        # Slow consumers: each named in a cut, then its connection ends (close frame or abort).
        if not await settled(lambda: all(s.cut_logged for s in slow), cfg.drain_timeout_s, "slow ones cut"):
            problems.append(
                f"slow consumers not cut: {[(s.role, s.local_port) for s in slow if not s.cut_logged]}"
            )
        if not await settled(
            lambda: all(s.closed.done() for s in slow if s.cut_logged), 15, "cut ones closed"
        ):
            problems.append("a cut slow consumer's connection stayed open")
        stop.set()
        await asyncio.gather(*background)

        status, body = await http_get(port, "/api/runs?limit=1000")  # 102 runs: one page
        stored = {run["run_id"]: run["last_seq"] for run in json.loads(body)["runs"]} if status == 200 else {}
        for run_id, count in published.items():
            if stored.get(run_id) != count:
                problems.append(f"run {run_id}: relay last_seq {stored.get(run_id)}, published {count}")
        slow_cut_metric = await metric(port, "fedrelay_slow_consumers_total")
        # Before our own close: a normal subscriber the relay closed, or that got anything
        # but ``subscribed`` as a control frame, was affected by the load or by the slow ones.
        affected = [s for s in normal if s.closed.done() or s.other_frames != 1]
    finally:
        stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await close_all(normal + slow, timeout=10.0)
        for producer in producers:
            await producer.close()

    # Everything closed: the relay's fds go back to the idle count (closes are asynchronous).
    await settled(lambda: fd_count(pid) <= fds_idle, 10, "fds back to idle", interval=0.2)  # checked next
    fds_end = fd_count(pid)
    if fds_end > fds_idle + FD_MARGIN:
        problems.append(f"fd leak: {fds_end} open after the soak, {fds_idle} idle before")
    lost, duplicated, foreign, stream_problems = check_streams(normal, slow, published)
    problems += stream_problems
    if affected:
        sub = affected[0]
        problems.append(
            f"{len(affected)} normal subscribers closed or got unexpected control frames, e.g. "
            f"close {sub.close_code} {sub.close_reason!r}, controls {sub.controls[:3]}"
        )
    if slow_cut_metric != len(slow):
        problems.append(f"fedrelay_slow_consumers_total = {slow_cut_metric:g}, expected {len(slow)}")
    cut_elsewhere = watcher.cut_ports - {s.local_port for s in slow}
    if cut_elsewhere:
        problems.append(f"the relay cut connections that were reading: ports {sorted(cut_elsewhere)}")

    latencies = sampled_latencies(normal, int((t0 + cfg.warmup_s) * 1e9))
    result = SoakResult(
        duration_s=load_s,
        subscribers=len(normal),
        runs=len(published),
        events_published=sum(published.values()),
        events_delivered=sum(s.count for s in normal),
        events_expected=sum(published[s.run_id] for s in normal),
        lost=lost,
        duplicated=duplicated,
        foreign=foreign,
        normal_closed=len(affected),
        rss_start_mib=window_median(samples, cfg.warmup_s, cfg.warmup_s + cfg.window_s),
        rss_end_mib=window_median(samples, load_s - cfg.window_s, load_s),
        rss_peak_mib=max(s.rss_kib for s in samples) / 1024,
        fds_idle=fds_idle,
        fds_peak=max(s.fds for s in samples),
        fds_end=fds_end,
        p50_ms=percentile(latencies, 50) / NS_PER_MS,
        p99_ms=percentile(latencies, 99) / NS_PER_MS,
        max_ms=(latencies[-1] if latencies else float("nan")) / NS_PER_MS,
        latency_samples=len(latencies),
        slow_consumers=len(slow),
        slow_cut=sum(s.cut_logged for s in slow),
        slow_1013=sum(s.close_code == 1013 for s in slow),
        slow_cut_metric=slow_cut_metric,
        slow_cut_after_s=sorted(round(s.cut_at - t0, 1) for s in slow if s.cut_logged),
        relay_cpu_pct=relay_cpu,
        client_cpu_pct=client_cpu,
        connect_s=connect_s,
        drain_s=drain_s,
        samples=samples,
        problems=problems,
    )
    if not result.rss_growth_mib <= result.rss_allowed_mib:  # NaN (no samples) fails too
        problems.append(
            f"relay RSS grew {result.rss_growth_mib:.1f} MiB after warm-up (allowed "
            f"{result.rss_allowed_mib:.1f}): {[(round(s.t_s), s.rss_kib // 1024) for s in samples]}"
        )
    return result
