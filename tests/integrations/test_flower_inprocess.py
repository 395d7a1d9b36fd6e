"""A real ClientApp with ``fedrelay_mod``, a real FedAvg wrapped by ``instrument``, and a real relay,
in one process: only Flower's transport is replaced, by a Grid that hands each message to the
ClientApp directly. Fast enough to check the round events' client and node ids in detail."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrelay.emitters import shared
from fedrelay.emitters.flower import (
    REPLY_RECORD,
    client_mod,
    emitter_for,
    instrument,
    relay_setting,
    report_epoch,
)
from tests.support.relay_process import free_port
from tests.support.stored import of_type, stored_events
from tests.support.waiting import wait_until

RUN_ID = 77
NODES = {101: 0, 202: 1}
"""Flower node id -> partition id (the client id client events carry)."""


class LocalGrid(Grid):
    """Flower's Grid, delivering each message to the ClientApp in this process."""

    def __init__(self, app: ClientApp, run_config: dict[str, Any]) -> None:
        self.app, self.run_config, self._run = app, run_config, None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(
                RUN_ID, node, {"partition-id": NODES[node]}, RecordDict(), dict(self.run_config)
            )
            try:
                replies.append(self.app(msg, context))
            except Exception as exc:  # as Flower's runtime does: the exception becomes an error reply
                replies.append(Message(Error(code=0, reason=repr(exc)), reply_to=msg))
        return replies


class SeeingFedAvg(FedAvg):
    """FedAvg that notes the record names of the replies it aggregates."""

    seen: list[str]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen.extend(name for r in replies if r.has_content() for name in r.content.config_records)
        return super().aggregate_train(server_round, replies)


def client_app(url: str, fail: tuple[int, int] | None = None, **mod_options) -> ClientApp:
    app = ClientApp(mods=[client_mod(url, **mod_options)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        server_round = msg.content["config"]["server-round"]
        if fail == (context.node_config["partition-id"], server_round):
            raise RuntimeError("injected failure")
        report_epoch(context, msg, 1, {"loss": 0.5}, url=url)
        metrics = MetricRecord({"loss": 0.5, "num-examples": 10})
        return Message(
            content=RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"loss": 0.4, "num-examples": 10})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


@pytest.fixture(autouse=True)
def flower_process(monkeypatch, tmp_path):
    """Flower's task identity (a real run sets it), a private spool; shared emitters closed after."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setenv("FEDRELAY_SPOOL_DIR", str(tmp_path / "spool"))
    for name in ("FEDRELAY_URL", "FEDRELAY_TOKEN", "FEDRELAY_PUBLISH_TOKEN", "FEDRELAY_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    for emitter in list(shared._shared.values()):
        emitter.close(timeout=2)
    shared._shared.clear()


def run_federation(relay, app: ClientApp, strategy: FedAvg, rounds: int = 2) -> list[dict]:
    run_config = {"fedrelay-url": relay.url}
    server_context = Context(RUN_ID, 0, {}, RecordDict(), run_config)
    instrument(strategy, server_context).start(
        LocalGrid(app, run_config), ArrayRecord([np.zeros(3)]), num_rounds=rounds
    )
    wait_until(lambda: of_type(stored_events(relay, str(RUN_ID)), "training_end"), 15, what="training_end")
    return stored_events(relay, str(RUN_ID))


def test_round_events_name_clients_by_client_id_and_keep_node_ids(relay):
    strategy = SeeingFedAvg(fraction_evaluate=1.0)
    strategy.seen = []
    events = run_federation(relay, client_app(relay.url), strategy)
    starts = of_type(events, "round_start")
    assert starts[0]["data"]["participating_clients"] == 2  # no reply yet: only how many
    assert sorted(starts[1]["data"]["participating_clients"]) == [0, 1]
    assert all(sorted(s["data"]["participating_nodes"]) == ["101", "202"] for s in starts)
    for end in of_type(events, "round_end"):
        data = end["data"]
        assert sorted(data["participating_clients"]) == [0, 1] and sorted(data["evaluated_clients"]) == [0, 1]
        assert sorted(data["participating_nodes"]) == ["101", "202"]
        assert data["failed_clients"] == [] and data["failed_nodes"] == []
    done = of_type(events, "client_complete", round=1, phase="train")
    assert sorted((e["data"]["client_id"], e["data"]["node_id"]) for e in done) == [(0, "101"), (1, "202")]
    assert REPLY_RECORD not in strategy.seen  # the strategy aggregates the replies as the app made them


def test_without_the_reply_record_round_events_fall_back_to_node_ids(relay):
    strategy = SeeingFedAvg(fraction_evaluate=1.0)
    strategy.seen = []
    events = run_federation(relay, client_app(relay.url, report_client_id=False), strategy)
    ends = of_type(events, "round_end")
    assert all(sorted(e["data"]["participating_clients"]) == ["101", "202"] for e in ends)
    assert of_type(events, "round_start", round=2)[0]["data"]["participating_clients"] == 2


def test_a_failing_client_is_named_by_its_client_id_once_the_server_knows_it(relay):
    events = run_federation(relay, client_app(relay.url, fail=(1, 2)), FedAvg(fraction_evaluate=1.0))
    (round2,) = of_type(events, "round_end", round=2)
    assert round2["data"]["failed_clients"] == [1] and round2["data"]["failed_nodes"] == ["202"]
    assert round2["data"]["participating_clients"] == [0]
    (server_saw,) = [e for e in of_type(events, "error", round=2) if e["source"]["role"] == "server"]
    assert (server_saw["data"]["client_id"], server_saw["data"]["node_id"]) == (1, "202")
    (client_said,) = [e for e in of_type(events, "error", round=2) if e["source"]["role"] == "client"]
    assert client_said["data"]["client_id"] == 1


def test_settings_come_from_the_run_config_then_the_node_config_then_the_environment(monkeypatch):
    both = Context(1, 2, {"fedrelay-url": "ws://node:1"}, RecordDict(), {"fedrelay-url": "ws://run:1"})
    node_only = Context(1, 2, {"fedrelay-url": "ws://node:1", "fedrelay-token": "t"}, RecordDict(), {})
    neither = Context(1, 2, {}, RecordDict(), {})
    monkeypatch.setenv("FEDRELAY_URL", "ws://env:1")
    monkeypatch.setenv("FEDRELAY_CA_FILE", "/ca.pem")
    assert relay_setting(both, "fedrelay-url") == ("ws://run:1", "run config fedrelay-url")
    assert relay_setting(node_only, "fedrelay-url") == ("ws://node:1", "node config fedrelay-url")
    assert relay_setting(node_only, "fedrelay-token") == ("t", "node config fedrelay-token")
    assert relay_setting(neither, "fedrelay-url") == ("ws://env:1", "FEDRELAY_URL")
    assert relay_setting(neither, "fedrelay-ca-file") == ("/ca.pem", "FEDRELAY_CA_FILE")
    monkeypatch.delenv("FEDRELAY_URL")
    assert relay_setting(neither, "fedrelay-url") == (None, "default")


LOGGING_CHILD = textwrap.dedent(
    """
    import sys
    from flwr.app import Context, RecordDict
    from fedrelay.emitters.flower import emitter_for

    context = Context(1, 2, {}, RecordDict(), {"fedrelay-url": sys.argv[1]})
    emitter = emitter_for(context)
    emitter.emit("status", {"message": "hello"})
    print("SOURCE", emitter.url_source, flush=True)
    emitter.close(5)
    """
)


def test_each_process_logs_the_url_it_uses_and_its_source_where_flower_shows_it(relay, tmp_path):
    env = {**os.environ, "FEDRELAY_URL": "ws://127.0.0.1:9", "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", LOGGING_CHILD, relay.url], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "SOURCE run config fedrelay-url" in done.stdout
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if "fedrelay: publishing to" in line]
    assert len(lines) == 1, output  # once, at Flower's INFO level: no logging set up in this process
    assert f"publishing to {relay.url} (url from run config fedrelay-url)" in lines[0] and "INFO" in lines[0]


SEVERAL_CHILD = textwrap.dedent(
    """
    import sys
    from flwr.app import Context, RecordDict
    from fedrelay.emitters.flower import emitter_for

    context = Context(7, 2, {}, RecordDict(), {"fedrelay-url": sys.argv[1]})
    emitter = emitter_for(context)
    emitter.emit("status", {"message": "hello"}, run_id=str(context.run_id))
    print("DELIVERED", emitter.flush(30), emitter.url, flush=True)
    emitter.close(5)
    """
)


def test_the_run_config_url_may_list_several_nodes_of_one_relay(relay):
    dead = f"ws://127.0.0.1:{free_port()}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", SEVERAL_CHILD, f"{dead}, {relay.url}"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"DELIVERED True {relay.url}" in done.stdout
    assert [e["data"]["message"] for e in stored_events(relay, "7")] == ["hello"]
    (line,) = [line for line in (done.stdout + done.stderr).splitlines() if "fedrelay: publishing to" in line]
    assert f"publishing to {dead}, {relay.url}, in this order" in line
    assert "(urls from run config fedrelay-url)" in line


def test_report_epoch_counts_from_one_and_warns_once_about_zero(relay, caplog):
    caplog.set_level(logging.WARNING, logger="flwr.fedrelay")
    context = Context(RUN_ID, 101, {"partition-id": 0}, RecordDict(), {"fedrelay-url": relay.url})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), 101, "train")
    for epoch in (0, 1, 0):
        report_epoch(context, msg, epoch, {"loss": 0.1})
    warnings = [r for r in caplog.records if "epoch 0" in r.getMessage()]
    assert len(warnings) == 1 and "counted from 1" in warnings[0].getMessage()
    assert emitter_for(context).flush(10)  # the process's emitter, which report_epoch used
    assert [e["data"]["local_epoch"] for e in stored_events(relay, str(RUN_ID))] == [0, 1, 0]
