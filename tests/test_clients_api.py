"""``GET /api/runs/{id}/clients`` on a real relay: federation health read back from what the
relay stored, paged under its byte cap, kept up to date as a run goes on."""

from __future__ import annotations

import json

import pytest

from fedrelay.relay.health_page import MAX_PAGE_BYTES
from tests.support.federation_run import generated_run, publish
from tests.support.relay_process import RelayProcess


def pages(relay: RelayProcess, run_id: str, query: str = "") -> list[tuple[int, dict]]:
    """Every page, following next_cursor: (size in bytes, body)."""
    out = []
    cursor = None
    while True:
        target = f"/api/runs/{run_id}/clients?{query}" + (f"&cursor={cursor}" if cursor else "")
        status, body = relay.get(target)
        assert status == 200, body[:300]
        out.append((len(body), json.loads(body)))
        cursor = out[-1][1]["next_cursor"]
        if cursor is None:
            return out


def cells_of(page_list) -> dict[tuple[int, str], dict]:
    return {
        (rnd["round"], client): cell
        for _, page in page_list
        for rnd in page["rounds"]
        for client, cell in rnd.get("cells", {}).items()
    }


async def test_the_api_says_who_finished_failed_straggled_and_stayed_silent(relay):
    run = generated_run("api-health", clients=120, rounds=12, fail=0.04, silent=0.04, straggle=0.04, seed=7)
    await publish(relay.url, run)
    (size, page), *more = pages(relay, "api-health")
    assert not more and size <= MAX_PAGE_BYTES
    cells = cells_of([(size, page)])
    assert {key: cell["state"] for key, cell in cells.items()} == run.cells
    assert page["num_clients"] == 120 and page["num_rounds"] == 12 and not page["truncated"]
    assert page["last_seq"] == len(run.events)

    failed = next(key for key, state in run.cells.items() if state == "failed")
    cell = cells[failed]
    rnd, client = failed
    assert cell["reason"] == f"train failed: RuntimeError: CUDA out of memory (client {client}, round {rnd})"
    assert cell["detail"].endswith(f"RuntimeError: CUDA out of memory (client {client}, round {rnd})")
    assert cell["phase"] == "train" and isinstance(cell["seq"], int)

    for summary in page["rounds"]:
        n = summary["round"]
        durations = sorted(d for (r, _), d in run.durations.items() if r == n)
        mid = (durations[len(durations) // 2] + durations[(len(durations) - 1) // 2]) / 2
        assert summary["median"] == pytest.approx(mid)
        slowest = max(((c, d) for (r, c), d in run.durations.items() if r == n), key=lambda x: x[1])
        assert summary["critical_path"] == {"client_id": slowest[0], "duration": slowest[1]}
        expected = sorted((c for (r, c), s in run.cells.items() if r == n and s == "straggler"), key=int)
        assert summary["stragglers"] == expected and summary["num_stragglers"] == len(expected)
        for state in ("finished", "failed", "silent", "straggler"):
            assert summary[state] == sum(1 for (r, _), s in run.cells.items() if r == n and s == state)

    rates = {c["client_id"]: c for c in page["clients"]}
    for client_id, health in rates.items():
        mine = [s for (_, c), s in run.cells.items() if c == client_id]
        assert health["sampled"] == len(mine)
        assert health["failure_rate"] == pytest.approx(mine.count("failed") / len(mine))
        assert health["dropout_rate"] == pytest.approx(mine.count("silent") / len(mine))

    # A stricter straggler factor is the caller's to choose.
    strict = pages(relay, "api-health", "factor=1.2&min_gap=0&cells=0")[0][1]
    assert strict["straggler_factor"] == 1.2
    stragglers = sum(r["num_stragglers"] for r in page["rounds"])
    assert sum(r["num_stragglers"] for r in strict["rounds"]) > stragglers
    assert all("cells" not in r for r in strict["rounds"])


async def test_a_big_report_comes_in_pages_under_the_byte_cap(relay):
    """Long tracebacks on many failures: over the cap in all, so paged, and nothing lost."""
    run = generated_run("api-big", clients=300, rounds=10, fail=0.3, seed=3, traceback_frames=40)
    await publish(relay.url, run, batch=200)
    got = pages(relay, "api-big")
    assert len(got) >= 2
    assert all(size <= MAX_PAGE_BYTES for size, _ in got)
    assert sum(size for size, _ in got) > MAX_PAGE_BYTES
    assert {key: cell["state"] for key, cell in cells_of(got).items()} == run.cells
    assert sorted(c["client_id"] for _, p in got for c in p["clients"]) == sorted(
        {c for _, c in run.cells}, key=str
    )


async def test_a_live_run_is_folded_on_from_where_the_last_look_stopped(relay):
    run = generated_run("api-live", clients=40, rounds=6, seed=5)
    other = generated_run("api-other", clients=10, rounds=2, seed=6)
    half = next(i for i, e in enumerate(run.events) if e["type"] == "round_start" and e["data"]["round"] == 4)
    first = type(run)(run.run_id, run.events[:half])
    await publish(relay.url, first, name="live")
    page = pages(relay, "api-live")[0][1]
    assert page["num_rounds"] == 3 and page["last_seq"] == half
    assert {k: c["state"] for k, c in cells_of([(0, page)]).items()} == {
        k: s for k, s in run.cells.items() if k[0] <= 3
    }
    # Another run in between, then the rest of this one: both read right.
    await publish(relay.url, other, name="other")
    assert {k: c["state"] for k, c in cells_of(pages(relay, "api-other")).items()} == other.cells
    rest = type(run)(run.run_id, run.events[half:])
    await publish(relay.url, rest, name="live")
    page = pages(relay, "api-live")[0][1]
    assert page["last_seq"] == len(run.events)
    assert {k: c["state"] for k, c in cells_of([(0, page)]).items()} == run.cells


async def test_unknown_runs_bad_queries_and_runs_without_rounds(relay):
    assert relay.get("/api/runs/nope/clients")[0] == 404
    await publish(relay.url, generated_run("api-q", clients=6, rounds=1))
    status, body = relay.get("/api/runs/api-q/clients?factor=0.5")
    assert status == 400 and b"factor" in body
    assert relay.get("/api/runs/api-q/clients?cursor=zz")[0] == 400
    centralized = [{"type": "epoch_end", "run_id": "api-cen", "id": 1, "data": {"epoch": 1, "metrics": {}}}]
    await publish(relay.url, type(generated_run("x", clients=5, rounds=1))("api-cen", centralized), name="c")
    page = pages(relay, "api-cen")[0][1]
    assert page["clients"] == [] and page["rounds"] == [] and page["num_clients"] == 0
