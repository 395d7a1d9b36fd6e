"""The seed system, unchanged, through a real relay's ``/``: its senders' frames and its frontend.

The frames are those of the seed's real senders (``tests/support/seed_system.py`` says where
each comes from), sent as it sends them: one connection per frame, replies never read, NaN
and Infinity as literals. The frontend is its ``websocket.ts`` + ``useTrainingExecution``
rebuilt in Node (``tests/node/seed_frontend.mjs``), connected to ``ws://localhost:PORT``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support.clients import Collector
from tests.support.node import node_command
from tests.support.relay_process import RelayProcess
from tests.support.seed_system import (
    Frame,
    as_browser_sees,
    browser_parse,
    centralized_run,
    federated_run,
    send_frames,
)
from tests.support.waiting import wait_until


@pytest.fixture
def dual_stack_relay(tmp_path):
    """A relay on its default addresses, 127.0.0.1 and ::1, as ``fedrelay serve`` starts."""
    proc = RelayProcess(tmp_path / "relay.db", hosts=None).start()
    yield proc
    proc.stop()


class SeedFrontend:
    """``node seed_frontend.mjs``: connects, then reports its final state once it disconnects."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            node_command("seed_frontend.mjs", f"ws://localhost:{port}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_open(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # the script times itself out after 60 s
        assert line == "open", f"frontend did not connect: {line!r}"

    def final_state(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=90)
        assert self.proc.returncode == 0, f"frontend failed: {out[-2000:]} {err[-2000:]}"
        return json.loads(out.strip().splitlines()[-1])


def stored_runs(frames: list[Frame]) -> list[str]:
    """The run each frame must be stored under (docs/protocol.md): its ``data.run_id`` as text;
    without one, the run the last frame from the same host named while that run is running;
    else ``default``. A run stops running at training_end, or (on /) an error that names no client."""
    running: dict[str, bool] = {}
    last_named = None
    runs = []
    for frame in frames:
        data = frame["data"]
        if data.get("run_id") is not None:
            run = last_named = str(data["run_id"])
        elif last_named is not None and running[last_named]:
            run = last_named
        else:
            run = "default"
        running.setdefault(run, True)
        if frame["type"] == "training_start":
            running[run] = True
        elif frame["type"] == "training_end" or (frame["type"] == "error" and data.get("client_id") is None):
            running[run] = False
        runs.append(run)
    return runs


SCENARIOS = {
    "centralized-early-stopping": (lambda: centralized_run(7), "completed"),
    "federated": (lambda: federated_run(42), "completed"),
    "error": (lambda: centralized_run(43, fail_at_epoch=2), "error"),
    "database-down": (lambda: federated_run(None, rounds=1, clients=2), "completed"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_seed_trainer_and_frontend_work_unchanged_through_root(dual_stack_relay, scenario):
    relay = dual_stack_relay
    build, final = SCENARIOS[scenario]
    frames = build()
    frontend = SeedFrontend(relay.port)
    await asyncio.to_thread(frontend.wait_open)
    await send_frames(relay.url + "/", frames)
    state = await asyncio.to_thread(frontend.final_state)

    # Every frame reached the frontend and parsed (JSON.parse), with type, timestamp and data
    # as sent (NaN and Infinity as null); the relay's run_id and seq beside them.
    assert state["parseErrors"] == [] and state["listenerErrors"] == []
    got = [{k: v for k, v in m.items() if k not in ("run_id", "seq")} for m in state["received"]]
    assert got == [as_browser_sees(frame) for frame in frames]

    # The frontend reached the state the original relay got it to.
    if final == "completed":
        assert (state["overallStatus"], state["progress"], state["isRunning"]) == ("completed", 100, False)
        assert state["toasts"][-1] == {"kind": "success", "text": "Training completed successfully!"}
    else:
        assert (state["overallStatus"], state["isRunning"]) == ("error", False)
        assert state["messages"][-1]["message"] == "Error: CUDA out of memory. Tried to allocate 2.00 GiB"
        assert state["toasts"][-1]["kind"] == "error"

    # The same frames are stored, in order, under their runs: /api and /subscribe agree.
    runs = stored_runs(frames)
    assert [m["run_id"] for m in state["received"]] == runs
    for run in dict.fromkeys(runs):
        mine = [as_browser_sees(f) for f, r in zip(frames, runs, strict=True) if r == run]
        status, page = relay.get_json(f"/api/runs/{run}/events")
        assert status == 200
        assert [(e["seq"], e["type"], e["timestamp"], e["data"]) for e in page["events"]] == [
            (i, f["type"], f["timestamp"], f["data"]) for i, f in enumerate(mine, 1)
        ]
        async with Collector(relay.url, f"run_id={run}&since=0") as sub:
            await sub.wait_for(len(mine))
            assert [(e["type"], e["data"]) for e in sub.events] == [(f["type"], f["data"]) for f in mine]


def test_seed_runs_are_summarised_by_status(dual_stack_relay):
    relay = dual_stack_relay
    for frames in (centralized_run(7), federated_run(42), centralized_run(43, fail_at_epoch=2)):
        asyncio.run(send_frames(relay.url + "/", frames))
    runs = wait_until(lambda: {r["run_id"]: r for r in relay.get_json("/api/runs")[1]["runs"]}, what="runs")
    centralized, federated, failed = runs["7"], runs["42"], runs["43"]
    assert (centralized["status"], centralized["epoch"], centralized["max_epochs"]) == ("completed", 5, 10)
    assert centralized["training_duration"].startswith("0:00:")
    assert centralized["early_stopping"]["metric_name"] == "val_recall"
    assert (federated["status"], federated["training_mode"]) == ("completed", "federated")
    assert federated["round"] == 1  # the seed's round_end counts rounds from 0
    assert failed["status"] == "failed"
    assert failed["last_error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"


async def test_node_client_reaches_localhost_when_it_resolves_to_ipv6_first(dual_stack_relay):
    proc = await asyncio.create_subprocess_exec(
        *node_command("localhost_client.mjs", str(dual_stack_relay.port)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    result = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"stderr": err.decode()}
    assert result == {"remoteAddress": "::1", "pong": True}, result


async def test_a_root_subscriber_gets_nan_as_null_in_every_frame(relay):
    """A frame whose NaN the original relay passed on, so that JSON.parse lost it, parses here."""
    frames = centralized_run(9)[:2]
    async with connect(relay.url + "/") as frontend:
        await send_frames(relay.url + "/", frames)
        texts = [await asyncio.wait_for(frontend.recv(), 10) for _ in frames]
    parsed = [browser_parse(text) for text in texts]  # raises on NaN, as JSON.parse does
    assert [p["type"] for p in parsed] == ["training_start", "epoch_end"]
    assert parsed[1]["data"]["metrics"]["val_auroc"] is None
    assert parsed[1]["data"] == as_browser_sees(frames[1])["data"]
