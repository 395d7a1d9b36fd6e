"""PyTorch Lightning integration: a Callback that streams a fit to the relay.

Why a Callback and not a Logger: a Logger only sees ``log_metrics`` and a final status string. The
events this stream needs come from the trainer's life cycle, which only callbacks observe:
``trainer.sanity_checking`` (to skip the sanity-check validation), the epoch boundary with both
train and validation metrics in ``trainer.callback_metrics``, ``trainer.early_stopping_callback``
(why and when it stopped), and ``on_exception`` with the exception itself. A callback also composes
with whatever loggers the user already has (TensorBoard, CSV, W&B) instead of replacing one.

Epochs are counted from 1 on the wire (like Flower rounds and ``report_epoch``), so ``epoch_end``
for Lightning's ``current_epoch == 0`` says ``epoch: 1``; ``early_stopping.epoch`` and
``training_end.best_epoch`` use the same base, and ``training_end.epochs_completed`` counts the
epochs that finished.

At the end of each fit the callback settles (``Emitter.settle``): it waits up to ``flush_timeout``
for the relay's acks while that can pay off, not at all while the relay is known unreachable, and
spools what is left.

Inside a Flower client, pass ``round`` and ``client_id``: epochs then go out as ``client_progress``
(``local_epoch``) events of the federated run, and the callback does not send ``training_start`` or
``training_end``, which belong to the ServerApp and would end the federated run's status.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from . import Emitter, get_emitter
from .logs import LogSource, check_level, forwarding

_MAX_DETAIL = 4000
_HIGHER_IS_BETTER = ("acc", "auroc", "auc", "f1", "precision", "recall", "score", "iou", "dice")


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite scalar values of a Lightning metrics dict (tensors included) as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            if hasattr(value, "numel"):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            value = float(value)
        except Exception:
            continue
        if math.isfinite(value):
            out[str(key)] = value
    return out


class FedRelayCallback(Callback):
    """Streams ``training_start``, ``epoch_end``, ``early_stopping`` and ``training_end``.

    ``monitor`` names the metric for ``best_epoch`` in ``training_end``; by default the monitor of
    the trainer's EarlyStopping, else of its ModelCheckpoint, else ``val_loss`` when logged.
    ``forward_logs`` (True for INFO, or a level) sends ``logging`` records during the fit as ``log``
    events with the current epoch (:mod:`fedrelay.emitters.logs`).
    """

    def __init__(
        self,
        emitter: Emitter | None = None,
        *,
        url: str | Sequence[str] | None = None,
        run_id: str | None = None,
        experiment_name: str | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        round: int | None = None,
        client_id: str | int | None = None,
        hparams: dict[str, Any] | None = None,
        flush_timeout: float = 5.0,
        forward_logs: bool | int | str | None = None,
    ) -> None:
        if mode not in (None, "min", "max"):
            raise ValueError("mode must be 'min', 'max' or None")
        self._emitter = emitter
        self._url = url
        self._run_id = run_id
        self.experiment_name = experiment_name
        self.monitor = monitor
        self.mode = mode
        self.round = round
        self.client_id = client_id
        self.hparams = hparams
        self.flush_timeout = flush_timeout
        self.forward_logs = check_level(forward_logs)
        self._logs = contextlib.ExitStack()
        self._log_source = LogSource()
        self._t0 = 0.0
        self._epoch_t0 = 0.0
        self._best: tuple[int, float] | None = None
        self._ended = False

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def federated(self) -> bool:
        """True inside a Flower client: epochs are a client's local epochs of a federated run."""
        return self.round is not None or self.client_id is not None

    @property
    def emitter(self) -> Emitter:
        if self._emitter is None:
            self._emitter = get_emitter(self._url) if self._url else get_emitter()
        return self._emitter

    @property
    def run_id(self) -> str:
        return self._run_id or self.emitter.run_id

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.federated:
            data = {"round": self.round or 0, "client_id": self.client_id, **data}
            self.emitter.emit(kind, data, run_id=self.run_id, role="client", client_id=self.client_id)
        else:
            self.emitter.emit(kind, data, run_id=self.run_id, role="trainer")

    def _monitor(self, trainer: pl.Trainer) -> tuple[str | None, bool]:
        """(metric name, higher is better) for best-epoch tracking."""
        name, mode = self.monitor, self.mode
        for cb in (trainer.early_stopping_callback, trainer.checkpoint_callback):
            if name is None and cb is not None and getattr(cb, "monitor", None):
                name, mode = cb.monitor, mode or getattr(cb, "mode", None)
        if name is None:
            name = "val_loss"
        if mode is None:
            mode = "max" if any(t in name.lower() for t in _HIGHER_IS_BETTER) else "min"
        return name, mode == "max"

    # -- hooks --------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._best, self._ended = None, False
        self._logs.close()
        self._log_source = LogSource(
            run_id=self.run_id,
            role="client" if self.federated else "trainer",
            client_id=self.client_id,
            round=self.round,
            epoch=trainer.current_epoch + 1,
        )
        self._logs.enter_context(forwarding(self.forward_logs, self.emitter, self._log_source))
        if self.federated:
            return
        data: dict[str, Any] = {"training_mode": "centralized"}
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            data["max_epochs"] = int(trainer.max_epochs)
        if self.experiment_name:
            data["experiment_name"] = self.experiment_name
        config = dict(self.hparams or {})
        if not config:
            try:
                config = {k: v for k, v in dict(pl_module.hparams).items() if _plain(v)}
            except Exception:
                config = {}
        config["model"] = type(pl_module).__name__
        es = trainer.early_stopping_callback
        if es is not None:
            config["early_stopping"] = {"monitor": es.monitor, "patience": es.patience, "mode": es.mode}
        data["config"] = config
        self._emit("training_start", data)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_t0 = time.perf_counter()
        self._log_source.epoch = trainer.current_epoch + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation has already run for this epoch (Lightning 2.x), so both sets are here.
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        metrics = scalar_metrics(dict(trainer.callback_metrics))
        duration = round(time.perf_counter() - self._epoch_t0, 6)
        name, maximize = self._monitor(trainer)
        value = metrics.get(name) if name else None
        if value is not None and (
            self._best is None or (value > self._best[1] if maximize else value < self._best[1])
        ):
            self._best = (epoch, value)
        if self.federated:
            self._emit("client_progress", {"local_epoch": epoch, "metrics": metrics, "duration": duration})
        else:
            self._emit(
                "epoch_end", {"epoch": epoch, "phase": "train", "metrics": metrics, "duration": duration}
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # EarlyStopping decides in its own epoch-end hook, after ours: read its verdict here.
        stopped = self._early_stopping(trainer)
        self._end(trainer, "stopped" if stopped else "completed")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        interrupted = isinstance(exception, KeyboardInterrupt)
        self._emit(
            "error",
            {
                "message": f"{type(exception).__name__}: {exception}"[:1000],
                "detail": "".join(traceback.format_exception(exception))[-_MAX_DETAIL:],
                "epoch": trainer.current_epoch + 1,
            },
        )
        self._end(trainer, "stopped" if interrupted else "failed")

    # -- pieces ---------------------------------------------------------------------------------

    def _early_stopping(self, trainer: pl.Trainer) -> bool:
        es = trainer.early_stopping_callback
        reason = getattr(es, "stopping_reason", None) if es is not None else None
        if es is None or reason is None or getattr(reason, "name", "") == "NOT_STOPPED":
            return False
        best = scalar_metrics({"best": es.best_score}).get("best")
        data: dict[str, Any] = {
            "epoch": int(es.stopped_epoch) + 1,
            "metric_name": es.monitor,
            "patience": int(es.patience),
            "reason": es.stopping_reason_message or reason.name.lower(),
            "stopping_reason": reason.name.lower(),
            "wait_count": int(es.wait_count),
        }
        if best is not None:
            data["best_metric_value"] = best
        self._emit("early_stopping", data)
        return True

    def _end(self, trainer: pl.Trainer, status: str) -> None:
        if self._ended:
            return
        self._ended = True
        if not self.federated:
            data: dict[str, Any] = {
                "status": status,
                "training_duration": round(time.perf_counter() - self._t0, 6) if self._t0 else None,
                "epochs_completed": int(trainer.current_epoch),  # counts finished epochs
            }
            if self._best is not None:
                name, _ = self._monitor(trainer)
                data.update(best_epoch=self._best[0], best_metric_name=name, best_metric_value=self._best[1])
            if data["training_duration"] is None:
                del data["training_duration"]
            self._emit("training_end", data)
        self._logs.close()
        self.emitter.settle(self.flush_timeout)


def _plain(value: Any) -> bool:
    return isinstance(value, bool | int | float | str) or value is None


__all__ = ["FedRelayCallback", "scalar_metrics"]
