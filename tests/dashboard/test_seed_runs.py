"""The dashboard shows runs that came through ``/`` from the seed system's real senders, and
follows a run opened before its first event without polling."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tests.support.clients import ResendingProducer, event
from tests.support.dashboard import STATE, wait
from tests.support.metrics import scrape
from tests.support.seed_system import centralized_run, federated_run, send_frames
from tests.support.waiting import wait_until


def run_async(coro) -> None:
    """Run a coroutine to its end on a thread of its own: Playwright's sync API owns this one's loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result(timeout=120)


def send_seed_runs(relay) -> None:
    for frames in (centralized_run(7), federated_run(42), centralized_run(43, fail_at_epoch=2)):
        run_async(send_frames(relay.url + "/", frames))


def test_seed_runs_from_the_root_path_are_shown_with_their_epochs_rounds_and_status(relay, page):
    send_seed_runs(relay)

    page.goto(f"{relay.http}/#/runs/7")
    wait(page, f"() => {STATE}.status === 'completed' && {STATE}.mode === 'centralized'")
    assert page.evaluate(f"() => [{STATE}.epoch, {STATE}.maxEpochs]") == [5, 10]
    assert page.get_by_test_id("progress-counter").inner_text() == "Epoch 5 of 10"
    loss = page.evaluate(f"() => {STATE}.points('epoch:loss')")
    assert [x for x, _ in loss["val_loss"]] == [0, 1, 2, 3, 4, 5]  # the metrics' timestamp text is no point
    assert [x for x, _ in loss["train_loss"]] == [1, 2, 3, 4, 5]
    auroc = page.evaluate(f"() => {STATE}.points('epoch:auroc')")
    assert [x for x, _ in auroc["val_auroc"]] == [1, 2, 3, 4, 5]  # epoch 0's NaN came as null
    assert "epoch:global_step" not in page.evaluate(f"() => {STATE}.charts")
    assert page.get_by_test_id("early-stopping").inner_text().startswith("Early stopping at epoch 6")
    assert "0:00:" in page.get_by_test_id("summary").inner_text()  # the seed's duration text

    page.goto(f"{relay.http}/#/runs/42")
    wait(page, f"() => {STATE}.runId === '42' && {STATE}.status === 'completed'")
    assert page.evaluate(f"() => {STATE}.mode") == "federated"
    assert sorted(page.evaluate(f"() => {STATE}.clients")) == ["0", "1", "2"]
    accuracy = page.evaluate(f"() => {STATE}.points('round:accuracy')")
    assert [x for x, _ in accuracy["round_metrics accuracy"]] == [1, 2]  # a type fedrelay does not know
    assert [x for x, _ in accuracy["eval val_accuracy"]] == [0, 1]
    assert set(page.evaluate(f"() => {STATE}.points('round:loss')")) == {"fit train_loss", "eval val_loss"}

    page.goto(f"{relay.http}/#/runs/43")
    wait(page, f"() => {STATE}.runId === '43' && {STATE}.status === 'failed'")
    assert page.evaluate(f"() => {STATE}.lastError") == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "CUDA out of memory" in page.get_by_test_id("summary").inner_text()
    assert page.get_by_test_id("status").first.inner_text() == "failed"


def test_a_run_opened_before_its_first_event_fills_in_live_with_one_subscription(relay, page):
    page.goto(f"{relay.http}/#/runs/soon")
    wait(page, f"() => {STATE}.connection === 'open'")
    waiting = 'fedrelay_subscriptions_total{start="waiting"}'
    wait_until(lambda: scrape(relay).get(waiting) == 1, what="the waiting join")
    assert relay.get("/api/runs/soon")[0] == 404
    page.wait_for_timeout(1500)  # watched while waiting (clients used to ask again every second)
    run_async(ResendingProducer(relay.url, "soon").publish_all([event("soon", i) for i in range(1, 21)]))
    wait(page, f"() => {STATE}.lastSeq === 20")
    assert page.evaluate(f"() => {STATE}.connects") == 1
    metrics = scrape(relay)
    subscribed = {k: v for k, v in metrics.items() if k.startswith("fedrelay_subscriptions_total")}
    assert subscribed == {waiting: 1}  # no other subscription at all: no retry
    assert metrics['fedrelay_connections_opened_total{endpoint="subscribe"}'] == 1
