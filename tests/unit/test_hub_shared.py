"""The hub of a node on a shared log (PostgreSQL): no seqs of its own, state folded from commits."""

from __future__ import annotations

import json
from dataclasses import replace

from fedrelay.relay.hub import Hub, Subscription, with_seq


def ev(run_id: str, i: int, kind: str = "status", **data):
    return {"type": kind, "run_id": run_id, "id": i, "timestamp": None, "data": {"message": f"m{i}", **data}}


def numbered(items, first: int):
    """What the database makes of accepted events: seqs from ``first`` on, spliced into the body."""
    return [replace(item, seq=first + k, body=with_seq(item.body, first + k)) for k, item in enumerate(items)]


def test_accept_hands_out_no_seq_and_creates_no_run():
    hub = Hub(assigns_seqs=False)
    accepted = hub.accept("p", [ev("a", 1), ev("a", 2)])
    assert [item.seq for item in accepted.new] == [0, 0]
    assert all('"seq"' not in item.body for item in accepted.new)
    assert hub.runs == {}
    body = json.loads(with_seq(accepted.new[1].body, 7))
    assert (body["seq"], body["id"], body["producer"]) == (7, 2, "p")


def test_commits_from_any_node_create_and_fold_runs_and_wake_waiting_subscribers():
    hub = Hub(assigns_seqs=False)
    sub = Subscription(handle="s")
    joined = hub.subscribe(sub, "a", 0)
    assert joined.last_seq == 0 and "a" in hub.waiting
    mine = hub.accept("p", [ev("a", 1)]).new
    other_node = Hub(assigns_seqs=False).accept("q", [ev("a", 1, "training_end", status="failed")]).new
    deliveries = hub.committed(numbered(mine, 1)) + hub.committed(numbered(other_node, 2))
    assert [item.seq for s, items in deliveries if s is sub for item in items] == [1, 2]
    run = hub.runs["a"]
    assert (run.committed_seq, run.last_seq, run.status) == (2, 2, "failed")
    assert hub.stored_positions == {"p": 1, "q": 1} and hub.producers["q"] == 1  # q's ids are used


def test_a_since_past_what_this_node_has_seen_waits_for_it():
    hub = Hub(assigns_seqs=False)
    hub.committed(numbered(hub.accept("p", [ev("a", 1)]).new, 1))
    sub = Subscription(handle="s")
    hub.subscribe(sub, "a", 5)  # handed out by another node: not refused
    items = numbered(hub.accept("p", [ev("a", i) for i in range(2, 8)]).new, 2)
    deliveries = hub.committed(items)
    assert [item.seq for s, got in deliveries if s is sub for item in got] == [6, 7]
