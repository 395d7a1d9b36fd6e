"""The learning task: logistic regression in numpy on synthetic, partitioned data.

Small on purpose: under the Deployment Engine each train and evaluate message runs in a fresh
``flwr-clientapp`` process that imports this app, and numpy imports in about 0.1 s where torch
takes about 2 s (measured on a 2-core machine). Swap in your own model and data here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FEATURES = 8
SAMPLES = 400
SEED = 7


def load_partition(partition_id: int, num_partitions: int) -> tuple[np.ndarray, ...]:
    """This client's (x_train, y_train, x_test, y_test): one shared rule, a shifted share of inputs."""
    truth = np.random.default_rng(SEED).normal(size=FEATURES)
    rng = np.random.default_rng(SEED * 1000 + partition_id + 1)
    shift = (partition_id - (num_partitions - 1) / 2) * 0.5  # a little non-IID
    x = rng.normal(loc=shift, size=(SAMPLES, FEATURES))
    y = (x @ truth + rng.normal(scale=0.5, size=SAMPLES) > 0).astype(np.float64)
    cut = int(SAMPLES * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def initial_weights() -> list[np.ndarray]:
    return [np.zeros(FEATURES), np.zeros(1)]


def _predict(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ weights[0] + weights[1][0])))


def evaluate(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    p = np.clip(_predict(weights, x), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"loss": loss, "accuracy": float(np.mean((p > 0.5) == y))}


def train(
    weights: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Full-batch gradient descent, one step per epoch; ``on_epoch(epoch, metrics)`` from 1."""
    w, b = weights[0].copy(), weights[1].copy()
    metrics: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        error = _predict([w, b], x) - y
        w -= lr * x.T @ error / len(y)
        b -= lr * np.array([error.mean()])
        metrics = {f"train_{k}": v for k, v in evaluate([w, b], x, y).items()}
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return [w, b], metrics
