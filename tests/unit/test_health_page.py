"""Pages of ``/api/runs/{id}/clients``, with no I/O: the byte cap, the cursor chain, the query."""

from __future__ import annotations

import json

import pytest

from fedrelay.federation import FederationHealth
from fedrelay.relay import health_page
from fedrelay.relay.health_page import BadQuery, encode_page, parse_query
from tests.support.federation_run import generated_run


def report_of(clients: int, rounds: int, **kwargs):
    health = FederationHealth()
    for event in generated_run("p", clients=clients, rounds=rounds, seed=2, **kwargs).events:
        health.add(event)
    return health.report()


def all_pages(report, query: dict[str, str]) -> list[dict]:
    pages = []
    cursor = None
    while True:
        q = {k: [v] for k, v in query.items()}
        if cursor is not None:
            q["cursor"] = [cursor]
        body = encode_page("p", report, parse_query(q), 7)
        pages.append((len(body), json.loads(body)))
        cursor = pages[-1][1]["next_cursor"]
        if cursor is None:
            return pages


def merged(pages) -> tuple[list[dict], dict[int, dict]]:
    clients, rounds = [], {}
    for _, page in pages:
        clients += page["clients"]
        for rnd in page["rounds"]:
            if rnd["round"] in rounds:
                assert {k: v for k, v in rnd.items() if k != "cells"} == {
                    k: v for k, v in rounds[rnd["round"]].items() if k != "cells"
                }  # a split round repeats the same summary
                rounds[rnd["round"]]["cells"].update(rnd["cells"])
            else:
                rounds[rnd["round"]] = rnd
    return clients, rounds


def test_a_small_report_is_one_page_with_everything():
    report = report_of(20, 5)
    pages = all_pages(report, {})
    assert len(pages) == 1
    page = pages[0][1]
    assert page["run_id"] == "p" and page["last_seq"] == 7 and page["num_clients"] == 20
    assert page["straggler_factor"] == 2.0 and page["straggler_min_seconds"] == 1.0
    assert [c["client_id"] for c in page["clients"]] == [c.client_id for c in report.clients]
    assert [r["round"] for r in page["rounds"]] == [1, 2, 3, 4, 5]
    assert page["rounds"][0]["cells"] == {k: c.as_json() for k, c in report.rounds[0].cells.items()}


def test_pages_stay_under_the_cap_and_chain_to_the_whole_report(monkeypatch):
    monkeypatch.setattr(health_page, "MAX_PAGE_BYTES", 16_000)
    report = report_of(300, 8, fail=0.1)
    pages = all_pages(report, {})
    assert len(pages) > 10
    assert all(size <= 16_000 for size, _ in pages)
    clients, rounds = merged(pages)
    assert clients == [c.as_json() for c in report.clients]
    assert sorted(rounds) == [r.round for r in report.rounds]
    for rnd in report.rounds:
        assert rounds[rnd.round]["cells"] == {k: c.as_json() for k, c in rnd.cells.items()}
        assert rounds[rnd.round]["threshold"] == rnd.threshold


def test_summaries_only_and_the_straggler_settings(monkeypatch):
    report = FederationHealth().report()
    assert json.loads(encode_page("p", report, parse_query({}), 0))["rounds"] == []
    health = FederationHealth()
    for event in generated_run("p", clients=30, rounds=3, seed=1).events:
        health.add(event)
    query = parse_query({"cells": ["0"], "factor": ["3"], "min_gap": ["0.5"]})
    page = json.loads(encode_page("p", health.report(query.factor, query.min_gap), query, 0))
    assert all("cells" not in r for r in page["rounds"]) and len(page["rounds"]) == 3
    assert page["straggler_factor"] == 3.0 and page["straggler_min_seconds"] == 0.5
    assert page["rounds"][0]["threshold"] == pytest.approx(3 * page["rounds"][0]["median"])


@pytest.mark.parametrize(
    "query",
    [
        {"factor": ["0.5"]},
        {"factor": ["nan"]},
        {"factor": ["x"]},
        {"min_gap": ["-1"]},
        {"min_gap": ["inf"]},
        {"cells": ["yes"]},
        {"cursor": ["nonsense"]},
        {"cursor": ["eDox"]},  # base64 of "x:1"
    ],
)
def test_a_bad_query_is_refused_with_what_to_fix(query):
    with pytest.raises(BadQuery):
        parse_query(query)
