"""The example Flower app (examples/flwr-quickstart) run with ``flwr run``, as its README says.

1. Against a local Deployment Engine: ``flower-superlink`` and two ``flower-supernode``
   processes (each ClientApp message in a fresh ``flwr-clientapp`` process), a real relay, the
   relay URL in the run config only. Every expected event arrives once, in one run, rounds in
   order, and the run is ``completed`` with nothing missing.
2. In the local simulation (``flwr run .`` with ``address = ":local:"``): Flower starts a detached
   SuperLink of its own, found afterwards by its port and stopped by PID.

Flower's processes get no FEDRELAY_* variables: what reaches the relay went by the run config.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from tests.support.clients import Collector, until
from tests.support.flower_deployment import (
    Processes,
    check_stream,
    copy_app,
    flower_cmd,
    flower_env,
    listener_pid,
    listening,
    run_config_args,
    write_connection,
)
from tests.support.relay_process import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(420)


def flwr_run(app, connection: str, run_config: dict, env: dict[str, str], timeout: float = 300) -> str:
    """``flwr run APP CONNECTION --stream``; fails the test with Flower's output if it fails."""
    cmd = flower_cmd("flwr", "run", str(app), connection, "--stream", *run_config_args(run_config))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=app)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"flwr run did not finish in {timeout}s:\n{str(exc.output)[-4000:]}") from None
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def summary(relay, run_id: str) -> dict:
    status, body = relay.get_json(f"/api/runs/{run_id}")
    assert status == 200, body
    return body


async def test_flwr_run_on_a_local_deployment_engine_streams_every_event_once(relay, tmp_path):
    rounds, clients = 2, 2
    home = tmp_path / "flwr-home"
    link_port = free_port()
    flower = Processes(tmp_path / "logs")
    try:
        flower.start(
            "superlink",
            flower_cmd("flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                       "--port", str(link_port), "--database", str(tmp_path / "superlink.db")),
            flower_env(home, FEDRELAY_SPOOL_DIR=str(tmp_path / "spool-server")),
        )  # fmt: skip
        for node in range(clients):
            flower.start(
                f"supernode{node}",
                flower_cmd("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                           "--port", str(free_port()),
                           "--node-config", f"partition-id={node} num-partitions={clients}"),
                flower_env(home, FEDRELAY_SPOOL_DIR=str(tmp_path / f"spool-node{node}")),
            )  # fmt: skip
        write_connection(home, "local-deployment", f"127.0.0.1:{link_port}")
        wait_until(lambda: listening("127.0.0.1", link_port), 60, 0.2, what=flower.log("superlink"))

        async with Collector(relay.url, "run_id=*") as live:
            await asyncio.to_thread(  # the loop keeps reading the subscription meanwhile
                flwr_run,
                copy_app(tmp_path),
                "local-deployment",
                {"fedrelay-url": relay.url, "num-server-rounds": rounds},
                flower_env(home),
            )
            await until(lambda: any(e["type"] == "training_end" for e in live.events), timeout=60)
        run_id = check_stream(live.events, rounds, clients)
        stored = relay.get_json(f"/api/runs/{run_id}/events?since=0&limit=1000")[1]["events"]
        assert stored == live.events
        state = summary(relay, run_id)
        assert state["status"] == "completed" and state["incomplete"] is None, state
        assert state["experiment_name"] == "fedrelay-quickstart" and state["num_rounds"] == rounds
        producers = {e["producer"] for e in live.events if e["source"]["role"] == "client"}
        assert len(producers) == rounds * clients * 2  # a fresh flwr-clientapp process per message
    finally:
        flower.stop_all()


async def test_flwr_run_in_the_local_simulation_streams_every_event_once(relay, tmp_path):
    rounds, clients = 1, 2
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {clients}\n"
    )
    api_port, control_port = free_port(), free_port()
    env = flower_env(
        home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(api_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FEDRELAY_SPOOL_DIR=str(tmp_path / "spool"),
        RAY_DEDUP_LOGS="0",
    )
    flower = Processes(tmp_path / "logs")
    try:
        async with Collector(relay.url, "run_id=*") as live:
            config = {"fedrelay-url": relay.url, "num-server-rounds": rounds}
            await asyncio.to_thread(flwr_run, copy_app(tmp_path), "local", config, env)
            await until(lambda: any(e["type"] == "training_end" for e in live.events), timeout=60)
        run_id = check_stream(live.events, rounds, clients)
        assert summary(relay, run_id)["status"] == "completed"
    finally:
        # flwr run leaves its SuperLink running, detached: find it by the port it was given.
        for port in (api_port, control_port):
            pid = listener_pid(port)
            if pid is not None:
                flower.adopt(pid)
        flower.stop_all()
        wait_until(lambda: listener_pid(api_port) is None, 20, what="the local SuperLink to stop")
