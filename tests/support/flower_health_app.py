"""A small real Flower simulation (Ray) streaming to a relay, for the federation health and
comparison tests: a linear model trained with numpy (no torch in the Ray actors), FedAvg wrapped
by ``instrument``, the ``client_mod`` on every ClientApp. One client can be made to fail in a
round and another to sleep in its train handler in a round (a straggler however loaded the
machine: its sleep is many times what the others take).

    python -m tests.support.flower_health_app --relay ws://127.0.0.1:PORT --lr 0.05 \\
        --fail-client 1 --fail-round 2 --slow-client 2 --slow-round 3 --slow-seconds 8

Prints ``run_id=ID`` once the simulation is over. Run as ``__main__``, the handlers are pickled by
value into the Ray actors, with the frozen config they close over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

FEATURES = 8


@dataclass(frozen=True)
class Config:
    url: str
    experiment: str = "numpy-linear"
    rounds: int = 3
    clients: int = 4
    lr: float = 0.05
    local_epochs: int = 5
    fail_client: int | None = None
    fail_round: int | None = None
    slow_client: int | None = None
    slow_round: int | None = None
    slow_seconds: float = 8.0


def data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A linear problem shared by every client (the same true weights), each with its own samples."""
    truth = np.random.default_rng(0).normal(size=FEATURES)
    rng = np.random.default_rng(1000 + seed)
    x = rng.normal(size=(n, FEATURES))
    return x, x @ truth + rng.normal(scale=0.1, size=n)


def mse(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ w - y) ** 2))


def client_app(cfg: Config) -> ClientApp:
    from fedrelay.emitters.flower import client_mod

    app = ClientApp(mods=[client_mod(cfg.url)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        if cfg.fail_client == pid and cfg.fail_round == server_round:
            raise RuntimeError(f"injected failure on client {pid} in round {server_round}")
        if cfg.slow_client == pid and cfg.slow_round == server_round:
            time.sleep(cfg.slow_seconds)
        lr = float(msg.content["config"]["lr"])
        (w,) = msg.content["arrays"].to_numpy_ndarrays()
        x, y = data(pid, 120)
        for _ in range(cfg.local_epochs):
            w = w - lr * 2 * x.T @ (x @ w - y) / len(y)
        metrics = {"train_loss": mse(w, x, y), "num-examples": len(y)}
        content = RecordDict({"arrays": ArrayRecord([w]), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        (w,) = msg.content["arrays"].to_numpy_ndarrays()
        x, y = data(100 + pid, 60)
        metrics = {"loss": mse(w, x, y), "mae": float(np.mean(np.abs(x @ w - y))), "num-examples": len(y)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def server_app(cfg: Config, outcome: dict[str, Any]) -> ServerApp:
    from fedrelay.emitters.flower import instrument

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = instrument(
            FedAvg(
                fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=cfg.clients,
                min_evaluate_nodes=cfg.clients, min_available_nodes=cfg.clients,
            ),
            context, url=cfg.url, experiment_name=cfg.experiment, num_clients=cfg.clients, monitor="loss",
        )  # fmt: skip
        x, y = data(999, 200)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            (w,) = arrays.to_numpy_ndarrays()
            return MetricRecord({"loss": mse(w, x, y)})

        outcome["run_id"] = str(context.run_id)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([np.zeros(FEATURES)]),
            num_rounds=cfg.rounds,
            train_config=ConfigRecord({"lr": cfg.lr, "local-epochs": cfg.local_epochs}),
            evaluate_fn=central,
        )
        outcome["done"] = True

    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", required=True)
    parser.add_argument("--experiment", default="numpy-linear")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    for name in ("fail-client", "fail-round", "slow-client", "slow-round"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--slow-seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    cfg = Config(
        url=args.relay, experiment=args.experiment, rounds=args.rounds, clients=args.clients, lr=args.lr,
        fail_client=args.fail_client, fail_round=args.fail_round, slow_client=args.slow_client,
        slow_round=args.slow_round, slow_seconds=args.slow_seconds,
    )  # fmt: skip
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    outcome: dict[str, Any] = {}
    run_simulation(
        server_app=server_app(cfg, outcome),
        client_app=client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False},
        },
    )
    if not outcome.get("done"):
        print("the ServerApp did not finish", file=sys.stderr)
        return 1
    print(f"run_id={outcome['run_id']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
