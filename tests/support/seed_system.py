"""The frames the seed system's real senders send, rebuilt field by field (no code copied).

fedrelay replaces the hand-rolled telemetry of the public repository
h19overflow/federated_learning. These builders produce, in call order, the frames its
trainers put on ``ws://localhost:8765``, read there with the search tool:

- ``federated_pneumonia_detection/src/control/dl_model/utils/data/websocket_metrics_sender.py``
  (``MetricsWebSocketSender``): every frame is ``{"type", "timestamp":
  datetime.now().isoformat(), "data"}``, ``json.dumps`` with its defaults (so a NaN or an
  infinite metric goes out as the literals ``NaN`` / ``Infinity``), sent on a connection of
  its own (``asyncio.run`` per frame, ``ping_interval=None``) whose replies are never read.
  ``send_epoch_end(epoch, phase, metrics)``, ``send_round_end(round_num, total_rounds,
  fit_metrics, eval_metrics)`` (``{}`` for a missing dict), ``send_error(error_message,
  error_type="training_error")`` -> ``{"error", "error_type"}``,
  ``send_early_stopping_triggered`` (``reason`` formatted with ``:.4f``),
  ``send_training_mode(is_federated, num_rounds, num_clients)``,
  ``send_round_metrics(round_num, total_rounds, metrics)``.
- Centralized (Lightning): ``.../dl_model/utils/model/metrics_collector.py``, the version
  that sends (``MetricsCollectorCallback``): ``training_start`` in ``on_train_start`` only
  when the database gave a run id (``{run_id, experiment_name, max_epochs,
  training_mode}``), ``epoch_end`` with ``phase="val"`` in ``on_validation_epoch_end`` whose
  metrics dict is ``_extract_metrics``: ``epoch``, ``global_step``, a ``timestamp`` string,
  the trainer's callback metrics as floats, ``learning_rate``; ``training_end`` in
  ``on_train_end``, again only with a run id (``{run_id, status: "completed",
  experiment_name, best_epoch, best_val_recall, total_epochs, training_duration:
  str(timedelta)}``). ``.../dl_model/utils/model/training_callbacks.py``: the
  ``EarlyStoppingSignalCallback`` sits before the collector in the callbacks list, so its
  ``early_stopping`` (``epoch=trainer.current_epoch``, ``metric_name="val_recall"``) goes
  out before ``training_end``. A failing run: the trainer's ``except`` calls ``send_error``;
  Lightning calls no ``on_train_end`` then.
- Federated clients: ``.../control/federated_learning/client.py`` (``FlowerClient``:
  ``client_training_start`` / ``client_training_end`` around ``fit``, ``client_eval_end``
  after ``evaluate``, ``round`` = its 0-based ``current_round``; ``train()`` passes
  ``epoch_progress: f"{epoch + 1}/{epochs}"`` and ``overall_progress_percent`` in the
  epoch's metrics) and ``.../federated_metrics_collector.py`` (the version with a
  ``ws_sender``: ``round_start`` with ``round`` 1-based, ``round_index``, ``total_rounds``
  and ``local_epochs`` read from the server config with defaults; ``client_progress`` per
  local epoch; ``round_end`` per client evaluation with ``total_rounds`` from metadata (0
  until training ends) and fit/eval dicts that carry a ``timestamp`` string;
  ``client_complete`` at the end, without a ``round``, ``best_val_loss`` still
  ``float("inf")`` for a client never asked to evaluate, ``training_duration``
  ``str(timedelta)``).
- Federated server: ``.../federated_new_version/core/server_app.py`` (``training_mode``
  first; ``training_end`` with ``run_id`` None when creating the run in the database failed)
  and ``core/custom_strategy.py`` (``round_metrics`` from ``aggregate_evaluate``, only the
  metrics it maps: here ``accuracy``).
- The frontend that reads them: ``xray-vision-ai-forge/src/services/websocket.ts`` and
  ``src/hooks/useTrainingExecution.ts`` (rebuilt in ``tests/node/seed_frontend.mjs``).

What is ours: the numbers (a short run: 10 max epochs stopped at 6, 3 clients x 2 rounds x 2
local epochs), the run ids, and where a NaN appears (``val_auroc`` of the first validation
epoch, as an undefined metric would give).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from websockets.asyncio.client import connect

Frame = dict[str, Any]


@dataclass
class SeedClock:
    """``datetime.now().isoformat()``, advancing a little per call: naive local time, as sent."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 28, 10, 0, 0, 125000))

    def iso(self) -> str:
        self.now += timedelta(milliseconds=37)
        return self.now.isoformat()


class SeedSender:
    """``MetricsWebSocketSender``'s frames, collected in call order."""

    def __init__(self, clock: SeedClock) -> None:
        self.clock = clock
        self.frames: list[Frame] = []

    def send_metrics(self, metrics: Any, metric_type: str = "epoch_end") -> None:
        self.frames.append({"type": metric_type, "timestamp": self.clock.iso(), "data": metrics})

    def send_epoch_end(self, epoch: int, phase: str, metrics: dict[str, Any]) -> None:
        self.send_metrics({"epoch": epoch, "phase": phase, "metrics": metrics}, "epoch_end")

    def send_round_end(
        self, round_num: int, total_rounds: int, fit_metrics: dict | None, eval_metrics: dict | None
    ) -> None:
        data = {
            "round": round_num,
            "total_rounds": total_rounds,
            "fit_metrics": fit_metrics or {},
            "eval_metrics": eval_metrics or {},
        }
        self.send_metrics(data, "round_end")

    def send_error(self, error_message: str, error_type: str = "training_error") -> None:
        self.send_metrics({"error": error_message, "error_type": error_type}, "error")

    def send_early_stopping_triggered(
        self, epoch: int, best_metric_value: float, metric_name: str = "val_recall", patience: int = 7
    ) -> None:
        reason = f"Early stopping triggered at epoch {epoch} with best {metric_name}={best_metric_value:.4f}"
        data = {
            "epoch": epoch,
            "best_metric_value": best_metric_value,
            "metric_name": metric_name,
            "patience": patience,
            "reason": reason,
        }
        self.send_metrics(data, "early_stopping")

    def send_training_mode(self, is_federated: bool, num_rounds: int, num_clients: int) -> None:
        data = {"is_federated": is_federated, "num_rounds": num_rounds, "num_clients": num_clients}
        self.send_metrics(data, "training_mode")

    def send_round_metrics(self, round_num: int, total_rounds: int, metrics: dict[str, float]) -> None:
        data = {"round": round_num, "total_rounds": total_rounds, "metrics": metrics}
        self.send_metrics(data, "round_metrics")


# -- centralized: the Lightning callbacks ---------------------------------------------------


def _val_metrics(clock: SeedClock, epoch: int, recall: float, steps: int) -> dict[str, Any]:
    """``_extract_metrics(trainer, pl_module, "val")`` at the end of a validation epoch."""
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "global_step": (epoch + 1) * steps,
        "timestamp": clock.iso(),
        "train_loss_step": round(0.69 - 0.05 * epoch, 6),
        "val_loss": round(0.62 - 0.03 * epoch, 6),
        "val_acc": round(0.71 + 0.02 * epoch, 6),
        "val_precision": round(0.68 + 0.02 * epoch, 6),
        "val_recall": recall,
        "val_f1": round(0.7 + 0.02 * epoch, 6),
        "val_auroc": float("nan") if epoch == 0 else round(0.75 + 0.02 * epoch, 6),
    }
    if epoch > 0:  # epoch aggregates of training appear once a training epoch has ended
        metrics["train_loss"] = round(0.66 - 0.04 * epoch, 6)
        metrics["train_acc"] = round(0.64 + 0.03 * epoch, 6)
    metrics["learning_rate"] = 0.001
    metrics["lr-AdamW"] = 0.001  # LearningRateMonitor's key, from logged_metrics
    return metrics


def centralized_run(run_id: int | None = 7, *, fail_at_epoch: int | None = None) -> list[Frame]:
    """A Lightning run: 10 max epochs, val_recall peaks at epoch 2, patience 3 stops it after 6.

    ``run_id`` None: the database was down, so no training_start nor training_end goes out.
    ``fail_at_epoch``: an exception in that epoch; the trainer's handler calls ``send_error``.
    """
    clock = SeedClock()
    sender = SeedSender(clock)
    max_epochs, patience, steps = 10, 3, 12
    recalls = [0.81, 0.86, 0.9123, 0.9, 0.905, 0.899]
    if run_id is not None:
        sender.send_metrics(
            {
                "run_id": run_id,
                "experiment_name": "pneumonia_centralized",
                "max_epochs": max_epochs,
                "training_mode": "centralized",
            },
            "training_start",
        )
    started = clock.now
    for epoch, recall in enumerate(recalls):
        if epoch == fail_at_epoch:
            sender.send_error("CUDA out of memory. Tried to allocate 2.00 GiB")
            return sender.frames
        sender.send_epoch_end(epoch, "val", _val_metrics(clock, epoch, recall, steps))
    best = max(range(len(recalls)), key=recalls.__getitem__)
    current_epoch = len(recalls)  # Lightning has counted the last epoch when on_train_end runs
    sender.send_early_stopping_triggered(current_epoch, recalls[best], "val_recall", patience)
    if run_id is not None:
        sender.send_metrics(
            {
                "run_id": run_id,
                "status": "completed",
                "experiment_name": "pneumonia_centralized",
                "best_epoch": best,
                "best_val_recall": recalls[best],
                "total_epochs": len(recalls),
                "training_duration": str(clock.now - started),
            },
            "training_end",
        )
    return sender.frames


# -- federated: server app, strategy, clients and their collectors ------------------------


@dataclass
class _Client:
    client_id: str
    samples: int
    evaluates: bool
    started: datetime
    best_round: int | None = None
    best_val_accuracy: float = 0.0
    best_val_loss: float = float("inf")
    local_epochs_done: int = 0
    fit: dict[str, Any] = field(default_factory=dict)


def federated_run(run_id: int | None = 42, *, rounds: int = 2, clients: int = 3) -> list[Frame]:
    """A Flower simulation: ``clients`` clients, ``rounds`` rounds of 2 local epochs each.

    The strategy asks all but the last client to evaluate, so that one ends with
    ``best_val_loss`` Infinity. ``run_id`` None: the server could not create the run in its
    database, and every frame carries ``"run_id": null``.
    """
    clock = SeedClock()
    sender = SeedSender(clock)
    local_epochs, batches, lr, name = 2, 4, 0.001, "federated_pneumonia"
    sender.send_training_mode(True, rounds, clients)
    fleet = [_Client(str(c), 120 + 10 * c, c < clients - 1, clock.now) for c in range(clients)]
    for r0 in range(rounds):  # FlowerClient.current_round, 0-based
        for client in fleet:  # fit
            sender.send_metrics(
                {
                    "run_id": run_id,
                    "client_id": client.client_id,
                    "round": r0,
                    "status": "client_training_started",
                    "local_epochs": local_epochs,
                    "num_samples": client.samples,
                    "experiment_name": name,
                },
                "client_training_start",
            )
            server_config: dict[str, Any] = {}  # FedAvg's default on_fit_config: nothing
            sender.send_metrics(
                {
                    "run_id": run_id,
                    "round": r0 + 1,
                    "round_index": r0,
                    "total_rounds": server_config.get("num_rounds", r0 + 1),
                    "client_id": client.client_id,
                    "experiment_name": name,
                    "local_epochs": server_config.get("local_epochs", 1),
                    "status": "starting_round",
                    "timestamp": clock.iso(),
                },
                "round_start",
            )
            losses = []
            for epoch in range(local_epochs):
                loss = round(0.7 - 0.05 * (2 * r0 + epoch) - 0.01 * int(client.client_id), 6)
                losses.append(loss)
                processed = (epoch + 1) * batches
                sender.send_metrics(
                    {
                        "run_id": run_id,
                        "round": r0 + 1,
                        "round_index": r0,
                        "client_id": client.client_id,
                        "local_epoch": epoch,
                        "metrics": {
                            "train_loss": loss,
                            "learning_rate": lr,
                            "num_samples": client.samples,
                            "batch_count": batches,
                            "epoch_progress": f"{epoch + 1}/{local_epochs}",
                            "overall_progress_percent": processed / (batches * local_epochs) * 100,
                            "batches_processed": processed,
                            "total_batches": batches * local_epochs,
                        },
                        "timestamp": clock.iso(),
                        "status": "training_progress",
                        "experiment_name": name,
                    },
                    "client_progress",
                )
                client.local_epochs_done += 1
            train_loss = sum(losses) / len(losses)
            client.fit = {"train_loss": train_loss, "num_samples": client.samples, "timestamp": clock.iso()}
            sender.send_metrics(
                {
                    "run_id": run_id,
                    "client_id": client.client_id,
                    "round": r0,
                    "status": "client_training_completed",
                    "train_loss": train_loss,
                    "num_samples": client.samples,
                    "experiment_name": name,
                },
                "client_training_end",
            )
        accuracies = []
        for client in fleet:  # evaluate (current_round was incremented by fit)
            if not client.evaluates:
                continue
            val_loss = round(0.55 - 0.04 * r0 - 0.01 * int(client.client_id), 6)
            val_accuracy = round(0.74 + 0.03 * r0 + 0.01 * int(client.client_id), 6)
            accuracies.append(val_accuracy)
            evaluated = {
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "num_samples": 30,
                "timestamp": clock.iso(),
            }
            sender.send_round_end(r0, 0, client.fit, evaluated)  # metadata["total_rounds"]: 0 until the end
            if val_accuracy > client.best_val_accuracy:
                client.best_val_accuracy, client.best_round = val_accuracy, r0
            client.best_val_loss = min(client.best_val_loss, val_loss)
            sender.send_metrics(
                {
                    "run_id": run_id,
                    "client_id": client.client_id,
                    "round": r0,
                    "status": "client_evaluation_completed",
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                    "num_samples": 30,
                    "experiment_name": name,
                },
                "client_eval_end",
            )
        sender.send_round_metrics(r0 + 1, rounds, {"accuracy": sum(accuracies) / len(accuracies)})
    for client in fleet:  # FlowerClient.finalize -> FederatedMetricsCollector.end_training
        sender.send_metrics(
            {
                "run_id": run_id,
                "client_id": client.client_id,
                "client_db_id": None,
                "status": "completed",
                "total_rounds": rounds,
                "total_local_epochs": client.local_epochs_done,
                "best_round": client.best_round,
                "best_val_accuracy": client.best_val_accuracy,
                "best_val_loss": client.best_val_loss,
                "total_samples_trained": client.samples * rounds,
                "training_duration": str(clock.now - client.started),
                "timestamp": clock.iso(),
            },
            "client_complete",
        )
    sender.send_metrics(
        {
            "run_id": run_id,
            "status": "completed",
            "experiment_name": f"federated_{clock.now.strftime('%Y%m%d_%H%M%S')}",
            "total_rounds": rounds,
            "training_mode": "federated",
        },
        "training_end",
    )
    return sender.frames


SCENARIOS = {
    "centralized, early stopping": lambda: centralized_run(7),
    "federated": lambda: federated_run(42),
    "error": lambda: centralized_run(43, fail_at_epoch=2),
    "database down (run_id null)": lambda: federated_run(None, rounds=1, clients=2),
}
"""The four paths the closing note counts, in the order they are sent."""


# -- on the wire ----------------------------------------------------------------------------


def wire_text(frame: Frame) -> str:
    """``json.dumps(payload)``: NaN and infinities as the non-JSON literals."""
    return json.dumps(frame)


async def send_frames(url: str, frames: list[Frame]) -> None:
    """Each frame on a new connection, never reading a reply, as the seed's sender does."""
    for frame in frames:
        async with connect(url, ping_interval=None, compression=None) as ws:
            await ws.send(wire_text(frame))


def as_browser_sees(frame: Frame) -> Frame:
    """What a frame must be once through the relay: NaN and infinities as null."""

    def fix(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return fix(frame)


def browser_parse(text: str) -> Any:
    """``JSON.parse``: no NaN, Infinity or -Infinity literals."""

    def refuse(name: str) -> Any:
        raise ValueError(f"JSON.parse: unexpected token {name}")

    return json.loads(text, parse_constant=refuse)


def count_types(frames: list[Frame]) -> Counter[str]:
    return Counter(frame["type"] for frame in frames)
