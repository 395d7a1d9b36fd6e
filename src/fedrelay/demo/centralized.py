"""Centralized pneumonia detection with PyTorch Lightning and EarlyStopping, streamed live.

The same model and data as the federated demo, trained in one place: the baseline a federation is
compared against. :class:`fedrelay.emitters.lightning.FedRelayCallback` streams every epoch, the
early stop and the end of training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data import Split, load_dataset
from .metrics import binary_metrics
from .model import PneumoniaCNN


@dataclass(frozen=True)
class CentralizedConfig:
    max_epochs: int = 20
    patience: int = 3
    data_dir: str | None = None
    image_size: int = 32
    n_train: int = 1000
    n_test: int = 300
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    url: str | None = None
    run_id: str | None = None
    telemetry: bool = True
    experiment_name: str = "pneumonia-centralized"
    fail_epoch: int | None = None
    """Raise in this epoch (counted from 1): to see a failed run on the dashboard, and to test it."""


class PneumoniaModule(pl.LightningModule):
    """Lightning wrapper: BCE loss; epoch-level train loss and the full validation metric set."""

    def __init__(self, lr: float = 0.05, fail_epoch: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PneumoniaCNN()
        self.loss_fn = nn.BCEWithLogitsLoss()
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_epoch is not None and self.current_epoch + 1 == self.hparams.fail_epoch:
            raise RuntimeError(f"injected failure in epoch {self.hparams.fail_epoch}")
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._val_logits.append(logits.detach())
        self._val_labels.append(y)

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits, labels = torch.cat(self._val_logits), torch.cat(self._val_labels)
        self._val_logits.clear()
        self._val_labels.clear()
        loss = float(self.loss_fn(logits, labels))
        for name, value in binary_metrics(logits, labels, loss).items():
            self.log(f"val_{name}", value, prog_bar=name in ("loss", "auroc"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _loader(split: Split, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def run_centralized(cfg: CentralizedConfig, *, emitter: Any = None, progress: bool = False) -> dict[str, Any]:
    """Fit with EarlyStopping on ``val_loss``; returns ``{"run_id", "epochs", "stopped_early", ...}``."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train, test = load_dataset(cfg.data_dir, cfg.image_size, cfg.n_train, cfg.n_test, cfg.seed)
    module = PneumoniaModule(lr=cfg.lr, fail_epoch=cfg.fail_epoch)
    early = EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience, min_delta=1e-3)
    callbacks: list[pl.Callback] = [early]
    relay_cb = None
    if cfg.telemetry:
        from fedrelay.emitters.lightning import FedRelayCallback

        relay_cb = FedRelayCallback(
            emitter, url=cfg.url, run_id=cfg.run_id, experiment_name=cfg.experiment_name,
            hparams={k: v for k, v in asdict(cfg).items() if k not in ("url", "telemetry")},
        )  # fmt: skip
        callbacks.append(relay_cb)
    trainer = pl.Trainer(
        max_epochs=cfg.max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        accelerator="cpu",
        devices=1,
    )
    started = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=_loader(train, cfg.batch_size, True, cfg.seed),
        val_dataloaders=_loader(test, 256, False, cfg.seed),
    )
    return {
        "run_id": relay_cb.run_id if relay_cb is not None else None,
        "epochs": int(trainer.current_epoch),
        "stopped_early": early.stopped_epoch > 0,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "seconds": time.perf_counter() - started,
    }
