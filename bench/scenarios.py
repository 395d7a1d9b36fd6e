"""The bench scenarios. Each ``run_*`` function measures one relay once.

Every run uses a fresh run id and fresh producer names, so fedrelay's
history and deduplication from earlier runs cannot leak into it, and every
loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil

from harness import CpuMeter, LoadGenPool, MachineMeter, percentile, settled_rss
from producer import Producer
from rawws import RawSubscriber, connect_many, connect_subscriber
from relays import HOST, Relay, http_get, is_fedrelay

NS_PER_MS = 1_000_000


@dataclass
class Config:
    """Sizes and bounds of every scenario (``--quick`` shrinks them)."""

    subscribers: int = 100
    fanout_events: int = 20_000
    fanout_seconds: float = 6.0
    fanout_window: int = 256
    latency_rate: int = 500
    latency_warmup_s: float = 1.0
    latency_seconds: float = 9.0
    latency_low_rate: int = 250
    latency_low_seconds: float = 5.0
    ingest_producers: int = 50
    ingest_rate: int = 100
    ingest_seconds: float = 12.0
    catchup_events: int = 100_000
    catchup_batch: int = 500
    memory_connections: int = 1_000
    drain_timeout: float = 15.0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            fanout_events=3_000,
            fanout_seconds=3.0,
            latency_seconds=3.0,
            latency_low_seconds=3.0,
            ingest_seconds=4.0,
            catchup_events=20_000,
            memory_connections=200,
            drain_timeout=8.0,
        )


@dataclass
class Ctx:
    """What a scenario run needs besides the relay."""

    config: Config
    pool: LoadGenPool
    workdir: Path
    notes: list[str] = field(default_factory=list)
    pg: Any = None
    """The bench's PostgreSQL server (``pg.PgServer``) when a PostgreSQL relay kind runs."""


def new_run_id(scenario: str, relay: Relay) -> str:
    return f"{scenario}-{relay.kind}-{uuid.uuid4().hex[:8]}"


def sub_path(run_id: str, since: int = 0) -> str:
    return f"/subscribe?run_id={run_id}&since={since}"


async def open_producer(
    relay: Relay, run_id: str, name: str, *, track_acks: bool = False, index: int = 0
) -> Producer:
    """The ``index``-th producer of a run: a cluster spreads them over its publishing nodes."""
    url = relay.url(f"/publish?producer={name}", index)
    return await Producer.open(url, name, run_id, track_acks=track_acks)


async def create_run(relay: Relay, producer: Producer) -> None:
    """Publish a first, non-bench event so the run exists before anyone subscribes.

    On fedrelay wait for its ack (the run is then stored); the baselines drop
    it since nobody is subscribed yet. Subscribers see it as a non-event frame.
    """
    await producer.send_raw(
        {
            "type": "training_start",
            "run_id": producer.run_id,
            "data": {"experiment_name": "bench", "num_clients": 10},
        }
    )
    if is_fedrelay(relay.kind) and not await producer.wait_acked(1, timeout=10):
        raise RuntimeError(f"fedrelay did not ack the run's first event: {producer.errors}")


def relay_problems(sub_summary: dict[str, Any], producers: list[Producer]) -> list[str]:
    """Human-readable anomalies: closes, unexpected control frames, producer errors."""
    problems = []
    if sub_summary.get("closes"):
        problems.append(f"subscriber closes {sub_summary['closes']}")
    if sub_summary.get("unexpected_control_count"):
        problems.append(
            f"{sub_summary['unexpected_control_count']} unexpected control frames, "
            f"e.g. {sub_summary['unexpected_controls'][:2]}"
        )
    errors = sum(p.error_count for p in producers)
    if errors:
        sample = next(p.errors[0] for p in producers if p.errors)
        problems.append(f"{errors} producer error frames, e.g. {sample}")
    closed = [p.close_info for p in producers if p.close_info]
    if closed:
        problems.append(f"{len(closed)} producer connections closed by relay: {closed[0]}")
    return problems


def local_summary(subs: list[RawSubscriber], expect: int) -> dict[str, Any]:
    """The same summary the workers give, for subscribers held in this process."""
    closes: dict[str, int] = {}
    for s in subs:
        if s.close_code:
            key = f"{s.close_code} {s.close_reason}".strip()
            closes[key] = closes.get(key, 0) + 1
    controls = [c for s in subs for c in s.controls if c.get("op") not in (None, "subscribed")]
    return {
        "total": sum(s.count for s in subs),
        "complete": sum(1 for s in subs if s.count >= expect),
        "last_ns": max((s.last_ns for s in subs), default=0),
        "closes": closes,
        "unexpected_controls": controls[:5],
        "unexpected_control_count": len(controls),
    }


# -- fan-out -------------------------------------------------------------------


async def publish_windowed(
    producer: Producer, pacer: RawSubscriber, count: int, seconds: float, window: int
) -> tuple[int, bool]:
    """Publish as fast as the relay delivers, at most ``window`` events ahead of ``pacer``.

    Without the window the producer would just fill socket buffers and the
    relay's queues, and the number would measure buffering, not delivery.
    Returns (events sent, whether delivery stalled for 5 s).
    """
    deadline = time.monotonic() + seconds
    sent = 0
    while sent < count and time.monotonic() < deadline:
        if sent - pacer.count >= window:
            try:
                await asyncio.wait_for(pacer.wait_count(sent - window + 1), 5.0)
            except (TimeoutError, ConnectionError):
                return sent, True
            continue
        await producer.send_event()
        sent += 1
    return sent, False


async def run_fanout(ctx: Ctx, relay: Relay) -> dict[str, Any]:
    """1 producer -> N subscribers, delivered events per second over all subscribers."""
    cfg = ctx.config
    run_id = new_run_id("fanout", relay)
    producer = await open_producer(relay, run_id, f"{run_id}-p")
    pacer: RawSubscriber | None = None
    try:
        await create_run(relay, producer)
        pacer = await connect_subscriber(HOST, relay.sub_port, sub_path(run_id))
        await ctx.pool.connect(relay.sub_port, sub_path(run_id), cfg.subscribers - 1)
        relay_cpu, gen_cpu, own_cpu = CpuMeter(relay.pids), CpuMeter(ctx.pool.pids), CpuMeter([os.getpid()])
        machine = MachineMeter()
        start_ns = time.monotonic_ns()
        sent, stalled = await publish_windowed(
            producer, pacer, cfg.fanout_events, cfg.fanout_seconds, cfg.fanout_window
        )
        pacer_wait = asyncio.ensure_future(pacer.wait_count(sent))
        remote = await ctx.pool.finish(sent, cfg.drain_timeout)
        busy = machine.busy_and_steal()
        await asyncio.wait([pacer_wait], timeout=2.0)
        local = local_summary([pacer], sent)
        end_ns = max(remote["last_ns"], local["last_ns"])
        total = remote["total"] + local["total"]
        elapsed = (end_ns - start_ns) / 1e9 if end_ns > start_ns else float("nan")
        problems = relay_problems(remote, [producer]) + relay_problems(local, [])
        if stalled:
            problems.append(f"delivery stalled (pacer saw no progress for 5 s) after {sent}")
        return {
            "delivered_per_s": total / elapsed,
            "published": sent,
            "publish_per_s": sent / elapsed,
            "delivered": total,
            "expected": sent * cfg.subscribers,
            "complete_subs": remote["complete"] + local["complete"],
            "elapsed_s": elapsed,
            "relay_cpu": relay_cpu.percent(),
            "loadgen_cpu": gen_cpu.percent(),
            "driver_cpu": own_cpu.percent(),
            "machine_busy": busy[0],
            "steal": busy[1],
            "frames_per_event": remote["frames"] / max(1, remote["total"]),
            "frames_per_read": remote["frames"] / max(1, remote["reads"]),
            "problems": problems,
        }
    finally:
        if pacer is not None:
            pacer.close()
        await producer.close()


# -- latency -------------------------------------------------------------------


async def publish_paced(
    producer: Producer, rate: float, warmup_s: float, seconds: float
) -> tuple[int, int, float]:
    """Publish at a fixed rate on an absolute schedule (late sends catch up).

    Warm-up events carry ``sent_ns = 0`` and are delivered but not sampled.
    Returns (events sent, warm-up events, achieved rate of the measured part).
    """
    interval = 1.0 / rate
    warm = int(rate * warmup_s)
    total = warm + int(rate * seconds)
    start = time.monotonic()
    hard_stop = start + 3 * (warmup_s + seconds) + 5
    measured_start = start
    sent = 0
    while sent < total and time.monotonic() < hard_stop:
        delay = start + sent * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if sent == warm:
            measured_start = time.monotonic()
        await producer.send_event(0 if sent < warm else None)
        sent += 1
    measured = sent - warm
    achieved = measured / max(1e-9, time.monotonic() - measured_start)
    return sent, warm, achieved


def split_by_time(pairs: Sequence[int], window_s: float) -> tuple[list[int], list[int]]:
    """Sorted latencies of events sent in the first and in the last ``window_s``.

    A relay (or load generator) that cannot keep up shows a tail that grows
    over the run; a noisy neighbour shows spikes anywhere.
    """
    sents = pairs[0::2]
    if not sents:
        return [], []
    lo, hi, window = min(sents), max(sents), int(window_s * 1e9)
    lats = pairs[1::2]
    early = sorted(lat for s, lat in zip(sents, lats, strict=True) if s < lo + window)
    late = sorted(lat for s, lat in zip(sents, lats, strict=True) if s > hi - window)
    return early, late


def stall_starts(
    pairs: Sequence[int], late_ns: int = 5 * NS_PER_MS, merge_ns: int = 50 * NS_PER_MS
) -> list[int]:
    """Send times at which the relay stalled: events late at *every* subscriber.

    Fan-out order makes the last subscriber later than the first; an event
    that even its earliest subscriber got more than ``late_ns`` after it was
    sent was held up before fan-out (parsing, storage, a busy loop). Late
    events closer than ``merge_ns`` form one stall.
    """
    earliest: dict[int, int] = {}
    for sent, lat in zip(pairs[0::2], pairs[1::2], strict=True):
        if lat < earliest.get(sent, lat + 1):
            earliest[sent] = lat
    starts: list[int] = []
    last_late = None
    for sent in sorted(earliest):
        if earliest[sent] > late_ns:
            if last_late is None or sent - last_late > merge_ns:
                starts.append(sent)
            last_late = sent
    return starts


def stall_stats(pairs: Sequence[int], seconds: float) -> dict[str, float | None]:
    """Stalls per second and the median time between stalls (periodic = suspicious)."""
    starts = stall_starts(pairs)
    gaps = sorted(b - a for a, b in pairwise(starts))
    return {
        "stalls_per_s": len(starts) / seconds,
        "stall_period_s": gaps[len(gaps) // 2] / 1e9 if gaps else None,
    }


async def run_latency(ctx: Ctx, relay: Relay) -> dict[str, Any]:
    """Fixed-rate publish to N subscribers; receive minus send time, per event."""
    cfg = ctx.config
    return await measure_latency(ctx, relay, cfg.latency_rate, cfg.latency_seconds)


async def run_latency_low(ctx: Ctx, relay: Relay) -> dict[str, Any]:
    """The same at a rate the relays do not saturate at: the relay's own delays, not queueing."""
    cfg = ctx.config
    return await measure_latency(ctx, relay, cfg.latency_low_rate, cfg.latency_low_seconds)


async def measure_latency(ctx: Ctx, relay: Relay, rate: int, seconds: float) -> dict[str, Any]:
    """Publish at ``rate`` for ``seconds`` (after warm-up); latency of every delivery."""
    cfg = ctx.config
    run_id = new_run_id("latency", relay)
    producer = await open_producer(relay, run_id, f"{run_id}-p")
    try:
        await create_run(relay, producer)
        await ctx.pool.connect(relay.sub_port, sub_path(run_id), cfg.subscribers, latency=True)
        relay_cpu, gen_cpu = CpuMeter(relay.pids), CpuMeter(ctx.pool.pids)
        machine = MachineMeter()
        sent, warm, achieved = await publish_paced(producer, rate, cfg.latency_warmup_s, seconds)
        cpu = (relay_cpu.percent(), gen_cpu.percent())
        busy = machine.busy_and_steal()
        remote = await ctx.pool.finish(sent, cfg.drain_timeout, lat_dir=ctx.workdir)
        pairs = remote.pop("latencies")
        samples = sorted(pairs[1::2])
        early, late = split_by_time(pairs, seconds / 4)
        expected = (sent - warm) * cfg.subscribers
        return {
            "p50_ms": percentile(samples, 50) / NS_PER_MS,
            "p99_ms": percentile(samples, 99) / NS_PER_MS,
            "p999_ms": percentile(samples, 99.9) / NS_PER_MS,
            "max_ms": (samples[-1] if samples else float("nan")) / NS_PER_MS,
            "p99_first_ms": percentile(early, 99) / NS_PER_MS,
            "p99_last_ms": percentile(late, 99) / NS_PER_MS,
            **stall_stats(pairs, seconds),
            "over_5ms": sum(1 for s in samples if s > 5 * NS_PER_MS) / max(1, len(samples)),
            "samples": len(samples),
            "expected": expected,
            "rate": achieved,
            "relay_cpu": cpu[0],
            "loadgen_cpu": cpu[1],
            "machine_busy": busy[0],
            "steal": busy[1],
            "frames_per_event": remote["frames"] / max(1, remote["total"]),
            "frames_per_read": remote["frames"] / max(1, remote["reads"]),
            "problems": relay_problems(remote, [producer]),
        }
    finally:
        await producer.close()


# -- ingest --------------------------------------------------------------------


async def paced_producer(producer: Producer, rate: float, seconds: float, phase: float) -> None:
    """One producer at ``rate`` events/s, offset by ``phase`` of an interval."""
    interval = 1.0 / rate
    total = int(rate * seconds)
    start = time.monotonic() + phase * interval
    hard_stop = start + 3 * seconds + 5
    for i in range(total):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > hard_stop:
            return
        await producer.send_event()


async def sample_backlog(
    producers: list[Producer], relay: Relay, stop: asyncio.Event, out: list[dict[str, float]]
) -> None:
    """Every 0.5 s: events sent, acked, and the relay's CPU%, until ``stop``."""
    meter = CpuMeter(relay.pids)
    for _ in range(10_000):
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
            return
        except TimeoutError:
            pass
        sent = sum(p.sent for p in producers)
        acked = sum(p.acked for p in producers)
        out.append({"sent": sent, "acked": acked, "cpu": meter.percent()})
        meter = CpuMeter(relay.pids)


async def relay_run_state(relay: Relay, run_id: str) -> dict[str, Any]:
    """``GET /api/runs/{run_id}`` (fedrelay only); empty dict when unavailable."""
    if not is_fedrelay(relay.kind):
        return {}
    try:
        response = await http_get(relay.port, f"/api/runs/{run_id}")
        return response.json() if response.status == 200 else {"status": response.status}
    except (OSError, TimeoutError, ValueError) as exc:
        return {"error": str(exc)}


async def relay_metrics(relay: Relay) -> dict[str, str]:
    """Prometheus lines of interest (lag, drops, errors) from fedrelay's ``/metrics``."""
    if not is_fedrelay(relay.kind):
        return {}
    try:
        text = (await http_get(relay.port, "/metrics")).body.decode(errors="replace")
    except (OSError, TimeoutError) as exc:
        return {"error": str(exc)}
    keep = ("lag", "drop", "error", "duplicate", "slow", "events", "commit", "connections")
    return {
        line.split()[0]: line.split()[-1]
        for line in text.splitlines()
        if line and not line.startswith("#") and any(k in line.split()[0] for k in keep)
    }


async def run_ingest(ctx: Ctx, relay: Relay) -> dict[str, Any]:
    """Many producers at a steady rate: does a backlog build, what does it cost in CPU?"""
    cfg = ctx.config
    run_id = new_run_id("ingest", relay)
    fed = is_fedrelay(relay.kind)
    producers = list(
        await asyncio.gather(
            *(
                open_producer(relay, run_id, f"{run_id}-p{i}", track_acks=fed, index=i)
                for i in range(cfg.ingest_producers)
            )
        )
    )
    sub: RawSubscriber | None = None
    try:
        await create_run(relay, producers[0])
        sub = await connect_subscriber(HOST, relay.sub_port, sub_path(run_id))
        samples: list[dict[str, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_backlog(producers, relay, stop, samples))
        total_cpu, machine = CpuMeter(relay.pids), MachineMeter()
        await asyncio.gather(
            *(
                paced_producer(p, cfg.ingest_rate, cfg.ingest_seconds, i / len(producers))
                for i, p in enumerate(producers)
            )
        )
        send_end = time.monotonic()
        cpu_during = total_cpu.percent()
        busy = machine.busy_and_steal()
        acked_at_end = sum(p.acked for p in producers)
        stop.set()
        await sampler
        settled = (
            await asyncio.gather(*(p.wait_acked(p.sent, cfg.drain_timeout) for p in producers))
            if fed
            else [True]
        )
        settle_s = time.monotonic() - send_end
        bench_events = sum(p.sent for p in producers) - 1
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(sub.wait_count(bench_events), cfg.drain_timeout)
        state, metrics = await relay_run_state(relay, run_id), await relay_metrics(relay)
        ack_lat = sorted(x for p in producers for x in p.ack_latency_ns)
        sent_total = sum(p.sent for p in producers)
        return {
            "sent": sent_total,
            "rate": bench_events / cfg.ingest_seconds,
            "acked_at_end": acked_at_end if fed else None,
            "acked_final": sum(p.acked for p in producers) if fed else None,
            "all_acked": all(settled),
            "settle_s": settle_s if fed else None,
            "last_seq": state.get("last_seq"),
            "max_backlog": max((s["sent"] - s["acked"] for s in samples), default=0) if fed else None,
            "ack_p50_ms": percentile(ack_lat, 50) / NS_PER_MS if fed else None,
            "ack_p99_ms": percentile(ack_lat, 99) / NS_PER_MS if fed else None,
            "ack_max_ms": (ack_lat[-1] / NS_PER_MS) if ack_lat else None,
            "relay_cpu": cpu_during,
            "relay_cpu_max": max((s["cpu"] for s in samples), default=0.0),
            "machine_busy": busy[0],
            "steal": busy[1],
            "sub_received": sub.count,
            "sub_expected": bench_events,
            "metrics": metrics,
            "run_state": state,
            "problems": relay_problems(local_summary([sub], bench_events), producers),
        }
    finally:
        if sub is not None:
            sub.close()
        await asyncio.gather(*(p.close() for p in producers))


# -- catch-up ------------------------------------------------------------------


async def publish_history(producer: Producer, events: int, batch: int, timeout: float) -> float:
    """Store ``events`` in array frames, at most 20 frames unacked; returns seconds taken."""
    start = time.monotonic()
    last_ids: list[int] = []
    for _ in range(events // batch):
        if len(last_ids) >= 20 and not await producer.wait_acked(last_ids[-20], timeout):
            raise RuntimeError(f"no ack for id {last_ids[-20]}: {producer.errors[:2]} {producer.close_info}")
        last_ids.append(await producer.send_batch(batch))
    if not await producer.wait_acked(producer.sent, timeout):
        raise RuntimeError(
            f"history not acked: acked {producer.acked}/{producer.sent} "
            f"{producer.errors[:2]} {producer.close_info}"
        )
    return time.monotonic() - start


def check_seqs(payloads: list[bytes], expected: int) -> tuple[bool, str, float]:
    """Decode every received frame and check seq runs 1..expected with no gap or repeat."""
    start = time.monotonic()
    seqs: list[int] = []
    for payload in payloads:
        message = json.loads(payload)
        for item in message if isinstance(message, list) else [message]:
            seqs.append(item["seq"])
    decode_s = time.monotonic() - start
    if seqs == list(range(1, expected + 1)):
        return True, "ok", decode_s
    bad = next((i for i, s in enumerate(seqs) if s != i + 1), len(seqs))
    return (
        False,
        f"{len(seqs)} seqs, first mismatch at index {bad}: {seqs[max(0, bad - 2) : bad + 3]}",
        decode_s,
    )


async def run_catchup(ctx: Ctx, relay: Relay) -> dict[str, Any]:
    """A new subscriber with since=0 on a long run: time until it holds all history."""
    cfg = ctx.config
    run_id = new_run_id("catchup", relay)
    producer = await open_producer(relay, run_id, f"{run_id}-p", track_acks=True)
    sub: RawSubscriber | None = None
    try:
        publish_s = await publish_history(producer, cfg.catchup_events, cfg.catchup_batch, 60)
        expected = producer.sent
        relay_cpu = CpuMeter(relay.pids)
        start_ns = time.monotonic_ns()
        sub = await connect_subscriber(HOST, relay.sub_port, sub_path(run_id), keep_payloads=True)
        subscribed_ns = time.monotonic_ns()
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(sub.wait_count(expected), 30)
        cpu = relay_cpu.percent()
        ok, detail, decode_s = check_seqs(sub.payloads or [], expected)
        return {
            "events": expected,
            "received": sub.count,
            "time_ms": (sub.last_ns - start_ns) / NS_PER_MS,
            "after_subscribed_ms": (sub.last_ns - subscribed_ns) / NS_PER_MS,
            "frames": len(sub.payloads or []),
            "events_per_frame": sub.count / max(1, len(sub.payloads or [])),
            "seq_ok": ok,
            "seq_detail": detail,
            "decode_ms": decode_s * 1000,
            "publish_per_s": expected / publish_s,
            "relay_cpu": cpu,
            "problems": relay_problems(local_summary([sub], expected), [producer]),
        }
    finally:
        if sub is not None:
            sub.close()
        await producer.close()


# -- memory per connection -----------------------------------------------------


async def warm_up_connections(relay: Relay, path: str, count: int = 20) -> None:
    """Open and close a few subscribers so one-time costs are not billed per connection."""
    subs, _ = await connect_many(HOST, relay.port, path, count)
    if not subs:
        raise RuntimeError("warm-up subscribers could not connect")
    for sub in subs:
        sub.close()
    await asyncio.wait([s.closed for s in subs], timeout=5)


async def run_memory(ctx: Ctx, relay: Relay) -> dict[str, Any]:
    """RSS growth of the relay per idle subscriber connection."""
    cfg = ctx.config
    run_id = new_run_id("memory", relay)
    producer = await open_producer(relay, run_id, f"{run_id}-p")
    try:
        await create_run(relay, producer)
    finally:
        await producer.close()
    path = sub_path(run_id)
    await warm_up_connections(relay, path)
    proc = relay.ps
    rss_before = await settled_rss(relay.pid)
    fds_before = proc.num_fds()
    connected = await ctx.pool.connect(relay.port, path, cfg.memory_connections, timeout=120)
    rss_after = await settled_rss(relay.pid)
    fds_after = proc.num_fds()
    remote = await ctx.pool.finish(0, 1.0)
    return {
        "connections": connected["connected"],
        "connect_s": connected["connect_s"],
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
        "kib_per_conn": (rss_after - rss_before) / 1024 / cfg.memory_connections,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "fd_limit": proc.rlimit(psutil.RLIMIT_NOFILE)[0],
        "problems": relay_problems(remote, []),
    }


SCENARIOS = {
    "fanout": run_fanout,
    "latency": run_latency,
    "latency_low": run_latency_low,
    "ingest": run_ingest,
    "catchup": run_catchup,
    "memory": run_memory,
}
"""Scenario name -> run function, in the default order."""
