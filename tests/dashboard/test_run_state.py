"""The dashboard and the relay's run state: an incomplete run says what is missing and becomes
complete as the spools arrive, out of round order, while every round view stays in round order."""

from __future__ import annotations

import asyncio
import threading

from tests.support.clients import ResendingProducer
from tests.support.dashboard import STATE, all_points, wait
from tests.support.training import federated_run

ROUNDS, CLIENTS = 4, 3


def publish(url: str, producer: str, events: list[dict]) -> None:
    """Publish until acked, from a thread: Playwright's sync API owns this thread's event loop."""
    worker = threading.Thread(
        target=lambda: asyncio.run(ResendingProducer(url, producer).publish_all(events, timeout=30))
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive()


def test_an_incomplete_run_names_the_missing_rounds_then_completes_in_round_order(relay, page):
    run_id = "fed-outage"
    events = federated_run(run_id, rounds=ROUNDS, clients=CLIENTS)
    server = [e for e in events if e["source"]["role"] == "server"]
    by_round = {
        r: [e for e in events if e["source"]["role"] == "client" and e["data"]["round"] == r]
        for r in range(1, ROUNDS + 1)
    }
    # Round 1's client events arrived live; the relay then went down, and the server's spool
    # (every round, training_end) was synced before any client's.
    publish(relay.url, "clients-live", by_round[1])
    publish(relay.url, "server", server)

    page.goto(relay.http + "/")
    row = page.locator(f"[data-testid=run-row][data-run-id={run_id}]")
    row.wait_for(timeout=15000)
    assert row.get_by_test_id("status").inner_text() == "incomplete"
    missing = "incomplete: events missing for rounds 2-4 (run `fedrelay sync` where the clients ran)"
    assert row.get_by_test_id("run-incomplete").inner_text() == missing

    row.get_by_test_id("run-link").click()
    wait(page, f"() => {STATE}.view === 'run' && {STATE}.status === 'incomplete'")
    assert page.evaluate(f"() => {STATE}.incomplete") == missing
    assert page.get_by_test_id("incomplete").is_visible()
    assert page.get_by_test_id("incomplete").inner_text() == missing
    assert page.locator(".meta [data-testid=status]").inner_text() == "incomplete"

    # The clients' spools arrive, the last round first: arrival order is not round order.
    for r in range(ROUNDS, 1, -1):
        publish(relay.url, f"clients-synced-{r}", by_round[r])
    wait(page, f"() => {STATE}.lastSeq === {len(events)} && {STATE}.status === 'completed'")
    assert page.evaluate(f"() => {STATE}.incomplete") is None
    assert page.get_by_test_id("incomplete").is_hidden()

    # What the charts draw, left to right: rounds in order, though round 4's client metrics came first.
    rounds = list(range(1, ROUNDS + 1))
    assert page.evaluate(f"() => {STATE}.drawn('client:per-client')") == rounds
    for chart in all_points(page):
        assert page.evaluate(f"(id) => {STATE}.drawn(id)", chart) == [0, *rounds], chart  # 0: initial eval
    cells = page.locator("[data-client-id='0'] .cell").evaluate_all("cells => cells.map(c => c.title)")
    assert cells == [f"round {r}: done" for r in range(1, ROUNDS + 1)]
    page.goto(relay.http + "/")
    row.wait_for(timeout=15000)
    wait(page, f"() => document.querySelector('[data-run-id={run_id}] [data-testid=status]')"
               f".textContent === 'completed'")  # fmt: skip
    assert row.get_by_test_id("run-incomplete").count() == 0
