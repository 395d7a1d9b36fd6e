"""The fault tests' shared checker, and the producer process they kill.

What was emitted is known exactly: the producer below emits ``payload(p, i)`` as its ``i``-th
event (so its id is ``i``), and publishes how far it got through a small memory-mapped file that
survives ``kill -9``; a demo run's events are known by their keys (:func:`demo_expected`).
:func:`check` compares that with the store and with what each subscriber received: every
emitted event exactly once, seqs gap-free from 1, each producer's ids in order, content equal
to what was emitted, and every subscriber's stream equal to the store's.

Run as ``python -m tests.reliability.checker URL SPOOL RUN P COUNT [options]`` to produce.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

Event = dict[str, Any]
Key = Hashable

# -- what the producer emits -------------------------------------------------------------------


def payload(p: int, i: int) -> dict[str, Any]:
    """The data of producer ``p``'s ``i``-th event: deterministic, so the checker knows it."""
    return {"message": f"p{p}", "p": p, "i": i, "pad": "x" * (i % 97), "metrics": {"loss": 1.0 / i}}


def producer_key(event: Event) -> Key:
    return (event["data"].get("p"), event["data"].get("i"))


def producer_expected(p: int, count: int) -> dict[Key, dict[str, Any]]:
    return {(p, i): payload(p, i) for i in range(1, count + 1)}


class Progress:
    """Four int64 slots in a file, written by the producer, read by the test, kept across kill -9.

    ``emitted``: emit() has returned for events 1..emitted. ``persisted``: persist() returned
    True after event ``persisted`` was emitted (documented: all of it was then on disk).
    ``ready``: 1 once the emitter exists. ``acked``: the emitter's ``stats["acked"]``, sampled.
    """

    SLOTS = ("emitted", "persisted", "ready", "acked")

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        if create:
            path.write_bytes(b"\0" * 8 * len(self.SLOTS))
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 8 * len(self.SLOTS))

    def set(self, name: str, value: int) -> None:
        struct.pack_into("q", self._map, 8 * self.SLOTS.index(name), value)

    def get(self, name: str) -> int:
        return struct.unpack_from("q", self._map, 8 * self.SLOTS.index(name))[0]

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def stdin_closed() -> bool:
    """Whether the test closed our stdin (checked without blocking)."""
    if select.select([sys.stdin], [], [], 0)[0]:
        return sys.stdin.read(1) == ""
    return False


def produce(argv: list[str]) -> int:
    """Emit ``count`` events as fast as allowed, recording progress; flush and report at the end."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("spool")
    parser.add_argument("run_id")
    parser.add_argument("p", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="events per second; 0: full speed")
    parser.add_argument("--max-buffer", type=int, default=10_000)
    parser.add_argument("--persist-every", type=int, default=0)
    parser.add_argument("--flush-timeout", type=float, default=60.0)
    parser.add_argument("--hold", action="store_true", help="after the report, wait for stdin to close")
    parser.add_argument(
        "--until-stdin-closes",
        action="store_true",
        help="after COUNT events, go on until stdin is closed (the test ends the stream when it wants)",
    )
    args = parser.parse_args(argv)

    from fedrelay.emitters import Emitter

    progress = Progress(Path(args.progress))
    em = Emitter(
        args.url, run_id=args.run_id, spool_dir=args.spool, max_buffer=args.max_buffer, max_backoff=0.5
    )
    print(json.dumps({"producer": em.producer}), flush=True)
    progress.set("ready", 1)
    started = time.monotonic()
    i = 0
    while i < args.count or (args.until_stdin_closes and not stdin_closed()):
        i += 1
        em.emit("status", payload(args.p, i), role="trainer")
        progress.set("emitted", i)
        if args.persist_every and i % args.persist_every == 0 and em.persist(10.0):
            progress.set("persisted", i)
        if i % 50 == 0:
            progress.set("acked", em.stats["acked"])
            if args.rate:
                ahead = started + i / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the stream, not waiting for a condition
    flushed = em.flush(args.flush_timeout)
    progress.set("acked", em.stats["acked"])
    print(json.dumps({"flushed": flushed, "emitted": i, "stats": em.stats}), flush=True)
    if args.hold:
        sys.stdin.read()  # alive until the test kills it or closes stdin
    em.close(5.0)
    return 0 if flushed else 1


# -- what a demo run emits ---------------------------------------------------------------------


def demo_key(event: Event) -> Key:
    """Which of a demo run's events this is, independent of timing."""
    d = event["data"]
    kind = event["type"]
    if kind == "client_progress":
        what = "epoch" if "local_epoch" in d else d.get("status")
        return (kind, d.get("round"), d.get("phase"), d.get("client_id"), what)
    if kind == "client_complete":
        return (kind, d.get("round"), d.get("phase"), d.get("client_id"))
    if kind in ("round_start", "round_end", "status"):
        return (kind, d.get("round"))
    return (kind,)


def demo_expected(rounds: int, clients: int) -> dict[Key, dict[str, Any]]:
    """Every event a demo run emits, keyed by :func:`demo_key`, with the data fields known ahead."""
    expected: dict[Key, dict[str, Any]] = {
        ("training_start",): {"num_rounds": rounds, "training_mode": "federated"},
        ("status", 0): {"round": 0},
        ("training_end",): {"status": "completed", "rounds_completed": rounds},
    }
    for r in range(1, rounds + 1):
        expected[("round_start", r)] = {"round": r, "total_rounds": rounds}
        expected[("round_end", r)] = {"round": r, "total_rounds": rounds, "num_failures": 0}
        for c in range(clients):
            for phase in ("train", "evaluate"):
                started = {"round": r, "client_id": c, "phase": phase, "status": "started"}
                expected[("client_progress", r, phase, c, "started")] = started
                expected[("client_complete", r, phase, c)] = {"round": r, "client_id": c, "phase": phase}
            expected[("client_progress", r, "train", c, "epoch")] = {"round": r, "local_epoch": 1}
    return expected


# -- the check ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What one check found; ``problems`` says what, the counts are for the report."""

    events_checked: int = 0
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 30:
            self.problems.append(text)

    def add(self, other: Verdict) -> Verdict:
        self.events_checked += other.events_checked
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.problems.extend(other.problems)
        return self

    def assert_ok(self, context: str = "") -> None:
        assert not self.problems and not self.lost and not self.duplicated, (
            f"{context}: lost={self.lost} duplicated={self.duplicated}\n" + "\n".join(self.problems)
        )


def check(
    expected: Mapping[Key, Mapping[str, Any]],
    stored: list[Event],
    views: Mapping[str, list[Event]] | None = None,
    *,
    key: Callable[[Event], Key],
    exact: bool = False,
    may_lose: Collection[Key] = (),
    id_is_index: bool = False,
) -> Verdict:
    """Every expected event once in ``stored`` (seq 1..N, content as emitted), and each view
    (a subscriber's events) identical to ``stored``.

    ``exact``: an event's ``data`` must equal the expected one (else contain its fields).
    ``may_lose``: keys the contract allows to be missing (not counted as lost).
    ``id_is_index``: the event's ``id`` must be the ``i`` of its key (producer events).
    """
    verdict = Verdict(events_checked=len(stored))
    seqs = [e.get("seq") for e in stored]
    if seqs != list(range(1, len(stored) + 1)):
        dup_seqs = sum(n - 1 for n in Counter(seqs).values() if n > 1)
        verdict.duplicated += dup_seqs
        verdict.problem(f"store: seqs not gap-free 1..{len(stored)}: {_sample_disorder(seqs)}")
    counts = Counter(key(e) for e in stored)
    ids = Counter((e.get("producer"), e.get("id")) for e in stored if e.get("id") is not None)
    twice = {k: n for k, n in counts.items() if n > 1}
    twice_ids = {k: n for k, n in ids.items() if n > 1}
    verdict.duplicated += max(sum(twice.values()) - len(twice), sum(twice_ids.values()) - len(twice_ids))
    for k, n in [*twice.items(), *twice_ids.items()][:10]:
        verdict.problem(f"store: {k} stored {n} times")
    unexpected = [k for k in counts if k not in expected]
    if unexpected:
        verdict.problem(f"store: {len(unexpected)} events never emitted, e.g. {unexpected[:3]}")
    missing = [k for k in expected if k not in counts and k not in may_lose]
    verdict.lost += len(missing)
    if missing:
        verdict.problem(f"store: {len(missing)} emitted events missing, e.g. {missing[:5]}")
    for e in stored:
        k = key(e)
        want = expected.get(k)
        if want is None:
            continue
        data = e.get("data") or {}
        if (data != want) if exact else any(data.get(f) != v for f, v in want.items()):
            verdict.problem(f"store: content of {k} differs: {json.dumps(data)[:300]} vs {want}")
        if id_is_index and e.get("id") != k[-1]:
            verdict.problem(f"store: {k} has id {e.get('id')}")
    last_id: dict[Any, int] = {}
    for e in stored:
        if e.get("id") is None:
            continue
        producer = e.get("producer")
        if e["id"] <= last_id.get(producer, 0):
            verdict.problem(f"store: producer {producer} id {e['id']} after {last_id[producer]}")
        last_id[producer] = e["id"]
    for name, view in (views or {}).items():
        verdict.add(compare_view(name, stored, view))
    return verdict


def compare_view(name: str, stored: list[Event], view: list[Event]) -> Verdict:
    """A subscriber must have received exactly the stored events, in seq order, once each."""
    verdict = Verdict(events_checked=len(view))
    if view == stored:
        return verdict
    seqs = [e.get("seq") for e in view]
    counts = Counter(seqs)
    verdict.duplicated += sum(n - 1 for n in counts.values() if n > 1)
    stored_seqs = {e["seq"] for e in stored}
    verdict.lost += len(stored_seqs - set(counts))
    by_seq = {e["seq"]: e for e in stored}
    differ = [e.get("seq") for e in view if by_seq.get(e.get("seq")) not in (None, e)]
    verdict.problem(
        f"subscriber {name}: {len(view)} events vs {len(stored)} stored; "
        f"order {_sample_disorder(seqs)}; content differs at seqs {differ[:5]}; "
        f"unknown seqs {sorted(set(counts) - stored_seqs)[:5]}"
    )
    return verdict


def _sample_disorder(seqs: list[Any]) -> str:
    for n, (a, b) in enumerate(pairwise(seqs)):
        if not (isinstance(a, int) and isinstance(b, int) and b == a + 1):
            return f"at index {n}: {seqs[max(0, n - 2) : n + 3]}"
    return f"first {seqs[:1]}, length {len(seqs)}"


if __name__ == "__main__":
    sys.exit(produce(sys.argv[1:]))
