"""The log panel's bounds and safety in real Chromium, on records published through a real relay:
it holds the newest 5,000 records (and 4 Mi characters of text), keeps only the rows in view in
the DOM, finds older records in the relay on demand, shows every text as text, clips long ones
and fetches them whole, and is the same built live as rebuilt after a reload."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.dashboard import STATE, wait
from tests.support.log_records import TRACEBACK, flood, log_event
from tests.support.seed_system import send_frames
from tests.support.training import BackgroundProducer, federated_run

pytestmark = pytest.mark.timeout(300)

LOGS = f"{STATE}.logs"
MAX_RECORDS = 5000
"""logbook.js's MAX_RECORDS and MAX_TEXT_CHARS, as docs/dashboard.md states them."""
MAX_TEXT_CHARS = 4 * 1024 * 1024
MESSAGE_CHARS, EXCEPTION_CHARS = 2000, 8000
MAX_DOM_ROWS = 40
"""The list's viewport is 360 px of 24 px rows (15) and 8 more above and below."""


def publish(relay, events: list[dict], name: str, batch: int = 500) -> None:
    BackgroundProducer(relay.url, events, pace=0, batch=batch, name=name).start().join()


def stored_logs(relay, run_id: str) -> list[dict]:
    """Every log record of the run, oldest first, through the API's ``type=log`` pages."""
    out: list[dict] = []
    since = 0
    while True:
        status, page = relay.get_json(f"/api/runs/{run_id}/events?type=log&since={since}&limit=10000")
        assert status == 200
        if not page["events"]:
            return out
        out.extend(page["events"])
        since = page["next_since"]


def shown_seqs(page) -> list[int]:
    return page.evaluate(f"() => {LOGS}.records().map(r => r.seq)")


def test_the_newest_records_live_older_ones_from_the_relay_the_same_after_a_reload(relay, page):
    events = flood("flood", MAX_RECORDS + 1500)
    publish(relay, events[:3000], "first")
    page.goto(f"{relay.http}/#/runs/flood")
    wait(page, f"() => {LOGS} && {LOGS}.held === 3000 && {LOGS}.shown === 3000", timeout=60)
    assert page.get_by_test_id("log-older").is_hidden()

    # The rest arrives while the page is open: the newest 5,000 stay, the oldest are counted.
    publish(relay, events[3000:], "second")
    wait(page, f"() => {STATE}.lastSeq === {len(events)}", timeout=60)
    wait(page, f"() => {LOGS}.held === {MAX_RECORDS} && {LOGS}.shown === {MAX_RECORDS}")
    stored = stored_logs(relay, "flood")
    assert len(stored) == len(events)
    held, older = stored[-MAX_RECORDS:], stored[:-MAX_RECORDS]
    assert page.evaluate(f"() => {LOGS}.evicted") == len(older) == 1500
    live = shown_seqs(page)
    assert live == [e["seq"] for e in reversed(held)]
    rows = page.locator("[data-testid=log-row]")
    assert 10 <= rows.count() <= MAX_DOM_ROWS
    assert page.evaluate(f"() => {LOGS}.visible()[0].seq") == held[-1]["seq"]
    assert "1500 older records are not held" in page.get_by_test_id("log-older").inner_text()

    # One client's records: the held ones, then, on demand, the older ones the relay has.
    page.get_by_test_id("log-client").select_option("c:3")
    wait(page, f"() => {LOGS}.filter.client === '3'")
    mine = lambda records: [e["seq"] for e in reversed(records) if e["data"]["client_id"] == 3]  # noqa: E731
    assert shown_seqs(page) == mine(held)
    page.get_by_test_id("log-load-older").click()
    wait(page, f"() => {LOGS}.older && {LOGS}.older.state === 'done'")
    assert shown_seqs(page) == mine(held) + mine(older)
    assert page.evaluate(f"() => {LOGS}.older")["scanned"] == len(older)
    assert "150 older matches of 1500 read" in page.get_by_test_id("log-older").inner_text()
    assert page.evaluate(f"() => {LOGS}.held") == MAX_RECORDS  # the search holds its own, bounded too

    # Rebuilt from the relay's history, the page holds what it held live.
    page.reload()
    wait(page, f"() => {STATE}.lastSeq === {len(events)} && {LOGS}.shown === {MAX_RECORDS}", timeout=60)
    assert shown_seqs(page) == live
    assert page.evaluate(f"() => {LOGS}.filter.client") is None


def test_text_is_text_long_texts_are_clipped_and_fetched_whole(relay, page):
    trap = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    long_message = "m" * 19_000 + " the end of a long message"
    long_exception = "Traceback (most recent call last):\n" + "  frame\n" * 1500 + "ValueError: deep"
    events = [
        log_event("texts", 1, trap, level=("warning", 30), client=1, rnd=1, logger="<b>app</b>"),
        log_event("texts", 2, long_message, client=2, rnd=1, exception=long_exception, level=("error", 40)),
        log_event("texts", 3, "after the rate limit", client=2, rnd=1, dropped=41),
        log_event(
            "texts",
            4,
            "boom",
            client=0,
            rnd=2,
            exception=TRACEBACK.format(message="boom"),
            level=("error", 40),
        ),
    ]
    publish(relay, events, "texts")
    # A hand-rolled trainer's record through the root path: nothing of it has the expected kind.
    odd_data = {"level": {"x": 1}, "message": ["a"], "client_id": {"y": 2}, "round": "2", "exception": 5}
    odd = {"type": "log", "data": {"run_id": "texts", **odd_data, "truncated": "no"}}
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send_frames(relay.url + "/", [odd])).result(timeout=60)
    page.goto(f"{relay.http}/#/runs/texts")
    wait(page, f"() => {LOGS} && {LOGS}.shown === 5", timeout=60)  # drawn

    # Markup in a record is text: no element made of it, nothing run.
    panel = page.get_by_test_id("log-panel")
    assert panel.locator("img, script, b:not(.exc)").count() == 0
    assert page.evaluate("() => window.pwned") is None
    trap_row = page.locator("[data-testid=log-row][data-seq='1']")
    assert trap in trap_row.inner_text() and "<b>app</b>" in trap_row.inner_text()
    trap_row.click()
    assert page.get_by_test_id("log-message").inner_text() == trap

    # A long message: the row shows its start, the detail what the page holds, then all of it.
    long_row = page.locator("[data-testid=log-row][data-seq='2']")
    assert len(long_row.inner_text()) < 600
    long_row.click()
    wait(page, f"() => {LOGS}.picked === 2")
    assert page.get_by_test_id("log-message").inner_text() == long_message[:MESSAGE_CHARS]
    assert page.get_by_test_id("log-exception").inner_text() == long_exception[-EXCEPTION_CHARS:]
    page.get_by_test_id("log-load-whole").click()
    page.get_by_test_id("log-load-whole").wait_for(state="detached")
    assert page.get_by_test_id("log-message").inner_text() == long_message
    assert page.get_by_test_id("log-exception").inner_text() == long_exception

    # The producers' rate-limit counts add up; the root record shows what it has, as text.
    assert "41 dropped by the producers' rate limits" in page.get_by_test_id("log-counts").inner_text()
    odd_record = page.evaluate(f"() => {LOGS}.records().find(r => r.seq === 5)")
    assert odd_record == {"seq": 5, "level": "?", "levelno": 0, "role": None, "clientId": None, "round": None,
                          "epoch": None, "logger": "", "message": '["a"]', "exception": "5"}  # fmt: skip


def test_the_text_held_is_bounded(relay, page):
    """Records with big exceptions: fewer than 5,000 fit the page's 4 Mi characters."""
    count = 600
    events = [
        log_event("big", i, f"{i:0100d}", level=("error", 40), client=i % 3, rnd=1, exception="x" * 12_000)
        for i in range(1, count + 1)
    ]
    publish(relay, events, "big", batch=50)  # frames under the relay's 1 MiB
    page.goto(f"{relay.http}/#/runs/big")
    wait(page, f"() => {STATE}.lastSeq === {count}", timeout=60)
    fits = MAX_TEXT_CHARS // (100 + EXCEPTION_CHARS)
    wait(page, f"() => {LOGS}.held === {fits} && {LOGS}.shown === {fits}")
    assert page.evaluate(f"() => {LOGS}.evicted") == count - fits
    assert shown_seqs(page) == list(range(count, count - fits, -1))


def test_rows_in_view_stay_put_as_newer_records_arrive(relay, page):
    publish(relay, flood("steady", 300), "first")
    page.goto(f"{relay.http}/#/runs/steady")
    wait(page, f"() => {LOGS} && {LOGS}.shown === 300", timeout=60)
    page.get_by_test_id("log-list").evaluate("(list) => { list.scrollTop = 100 * 24; }")
    wait(page, f"() => {LOGS}.top === 200")  # 300 newest first: the 101st row
    publish(relay, flood("steady", 40, first_id=301), "second")
    wait(page, f"() => {STATE}.lastSeq === 340 && {LOGS}.shown === 340")
    assert page.evaluate(f"() => {LOGS}.top") == 200
    assert str(200) in {r.get_attribute("data-seq") for r in page.locator("[data-testid=log-row]").all()}


def test_a_failed_cells_logs_finds_its_records_in_the_relay_when_the_page_no_longer_holds_them(relay, page):
    run = federated_run("evicted", rounds=3, clients=3, fail=(1, 2), logs=True)
    run += flood("evicted", MAX_RECORDS, first_id=len(run) + 1)
    publish(relay, run, "server")
    page.goto(f"{relay.http}/#/runs/evicted")
    wait(page, f"() => {STATE}.lastSeq === {len(run)} && {LOGS}.shown === {MAX_RECORDS}", timeout=60)
    stored = stored_logs(relay, "evicted")
    cell = [e["seq"] for e in reversed(stored) if e["data"].get("client_id") == 1 and e["data"]["round"] == 2]
    failure = next(e for e in stored if e["data"]["level"] == "error" and e["data"].get("client_id") == 1)
    assert failure["seq"] < stored[-MAX_RECORDS]["seq"]  # evicted from the page

    point = page.evaluate(f"() => {STATE}.health.reveal('1', 2)")
    page.mouse.click(point["x"], point["y"])
    page.get_by_test_id("health-open-log").click()
    wait(page, f"() => {LOGS}.older && {LOGS}.older.state === 'done'")
    assert page.evaluate(f"() => {LOGS}.filter") == {
        "source": "client", "client": "1", "round": 2, "minLevel": 0, "text": ""
    }  # fmt: skip
    assert shown_seqs(page) == cell and failure["seq"] in cell
