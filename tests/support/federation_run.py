"""A generated federated run with a known health grid: who was sampled, finished, failed,
straggled or stayed silent in every round, decided up front and independently of the code that
judges it.

The event mix is what the Flower emitters send for each sampled client: a train
``client_progress`` (started), then a train ``client_complete`` with the mod's ``duration`` and
an evaluate ``client_complete``, or a client ``error`` (message and a traceback) followed by the
server's own ``error`` naming the node, or nothing (silent). Servers list client ids in
``round_start``/``round_end`` next to node ids (protocol decision C); client events carry both.

Durations: ordinary clients take 3-6 s, stragglers 20-30 s. While most of a round's finishers are
ordinary (a few percent straggle, and the first four sampled never do) its median is 3-6 s, so the
default threshold (2x the median, 6-12 s) separates the two groups whatever the draw: a straggler
is one here and only here.

``python -m tests.support.federation_run URL RUN_ID [CLIENTS ROUNDS]`` publishes one to a relay.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.clients import ResendingProducer

FAILED_MESSAGE = "train failed: RuntimeError: CUDA out of memory (client {c}, round {r})"


@dataclass
class GeneratedRun:
    run_id: str
    events: list[dict[str, Any]]
    cells: dict[tuple[int, str], str] = field(default_factory=dict)
    """(round, client id) -> state, for every sampled client; absent: not sampled."""
    durations: dict[tuple[int, str], float] = field(default_factory=dict)
    """Train durations of the clients that finished."""

    def state(self, rnd: int, client: str) -> str | None:
        return self.cells.get((rnd, client))


def node_of(client: int) -> str:
    """A Flower-like 64-bit node id for a client (a string, as the emitters send node ids)."""
    return str(6_000_000_000_000_000_000 + client * 7919)


def generated_run(
    run_id: str,
    *,
    clients: int = 1000,
    rounds: int = 100,
    sample: float = 0.8,
    fail: float = 0.01,
    silent: float = 0.005,
    straggle: float = 0.02,
    seed: int = 0,
    start: datetime | None = None,
    config: dict[str, Any] | None = None,
    evaluate: bool = True,
    traceback_frames: int = 1,
) -> GeneratedRun:
    rng = random.Random(seed)
    now = start or datetime.now(UTC) - timedelta(hours=2)
    run = GeneratedRun(run_id, [])
    events = run.events

    def add(kind: str, data: dict[str, Any], role: str = "server", client: int | None = None) -> None:
        events.append(
            {
                "type": kind,
                "run_id": run_id,
                "id": len(events) + 1,
                "timestamp": now.isoformat(),
                "source": {"role": role, "client_id": client},
                "data": data,
            }
        )

    add(
        "training_start",
        {
            "experiment_name": f"generated-{clients}x{rounds}",
            "training_mode": "federated",
            "num_rounds": rounds,
            "num_clients": clients,
            "config": config or {"strategy": "FedAvg", "train_config": {"lr": 0.05, "local-epochs": 1}},
        },
    )
    everyone = list(range(clients))
    for rnd in range(1, rounds + 1):
        sampled = sorted(rng.sample(everyone, max(5, round(sample * clients))))
        fates = {}
        for c in sampled:
            draw = rng.random()
            fates[c] = (
                "failed"
                if draw < fail
                else "silent"
                if draw < fail + silent
                else "straggler"
                if draw < fail + silent + straggle
                else "finished"
            )
        # Enough ordinary finishers for a median that keeps the two groups apart.
        for c in sampled[:4]:
            fates[c] = "finished"
        add(
            "round_start",
            {
                "round": rnd,
                "total_rounds": rounds,
                "participating_clients": [str(c) for c in sampled],
                "participating_nodes": [node_of(c) for c in sampled],
            },
        )
        finished, failed = [], []
        for c in sampled:
            now += timedelta(milliseconds=5)
            base = {"round": rnd, "client_id": c, "node_id": node_of(c)}
            add("client_progress", {**base, "phase": "train", "status": "started"}, "client", c)
            fate = fates[c]
            run.cells[(rnd, str(c))] = fate
            if fate == "failed":
                add(
                    "error",
                    {
                        **base,
                        "phase": "train",
                        "message": FAILED_MESSAGE.format(c=c, r=rnd),
                        "detail": "Traceback (most recent call last):\n"
                        + f'  File "client.py", line {rnd}, in train_handler\n' * traceback_frames
                        + f"RuntimeError: CUDA out of memory (client {c}, round {rnd})",
                    },
                    "client",
                    c,
                )
                add(
                    "error",
                    {
                        "message": f"client {c} failed in train",
                        "detail": "ClientApp raised an exception",
                        "client_id": c,
                        "node_id": node_of(c),
                        "round": rnd,
                        "phase": "train",
                    },
                )
                failed.append(c)
                continue
            if fate == "silent":
                continue
            duration = round(rng.uniform(20, 30) if fate == "straggler" else rng.uniform(3, 6), 3)
            run.durations[(rnd, str(c))] = duration
            loss = 0.3 + 0.5 / rnd + rng.gauss(0, 0.02)
            add(
                "client_complete",
                {**base, "phase": "train", "duration": duration, "num_examples": 200 + c % 50,
                 "metrics": {"train_loss": loss, "num-examples": 200 + c % 50}},
                "client",
                c,
            )  # fmt: skip
            if evaluate:
                add(
                    "client_complete",
                    {**base, "phase": "evaluate", "duration": round(duration / 4, 3), "num_examples": 50,
                     "metrics": {"loss": loss + 0.05, "accuracy": 0.9 - 0.3 / rnd}},
                    "client",
                    c,
                )  # fmt: skip
            finished.append(c)
        now += timedelta(seconds=30)
        add(
            "round_end",
            {
                "round": rnd,
                "total_rounds": rounds,
                "fit_metrics": {"train_loss": 0.3 + 0.5 / rnd},
                "eval_metrics": {"loss": 0.35 + 0.5 / rnd, "accuracy": 0.9 - 0.3 / rnd},
                "duration": 31.0,
                "participating_clients": [str(c) for c in finished],
                "participating_nodes": [node_of(c) for c in finished],
                "failed_clients": [str(c) for c in failed],
                "failed_nodes": [node_of(c) for c in failed],
                "num_failures": len(failed),
            },
        )
    add("training_end", {"status": "completed", "rounds_completed": rounds})
    return run


async def publish(url: str, run: GeneratedRun, name: str = "generated", batch: int = 1000) -> None:
    """Publish every event and wait until the relay has stored them all."""
    producer = ResendingProducer(url, name)
    await producer.publish_all(run.events, batch=batch, timeout=600)
    if producer.errors:
        raise RuntimeError(f"the relay refused events: {producer.errors[:3]}")


def publish_blocking(url: str, run: GeneratedRun, name: str = "generated", batch: int = 1000) -> None:
    """:func:`publish` from synchronous code that may run inside an event loop (Playwright's)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(publish(url, run, name, batch))
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def main(argv: list[str]) -> int:
    url, run_id = argv[0], argv[1]
    clients = int(argv[2]) if len(argv) > 2 else 1000
    rounds = int(argv[3]) if len(argv) > 3 else 100
    run = generated_run(run_id, clients=clients, rounds=rounds)
    asyncio.run(publish(url, run))
    print(f"published {len(run.events)} events of run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
