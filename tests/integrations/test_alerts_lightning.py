"""Alerts from real Lightning fits streamed through a real relay to a real HTTP receiver: a rule
on epoch metrics, a plateau (the fit that early stopping ends), the end, and a failure."""

from __future__ import annotations

import pytest

from fedrelay.demo.centralized import CentralizedConfig, run_centralized
from fedrelay.emitters import Emitter
from tests.support.waiting import wait_until
from tests.support.webhook_receiver import WebhookReceiver

TINY = dict(image_size=16, n_train=160, n_test=80, batch_size=32)
RULES = ["metrics.val_loss > 0", "no improvement of val_loss by 0.001 for 1 epoch"]


def test_lightning_fits_alert_their_rules_their_end_and_their_failure(tmp_path, relay_factory):
    receiver = WebhookReceiver().start()
    relay = relay_factory("--alert-webhook", receiver.url, *[a for r in RULES for a in ("--alert-rule", r)])
    emitter = Emitter(relay.url, spool_dir=tmp_path / "spool")
    try:
        # A learning rate this small cannot improve val_loss: patience 1 stops the fit at epoch 2.
        out = run_centralized(
            CentralizedConfig(max_epochs=10, patience=1, lr=1e-7, run_id="light-alert", **TINY),
            emitter=emitter,
        )
        assert out["stopped_early"] and out["epochs"] == 2
        with pytest.raises(RuntimeError, match="injected failure in epoch 2"):
            run_centralized(
                CentralizedConfig(max_epochs=5, fail_epoch=2, run_id="light-alert-fail", **TINY),
                emitter=emitter,
            )
        assert emitter.flush(10)
        wait_until(lambda: len(receiver.received) >= 5, 30, what="five alerts")
        by = {(b["run_id"], b["alert"], b["rule"]): b for b in receiver.bodies()}
        assert len(by) == len(receiver.received) == 5, receiver.bodies()

        threshold = by[("light-alert", "rule", RULES[0])]
        assert threshold["epoch"] == 1 and threshold["round"] is None and threshold["value"] > 0
        assert threshold["metric"] == "metrics.val_loss"
        plateau = by[("light-alert", "rule", RULES[1])]
        assert plateau["epoch"] == 2
        ended = by[("light-alert", "ended", None)]
        assert ended["status"] == "stopped" and ended["url"].endswith("/#/runs/light-alert")
        assert by[("light-alert-fail", "rule", RULES[0])]["epoch"] == 1
        failed = by[("light-alert-fail", "failed", None)]
        assert failed["status"] == "failed" and "injected failure in epoch 2" in failed["detail"]
    finally:
        emitter.close(timeout=5)
        receiver.stop()
