"""The federation health grid in real Chromium, on a generated run of 1,000 clients x 100 rounds
published through a real relay: every row it shows is right, only the rows in view are in the
DOM, and scrolling, filtering, sorting and the straggler setting redraw what they should.
Structural facts only: how fast it scrolls is measured by bench/dashboard_grid.py."""

from __future__ import annotations

import pytest

from tests.support.federation_run import FAILED_MESSAGE, generated_run, publish_blocking
from tests.support.health_page import (
    COLORS,
    STATE,
    expected_letters,
    pixel,
    scroll_grid,
    visible,
    wait,
)

pytestmark = pytest.mark.timeout(300)

CLIENTS, ROUNDS = 1000, 100
MAX_DOM_ROWS = 30
"""The grid's viewport is at most 480 px high, rows are 18 px: 26 rows show, one more is cut."""


def check_rows(view: dict, run) -> None:
    assert 20 <= len(view["rows"]) <= MAX_DOM_ROWS, len(view["rows"])
    for row in view["rows"]:
        assert row["cells"] == expected_letters(run.cells, row["clientId"], ROUNDS), row["clientId"]


def test_a_thousand_clients_by_a_hundred_rounds(relay, page):
    run = generated_run("grid-1000", clients=CLIENTS, rounds=ROUNDS, seed=9)
    publish_blocking(relay.url, run)
    page.goto(f"{relay.http}/#/runs/grid-1000")
    wait(page, f"() => {STATE}.lastSeq === {len(run.events)}", timeout=120)
    wait(
        page,
        f"() => {STATE}.health && {STATE}.health.clients === {CLIENTS} && {STATE}.health.rounds === {ROUNDS}",
    )

    # Every client has a row, in natural order; only the rows in view are in the DOM.
    assert page.evaluate(f"() => {STATE}.health.rowIds") == [str(c) for c in range(CLIENTS)]
    top = visible(page)
    assert [r["clientId"] for r in top["rows"]][:3] == ["0", "1", "2"]
    check_rows(top, run)
    assert page.locator("[data-testid=health-grid] *").count() < 250  # no element per cell

    # Scrolled to the middle and to the end: other rows, still right, still as few.
    middle = scroll_grid(page, top=500 * 18)
    assert middle["firstRow"] == 500 and middle["rows"][0]["clientId"] == "500"
    check_rows(middle, run)
    end = scroll_grid(page, top=10**7)
    assert end["rows"][-1]["clientId"] == str(CLIENTS - 1)
    check_rows(end, run)

    # The canvas draws each state in its colour: a failed and a silent cell, then a click on the failed one.
    failed = next((r, c) for (r, c), s in sorted(run.cells.items()) if s == "failed" and int(c) > 900)
    silent = next((r, c) for (r, c), s in sorted(run.cells.items()) if s == "silent")
    not_sampled = next(
        (r, str(c)) for r in range(1, ROUNDS + 1) for c in range(CLIENTS) if (r, str(c)) not in run.cells
    )
    for (rnd, client), color in ((failed, "failed"), (silent, "silent"), (not_sampled, "none")):
        point = page.evaluate(f"([c, r]) => {STATE}.health.reveal(c, r)", [client, rnd])
        assert pixel(page, point["x"], point["y"]) == COLORS[color], (client, rnd, color)
    rnd, client = failed
    point = page.evaluate(f"([c, r]) => {STATE}.health.reveal(c, r)", [client, rnd])
    page.mouse.move(point["x"], point["y"])
    title = page.get_by_test_id("health-canvas").get_attribute("title")
    assert title == f"client {client} · round {rnd}: failed — {FAILED_MESSAGE.format(c=client, r=rnd)}"
    page.mouse.click(point["x"], point["y"])
    detail = page.get_by_test_id("health-detail")
    detail.wait_for()
    assert page.get_by_test_id("health-reason").inner_text() == FAILED_MESSAGE.format(c=client, r=rnd)
    assert f"round {rnd}" in page.get_by_test_id("health-failure-detail").inner_text()
    assert page.evaluate(f"() => {STATE}.health.roundShown") == rnd

    # Only clients that failed at least once, the most failing first.
    failures: dict[str, int] = {}
    for (_, c), s in run.cells.items():
        failures[c] = failures.get(c, 0) + (s == "failed")
    page.get_by_test_id("health-show").select_option("failed")
    page.get_by_test_id("health-sort").select_option("failure")
    wait(page, f"() => {STATE}.health.clients === {sum(1 for n in failures.values() if n)}")
    shown = page.evaluate(f"() => {STATE}.health.rowIds")
    assert set(shown) == {c for c, n in failures.items() if n}
    sampled = {c: sum(1 for (_, k) in run.cells if k == c) for c in shown}
    rates = [failures[c] / sampled[c] for c in shown]
    assert rates == sorted(rates, reverse=True)
    check_rows(scroll_grid(page, top=0), run)

    # A lower straggler factor makes more stragglers (the grid and the counts follow it).
    page.get_by_test_id("health-show").select_option("all")
    before = page.get_by_test_id("health-counts").inner_text()
    page.get_by_test_id("straggler-factor").fill("1.1")
    page.get_by_test_id("straggler-min-gap").fill("0")
    wait(page, f"() => {STATE}.health.factor === 1.1 && {STATE}.health.minGap === 0")
    after = page.get_by_test_id("health-counts").inner_text()

    def stragglers(text: str) -> int:
        return int(text.split(" stragglers")[0].rsplit("· ", 1)[1])

    assert stragglers(before) == sum(1 for s in run.cells.values() if s == "straggler")
    assert stragglers(after) > stragglers(before)
