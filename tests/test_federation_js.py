"""The dashboard's federation fold (``static/federation.js``, run by Node) and the relay's
(``fedrelay/federation.py``) judge the same events the same way: cell states, reasons,
medians, thresholds, stragglers, critical paths, rates and the order of clients."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from fedrelay.federation import FederationHealth
from tests.support.federation_run import generated_run
from tests.support.node import node_command

IDS = [0, 1, 2, "1", "2", "n1", "n2", "01", "c10", "c9", 2.0, 3.5, True, None, "x" * 129, 2**60, "é"]
ROUNDS = [1, 2, 3, 2.0, "2", 0, -1, True, None, 2.5]
PHASES = ["train", "train", "evaluate", None, 5]
DURATIONS = [0.5, 1, 3.0, 3.2, 10, 0, -1, 1e10, None, "x", True]
TEXTS = ["boom", "", None, 3, "y" * 400]


def python_report(events: list[dict], factor: float, min_gap: float) -> dict:
    health = FederationHealth()
    for event in events:
        health.add(event)
    report = health.report(factor, min_gap)
    return {
        "truncated": report.truncated,
        "rounds": [
            {**r.summary(), "cells": {k: c.as_json() for k, c in r.cells.items()}} for r in report.rounds
        ],
        "clients": [c.as_json() for c in report.clients],
    }


def js_reports(runs: list[list[dict]], factor: float, min_gap: float) -> list[dict]:
    result = subprocess.run(
        node_command("federation_report.mjs", str(factor), str(min_gap), needs_ws=False),
        input=json.dumps(runs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def random_run(rng: random.Random) -> list[dict]:
    """Events of every kind with well-formed and odd values, in any order (what the root path lets in)."""
    events = []
    for seq in range(1, rng.randint(1, 40)):
        kind = rng.choice(["round_start", "round_end", "client_progress", "client_complete", "error",
                           "training_end", "status"])  # fmt: skip
        data: dict = {}
        if rng.random() < 0.9:
            data["round"] = rng.choice(ROUNDS)
        if kind in ("round_start", "round_end"):
            for key in ("participating", "failed", "evaluated"):
                if rng.random() < 0.5:
                    clients = rng.sample(IDS, rng.randint(0, 4))
                    data[f"{key}_clients"] = clients
                    if rng.random() < 0.5:
                        data[f"{key}_nodes"] = [f"node-{c}" for c in clients]
            if rng.random() < 0.2:
                data["participating_clients"] = rng.randint(0, 5)
        else:
            data["client_id"] = rng.choice(IDS)
            if rng.random() < 0.5:
                data["node_id"] = rng.choice(["node-0", "node-1", "node-2", "node-n1", None, 7])
            data["phase"] = rng.choice(PHASES)
            data["duration"] = rng.choice(DURATIONS)
            if rng.random() < 0.7:
                data["message"] = rng.choice(TEXTS)
            else:
                data["error"] = rng.choice(TEXTS)
            data["detail"] = rng.choice(TEXTS)
        event = {"type": kind, "seq": rng.choice([seq, seq, 2.0, None]), "data": data}
        if rng.random() < 0.8:
            event["source"] = {"role": rng.choice(["client", "server", None])}
        events.append(event)
    return events


@pytest.mark.parametrize(("factor", "min_gap"), [(2.0, 1.0), (1.5, 0.0)])
def test_python_and_javascript_judge_the_same_events_alike(factor, min_gap):
    rng = random.Random(1234)
    generated = [
        generated_run("a", clients=60, rounds=12, fail=0.05, silent=0.05, straggle=0.05, seed=1).events,
        generated_run("b", clients=25, rounds=30, fail=0.1, seed=2, evaluate=False).events,
    ]
    odd = [random_run(rng) for _ in range(300)]
    runs = generated + odd
    expected = [python_report(events, factor, min_gap) for events in runs]
    got = js_reports(runs, factor, min_gap)
    assert sum(len(r["rounds"]) for r in expected) > 300  # the odd runs do make rounds
    assert sum(
        1 for r in expected for rnd in r["rounds"] for c in rnd["cells"].values() if c["state"] == "failed"
    )
    for i, (mine, theirs) in enumerate(zip(expected, got, strict=True)):
        assert theirs == mine, f"run {i} judged differently: {runs[i] if i >= 2 else 'generated'}"
