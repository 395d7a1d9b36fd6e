"""The dashboard in real headless Chromium against a real relay, with runs streaming live."""

from __future__ import annotations

from tests.support.dashboard import STATE, all_points, round_points, summary_items, wait
from tests.support.relay_process import RelayProcess
from tests.support.training import BackgroundProducer, centralized_run, expected_points, federated_run


def test_federated_run_streams_live_and_survives_a_reload(relay, page):
    run_id = "fed-live"
    events = federated_run(run_id, rounds=10, clients=6, fail=(4, 3))
    page.goto(relay.http + "/")
    wait(page, f"() => {STATE}.view === 'runs'")
    producer = BackgroundProducer(relay.url, events, pace=0.15, batch=6).start()

    # The runs list shows the run as soon as it starts, without a reload.
    row = page.locator(f"[data-testid=run-row][data-run-id={run_id}]")
    row.wait_for(timeout=15000)
    assert "federated" in row.inner_text()
    row.locator("[data-testid=run-link]").click()
    wait(page, f"() => {STATE}.view === 'run' && {STATE}.runId === '{run_id}'")

    # While the run streams, the round counter and the charts' point counts go up.
    wait(page, f"() => {STATE}.round >= 2 && Object.keys({STATE}.charts).some(k => k.startsWith('round:'))")
    first_round = page.evaluate(f"() => {STATE}.round")
    first_points = sum(round_points(page).values())
    assert page.evaluate(f"() => {STATE}.status") == "running"
    wait(page, f"() => {STATE}.round >= {first_round + 2}")
    counter = page.get_by_test_id("progress-counter").inner_text()
    assert counter.startswith("Round ") and counter.endswith(" of 10")
    assert sum(round_points(page).values()) > first_points

    producer.join(60)
    wait(page, f"() => {STATE}.lastSeq === {len(events)} && {STATE}.status === 'completed'")
    wait(
        page,
        f"() => {STATE}.charts['round:auroc'] === {expected_points(events)['round:auroc']}",
    )
    assert round_points(page) == expected_points(events)
    assert page.get_by_test_id("progress-counter").inner_text() == "Round 10 of 10"

    # The clients table lists every client, with the failure where it happened.
    client_ids = sorted(page.evaluate(f"() => {STATE}.clients"))
    assert client_ids == [str(c) for c in range(6)]
    rows = page.locator("[data-testid=client-row]")
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.clientId)")) == client_ids
    assert page.locator("[data-client-id='4'] .cell.failed").count() == 1
    summary = summary_items(page)
    assert summary["status"] == "completed" and summary["rounds completed"] == "10", summary
    stats = page.evaluate(f"() => {STATE}.stats")
    assert stats == {"events": len(events), "duplicates": 0, "holes": 0, "gaps": 0}

    # A reload (a late tab) rebuilds the same charts from history.
    before_counts = page.evaluate(f"() => {STATE}.charts")
    before_points = all_points(page)
    page.reload()
    wait(
        page,
        f"() => {STATE}.lastSeq === {len(events)} && {STATE}.charts['round:loss'] > 0",
    )
    wait(
        page,
        "(c) => JSON.stringify(window.fedrelayDashboard.charts) === JSON.stringify(c)",
        arg=before_counts,
    )
    assert all_points(page) == before_points


def test_relay_restart_mid_run_loses_and_doubles_no_point(relay_factory, page, tmp_path):
    db = tmp_path / "restart.db"
    relay = relay_factory(db=db)
    port = relay.port
    run_id = "fed-restart"
    events = federated_run(run_id, rounds=12, clients=4)
    producer = BackgroundProducer(relay.url, events, pace=0.1, batch=6).start()
    page.goto(f"{relay.http}/#/runs/{run_id}")  # a tab opened on the run before it exists
    wait(page, f"() => {STATE}.round >= 3 && {STATE}.connects === 1")

    relay.kill()  # SIGKILL: no goodbye to the page or the producer
    wait(page, f"() => {STATE}.connection !== 'open'", timeout=20)
    seen_before = page.evaluate(f"() => {STATE}.lastSeq")
    relay_factory(db=db, port=port)
    producer.join(90)

    wait(page, f"() => {STATE}.lastSeq === {len(events)} && {STATE}.status === 'completed'", timeout=60)
    wait(page, f"() => {STATE}.charts['round:auroc'] === {expected_points(events)['round:auroc']}")
    assert seen_before < len(events)
    assert page.evaluate(f"() => {STATE}.connects") >= 2
    assert page.evaluate(f"() => {STATE}.stats") == {
        "events": len(events),
        "duplicates": 0,
        "holes": 0,
        "gaps": 0,
    }
    assert round_points(page) == expected_points(events)
    for chart, series in all_points(page).items():
        for label, points in series.items():
            xs = [x for x, _ in points]
            assert xs == sorted(set(xs)), f"{chart} {label}: a round twice or out of order"
    loss = all_points(page)["round:loss"]
    assert [x for x, _ in loss["eval"]] == list(range(1, 13))
    assert [x for x, _ in loss["server"]] == list(range(0, 13))


def test_centralized_run_with_early_stopping_and_a_token(relay_factory, page):
    relay = relay_factory("--subscribe-token", "tok3n")
    run_id = "cen-live"
    events = centralized_run(run_id, max_epochs=30, stop_at=16, patience=4)
    producer = BackgroundProducer(relay.url, events, pace=0.2, batch=1).start()
    page.goto(f"{relay.http}/?token=tok3n#/runs/{run_id}")
    wait(page, f"() => {STATE}.mode === 'centralized' && {STATE}.epoch >= 2")
    first = page.evaluate(f"() => {STATE}.charts['epoch:loss'] || 0")
    wait(page, f"() => ({STATE}.charts['epoch:loss'] || 0) > {first}")
    producer.join(60)
    wait(page, f"() => {STATE}.lastSeq === {len(events)} && {STATE}.status === 'stopped'")
    wait(page, f"() => {STATE}.charts['epoch:loss'] === {expected_points(events)['epoch:loss']}")
    assert page.evaluate(f"() => {STATE}.charts") == expected_points(events)
    assert page.get_by_test_id("progress-counter").inner_text() == "Epoch 16 of 30"
    assert "Early stopping at epoch 16" in page.get_by_test_id("early-stopping").inner_text()
    # Each summary entry on its own: "12" alone would also match "training time 5m 12s".
    summary = summary_items(page)
    assert summary["best epoch"] == "12"
    assert summary["epochs completed"] == "16"
    loss = page.evaluate(f"() => {STATE}.points('epoch:loss')")
    assert sorted(loss) == ["train_loss", "val_loss"] and len(loss["val_loss"]) == 16

    # Without the token the page cannot read the relay; with it, the runs list works.
    page.goto(f"{relay.http}/?token=tok3n#/")
    page.locator(f"[data-testid=run-row][data-run-id={run_id}]").wait_for(timeout=10000)
    assert RelayProcess.get(relay, f"/api/runs/{run_id}")[0] == 401


def test_static_client_files_are_served(relay, page):
    """fedrelay.js, its types and the vendored chart library ship with the relay."""
    for path, kind in [
        ("/static/fedrelay.js", "javascript"),
        ("/static/fedrelay.d.ts", "text/plain"),
        ("/static/vendor/uplot/uPlot.esm.js", "javascript"),
        ("/static/vendor/uplot/LICENSE", ""),
    ]:
        response = page.request.get(relay.http + path)
        assert response.status == 200, path
        assert kind in response.headers["content-type"], path
