"""Plain torch train and evaluate loops shared by the Flower clients and the server-side evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .data import Split
from .metrics import binary_metrics


def _batches(split: Split, batch_size: int, generator: torch.Generator | None = None):
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield split.x[index], split.y[index]


def train(
    model: nn.Module,
    data: Split,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.01,
    seed: int = 0,
    proximal_mu: float = 0.0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """SGD with momentum; ``proximal_mu`` > 0 adds FedProx's proximal term towards the start weights.

    ``on_epoch(epoch, metrics)`` is called after each local epoch (epochs counted from 1).
    """
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    metrics: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in _batches(data, batch_size, generator):
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + proximal_mu / 2 * prox
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int(((logits >= 0).float() == y).sum())
            total += len(y)
        metrics = {"train_loss": loss_sum / max(total, 1), "train_accuracy": correct / max(total, 1)}
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 256) -> dict[str, float]:
    """Loss, accuracy, precision, recall, F1 and AUROC on ``data``."""
    model.eval()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    logits, loss_sum = [], 0.0
    for x, y in _batches(data, batch_size):
        out = model(x)
        loss_sum += float(loss_fn(out, y))
        logits.append(out)
    all_logits = torch.cat(logits) if logits else torch.empty(0)
    return binary_metrics(all_logits, data.y, loss_sum / max(len(data), 1))
