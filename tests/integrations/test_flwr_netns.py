"""SuperNodes on other "hosts": network namespaces on one private subnet, the relay over TLS.

The hub namespace runs the relay (``--certfile/--keyfile``, publish and subscribe tokens) and the
SuperLink; two namespaces run one SuperNode each; a fourth runs a subscriber. Everything crosses
veth pairs and a bridge, never loopback, and everything that reaches the relay speaks wss:// with
a token, verified against a test CA (trustme) that no system store knows.

1. The relay side: a plain websockets client with an ``ssl`` context publishes from a SuperNode's
   namespace, the subscriber's namespace receives; a wrong token is refused; a client that does
   not trust the CA refuses the relay.
2. The whole path: ``flwr run`` of the example app with the relay's URL, token and CA file in the
   run config only (``fedrelay-url``, ``fedrelay-token``, ``fedrelay-ca-file``); the subscriber
   receives every event once, in order, and nothing is left in any spool.

Namespaces, veths and processes are removed at the end of each test, also on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from tests.support.flower_deployment import (
    REPO,
    SRC,
    Processes,
    check_stream,
    copy_app,
    flower_cmd,
    flower_env,
    run_config_args,
    write_connection,
)
from tests.support.netns import HUB_ADDRESS, Hosts
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(420)

PUBLISH, SUBSCRIBE = "lab-publish-t0ken", "lab-subscribe-t0ken"
RELAY_PORT, SUPERLINK_PORT = 8765, 8000
"""Fixed: each namespace has its own ports."""
RELAY_URL = f"wss://{HUB_ADDRESS}:{RELAY_PORT}"


@pytest.fixture
def lab(tmp_path):
    """The four namespaces, a test CA, and the relay running in the hub over TLS."""
    hosts = Hosts("node0", "node1", "sub")
    processes = Processes(tmp_path / "logs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = ca.issue_cert(HUB_ADDRESS)
    server.cert_chain_pems[0].write_to_path(tmp_path / "relay.pem")
    server.private_key_pem.write_to_path(tmp_path / "relay-key.pem")
    try:
        hosts.up()
        processes.start(
            "relay",
            [sys.executable, "-m", "fedrelay", "serve", "--host", "0.0.0.0", "--port", str(RELAY_PORT),
             "--db", str(tmp_path / "relay.db"), "--certfile", str(tmp_path / "relay.pem"),
             "--keyfile", str(tmp_path / "relay-key.pem"), "--log-level", "info"],
            client_env(FEDRELAY_PUBLISH_TOKEN=PUBLISH, FEDRELAY_SUBSCRIBE_TOKEN=SUBSCRIBE),
            netns=hosts["hub"],
        )  # fmt: skip
        ready = client(hosts["sub"], "health", RELAY_URL, "--ca", str(tmp_path / "ca.pem"))
        assert ready.returncode == 0, (ready.stderr, processes.log("relay"))
        yield Lab(hosts, processes, tmp_path)
    finally:
        processes.stop_all()
        hosts.down()
        assert not hosts.exists(), "namespaces left behind"


class Lab:
    def __init__(self, hosts: Hosts, processes: Processes, root: Path) -> None:
        self.hosts = hosts
        self.processes = processes
        self.root = root
        self.ca = str(root / "ca.pem")

    def subscribe(self) -> Path:
        """A subscriber to every run, in its own namespace; returns the file it writes events to."""
        out = self.root / "subscriber.jsonl"
        self.processes.start(
            "subscriber",
            client_cmd("subscribe", RELAY_URL, "--ca", self.ca, "--token", SUBSCRIBE, "--out", str(out),
                       "--timeout", "400"),
            client_env(),
            netns=self.hosts["sub"],
        )  # fmt: skip
        wait_until(lambda: Path(f"{out}.ready").exists(), 30, what=self.processes.log("subscriber"))
        return out


def client_env(**extra: str) -> dict[str, str]:
    """The relay's and the test clients' environment: this checkout, no relay settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDRELAY_")}
    return {**env, "PYTHONPATH": f"{SRC}{os.pathsep}{REPO}", **extra}


def client_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.support.wss_client", *args]


def client(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *client_cmd(*args)],
        capture_output=True,
        text=True,
        timeout=90,
        env=client_env(),
    )


def received(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_relay_over_wss_across_namespaces_with_tokens_and_a_test_ca(lab):
    stream = lab.subscribe()
    sent = client(lab.hosts["node0"], "publish", RELAY_URL, "--ca", lab.ca, "--token", PUBLISH,
                  "--producer", "node0", "--run", "lab-run", "--count", "3")  # fmt: skip
    assert sent.returncode == 0, (sent.stdout, sent.stderr)
    wait_until(lambda: len(received(stream)) == 3, 20, what="3 events at the subscriber's namespace")
    events = received(stream)
    assert [(e["run_id"], e["seq"], e["producer"]) for e in events] == [
        ("lab-run", s, "node0") for s in (1, 2, 3)
    ]

    wrong = client(lab.hosts["node1"], "publish", RELAY_URL, "--ca", lab.ca, "--token", "not-the-token",
                   "--producer", "node1", "--run", "lab-run")  # fmt: skip
    assert wrong.returncode != 0 and "HTTP 401" in wrong.stderr, wrong.stderr
    untrusting = client(lab.hosts["node1"], "untrusted", RELAY_URL)
    assert untrusting.returncode == 0, (untrusting.stdout, untrusting.stderr)
    assert "certificate verify failed" in untrusting.stdout
    assert f"relay on wss://0.0.0.0:{RELAY_PORT}" in lab.processes.log("relay")


def test_flwr_run_with_supernodes_in_their_own_namespaces_publishes_over_wss(lab):
    """Needs the emitters to take the token and CA from the run config (decision C)."""
    rounds, clients = 1, 2
    home = lab.root / "flwr-home"
    hub = lab.hosts["hub"]
    lab.processes.start(
        "superlink",
        flower_cmd("flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                   "--host", "0.0.0.0", "--port", str(SUPERLINK_PORT)),
        flower_env(home, FEDRELAY_SPOOL_DIR=str(lab.root / "spool-hub")),
        netns=hub,
    )  # fmt: skip
    for node in range(clients):
        lab.processes.start(
            f"supernode{node}",
            flower_cmd("flower-supernode", "--insecure", "--superlink", f"{HUB_ADDRESS}:{SUPERLINK_PORT}",
                       "--port", "9094", "--node-config", f"partition-id={node} num-partitions={clients}"),
            flower_env(home, FEDRELAY_SPOOL_DIR=str(lab.root / f"spool-node{node}")),
            netns=lab.hosts[f"node{node}"],
        )  # fmt: skip
    write_connection(home, "lab", f"127.0.0.1:{SUPERLINK_PORT}")
    stream = lab.subscribe()
    config = {
        "fedrelay-url": RELAY_URL,
        "fedrelay-token": PUBLISH,
        "fedrelay-ca-file": lab.ca,
        "num-server-rounds": rounds,
    }
    app = copy_app(lab.root)
    up = client(hub, "listening", f"127.0.0.1:{SUPERLINK_PORT}")
    assert up.returncode == 0, (up.stderr, lab.processes.log("superlink"))
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            hub,
            *flower_cmd("flwr", "run", str(app), "lab", "--stream", *run_config_args(config)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=flower_env(home),
        cwd=app,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    def ended() -> bool:
        return any(e["type"] == "training_end" for e in received(stream))

    try:
        wait_until(ended, 60, 0.2, what="training_end at the subscriber")
    except TimeoutError:
        spooled = sorted(str(p.relative_to(lab.root)) for p in lab.root.glob("spool-*/*/*.seg"))
        pytest.fail(
            f"the run finished but {len(received(stream))} events reached the subscriber; spooled: "
            f"{spooled or 'nothing'}. The emitters must publish with fedrelay-token and verify with "
            f"fedrelay-ca-file from the run config.\nrelay log:\n{lab.processes.log('relay')}"
        )
    check_stream(received(stream), rounds, clients)
    assert not list(lab.root.glob("spool-*/*/*.seg")), "events left in a spool"
