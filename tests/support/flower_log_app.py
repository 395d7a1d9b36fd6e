"""A small real Flower simulation (Ray, numpy only) that logs, fails on purpose and can be paced.

Run as a script (``python tests/support/flower_log_app.py --relay URL ...``): its handlers live in
``__main__``, so Ray pickles them by value into the actors, with the settings they close over.

- Every ClientApp logs a WARNING per train message (``client P round R: ...``) and an INFO line;
  ``--fail-client/--fail-round`` make one client raise in train.
- The ServerApp logs an INFO line per round from its server-side evaluation.
- ``--gate-dir DIR``: the server-side evaluation of round R waits until ``DIR/round-R`` exists
  (the test paces the run: it kills and restarts things between rounds).
Prints ``run_id=...`` first, and ``done`` at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedrelay.emitters.flower import client_mod, instrument


def build_client_app(url: str, fail_client: int | None, fail_round: int | None) -> ClientApp:
    app = ClientApp(mods=[client_mod(url, forward_logs="INFO")])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        log = logging.getLogger("logapp.client")
        log.setLevel(logging.INFO)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        log.warning("client %d round %d: only %d examples here", pid, server_round, 10 + pid)
        log.info("client %d round %d: training", pid, server_round)
        if fail_client == pid and fail_round == server_round:
            raise RuntimeError(f"injected failure on client {pid} in round {server_round}")
        weights = msg.content["arrays"].to_numpy_ndarrays()
        updated = [w + 0.1 * (pid + 1) for w in weights]
        loss = 1.0 / (server_round + pid + 1)
        content = RecordDict(
            {
                "arrays": ArrayRecord(updated),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": 10 + pid}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        metrics = {"eval_loss": 0.5 / (server_round + 1) + 0.01 * pid, "eval_acc": 0.5 + 0.1 * server_round}
        metrics["num-examples"] = 10 + pid
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def build_server_app(
    url: str, rounds: int, clients: int, gate_dir: str | None, experiment: str, outcome: dict
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome["run_id"] = str(context.run_id)
        print(f"run_id={context.run_id}", flush=True)
        log = logging.getLogger("logapp.server")
        log.setLevel(logging.INFO)
        strategy = instrument(
            FedAvg(
                fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=clients - 1,
                min_evaluate_nodes=clients, min_available_nodes=clients,
            ),
            context, url=url, experiment_name=experiment, num_clients=clients, monitor="eval_acc",
            forward_logs=True,
        )  # fmt: skip

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if gate_dir and server_round > 0:
                gate = Path(gate_dir) / f"round-{server_round}"
                deadline = time.monotonic() + 300
                while not gate.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            total = float(sum(w.sum() for w in arrays.to_numpy_ndarrays()))
            log.info("server round %d: weights sum to %.3f", server_round, total)
            return MetricRecord(
                {"server_loss": 1.0 / (server_round + 1), "server_acc": 0.4 + 0.1 * server_round}
            )

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": 0.1}),
            evaluate_fn=central,
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--fail-client", type=int)
    parser.add_argument("--fail-round", type=int)
    parser.add_argument("--gate-dir")
    parser.add_argument("--experiment", default="logapp")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    outcome: dict = {}
    run_simulation(
        server_app=build_server_app(
            args.relay, args.rounds, args.clients, args.gate_dir, args.experiment, outcome
        ),
        client_app=build_client_app(args.relay, args.fail_client, args.fail_round),
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False},
        },
    )
    print("done" if "run_id" in outcome else "no run", flush=True)


if __name__ == "__main__":
    main()
