"""A real Lightning fit streaming into a real relay: epochs, early stopping, end status."""

from __future__ import annotations

import pytest

from fedrelay.demo.centralized import CentralizedConfig, run_centralized
from fedrelay.emitters import Emitter
from tests.support.stored import assert_gap_free, of_type, run_status, stored_events
from tests.support.waiting import wait_until

TINY = dict(image_size=16, n_train=160, n_test=80, batch_size=32)


@pytest.fixture
def emitter(relay, tmp_path):
    em = Emitter(relay.url, spool_dir=tmp_path / "spool")
    yield em
    em.close(timeout=5)


def _events_when_ended(relay, run_id: str) -> list[dict]:
    def ended():
        status, body = relay.get_json(f"/api/runs/{run_id}")
        return status == 200 and body.get("ended_at") is not None

    wait_until(ended, timeout=20, what=f"training_end of {run_id}")
    return stored_events(relay, run_id)


def test_early_stopping_run_streams_epochs_the_stop_and_status_stopped(relay, emitter):
    # A learning rate this small cannot improve val_loss by min_delta: patience 1 stops at epoch 2.
    out = run_centralized(
        CentralizedConfig(max_epochs=10, patience=1, lr=1e-7, run_id="light-es", **TINY), emitter=emitter
    )
    assert out["stopped_early"] and out["epochs"] == 2
    events = _events_when_ended(relay, "light-es")
    assert_gap_free(events)
    assert [e["type"] for e in events] == [
        "training_start",
        "epoch_end",
        "epoch_end",
        "early_stopping",
        "training_end",
    ]
    start = events[0]["data"]
    assert start["training_mode"] == "centralized" and start["max_epochs"] == 10
    assert start["config"]["early_stopping"] == {"monitor": "val_loss", "patience": 1, "mode": "min"}
    # One epoch_end per epoch (the sanity check is not one), with train and validation metrics.
    epochs = of_type(events, "epoch_end")
    assert [e["data"]["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert {"train_loss", "val_loss", "val_accuracy", "val_auroc", "val_f1"} <= set(e["data"]["metrics"])
        assert e["source"]["role"] == "trainer"
    (stop,) = of_type(events, "early_stopping")
    assert stop["data"]["epoch"] == 2 and stop["data"]["metric_name"] == "val_loss"
    assert stop["data"]["patience"] == 1 and stop["data"]["stopping_reason"] == "patience_exhausted"
    assert stop["data"]["best_metric_value"] == pytest.approx(epochs[0]["data"]["metrics"]["val_loss"])
    end = events[-1]["data"]
    losses = [e["data"]["metrics"]["val_loss"] for e in epochs]
    assert end["status"] == "stopped" and end["best_metric_name"] == "val_loss"
    assert end["best_epoch"] == losses.index(min(losses)) + 1
    assert end["epochs_completed"] == 2
    assert run_status(relay, "light-es") == "stopped"


def test_complete_run_ends_completed_with_best_epoch(relay, emitter):
    out = run_centralized(
        CentralizedConfig(max_epochs=3, patience=5, run_id="light-ok", **TINY), emitter=emitter
    )
    assert not out["stopped_early"]
    events = _events_when_ended(relay, "light-ok")
    assert [e["type"] for e in events] == ["training_start"] + ["epoch_end"] * 3 + ["training_end"]
    end = events[-1]["data"]
    losses = [e["data"]["metrics"]["val_loss"] for e in of_type(events, "epoch_end")]
    assert end["status"] == "completed" and end["best_epoch"] == losses.index(min(losses)) + 1
    assert end["best_metric_value"] == pytest.approx(min(losses))
    assert run_status(relay, "light-ok") == "completed"


def test_exception_streams_error_and_fails_the_run(relay, emitter):
    with pytest.raises(RuntimeError, match="injected failure in epoch 2"):
        run_centralized(
            CentralizedConfig(max_epochs=5, fail_epoch=2, run_id="light-fail", **TINY), emitter=emitter
        )
    events = _events_when_ended(relay, "light-fail")
    assert [e["type"] for e in events] == ["training_start", "epoch_end", "error", "training_end"]
    assert "injected failure" in events[2]["data"]["message"] and events[2]["data"]["epoch"] == 2
    assert events[-1]["data"]["status"] == "failed"
    assert run_status(relay, "light-fail") == "failed"


def test_inside_a_flower_client_epochs_are_client_progress(relay, emitter):
    import pytorch_lightning as pl

    from fedrelay.demo.centralized import PneumoniaModule, _loader
    from fedrelay.demo.data import synthetic
    from fedrelay.emitters.lightning import FedRelayCallback

    data = synthetic(64, 16, seed=3)
    callback = FedRelayCallback(emitter, run_id="fed-run", round=4, client_id=2)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(PneumoniaModule(), _loader(data, 32, True, 0), _loader(data, 64, False, 0))

    def two_events() -> bool:
        return relay.get("/api/runs/fed-run")[0] == 200 and len(stored_events(relay, "fed-run")) == 2

    wait_until(two_events, timeout=20, what="two client_progress events")
    events = stored_events(relay, "fed-run")
    # No training_start / training_end: those belong to the ServerApp of the federated run.
    assert [e["type"] for e in events] == ["client_progress", "client_progress"]
    assert [e["data"]["local_epoch"] for e in events] == [1, 2]
    assert all(e["data"]["round"] == 4 and e["data"]["client_id"] == 2 for e in events)
    assert all(e["source"] == {"role": "client", "client_id": 2} for e in events)
    assert run_status(relay, "fed-run") == "running"


def test_forwarded_logs_carry_the_epoch_and_stop_with_the_fit(relay, emitter):
    import logging

    import pytorch_lightning as pl

    from fedrelay.demo.centralized import PneumoniaModule, _loader
    from fedrelay.demo.data import synthetic
    from fedrelay.emitters.lightning import FedRelayCallback

    log = logging.getLogger("light.app")
    log.setLevel(logging.INFO)

    class Chatty(PneumoniaModule):
        def on_train_epoch_end(self) -> None:
            log.warning("epoch %d: loss looks flat", self.current_epoch + 1)

    data = synthetic(64, 16, seed=4)
    callback = FedRelayCallback(emitter, run_id="light-logs", forward_logs="WARNING")
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Chatty(), _loader(data, 32, True, 0), _loader(data, 64, False, 0))
    log.warning("after the fit: not forwarded")
    assert emitter.flush(10)

    events = _events_when_ended(relay, "light-logs")
    logs = [e for e in events if e["type"] == "log"]
    assert [(e["data"]["message"], e["data"]["epoch"]) for e in logs] == [
        ("epoch 1: loss looks flat", 1),
        ("epoch 2: loss looks flat", 2),
    ]
    assert all(e["source"]["role"] == "trainer" and e["data"]["logger"] == "light.app" for e in logs)
    assert events[-1]["type"] == "training_end"
