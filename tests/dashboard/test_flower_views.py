"""Federation health and runs side by side, in real Chromium, on real Flower simulations (Ray):
one run where client 1 fails in round 2 and client 2 sleeps 8 s in round 3, another with a
different learning rate. Both are run once for the module (about 25 s each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.health_page import COLORS, STATE, pixel, wait
from tests.support.relay_process import RelayProcess

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
SLOW_SECONDS = 8.0
"""Client 2's sleep in round 3: the others train in milliseconds, so it straggles at any load."""


def flower_run(tmp: Path, url: str, *args: str) -> str:
    """One simulation through ``tests/support/flower_health_app.py``; returns its run id."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),  # also for the Ray actors
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "FEDRELAY_SPOOL_DIR": str(tmp / "spool"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.flower_health_app", "--relay", url, *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("run_id=")]
    return line.split("=", 1)[1]


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flower-views")
    relay = RelayProcess(tmp / "relay.db").start()
    try:
        faulty = flower_run(
            tmp, relay.url, "--experiment", "lr-0.05", "--lr", "0.05",
            "--fail-client", "1", "--fail-round", "2",
            "--slow-client", "2", "--slow-round", "3", "--slow-seconds", str(SLOW_SECONDS),
        )  # fmt: skip
        other = flower_run(tmp, relay.url, "--experiment", "lr-0.2", "--lr", "0.2")
        yield relay, faulty, other
    finally:
        relay.stop()


def test_a_failed_client_and_a_straggler_show_where_they_happened(flower, page):
    relay, run_id, _ = flower
    page.goto(f"{relay.http}/#/runs/{run_id}")
    wait(
        page,
        f"() => {STATE}.status === 'completed' && {STATE}.health && {STATE}.health.rounds === 3",
        timeout=60,
    )
    cell = lambda client, rnd: page.evaluate(f"([c, r]) => {STATE}.health.cell(c, r)", [client, rnd])  # noqa: E731

    failed = cell("1", 2)
    assert failed["state"] == "failed"
    assert failed["reason"] == "train failed: RuntimeError: injected failure on client 1 in round 2"
    assert "Traceback" in failed["detail"] and failed["phase"] == "train"
    slow = cell("2", 3)
    assert slow["state"] == "straggler" and slow["duration"] >= SLOW_SECONDS
    assert page.evaluate(f"() => {STATE}.health.round(3)")["criticalPath"][0] == "2"
    states = {(c, r): cell(str(c), r)["state"] for c in range(4) for r in (1, 2, 3)}
    assert states[(1, 2)] == "failed" and states[(2, 3)] == "straggler"
    assert all(s in ("finished", "straggler") for k, s in states.items() if k != (1, 2))

    # The API says the same.
    status, body = relay.get(f"/api/runs/{run_id}/clients")
    api = json.loads(body)
    assert status == 200 and api["next_cursor"] is None
    api_cells = {(int(c), r["round"]): v for r in api["rounds"] for c, v in r["cells"].items()}
    assert {k: v["state"] for k, v in api_cells.items()} == states
    assert api_cells[(1, 2)]["reason"] == failed["reason"]
    assert api["rounds"][2]["critical_path"]["client_id"] == "2" and api["rounds"][2]["stragglers"] == ["2"]

    # Hovering the failed cell names the reason; clicking it shows the message and the traceback.
    point = page.evaluate(f"() => {STATE}.health.reveal('1', 2)")
    assert pixel(page, point["x"], point["y"]) == COLORS["failed"]
    page.mouse.move(point["x"], point["y"])
    assert page.get_by_test_id("health-canvas").get_attribute("title") == (
        "client 1 · round 2: failed — train failed: RuntimeError: injected failure on client 1 in round 2"
    )
    page.mouse.click(point["x"], point["y"])
    assert "injected failure on client 1" in page.get_by_test_id("health-reason").inner_text()
    assert "RuntimeError" in page.get_by_test_id("health-failure-detail").inner_text()

    # The detail's button (the hook for a log panel) shows that client's events of that round.
    page.get_by_test_id("health-open-log").click()
    wait(page, f"() => {STATE}.logFilter && {STATE}.logFilter.clientId === '1'")
    log = page.get_by_test_id("event-log").inner_text()
    assert "injected failure on client 1" in log
    assert "client 0" not in log and "round 3" not in log

    # The straggler's round: its durations, with the slowest named.
    point = page.evaluate(f"() => {STATE}.health.reveal('2', 3)")
    assert pixel(page, point["x"], point["y"]) == COLORS["straggler"]
    page.mouse.click(point["x"], point["y"])
    wait(page, f"() => {STATE}.health.roundShown === 3")
    summary = page.get_by_test_id("round-summary").inner_text()
    assert "4 sampled" in summary and "1 straggling" in summary and "critical path: client 2" in summary


def test_two_real_runs_side_by_side(flower, page):
    relay, faulty, other = flower
    page.goto(f"{relay.http}/")
    for run_id in (faulty, other):
        page.locator(f"[data-testid=run-row][data-run-id='{run_id}'] [data-testid=run-select]").check()
    page.get_by_test_id("compare-button").click()
    wait(
        page,
        f"() => {STATE}.view === 'compare' && {STATE}.statuses.every(s => s === 'completed')",
        timeout=60,
    )
    assert page.url.endswith(f"#/compare?runs={faulty},{other}")

    def check() -> None:
        labels = page.evaluate(f"() => {STATE}.labels")
        assert labels == [f"lr-0.05 ({faulty})", f"lr-0.2 ({other})"]
        wait(page, f"() => ({STATE}.charts['compare:round:loss/server'] || 0) === 8")
        server = page.evaluate(f"() => {STATE}.points('compare:round:loss/server')")
        assert [x for x, _ in server[labels[0]]] == [0, 1, 2, 3] == [x for x, _ in server[labels[1]]]
        assert server[labels[0]][0][1] == server[labels[1]][0][1]  # the same start...
        assert server[labels[0]][3][1] != server[labels[1]][3][1]  # ...and other curves
        assert page.evaluate(f"() => {STATE}.drawn('compare:round:loss/server')") == [0, 1, 2, 3]
        assert page.evaluate(f"() => {STATE}.charts['compare:round:loss/eval']") == 6
        diff = {d["key"]: d["values"] for d in page.evaluate(f"() => {STATE}.diff")}
        assert diff["config.train_config.lr"] == [0.05, 0.2]
        assert diff["experiment_name"] == ["lr-0.05", "lr-0.2"]
        assert "config.strategy" not in diff and "num_rounds" not in diff  # the same in both
        row = page.locator("[data-testid=config-diff] tr.differs[data-key='config.train_config.lr']")
        assert row.inner_text().split() == ["config.train_config.lr", "0.0500", "0.2000"]
        table = {r["metric"]: r["values"] for r in page.evaluate(f"() => {STATE}.table")}
        final = table["round:loss/server"]
        assert [v["at"] for v in final] == [3, 3] and all(v["best"] <= v["final"] for v in final)

    check()
    page.reload()  # the URL is the comparison: shared, it shows the same
    wait(
        page,
        f"() => {STATE}.view === 'compare' && {STATE}.statuses.every(s => s === 'completed')",
        timeout=60,
    )
    check()
