"""docker-compose.yml's ``cluster`` profile, checked without Docker (no engine here).

The structure is read as YAML (services, profiles, ports, health checks, dependencies, networks)
and the default profile is pinned as it was; the load balancer's configuration
(``deploy/haproxy.cfg``) is checked by the real ``haproxy`` binary and then run in front of two
real relay processes, carrying ``/publish``, ``/subscribe``, ``/`` and HTTP, and moving clients to
the relay that is left when one is killed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from websockets.sync.client import connect

from fedrelay.emitters import Emitter
from fedrelay.follow import Follower
from tests.support.haproxy import CONFIG, HaproxyProcess, haproxy_binary, render
from tests.support.postgres import PgServer
from tests.support.relay_process import RelayProcess
from tests.support.stored import stored_events
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
HEALTHCHECK = [
    "CMD",
    "python",
    "-c",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2)",
]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def started_by(services: dict, target: str) -> set[str]:
    """``docker compose up TARGET``: the service and what it depends on, transitively."""
    todo, seen = [target], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(services[name].get("depends_on") or {})
    return seen


def test_the_default_profile_is_the_single_relay_and_the_demo_as_before(compose):
    services = compose["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"relay", "trainer"}
    assert services["relay"] == {
        "build": {"context": ".", "target": "relay"},
        "image": "fedrelay:relay",
        "ports": ["127.0.0.1:8765:8765"],
        "volumes": ["relay-data:/data"],
        "environment": {
            "FEDRELAY_PUBLISH_TOKEN": "${FEDRELAY_PUBLISH_TOKEN:-}",
            "FEDRELAY_SUBSCRIBE_TOKEN": "${FEDRELAY_SUBSCRIBE_TOKEN:-}",
        },
        "healthcheck": {"test": HEALTHCHECK, "interval": "5s", "timeout": "3s", "retries": 10},
        "restart": "unless-stopped",
    }
    trainer = services["trainer"]
    assert trainer["depends_on"] == {"relay": {"condition": "service_healthy"}}
    assert trainer["environment"]["FEDRELAY_URL"] == "ws://relay:8765" and "networks" not in trainer


def test_the_cluster_profile_is_postgres_two_relays_and_a_load_balancer(compose):
    services = compose["services"]
    cluster = {name for name, service in services.items() if "cluster" in (service.get("profiles") or ())}
    assert cluster == {"postgres", "relay-1", "relay-2", "lb"}

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    for name in ("relay-1", "relay-2"):
        relay = services[name]
        assert relay["image"] == "fedrelay:relay" and relay["build"]["target"] == "relay"
        command = relay["command"]
        assert command[:2] == ["fedrelay", "serve"]
        assert command[command.index("--db") + 1] == "postgresql://fedrelay@postgres:5432/fedrelay"
        assert command[command.index("--host") + 1] == "0.0.0.0"
        assert relay["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        assert relay["healthcheck"]["test"] == HEALTHCHECK
        assert "ports" not in relay and relay["networks"] == ["cluster"]
        assert relay["environment"]["FEDRELAY_MAX_CONNECTIONS_PER_IP"] == "0"
        assert relay["environment"]["PGPASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
    lb = services["lb"]
    assert lb["image"].startswith("haproxy:")
    assert lb["ports"] == ["127.0.0.1:8765:8765"]
    assert lb["volumes"] == ["./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    assert set(lb["depends_on"]) == {"relay-1", "relay-2"} and set(lb["networks"]) == {"default", "cluster"}
    assert compose["networks"]["cluster"] == {"internal": True}
    assert set(compose["volumes"]) == {"relay-data", "pg-data"}

    up = started_by(services, "lb")  # docker compose --profile cluster up lb
    assert up == cluster, "no service of the default profile, so no clash on 127.0.0.1:8765"
    config = CONFIG.read_text()
    for name in ("relay-1", "relay-2"):
        assert config.count(f"server {name} {name}:8765") == 2, "the balancer names the relay services"


def test_haproxy_accepts_the_shipped_configuration():
    checked = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    warnings = [line for line in checked.stderr.splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    # Outside Docker the relay services' names do not resolve: the only warnings allowed.
    assert all("could not resolve address 'relay-" in line for line in warnings), warnings


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRELAY_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.delenv("FEDRELAY_URL", raising=False)


def follow(url: str, run_id: str, count: int) -> list[int]:
    seqs: list[int] = []

    def on_event(event: dict) -> bool:
        seqs.append(event["seq"])
        return len(seqs) == count

    asyncio.run(asyncio.wait_for(Follower(url, [run_id], on_event=on_event).run(), 30))
    return seqs


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def pg(tmp_path):
    """The relays' PostgreSQL, as the compose file's ``postgres`` service (a server of the test's own)."""
    server = PgServer(tmp_path / "pg").start()
    yield server
    server.remove()


def test_haproxy_carries_every_path_to_relays_on_one_postgresql_and_moves_clients_off_a_dead_one(
    tmp_path, isolated, pg
):
    url = pg.fresh_db("compose")
    relays = [RelayProcess(url, env={"FEDRELAY_MAX_CONNECTIONS_PER_IP": "0"}) for _ in range(2)]
    for i, relay in enumerate(relays, 1):
        relay.log_path = tmp_path / f"relay-{i}.log"  # as the compose file runs them
        relay.start()
    first, second = relays
    lb = HaproxyProcess(
        tmp_path, {"relay-1": f"127.0.0.1:{first.port}", "relay-2": f"127.0.0.1:{second.port}"}
    )
    emitter = Emitter(lb.url, run_id="through-lb", max_backoff=0.5)

    def lb_status(path: str) -> int:
        return get(lb.http + path)[0]

    try:
        lb.start()
        wait_until(lambda: lb_status("/healthz") == 200, 20, what="the balancer serving")
        status, page = get(lb.http + "/")
        assert status == 200 and b"fedrelay" in page.lower(), "the dashboard"

        for i in range(300):  # /publish
            emitter.emit("client_progress", {"round": 1, "client_id": "c1", "i": i})
        assert emitter.flush(30), emitter.last_error
        assert follow(lb.url, "through-lb", 300) == list(range(1, 301))  # /subscribe

        with connect(lb.url + "/") as watcher, connect(lb.url + "/") as trainer:  # /, both ways
            trainer.send(json.dumps({"type": "status", "data": {"run_id": "root-lb", "message": "hi"}}))
            heard = json.loads(watcher.recv(timeout=10))
        assert heard["type"] == "status" and heard["data"] == {"run_id": "root-lb", "message": "hi"}

        runs = json.loads(get(lb.http + "/api/runs")[1])["runs"]  # the API's own backend
        assert {run["run_id"] for run in runs} == {"through-lb", "root-lb"}
        assert stored_events(first, "through-lb") == stored_events(second, "through-lb"), "one store"
        assert len(stored_events(second, "through-lb")) == 300

        first.kill()  # the emitter's tunnel may end; it reconnects through the balancer
        for i in range(300, 400):
            emitter.emit("client_progress", {"round": 1, "client_id": "c1", "i": i})
        assert emitter.flush(60), emitter.last_error
        assert [e["seq"] for e in stored_events(second, "through-lb")] == list(range(1, 401))
        assert follow(lb.url, "through-lb", 400) == list(range(1, 401)), "the whole history, on relay-2"

        # PostgreSQL away: the relay says 503 and leaves the rotation, and comes back with it.
        pg.stop()
        wait_until(lambda: lb_status("/healthz") == 503, 20, what="no relay in the rotation")
        pg.start()
        wait_until(lambda: lb_status("/healthz") == 200, 30, what="relay-2 back in the rotation")
        emitter.emit("client_progress", {"round": 1, "client_id": "c1", "i": 400})
        assert emitter.flush(30), emitter.last_error
        assert len(stored_events(second, "through-lb")) == 401
    finally:
        emitter.close(1)
        lb.stop()
        for relay in relays:
            relay.stop()


def test_rendering_replaces_only_addresses():
    original = CONFIG.read_text()
    rendered = render(original, {"relay-1": "127.0.0.1:1", "relay-2": "127.0.0.1:2"}, "127.0.0.1:3")
    changed = [(a, b) for a, b in zip(original.splitlines(), rendered.splitlines(), strict=True) if a != b]
    assert len(changed) == 5 and all("server relay-" in a or "bind" in a for a, _ in changed)
