"""The runs list at scale, in real Chromium against a real relay: paged through the API (never
every run in one answer), searched by name or id, filtered by status and mode, and live as runs
start and end, also further down than the first page."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from tests.support.health_page import STATE, wait
from tests.support.training import BackgroundProducer

RUNS = 120
PAGE = 50


def start(run_id: str, i: int, n: int) -> dict:
    mode = "federated" if i % 2 else "centralized"
    data = {"training_mode": mode, "experiment_name": f"Exp-{i % 7}"}
    return {"type": "training_start", "run_id": run_id, "id": n, "data": data}


def end(run_id: str, n: int, status: str) -> dict:
    return {"type": "training_end", "run_id": run_id, "id": n, "data": {"status": status}}


def shown(page) -> list[str]:
    return page.evaluate(f"() => {STATE}.runs")


def test_search_filters_pages_and_live_updates(relay, page):
    events = [start(f"run-{i:03d}", i, i + 1) for i in range(RUNS)]
    BackgroundProducer(relay.url, events, pace=0, batch=1, name="starter").start().join(120)
    ends = [
        end(f"run-{i:03d}", RUNS + 1 + k, "failed" if i % 2 else "completed")
        for k, i in enumerate(range(0, RUNS, 3))
    ]
    BackgroundProducer(relay.url, ends, pace=0, batch=100, name="ender").start().join(60)
    newest_first = [f"run-{i:03d}" for i in range(RUNS - 1, -1, -1)]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/runs" in r.url else None)

    page.goto(f"{relay.http}/")
    wait(page, f"() => {STATE}.runs && {STATE}.runs.length === {PAGE}")
    assert shown(page) == newest_first[:PAGE] and page.evaluate(f"() => {STATE}.more")
    page.get_by_test_id("runs-more").click()
    wait(page, f"() => {STATE}.runs.length === {2 * PAGE}")
    page.get_by_test_id("runs-more").click()
    wait(page, f"() => {STATE}.runs.length === {RUNS} && !{STATE}.more")
    assert shown(page) == newest_first
    assert page.get_by_test_id("runs-more").is_hidden()

    # Live: a new run shows at the top, and a run three pages down turns failed, without a reload.
    BackgroundProducer(relay.url, [start("run-new", 1, 1)], pace=0, batch=1, name="late").start().join(30)
    wait(page, f"() => {STATE}.runs[0] === 'run-new'", timeout=15)
    BackgroundProducer(
        relay.url, [end("run-001", 1, "failed")], pace=0, batch=1, name="late-end"
    ).start().join(30)
    status = "[data-run-id='run-001'] [data-testid=status]"
    wait(page, "(s) => document.querySelector(s).textContent === 'failed'", arg=status, timeout=15)
    assert len(shown(page)) == RUNS + 1

    # Search by experiment name (any case) or by run id.
    page.get_by_test_id("runs-search").fill("exp-3")
    expected = [r for r in newest_first if int(r[4:]) % 7 == 3]
    wait(page, f"(ids) => JSON.stringify({STATE}.runs) === JSON.stringify(ids)", arg=expected)
    page.get_by_test_id("runs-search").fill("RUN-11")
    expected = [f"run-{i:03d}" for i in range(119, 109, -1)]
    wait(page, f"(ids) => JSON.stringify({STATE}.runs) === JSON.stringify(ids)", arg=expected)

    # Status and mode filters, together with the search.
    page.get_by_test_id("runs-search").fill("")
    page.get_by_test_id("runs-status").select_option("failed")
    failed = ["run-001"] + [r for r in newest_first if int(r[4:]) % 3 == 0 and int(r[4:]) % 2 == 1]
    failed = sorted(set(failed), key=newest_first.index)
    wait(page, f"(ids) => JSON.stringify({STATE}.runs) === JSON.stringify(ids)", arg=failed)
    page.get_by_test_id("runs-mode").select_option("centralized")
    wait(page, f"() => {STATE}.runs.length === 0")
    assert page.get_by_test_id("no-runs").inner_text() == "No run matches."
    page.get_by_test_id("runs-status").select_option("")
    centralized = [r for r in newest_first if int(r[4:]) % 2 == 0]
    wait(page, f"(ids) => JSON.stringify({STATE}.runs) === JSON.stringify(ids)", arg=centralized[:PAGE])

    # Never one answer with every run: every request asked for a page.
    assert requests
    for url in requests:
        query = parse_qs(urlsplit(url).query)
        assert query.get("limit") in (["50"], ["1000"]), url
        assert query.get("limit") == ["50"] or "updated_since" in query, url
