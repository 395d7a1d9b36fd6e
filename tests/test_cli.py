"""The command line against real processes: serve, runs, schema, config."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.support.clients import ResendingProducer, event
from tests.support.relay_process import RelayProcess, free_port
from tests.support.waiting import wait_until


def fedrelay(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_schema_lists_every_event_type_and_control_frame():
    out = fedrelay("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    from fedrelay.schemas.events import EVENT_TYPES

    mapping = schema["event"]["discriminator"]["mapping"]
    assert set(mapping) == set(EVENT_TYPES)
    control = json.dumps(schema["relay_control"])
    for op in ("hello", "ack", "subscribed", "gap", "error", "pong"):
        assert f'"{op}"' in control


async def test_runs_lists_what_the_relay_holds(relay):
    producer = ResendingProducer(relay.url, "cli")
    await producer.publish_all(
        [
            event("cli-run", 1, "training_start", training_mode="federated", num_rounds=5),
            {"type": "round_end", "run_id": "cli-run", "id": 2, "data": {"round": 2, "total_rounds": 5}},
        ]
    )
    out = await asyncio.to_thread(fedrelay, "runs", "--url", relay.http)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == ["RUN", "STATUS", "MODE", "PROGRESS", "EVENTS", "STARTED"]
    assert row.split()[:6] == ["cli-run", "running", "federated", "round", "2/5", "2"]
    as_json = json.loads((await asyncio.to_thread(fedrelay, "runs", "--url", relay.url, "--json")).stdout)
    assert as_json[0]["run_id"] == "cli-run" and as_json[0]["last_seq"] == 2


def test_runs_reads_the_subscribe_token_from_the_environment_as_tail_and_export_do(relay_factory):
    relay = relay_factory("--subscribe-token", "sub-7c1e")
    refused = fedrelay("runs", "--url", relay.http)
    assert refused.returncode == 1 and "401" in refused.stderr
    out = fedrelay("runs", "--url", relay.http, env={"FEDRELAY_SUBSCRIBE_TOKEN": "sub-7c1e"})
    assert out.returncode == 0 and out.stdout.strip() == "no runs yet", out.stderr
    flag = fedrelay(
        "runs", "--url", relay.http, "--token", "sub-7c1e", env={"FEDRELAY_SUBSCRIBE_TOKEN": "wrong"}
    )
    assert flag.returncode == 0, flag.stderr


def test_runs_without_a_relay_says_so():
    out = fedrelay("runs", "--url", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "no relay at" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_gracefully_and_keeps_every_acked_event(tmp_path, sig):
    relay = RelayProcess(tmp_path / "r.db").start()
    producer = ResendingProducer(relay.url, "p")
    await producer.publish_all([event("g", i) for i in range(1, 501)], batch=50)
    relay.proc.send_signal(sig)
    assert relay.proc.wait(timeout=20) == 0
    relay.start()
    try:
        status, run = relay.get_json("/api/runs/g")
        assert status == 200 and run["last_seq"] == 500
    finally:
        relay.stop()


def test_environment_variables_configure_the_relay(tmp_path):
    port = free_port()
    env = {"FEDRELAY_PORT": str(port), "FEDRELAY_DB": str(tmp_path / "env.db")}
    proc = subprocess.Popen([sys.executable, "-m", "fedrelay", "serve"], env={**os.environ, **env})
    try:
        relay = RelayProcess(tmp_path / "env.db", port=port)
        wait_until(lambda: _answers(relay), 20, what="relay from env config")
        assert (tmp_path / "env.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _answers(relay: RelayProcess) -> bool:
    try:
        return relay.get("/healthz")[0] == 200
    except OSError:
        return False


def test_a_flag_wins_over_the_environment_in_a_running_relay(tmp_path):
    env_port, flag_port = free_port(), free_port()
    env = {
        "FEDRELAY_PORT": str(env_port),
        "FEDRELAY_DB": str(tmp_path / "env.db"),
        "FEDRELAY_HOST": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "fedrelay", "serve", "--port", str(flag_port), "--memory"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env})
    try:
        wait_until(
            lambda: _answers(RelayProcess(":memory:", port=flag_port)), 20, what="relay on the flag's port"
        )
        assert not _answers(RelayProcess(":memory:", port=env_port))
        assert not (tmp_path / "env.db").exists()  # --memory beat FEDRELAY_DB
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_help_lists_every_setting_with_its_variable():
    from fedrelay.relay.config import RelayConfig, env_name, flag_of

    out = fedrelay("serve", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name, field in RelayConfig.model_fields.items():
        assert flag_of(name, field) in text and f"[{env_name(name)}]" in text, name
    assert "--no-compression" in text and "--memory" in text
    assert "(default: 8 MiB)" in text and "(default: relay.db in the user data dir)" in text


def test_serve_without_the_server_extra_says_what_to_install():
    """An emitter-only install lacks pydantic-settings: the other commands work, serve says so."""
    blocked = "import sys; sys.modules['pydantic_settings'] = None; from fedrelay.cli import main; "
    for args in (["serve", "--port", "0"], ["serve", "--help"]):
        out = subprocess.run(
            [sys.executable, "-c", blocked + f"sys.exit(main({args!r}))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        said = out.stdout + out.stderr
        assert "pip install 'fedrelay[server]'" in said and "Traceback" not in said, said
    out = subprocess.run(
        [sys.executable, "-c", blocked + "sys.exit(main(['schema', '--part', 'event']))"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "round_end" in out.stdout, out.stderr


def test_default_database_lives_in_the_user_data_dir(tmp_path):
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "FEDRELAY_PORT": str(port)}
    env.pop("FEDRELAY_DB", None)
    proc = subprocess.Popen([sys.executable, "-m", "fedrelay", "serve"], env=env)
    try:
        wait_until(lambda: _answers(RelayProcess(":memory:", port=port)), 20, what="relay")
        assert (tmp_path / "data" / "fedrelay" / "relay.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bad_configuration_is_a_clear_error(tmp_path):
    out = fedrelay("serve", env={"FEDRELAY_PORT": "eighty"})
    assert out.returncode == 2 and "FEDRELAY_PORT='eighty'" in out.stderr
    out = fedrelay("serve", "--replay-size", "-1")
    assert out.returncode == 2 and "--replay-size / FEDRELAY_REPLAY_SIZE must be a number >= 0" in out.stderr
    out = fedrelay("serve", env={"FEDRELAY_MAX_QUEUE_BYTES": "10"})
    assert out.returncode == 2 and "FEDRELAY_MAX_QUEUE_BYTES must be a number >= 1024" in out.stderr

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = fedrelay("serve", "--port", "0", "--db", str(blocker / "sub" / "relay.db"))
    assert out.returncode == 1 and "cannot" in out.stderr and "relay.db" in out.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = fedrelay("serve", "--port", str(port), "--memory")
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


async def test_memory_store_serves_without_a_file(tmp_path):
    relay = RelayProcess(":memory:").start()
    try:
        producer = ResendingProducer(relay.url, "m")
        await producer.publish_all([event("mem", i) for i in range(1, 11)])
        status, page = relay.get_json("/api/runs/mem/events?since=0")
        assert status == 200 and [e["seq"] for e in page["events"]] == list(range(1, 11))
        assert list(tmp_path.iterdir()) == []
    finally:
        relay.stop()
