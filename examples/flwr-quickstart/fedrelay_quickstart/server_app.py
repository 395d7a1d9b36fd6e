"""The ServerApp: FedAvg over the SuperNodes, wrapped by ``instrument`` to stream the run.

``instrument(strategy, context)`` streams ``training_start``, ``round_start``/``round_end`` (with
the clients that took part) and ``training_end``; the run id is Flower's, shared with every
ClientApp, so the whole federation lands in one relay run.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrelay.emitters.flower import instrument

from . import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config["min-nodes"])
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy = instrument(strategy, context, experiment_name="fedrelay-quickstart", monitor="accuracy")
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.initial_weights()),
        num_rounds=int(config["num-server-rounds"]),
        train_config=ConfigRecord(
            {"lr": float(config["learning-rate"]), "local-epochs": int(config["local-epochs"])}
        ),
    )
