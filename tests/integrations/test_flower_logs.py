"""A real Flower simulation (Ray) whose ServerApp and ClientApps forward their logs: the relay
stores them as ``log`` events with their client ids and rounds, and a client's exception text."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.support.demo import demo_env
from tests.support.stored import of_type, stored_events

pytestmark = pytest.mark.timeout(300)

APP = Path(__file__).resolve().parents[1] / "support" / "flower_log_app.py"


async def run_app(tmp_path: Path, *args: str, timeout: float = 240.0) -> tuple[int, str]:
    """``python tests/support/flower_log_app.py ARGS``; returns (exit code, output)."""
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(APP),
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=demo_env(tmp_path),
        )
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(
                f"the app did not finish in {timeout}s:\n{log.read_text()[-4000:]}"
            ) from None
    return code, log.read_text(errors="replace")


def run_id_of(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("run_id=")]
    return line.split("=", 1)[1]


async def test_client_and_server_logs_reach_the_relay_with_client_ids_rounds_and_the_exception(
    relay, tmp_path
):
    code, output = await run_app(
        tmp_path,
        "--relay",
        relay.url,
        "--rounds",
        "2",
        "--clients",
        "3",
        "--fail-client",
        "1",
        "--fail-round",
        "1",
    )
    assert code == 0, output[-4000:]
    run_id = run_id_of(output)
    events = stored_events(relay, run_id)
    logs = [e for e in events if e["type"] == "log"]

    # Every ClientApp's warning, once per train message, with its client id and round.
    warnings = [e for e in logs if e["data"]["logger"] == "logapp.client" and e["data"]["level"] == "warning"]
    assert sorted((e["data"]["client_id"], e["data"]["round"]) for e in warnings) == [
        (c, r) for c in range(3) for r in (1, 2)
    ]
    for e in warnings:
        client, rnd = e["data"]["client_id"], e["data"]["round"]
        assert e["data"]["message"] == f"client {client} round {rnd}: only {10 + client} examples here"
        assert e["source"] == {"role": "client", "client_id": client}
    # INFO lines pass the default threshold too.
    assert (
        len([e for e in logs if e["data"]["logger"] == "logapp.client" and e["data"]["level"] == "info"]) == 6
    )

    # The failing client's exception, with its traceback, attributed to it.
    (failure,) = [e for e in logs if e["data"]["level"] == "error" and e["data"].get("client_id") == 1]
    assert (
        failure["data"]["round"] == 1
        and "injected failure on client 1 in round 1" in failure["data"]["message"]
    )
    assert failure["data"]["exception"].startswith("Traceback (most recent call last)")
    assert (
        failure["data"]["exception"]
        .rstrip()
        .endswith("RuntimeError: injected failure on client 1 in round 1")
    )
    (error,) = [e for e in of_type(events, "error") if e["source"]["role"] == "client"]
    assert error["seq"] > failure["seq"]  # the log line sits next to the error event

    # The ServerApp's own logs (its evaluate_fn and Flower's), tagged with the round they belong to.
    server = [e for e in logs if e["data"]["logger"] == "logapp.server"]
    assert [e["data"]["message"].split(":")[0] for e in server] == [f"server round {r}" for r in (0, 1, 2)]
    assert [e["data"].get("round") for e in server] == [None, 1, 2]
    assert all(e["source"]["role"] == "server" for e in server)
    assert any(e["data"]["logger"] == "flwr" and "[ROUND 2/2]" in e["data"]["message"] for e in logs)
    # Nothing of fedrelay's own machinery, except the mod's report of the exception.
    assert all(e["data"]["logger"] != "fedrelay.emitter" for e in logs)
    assert {e["data"]["logger"] for e in logs if e["data"]["logger"].startswith("fedrelay")} == {"fedrelay"}
