"""Realistic training runs as event lists, and a producer that streams them in the background.

The runs look like what the Flower and Lightning emitters send (same types, fields and metric
names), with plausible curves, so the dashboard, ``fedrelay tail`` and the screenshots see
real-looking data without a minute of real training.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.clients import ResendingProducer

_COUNT_KEYS = re.compile(r"^(num[-_ ]?examples|num[-_ ]?samples|examples|samples|epoch|step|round)$", re.I)
_PHASE_PREFIX = re.compile(r"^(train|training|fit|val|valid|validation|eval|evaluate|test)[_/.-]", re.I)


class _Clock:
    """Event timestamps: a run that took minutes, streamed in seconds."""

    def __init__(self, start: datetime | None, step: float) -> None:
        self.now = start or datetime.now(UTC) - timedelta(minutes=30)
        self.step = step

    def tick(self, seconds: float | None = None) -> str:
        self.now += timedelta(seconds=self.step if seconds is None else seconds)
        return self.now.isoformat()


def _curve(rng: random.Random, t: float, start: float, end: float, noise: float) -> float:
    """From start towards end, fast at first, with noise: a learning curve."""
    return end + (start - end) * math.exp(-3.0 * t) + rng.gauss(0, noise)


def _clf_metrics(rng: random.Random, t: float, noise: float = 0.01) -> dict[str, float]:
    acc = min(0.99, _curve(rng, t, 0.55, 0.91, noise))
    precision = min(0.99, acc + rng.gauss(0.01, noise))
    recall = min(0.99, acc + rng.gauss(0.03, noise))
    return {
        "loss": max(0.05, _curve(rng, t, 0.70, 0.24, noise)),
        "accuracy": acc,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "auroc": min(0.999, _curve(rng, t, 0.60, 0.96, noise / 2)),
    }


def federated_run(
    run_id: str,
    *,
    rounds: int = 5,
    clients: int = 4,
    local_epochs: int = 2,
    seed: int = 0,
    fail: tuple[int, int] | None = None,
    partial_rounds: int | None = None,
    start: datetime | None = None,
    logs: bool = False,
) -> list[dict[str, Any]]:
    """A Flower run: ``fail`` = (client, round) raises; ``partial_rounds`` stops mid-way through
    that round with one straggler still training (for a live-looking screenshot); ``logs``: the
    ``log`` records ``forward_logs`` would add (Flower's round lines, a line per client and
    round, a few warnings, the failing client's traceback)."""
    rng = random.Random(seed)
    clock = _Clock(start, 0.4)
    out: list[dict[str, Any]] = []

    def add(kind: str, data: dict[str, Any], role: str = "server", client: int | None = None) -> None:
        source = {"role": role, "client_id": client}
        out.append(
            {
                "type": kind,
                "run_id": run_id,
                "id": len(out) + 1,
                "timestamp": clock.tick(),
                "source": source,
                "data": data,
            }
        )

    add(
        "training_start",
        {
            "experiment_name": "pneumonia-federated",
            "training_mode": "federated",
            "num_rounds": rounds,
            "num_clients": clients,
            "local_epochs": local_epochs,
            "config": {"strategy": "FedAvg", "lr": 0.05},
        },
    )
    add(
        "status",
        {
            "message": "initial server-side evaluation",
            "level": "info",
            "round": 0,
            "server_metrics": _clf_metrics(rng, 0.0),
        },
    )

    def log(
        level: tuple[str, int], logger: str, message: str, rnd: int, client: int | None = None, **extra: Any
    ) -> None:
        if not logs:
            return
        data = {
            "level": level[0],
            "levelno": level[1],
            "logger": logger,
            "message": message,
            "round": rnd,
            **extra,
        }
        if client is not None:
            data["client_id"] = client
        add("log", data, "server" if client is None else "client", client)

    info, warning, error = ("info", 20), ("warning", 30), ("error", 40)
    last = partial_rounds or rounds
    for rnd in range(1, last + 1):
        log(info, "flwr", f"[ROUND {rnd}/{rounds}]", rnd)
        log(info, "flwr", f"configure_train: strategy sampled {clients} nodes (out of {clients})", rnd)
        t = rnd / rounds
        ids = list(range(clients))
        add(
            "round_start",
            {"round": rnd, "total_rounds": rounds, "participating_clients": [str(c) for c in ids]},
        )
        partial = rnd == partial_rounds
        straggler = ids[-1] if partial else None
        ok = []
        for c in ids:
            base = {"round": rnd, "client_id": c, "phase": "train"}
            add("client_progress", {**base, "status": "started"}, "client", c)
            log(info, "pneumonia.client", f"client {c}: {250 + 7 * c} images, batch size 32", rnd, c)
            if (c + rnd) % 7 == 0:
                log(warning, "pneumonia.data", f"client {c}: {3 + c % 4} images unreadable, skipped", rnd, c)
            if straggler == c:
                continue
            if fail == (c, rnd):
                log(
                    error, "fedrelay", "train failed: RuntimeError: CUDA out of memory", rnd, c,
                    exception="Traceback (most recent call last):\n"
                    '  File "/app/pneumonia/client.py", line 88, in train\n'
                    "    loss = model.training_step(batch)\n"
                    '  File "/app/pneumonia/model.py", line 41, in training_step\n'
                    "    logits = self.net(x)\n"
                    "RuntimeError: CUDA out of memory. Tried to allocate 512.00 MiB",
                )  # fmt: skip
                add(
                    "error",
                    {**base, "message": "train failed: RuntimeError: CUDA out of memory"},
                    "client",
                    c,
                )
                continue
            for epoch in range(1, local_epochs + 1):
                m = _clf_metrics(rng, t + epoch / (local_epochs * rounds), 0.02)
                metrics = {"train_loss": m["loss"], "train_accuracy": m["accuracy"]}
                add("client_progress", {**base, "local_epoch": epoch, "metrics": metrics}, "client", c)
            n = 250 + 7 * c
            add(
                "client_complete",
                {
                    **base,
                    "num_examples": n,
                    "metrics": {**metrics, "num-examples": n},
                    "duration": round(rng.uniform(3, 6), 3),
                },
                "client",
                c,
            )
            ok.append(c)
        if partial:
            clock.tick(60)  # the straggler's peers finished long ago
            add("status", {"message": f"round {rnd}: waiting for client {straggler}", "level": "info"})
            break
        for c in ok:
            base = {"round": rnd, "client_id": c, "phase": "evaluate"}
            add("client_progress", {**base, "status": "started"}, "client", c)
            add(
                "client_complete",
                {**base, "num_examples": 66, "metrics": {**_clf_metrics(rng, t, 0.03), "num-examples": 66}},
                "client",
                c,
            )
        fit = _clf_metrics(rng, t, 0.01)
        add(
            "round_end",
            {
                "round": rnd,
                "total_rounds": rounds,
                "fit_metrics": {"train_loss": fit["loss"], "train_accuracy": fit["accuracy"]},
                "eval_metrics": _clf_metrics(rng, t, 0.01),
                "server_metrics": _clf_metrics(rng, t, 0.005),
                "duration": round(rng.uniform(5, 8), 3),
                "participating_clients": [str(c) for c in ok],
                "failed_clients": [str(c) for c in ids if c not in ok],
            },
        )
    if partial_rounds is None:
        add(
            "training_end",
            {
                "status": "completed",
                "best_round": rounds,
                "best_metric_name": "auroc",
                "best_metric_value": 0.95,
                "training_duration": 42.5,
                "rounds_completed": rounds,
            },
        )
    return out


def centralized_run(
    run_id: str,
    *,
    max_epochs: int = 30,
    stop_at: int = 18,
    patience: int = 4,
    seed: int = 1,
    start: datetime | None = None,
) -> list[dict[str, Any]]:
    """A Lightning run that early-stops at ``stop_at`` (best epoch ``stop_at - patience``)."""
    rng = random.Random(seed)
    clock = _Clock(start, 20.0)
    out: list[dict[str, Any]] = []

    def add(kind: str, data: dict[str, Any]) -> None:
        out.append(
            {
                "type": kind,
                "run_id": run_id,
                "id": len(out) + 1,
                "timestamp": clock.tick(),
                "source": {"role": "trainer"},
                "data": data,
            }
        )

    add(
        "training_start",
        {
            "experiment_name": "pneumonia-centralized",
            "training_mode": "centralized",
            "max_epochs": max_epochs,
            "config": {"lr": 0.001, "model": "SmallCNN"},
        },
    )
    best = stop_at - patience
    for epoch in range(1, stop_at + 1):
        t = min(epoch, best) / max_epochs * 2
        train = _clf_metrics(rng, t * 1.3, 0.008)
        val = _clf_metrics(rng, t, 0.01)
        if epoch > best:  # over-fitting: validation loss creeps up
            val["loss"] += 0.01 * (epoch - best)
        metrics = {
            "train_loss": train["loss"],
            "train_acc": train["accuracy"],
            "val_loss": val["loss"],
            "val_acc": val["accuracy"],
            "val_f1": val["f1"],
            "val_auroc": val["auroc"],
        }
        add("epoch_end", {"epoch": epoch, "phase": "train", "metrics": metrics, "duration": 19.5})
    add(
        "early_stopping",
        {
            "epoch": stop_at,
            "metric_name": "val_loss",
            "best_metric_value": 0.25,
            "patience": patience,
            "reason": f"val_loss did not improve in {patience} epochs",
        },
    )
    add(
        "training_end",
        {
            "status": "stopped",
            "best_epoch": best,
            "best_metric_name": "val_loss",
            "best_metric_value": 0.25,
            "training_duration": 19.5 * stop_at,
            "epochs_completed": stop_at,
        },
    )
    return out


def expected_points(events: list[dict[str, Any]]) -> dict[str, int]:
    """Points per dashboard chart ("round:loss", "epoch:loss"), counted independently of its code:
    one per (chart, series, x) for every finite, non-count metric."""
    seen: set[tuple[str, str, float]] = set()
    for e in events:
        d = e["data"]
        if e["type"] == "round_end":
            sources = [
                ("fit", d.get("fit_metrics")),
                ("eval", d.get("eval_metrics")),
                ("server", d.get("server_metrics")),
            ]
            x, prefix = d["round"], "round"
        elif e["type"] == "status" and d.get("server_metrics") and isinstance(d.get("round"), int):
            sources, x, prefix = [("server", d["server_metrics"])], d["round"], "round"
        elif e["type"] == "epoch_end":
            sources, x, prefix = [("", d.get("metrics"))], d["epoch"], "epoch"
        else:
            continue
        for source, metrics in sources:
            for key, value in (metrics or {}).items():
                if not isinstance(value, int | float) or isinstance(value, bool) or _COUNT_KEYS.match(key):
                    continue
                base = _PHASE_PREFIX.sub("", key) or key
                seen.add((f"{prefix}:{base}", f"{source}/{key}", x))
    counts: dict[str, int] = {}
    for chart, _, _ in seen:
        counts[chart] = counts.get(chart, 0) + 1
    return counts


class BackgroundProducer:
    """Streams events from a thread, paced, resending whatever was not acked after a relay restart."""

    def __init__(
        self,
        url: str,
        events: list[dict[str, Any]],
        *,
        pace: float = 0.1,
        batch: int = 8,
        name: str = "test-trainer",
    ) -> None:
        self.producer = ResendingProducer(url, name, pace=pace)
        self.events = events
        self.batch = batch
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.producer.publish_all(self.events, batch=self.batch, timeout=120))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def start(self) -> BackgroundProducer:
        self._thread.start()
        return self

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("producer still running")
        if self.error is not None:
            raise self.error
