"""What forwarding ``logging`` records costs the training process, against plain handlers.

One logger, one handler at a time, the same ``log.info("step %d loss %.4f", ...)`` call timed
alone with ``perf_counter_ns`` (median and p99 per call):

- ``NullHandler``: the logging machinery alone;
- ``StreamHandler`` to /dev/null with a timestamped format: what a configured program pays;
- the forwarder with the rate limit out of the way: every record becomes a ``log`` event,
  sent to a real relay (``fedrelay serve --db :memory:``) and checked as stored; also gives the
  records/s forwarded end to end (until the relay acked the last one);
- the forwarder under a flood with its default limit (20/s, bursts of 200): the cost of a
  record that is counted and dropped;
- ``log.exception`` through the forwarder: traceback formatting included.

    python bench/log_forwarding.py [--records 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from emitter_bench import free_port, percentile, start_relay, stored, timer_floor
from fedrelay.emitters import Emitter
from fedrelay.emitters.logs import LogForwarder


def time_calls(log: logging.Logger, records: int, *, exception: bool = False) -> tuple[list[int], float]:
    samples = [0] * records
    clock = time.perf_counter_ns
    info, error = log.info, log.exception
    started = time.perf_counter()
    for i in range(records):
        if exception:
            try:
                raise ValueError(f"bad batch {i}")
            except ValueError:
                t0 = clock()
                error("step %d failed", i)
                samples[i] = clock() - t0
        else:
            t0 = clock()
            info("step %d loss %.4f", i, 1.0 / (i + 1))
            samples[i] = clock() - t0
    return samples, time.perf_counter() - started


def with_handler(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"bench.{id(handler)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def row(name: str, samples: list[int], loop_s: float, note: str = "") -> str:
    return (
        f"| {name} | {len(samples):,} | {statistics.median(samples) / 1000:.2f} "
        f"| {percentile(samples, 0.99) / 1000:.2f} | {len(samples) / loop_s:,.0f} | {note} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="records per handler")
    parser.add_argument("--exceptions", type=int, default=2_000, help="log.exception calls")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    n = args.records

    port = free_port()
    relay = start_relay(port)
    rows: list[str] = []
    try:
        url = f"ws://127.0.0.1:{port}"
        floor = timer_floor()
        rows.append(row("`NullHandler`", *time_calls(with_handler(logging.NullHandler()), n)))
        with open(os.devnull, "w") as devnull:
            stream = logging.StreamHandler(devnull)
            stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            rows.append(row("`StreamHandler` (/dev/null, formatted)", *time_calls(with_handler(stream), n)))

        with TemporaryDirectory() as spool:
            em = Emitter(url, run_id="bench-logs", spool_dir=spool, role="trainer")
            em.emit("training_start", {"experiment_name": "bench-logs"})
            em.flush(10)  # connected and warm before timing
            unlimited = LogForwarder(em, rate=1e12, burst=10**12)
            samples, loop_s = time_calls(with_handler(unlimited), n)
            started = time.perf_counter() - loop_s
            em.flush(300)
            forwarded_per_s = n / (time.perf_counter() - started)
            count = stored(port, "bench-logs", n + 1) - 1
            rows.append(
                row(
                    "forwarder, every record sent",
                    samples,
                    loop_s,
                    f"{count:,}/{n:,} stored; {forwarded_per_s:,.0f} records/s forwarded until acked",
                )
            )
            unlimited.close()

            limited = LogForwarder(em)  # the defaults: 20/s, bursts of 200, per process
            samples, loop_s = time_calls(with_handler(limited), n)
            counts = f"{limited.stats['forwarded']:,} sent, {limited.stats['dropped']:,} dropped"
            rows.append(row("forwarder, default rate limit (flood)", samples, loop_s, counts))
            limited.close()

            traced = LogForwarder(em, rate=1e12, burst=10**12)
            samples, loop_s = time_calls(with_handler(traced), args.exceptions, exception=True)
            rows.append(row("forwarder, `log.exception` (traceback)", samples, loop_s))
            traced.close()
            em.close(30)
    finally:
        relay.terminate()
        relay.wait(20)

    report = "\n".join(
        [
            "| handler | records | median µs/record | p99 µs/record | records/s in the loop | |",
            "|---|---:|---:|---:|---:|---|",
            *rows,
            "",
            f"perf_counter_ns floor: {floor:.0f} ns (included above). "
            f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
