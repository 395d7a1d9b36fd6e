"""The dashboard watching a real Flower simulation: ``fedrelay demo`` (the pneumonia demo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.dashboard import STATE, all_points, round_points, wait
from tests.support.stored import stored_events
from tests.support.training import expected_points

ROUNDS, CLIENTS = 3, 4


@pytest.mark.timeout(400)
def test_dashboard_follows_a_real_flower_demo_run(relay, page, tmp_path):
    page.goto(relay.http + "/")
    wait(page, f"() => {STATE}.view === 'runs'")
    log = (tmp_path / "demo.log").open("w")
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedrelay.demo", "--rounds", str(ROUNDS), "--clients", str(CLIENTS),
         "--samples", "400", "--relay", relay.url, "--no-browser"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )  # fmt: skip
    try:
        row = page.locator("[data-testid=run-row]").first
        row.wait_for(timeout=120_000)
        row.locator("[data-testid=run-link]").click()
        wait(page, f"() => {STATE}.view === 'run' && {STATE}.mode === 'federated'", timeout=60)

        # Round by round, while Flower trains: the counter and the chart points go up.
        wait(page, f"() => {STATE}.round >= 1 && {STATE}.status === 'running'", timeout=180)
        wait(page, f"() => ({STATE}.charts['round:loss'] || 0) > 0", timeout=180)
        seen = [(page.evaluate(f"() => {STATE}.round"), sum(round_points(page).values()))]
        for target in range(seen[0][0] + 1, ROUNDS + 1):
            wait(page, f"() => {STATE}.round >= {target} && {STATE}.status === 'running'", timeout=180)
            seen.append((page.evaluate(f"() => {STATE}.round"), sum(round_points(page).values())))
        assert [r for r, _ in seen] == sorted({r for r, _ in seen}), seen
        assert seen[-1][1] > seen[0][1], f"chart points did not grow while training: {seen}"
        assert demo.wait(timeout=300) == 0, (tmp_path / "demo.log").read_text()[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        log.close()

    run_id = page.evaluate(f"() => {STATE}.runId")
    events = stored_events(relay, run_id)
    wait(page, f"() => {STATE}.lastSeq === {len(events)} && {STATE}.status === 'completed'")
    wait(page, f"() => {STATE}.charts['round:auroc'] === {expected_points(events)['round:auroc']}")
    assert round_points(page) == expected_points(events)
    assert page.get_by_test_id("progress-counter").inner_text() == f"Round {ROUNDS} of {ROUNDS}"
    clients = sorted(page.evaluate(f"() => {STATE}.clients"))
    assert clients == [str(c) for c in range(CLIENTS)]
    rows = page.locator("[data-testid=client-row]").evaluate_all("rows => rows.map(r => r.dataset.clientId)")
    assert sorted(rows) == clients
    assert page.evaluate(f"() => {STATE}.stats")["duplicates"] == 0

    before = all_points(page)
    page.reload()
    wait(page, f"() => {STATE}.lastSeq === {len(events)} && ({STATE}.charts['round:auroc'] || 0) > 0")
    wait(page, f"() => {STATE}.charts['round:auroc'] === {expected_points(events)['round:auroc']}")
    assert all_points(page) == before
