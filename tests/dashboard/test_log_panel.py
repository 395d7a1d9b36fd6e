"""The run's log panel in real Chromium, on a real Flower simulation (Ray) whose ClientApps log a
WARNING and an INFO line per train message and whose client 1 raises in round 1
(``tests/support/flower_log_app.py``: 3 clients, 2 rounds). The simulation runs once for the
module (about 13 s of the module's 20 s here); every test opens the page afresh and compares
what the panel holds with the relay's stored ``log`` events."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.health_page import COLORS, STATE, pixel, wait
from tests.support.relay_process import RelayProcess

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "support" / "flower_log_app.py"
LOGS = f"{STATE}.logs"
FAILURE = "injected failure on client 1 in round 1"


def log_app_run(tmp: Path, url: str) -> str:
    """The simulation, as a script (its handlers are pickled by value into the Ray actors)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),  # also for the Ray actors
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "FEDRELAY_SPOOL_DIR": str(tmp / "spool"),
    }
    result = subprocess.run(
        [sys.executable, str(APP), "--relay", url, "--rounds", "2", "--clients", "3",
         "--fail-client", "1", "--fail-round", "1", "--experiment", "logs"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0 and "done" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("run_id=")]
    return line.split("=", 1)[1]


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    """The relay, the run id, and the run's stored log records (as the API gives them)."""
    tmp = tmp_path_factory.mktemp("log-panel")
    relay = RelayProcess(tmp / "relay.db").start()
    try:
        run_id = log_app_run(tmp, relay.url)
        status, page = relay.get_json(f"/api/runs/{run_id}/events?type=log&limit=10000")
        assert status == 200 and page["events"]
        yield relay, run_id, page["events"]
    finally:
        relay.stop()


def open_run(page, relay, run_id: str, records: list[dict]) -> None:
    """The run's page, once it holds every stored record and the run is over."""
    page.goto(f"{relay.http}/#/runs/{run_id}")
    wait(
        page, f"() => {STATE}.status === 'completed' && {LOGS} && {LOGS}.shown === {len(records)}", timeout=60
    )


def shown(page) -> list[dict]:
    return page.evaluate(f"() => {LOGS}.records()")


def seqs(records: list[dict]) -> list[int]:
    """Seqs newest first, as the panel lists them."""
    return sorted((r["seq"] for r in records), reverse=True)


def client_of(record: dict) -> str | None:
    client = record["data"].get("client_id")
    return None if client is None else str(client)


def test_every_record_with_its_client_and_the_failing_clients_exception(flower, page):
    relay, run_id, records = flower
    open_run(page, relay, run_id, records)
    panel = shown(page)
    assert [r["seq"] for r in panel] == seqs(records)

    # Each ClientApp's warning, once per round, under its client id.
    warnings = [r for r in panel if r["logger"] == "logapp.client" and r["level"] == "warning"]
    assert sorted((r["clientId"], r["round"]) for r in warnings) == [
        (str(c), r) for c in range(3) for r in (1, 2)
    ]
    for r in warnings:
        assert (
            r["message"]
            == f"client {r['clientId']} round {r['round']}: only {10 + int(r['clientId'])} examples here"
        )
    # Server records have no client id.
    server = [r for r in panel if r["logger"] == "logapp.server"]
    assert len(server) == 3 and all(r["clientId"] is None and r["role"] == "server" for r in server)

    # The failing client's exception: its row says so, its detail has the traceback.
    (failure,) = [r for r in panel if r["clientId"] == "1" and r["level"] == "error"]
    assert failure["round"] == 1 and FAILURE in failure["message"]
    page.evaluate(f"(seq) => {LOGS}.reveal(seq)", failure["seq"])
    row = page.locator(f"[data-testid=log-row][data-seq='{failure['seq']}']")
    assert "client 1" in row.inner_text() and f"RuntimeError: {FAILURE}" in row.inner_text()
    row.click()
    wait(page, f"() => {LOGS}.picked === {failure['seq']}")
    exception = page.get_by_test_id("log-exception").inner_text()
    assert exception.startswith("Traceback (most recent call last)") and exception.rstrip().endswith(
        f"RuntimeError: {FAILURE}"
    )
    assert FAILURE in page.get_by_test_id("log-message").inner_text()

    # The records are in the panel, not in the event log, whose other events are still there.
    assert page.locator("[data-testid=event-log] tr.log").count() == 0
    assert page.locator("[data-testid=event-log] tr.round_end").count() > 0


def test_client_level_and_text_filters(flower, page):
    relay, run_id, records = flower
    open_run(page, relay, run_id, records)

    page.get_by_test_id("log-level").select_option("40")
    wait(page, f"() => {LOGS}.filter.minLevel === 40")
    errors = [r for r in records if r["data"]["levelno"] >= 40]
    assert [r["seq"] for r in shown(page)] == seqs(errors)
    assert any(client_of(r) == "1" and FAILURE in r["data"]["message"] for r in errors)

    page.get_by_test_id("log-client").select_option("c:2")
    wait(page, f"() => {LOGS}.filter.client === '2'")
    assert [r["seq"] for r in shown(page)] == seqs([r for r in errors if client_of(r) == "2"])
    page.get_by_test_id("log-level").select_option("0")
    wait(page, f"() => {LOGS}.filter.minLevel === 0")
    client2 = [r for r in records if client_of(r) == "2"]
    assert [r["seq"] for r in shown(page)] == seqs(client2)
    assert {
        (r["data"]["level"], r["data"]["round"]) for r in client2 if r["data"]["logger"] == "logapp.client"
    } == {(level, rnd) for level in ("warning", "info") for rnd in (1, 2)}
    rows = page.locator("[data-testid=log-row]")
    assert rows.count() == len(client2)
    assert {rows.nth(i).get_attribute("data-client-id") for i in range(rows.count())} == {"2"}

    # The server's records (no client id), then a text search over every source.
    page.get_by_test_id("log-client").select_option("none")
    wait(page, f"() => {LOGS}.filter.source === 'none'")
    assert [r["seq"] for r in shown(page)] == seqs([r for r in records if client_of(r) is None])
    page.get_by_test_id("log-client").select_option("all")
    page.get_by_test_id("log-search").fill("only 11 examples")
    wait(page, f"() => {LOGS}.filter.text === 'only 11 examples'")
    assert [(r["clientId"], r["round"]) for r in shown(page)] == [("1", 2), ("1", 1)]


def test_a_failed_cell_opens_the_panel_on_that_client_and_round(flower, page):
    relay, run_id, records = flower
    open_run(page, relay, run_id, records)
    wait(page, f"() => {STATE}.health && {STATE}.health.rounds === 2")
    assert page.evaluate(f"() => {STATE}.health.cell('1', 1)")["state"] == "failed"
    point = page.evaluate(f"() => {STATE}.health.reveal('1', 1)")
    assert pixel(page, point["x"], point["y"]) == COLORS["failed"]
    page.mouse.click(point["x"], point["y"])
    page.get_by_test_id("health-open-log").click()
    wait(page, f"() => {LOGS}.filter.client === '1' && {LOGS}.filter.round === 1")

    cell = [r for r in records if client_of(r) == "1" and r["data"].get("round") == 1]
    assert [r["seq"] for r in shown(page)] == seqs(cell)
    levels = {r["level"] for r in shown(page)}
    assert {"warning", "info", "error"} <= levels
    rows = page.locator("[data-testid=log-row]")
    assert {
        (rows.nth(i).get_attribute("data-client-id"), rows.nth(i).get_attribute("data-round"))
        for i in range(rows.count())
    } == {("1", "1")}
    assert page.get_by_test_id("log-round").inner_text().startswith("round 1")
    assert page.get_by_test_id("log-panel").is_visible()

    # The round can be cleared: the client's records of every round.
    page.get_by_test_id("log-round-clear").click()
    wait(page, f"() => {LOGS}.filter.round === null && {LOGS}.filter.client === '1'")
    assert [r["seq"] for r in shown(page)] == seqs([r for r in records if client_of(r) == "1"])
    assert page.get_by_test_id("log-round").is_hidden()


def test_after_a_reload_the_same_records(flower, page):
    relay, run_id, records = flower
    open_run(page, relay, run_id, records)
    before = shown(page)
    page.reload()
    open_run(page, relay, run_id, records)
    assert shown(page) == before
    assert page.evaluate(f"() => {LOGS}.visible().length") > 0
