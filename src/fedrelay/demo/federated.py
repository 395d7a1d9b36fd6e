"""Federated pneumonia detection with Flower's Message API, streamed live through fedrelay.

The ServerApp wraps FedAvg (or FedProx) with :func:`fedrelay.emitters.flower.instrument` and
evaluates the global model on a held-out test set every round; ClientApps train on their own
partition (IID or label-skewed) with the :data:`fedrelay_mod` mod and report local epochs with
:func:`report_epoch`. The apps are built by factories over a frozen config: Ray pickles the
handlers (closures) by value, and the config travels with them, because ``run_simulation`` has no
run config of its own.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from .data import client_data, load_dataset
from .engine import evaluate, train
from .model import PneumoniaCNN


@dataclass(frozen=True)
class FederatedConfig:
    """Everything a demo run needs; the same object reaches the server and every client."""

    rounds: int = 3
    clients: int = 5
    partition: str = "iid"
    data_dir: str | None = None
    image_size: int = 32
    n_train: int = 1000
    n_test: int = 300
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    seed: int = 0
    url: str | None = None
    telemetry: bool = True
    experiment_name: str = "pneumonia-federated"
    cpus_per_client: float = 1.0
    # Fault injection, to see failures on the dashboard (and to test them).
    fail_client: int | None = None
    fail_round: int | None = None
    fail_server_round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _new_model(seed: int) -> PneumoniaCNN:
    torch.manual_seed(seed)
    return PneumoniaCNN()


def _partition_of(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def build_client_app(cfg: FederatedConfig) -> ClientApp:
    """The ClientApp: local training and validation on this client's partition."""
    mods = []
    if cfg.telemetry:
        from fedrelay.emitters.flower import client_mod

        mods.append(client_mod(cfg.url))
    app = ClientApp(mods=mods)

    def local_data(context: Context):
        pid, n = _partition_of(context)
        return client_data(
            pid, n, scheme=cfg.partition, data_dir=cfg.data_dir, size=cfg.image_size,
            n_train=cfg.n_train, seed=cfg.seed,
        )  # fmt: skip

    def load_model(msg: Message) -> PneumoniaCNN:
        model = PneumoniaCNN()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return model

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        server_round = int(config["server-round"])
        pid, _ = _partition_of(context)
        if cfg.fail_client == pid and cfg.fail_round in (None, server_round):
            raise RuntimeError(f"injected failure on client {pid} in round {server_round}")
        model = load_model(msg)
        trainset, _ = local_data(context)
        on_epoch = None
        if cfg.telemetry:
            from fedrelay.emitters.flower import report_epoch

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                report_epoch(context, msg, epoch, metrics, url=cfg.url)

        metrics = train(
            model, trainset, epochs=int(config.get("local-epochs", cfg.local_epochs)),
            batch_size=cfg.batch_size, lr=float(config.get("lr", cfg.lr)),
            seed=cfg.seed * 1000 + server_round * 31 + pid,
            proximal_mu=float(config.get("proximal-mu", 0.0)), on_epoch=on_epoch,
        )  # fmt: skip
        metrics["num-examples"] = len(trainset)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        model = load_model(msg)
        _, valset = local_data(context)
        metrics: dict[str, Any] = evaluate(model, valset)
        metrics["num-examples"] = len(valset)
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def build_server_app(cfg: FederatedConfig, outcome: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp: FedAvg/FedProx over all clients, server-side test evaluation each round.

    ``outcome`` (optional) receives the run id and the strategy's ``Result``: the ServerApp runs in
    a thread of the calling process, so the caller can read it after ``run_simulation``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _, test = load_dataset(cfg.data_dir, cfg.image_size, cfg.n_train, cfg.n_test, cfg.seed)
        model = _new_model(cfg.seed)
        common = dict(
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=cfg.clients,
            min_evaluate_nodes=cfg.clients, min_available_nodes=cfg.clients,
        )  # fmt: skip
        if cfg.strategy == "fedprox":
            strategy = FedProx(proximal_mu=cfg.proximal_mu, **common)
        elif cfg.strategy == "fedavg":
            strategy = FedAvg(**common)
        else:
            raise ValueError(f"unknown strategy {cfg.strategy!r} (fedavg or fedprox)")
        if cfg.telemetry:
            from fedrelay.emitters.flower import instrument

            strategy = instrument(
                strategy, context, url=cfg.url, experiment_name=cfg.experiment_name,
                num_clients=cfg.clients, monitor="auroc",
            )  # fmt: skip

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if cfg.fail_server_round is not None and server_round == cfg.fail_server_round:
                raise RuntimeError(f"injected server failure in round {server_round}")
            model.load_state_dict(arrays.to_torch_state_dict())
            return MetricRecord(evaluate(model, test))

        if outcome is not None:
            outcome["run_id"] = str(context.run_id)
        started = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.rounds,
            train_config=ConfigRecord({"lr": cfg.lr, "local-epochs": cfg.local_epochs}),
            evaluate_fn=central_evaluate,
        )
        if outcome is not None:
            outcome["result"] = result
            outcome["strategy_seconds"] = time.perf_counter() - started

    return app


def run_federated(cfg: FederatedConfig, *, verbose: bool = False) -> dict[str, Any]:
    """Run the simulation (Ray) and return ``{"run_id", "result", "seconds", "config"}``.

    Raises when the ServerApp fails (after the failure has been streamed).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if cfg.url:
        # Ray actors inherit the driver's environment: a second route for the URL.
        os.environ.setdefault("FEDRELAY_URL", cfg.url)
    from flwr.simulation import run_simulation

    outcome: dict[str, Any] = {"config": asdict(cfg)}
    started = time.perf_counter()
    run_simulation(
        server_app=build_server_app(cfg, outcome),
        client_app=build_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False},
        },
        verbose_logging=verbose,
    )
    outcome["seconds"] = time.perf_counter() - started
    if "result" not in outcome:
        raise RuntimeError("the ServerApp did not finish (see the log above)")
    return outcome
