"""Plumbing shared by the scenarios: load-generator workers, CPU and RSS meters, stats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from relays import BENCH_DIR, stop_process


class Worker:
    """One ``loadgen.py`` process, spoken to in JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process, index: int) -> None:
        self.process = process
        self.index = index

    @classmethod
    async def start(cls, index: int, log_path: Path) -> Worker:
        with open(log_path, "ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(BENCH_DIR / "loadgen.py"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=BENCH_DIR,
                limit=1 << 20,
            )
        worker = cls(process, index)
        hello = await worker.receive(timeout=20)
        if not hello.get("ready"):
            raise RuntimeError(f"load generator {index} did not start: {hello}")
        return worker

    @property
    def pid(self) -> int:
        return self.process.pid

    async def call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        return await self.receive(timeout)

    async def receive(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"load generator {self.index} exited ({self.process.returncode})")
        return json.loads(line)

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"cmd": "quit"}\n')
            await self.process.stdin.drain()
            await asyncio.wait_for(self.process.wait(), 5)
        await stop_process(self.process, grace=2)


def split(total: int, parts: int) -> list[int]:
    """Spread ``total`` over ``parts`` as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class LoadGenPool:
    """The subscriber workers, started once and reused by every scenario run."""

    def __init__(self, workers: list[Worker], client: str) -> None:
        self.workers = workers
        self.client = client
        self._active: list[Worker] = []

    @classmethod
    async def start(cls, count: int, log_dir: Path, client: str = "raw") -> LoadGenPool:
        workers = await asyncio.gather(*(Worker.start(i, log_dir / f"loadgen{i}.log") for i in range(count)))
        return cls(list(workers), client)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def connect(
        self, port: int, path: str, n: int, *, latency: bool = False, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Open ``n`` subscribers spread over the workers; fail if any could not connect."""
        shares = split(n, len(self.workers))
        self._active = [w for w, share in zip(self.workers, shares, strict=True) if share]
        answers = await asyncio.gather(
            *(
                w.call(
                    {
                        "cmd": "connect",
                        "host": "127.0.0.1",
                        "port": port,
                        "path": path,
                        "n": share,
                        "latency": latency,
                        "timeout": timeout / 2,
                        "client": self.client,
                    },
                    timeout,
                )
                for w, share in zip(self.workers, shares, strict=True)
                if share
            )
        )
        merged = {
            "connected": sum(a["connected"] for a in answers),
            "error_count": sum(a["error_count"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]][:5],
            "connect_s": max(a["connect_s"] for a in answers),
        }
        if merged["error_count"]:
            raise RuntimeError(
                f"{merged['error_count']} of {n} subscribers failed to connect: {merged['errors']}"
            )
        return merged

    async def finish(self, expect: int, timeout: float, lat_dir: Path | None = None) -> dict[str, Any]:
        """Wait for every subscriber to reach ``expect`` events, then close them."""
        files = [lat_dir / f"lat{w.index}.bin" if lat_dir else None for w in self._active]
        answers = await asyncio.gather(
            *(
                w.call(
                    {
                        "cmd": "finish",
                        "expect": expect,
                        "timeout": timeout,
                        "lat_file": str(f) if f else None,
                    },
                    timeout + 30,
                )
                for w, f in zip(self._active, files, strict=True)
            )
        )
        self._active = []
        merged = merge_summaries(answers)
        merged["latencies"] = read_samples(f for f in files if f)
        return merged

    async def close(self) -> None:
        await asyncio.gather(*(w.quit() for w in self.workers))


def merge_summaries(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine the per-worker summaries of ``loadgen.finish``."""
    closes: Counter[str] = Counter()
    for a in answers:
        closes.update(a["closes"])
    firsts = [a["first_ns"] for a in answers if a["first_ns"]]
    return {
        "subs": sum(a["subs"] for a in answers),
        "total": sum(a["total"] for a in answers),
        "min_count": min((a["min_count"] for a in answers), default=0),
        "max_count": max((a["max_count"] for a in answers), default=0),
        "complete": sum(a["complete"] for a in answers),
        "frames": sum(a["frames"] for a in answers),
        "reads": sum(a["reads"] for a in answers),
        "first_ns": min(firsts, default=0),
        "last_ns": max((a["last_ns"] for a in answers), default=0),
        "closes": dict(closes),
        "unexpected_controls": [c for a in answers for c in a["unexpected_controls"]][:5],
        "unexpected_control_count": sum(a["unexpected_control_count"] for a in answers),
        "all_done": all(a["all_done"] for a in answers),
    }


def read_samples(paths: Iterable[Path]) -> array[int]:
    """Load the (sent_ns, latency_ns) int64 pairs the workers wrote, flat."""
    samples = array("q")
    for path in paths:
        with open(path, "rb") as handle:
            samples.frombytes(handle.read())
        path.unlink()
    return samples


class CpuMeter:
    """CPU used by a set of processes over a window, in % of one core."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.start_wall = time.monotonic()
        self.start_cpu = self._cpu()

    def _cpu(self) -> float:
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def percent(self) -> float:
        wall = time.monotonic() - self.start_wall
        return 100.0 * (self._cpu() - self.start_cpu) / wall if wall > 0 else 0.0


class MachineMeter:
    """Whole-machine busy % and steal % over a window, from /proc/stat.

    Tells a reader whether a run was CPU-bound as a whole (relay + load
    generator + kernel network processing), which is what drives latency
    tails on a 2-core machine.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> list[int]:
        try:
            with open("/proc/stat") as handle:
                return [int(x) for x in handle.readline().split()[1:]]
        except OSError:
            return []

    def busy_and_steal(self) -> tuple[float, float]:
        now = self._read()
        if not now or not self.start:
            return math.nan, math.nan
        delta = [b - a for a, b in zip(self.start, now, strict=False)]
        total = sum(delta[:8]) or 1
        idle = delta[3] + delta[4]
        return 100.0 * (total - idle) / total, 100.0 * delta[7] / total


async def settled_rss(pid: int, samples: int = 10, interval: float = 0.1) -> int:
    """RSS once two readings 100 ms apart agree within 1% (bounded: ``samples`` reads)."""
    proc = psutil.Process(pid)
    last = proc.memory_info().rss
    for _ in range(samples):
        await asyncio.sleep(interval)
        rss = proc.memory_info().rss
        if abs(rss - last) <= 0.01 * last:
            return rss
        last = rss
    return last


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def median(values: Iterable[float | None]) -> float:
    """Median ignoring missing values; NaN when nothing is left."""
    clean = sorted(v for v in values if v is not None and not math.isnan(v))
    if not clean:
        return math.nan
    mid = len(clean) // 2
    return clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2
