"""The sans-I/O hub, driven directly: no sockets, no disk."""

from __future__ import annotations

import pytest

from fedrelay.relay.hub import Hub, Subscription
from fedrelay.schemas.wire import Refused


def ev(run_id: str, i: int | None, kind: str = "status", **data):
    out = {"type": kind, "run_id": run_id, "data": {"message": f"m{i}", **data}}
    if i is not None:
        out["id"] = i
    return out


def publish(hub: Hub, producer: str, events: list[dict]):
    accepted = hub.accept(producer, events)
    deliveries = hub.committed(accepted.new)
    return accepted, deliveries


def delivered_to(deliveries, sub) -> list[int]:
    return [item.seq for s, items in deliveries if s is sub for item in items]


def test_seq_is_per_run_and_gap_free():
    hub = Hub()
    accepted = hub.accept("p", [ev("a", 1), ev("b", 2), ev("a", 3), ev("a", 4)])
    assert [(i.run_id, i.seq) for i in accepted.new] == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert accepted.upto == 4
    assert '"seq":3' in accepted.new[-1].body and '"producer":"p"' in accepted.new[-1].body


def test_duplicates_are_dropped_per_producer_but_other_producers_are_independent():
    hub = Hub()
    hub.accept("p", [ev("a", 1), ev("a", 2)])
    again = hub.accept("p", [ev("a", 1), ev("a", 2), ev("a", 3)])
    assert again.duplicates == 2 and [i.producer_id for i in again.new] == [3]
    other = hub.accept("q", [ev("a", 1)])
    assert other.duplicates == 0 and other.new[0].seq == 4


def test_events_without_id_are_never_deduplicated():
    hub = Hub()
    first = hub.accept("p", [ev("a", None), ev("a", None)])
    assert [i.seq for i in first.new] == [1, 2] and first.upto is None


def test_uncommitted_events_are_invisible_to_subscribers():
    hub = Hub()
    sub = Subscription(handle="s")
    hub.committed(hub.accept("p", [ev("a", 1)]).new)
    hub.subscribe(sub, "a", 1)
    pending = hub.accept("p", [ev("a", 2)])
    assert hub.runs["a"].committed_seq == 1 and hub.runs["a"].last_seq == 2
    # A second subscriber joining now must not be offered seq 2 yet.
    late = hub.subscribe(Subscription(handle="t"), "a", 0)
    assert [i.seq for i in late.backlog] == [1] and late.last_seq == 1
    assert delivered_to(hub.committed(pending.new), sub) == [2]


def test_backlog_from_ring_then_live():
    hub = Hub(replay_size=100)
    publish(hub, "p", [ev("a", i) for i in range(1, 11)])
    sub = Subscription(handle="s")
    joined = hub.subscribe(sub, "a", 4)
    assert not joined.from_store and [i.seq for i in joined.backlog] == list(range(5, 11))
    _, deliveries = publish(hub, "p", [ev("a", 11)])
    assert delivered_to(deliveries, sub) == [11]


def test_catch_up_from_store_switches_to_live_without_gap_or_duplicate():
    hub = Hub(replay_size=5)
    publish(hub, "p", [ev("a", i) for i in range(1, 21)])
    sub = Subscription(handle="s")
    joined = hub.subscribe(sub, "a", 0)
    assert joined.from_store and joined.backlog == []
    # While the subscriber pages the store, more events commit: not delivered live.
    _, deliveries = publish(hub, "p", [ev("a", i) for i in range(21, 24)])
    assert delivered_to(deliveries, sub) == []
    # Store pages reached seq 12: the ring (19..23) does not reach back yet.
    assert hub.caught_up_to(sub, "a", 12) is None
    rest = hub.caught_up_to(sub, "a", 18)
    assert [i.seq for i in rest] == [19, 20, 21, 22, 23]
    _, deliveries = publish(hub, "p", [ev("a", 24)])
    assert delivered_to(deliveries, sub) == [24]


def test_gap_when_history_was_pruned():
    hub = Hub()
    publish(hub, "p", [ev("a", i) for i in range(1, 11)])
    hub.pruned("a", 6)
    joined = hub.subscribe(Subscription(handle="s"), "a", 2)
    assert joined.gap_resume_from == 6
    assert [i.seq for i in joined.backlog] == [6, 7, 8, 9, 10]


def test_a_run_with_no_event_yet_is_waited_for_and_not_listed():
    hub = Hub()
    sub = Subscription(handle="s")
    joined = hub.subscribe(sub, "later", 0)
    assert (joined.last_seq, joined.backlog, joined.from_store) == (0, [], False)
    assert "later" not in hub.runs and "later" in hub.waiting  # no phantom run
    _, deliveries = publish(hub, "p", [ev("later", 1), ev("later", 2)])
    assert delivered_to(deliveries, sub) == [1, 2]
    assert hub.waiting == {}
    gone = Subscription(handle="g")
    hub.subscribe(gone, "never", 0)
    hub.drop(gone)
    assert hub.waiting == {}


def test_a_run_first_named_by_a_holding_report_takes_its_waiting_subscribers_along():
    """An emitter that held events before it reached the relay reports them (``holding``)
    before sending any: that creates the run, and whoever waited for it must get its events."""
    hub = Hub()
    sub = Subscription(handle="early")
    assert hub.subscribe(sub, "held", 0).last_seq == 0
    assert hub.holding("em-1", {"held": (3, 3)}) == ["held"]
    assert "held" in hub.runs and hub.waiting == {}
    _, deliveries = publish(hub, "em-1", [ev("held", i) for i in (1, 2, 3)])
    assert delivered_to(deliveries, sub) == [1, 2, 3]


def test_since_past_the_committed_seq_waits_only_for_seqs_this_relay_handed_out():
    hub = Hub()
    publish(hub, "p", [ev("a", 1), ev("a", 2)])
    pending = hub.accept("p", [ev("a", 3), ev("a", 4)])  # seqs 3 and 4 handed out, not committed
    sub = Subscription(handle="s")
    joined = hub.subscribe(sub, "a", 4)
    assert joined.last_seq == 2 and joined.backlog == []
    assert delivered_to(hub.committed(pending.new), sub) == []  # 3 and 4 are behind its since
    _, deliveries = publish(hub, "p", [ev("a", 5)])
    assert delivered_to(deliveries, sub) == [5]
    for since, run in ((6, "a"), (1, "nothing-yet")):  # seqs no event here ever had
        with pytest.raises(Refused) as ahead:
            hub.subscribe(Subscription(handle="x"), run, since)
        assert ahead.value.code == "bad_since" and "another relay" in ahead.value.detail


def test_run_tracking_takes_only_values_of_the_expected_kind():
    hub = Hub()
    seed_like = [
        {"type": "training_start", "run_id": "r", "data": {"max_epochs": 10, "experiment_name": "x" * 5000}},
        {"type": "epoch_end", "run_id": "r", "data": {"epoch": "1/2", "metrics": {"timestamp": "t"}}},
        {"type": "round_end", "run_id": "r", "data": {"round": [1], "total_rounds": "3"}},
        {"type": "early_stopping", "run_id": "r", "data": {"epoch": 4, "reason": {"why": 1}}},
        {"type": "training_end", "run_id": "r", "data": {"status": ["done"], "training_duration": "0:00:03"}},
        {"type": "custom", "run_id": "s", "data": [1, 2]},
    ]
    publish(hub, "p", seed_like)
    run = hub.runs["r"].summary(0.0, 0)
    assert run["status"] == "completed" and run["training_duration"] == "0:00:03"
    assert run["max_epochs"] == 10 and "experiment_name" not in run
    assert "epoch" not in run and "round" not in run and "num_rounds" not in run
    nothing = {"metric_name": None, "best_metric_value": None, "reason": None}
    assert run["early_stopping"] == {"epoch": 4, **nothing}
    dropped = {"type": "error", "run_id": "s", "data": {"message": "a round_end event was dropped"}}
    publish(hub, "p", [dropped])  # from /publish: an emitter reports, the run goes on
    assert hub.runs["s"].status == "running" and "dropped" in hub.runs["s"].info["last_error"]
    seed = {"type": "error", "run_id": "r", "via": "root", "data": {"error": "boom", "error_type": "x"}}
    publish(hub, "p", [seed])  # from /: a hand-rolled trainer's fatal error
    assert hub.runs["r"].status == "failed" and hub.runs["r"].info["last_error"] == "boom"
    client = {"message": "c1 died", "client_id": "c1"}
    publish(hub, "p", [{"type": "error", "run_id": "s", "via": "root", "data": client}])
    assert hub.runs["s"].status == "running"  # one client's failure is not the run's


def test_wildcard_gets_every_run_once_even_with_an_explicit_subscription():
    hub = Hub()
    publish(hub, "p", [ev("a", 1)])
    sub = Subscription(handle="s")
    hub.subscribe_all(sub)
    hub.subscribe(sub, "a", 1)
    _, deliveries = publish(hub, "p", [ev("a", 2), ev("b", 3)])
    assert [(i.run_id, i.seq) for s, items in deliveries if s is sub for i in items] == [("a", 2), ("b", 1)]


def test_legacy_subscribers_do_not_get_their_own_events_back():
    hub = Hub()
    root = Subscription(handle="root-conn", legacy=True, own_producer="anon")
    hub.subscribe_all(root)
    own = hub.accept("anon", [ev("a", None)])
    other = hub.accept("p", [ev("a", 1)])
    deliveries = hub.committed(own.new + other.new)
    assert delivered_to(deliveries, root) == [2]


def test_drop_removes_every_trace_of_a_subscriber():
    hub = Hub()
    publish(hub, "p", [ev("a", 1)])
    sub = Subscription(handle="s")
    hub.subscribe(sub, "a", 0)
    hub.subscribe_all(sub)
    hub.drop(sub)
    _, deliveries = publish(hub, "p", [ev("a", 2)])
    assert deliveries == []


def test_run_status_follows_training_start_and_end():
    hub = Hub(clock=lambda: 1000.0)
    hub.accept("p", [ev("a", 1, "training_start", training_mode="federated", num_rounds=3)])
    run = hub.runs["a"]
    assert run.status == "running" and run.info["num_rounds"] == 3
    assert run.summary(now=1000.0 + 301, stall_after=300)["status"] == "stalled"
    hub.accept("p", [{"type": "training_end", "run_id": "a", "id": 2, "data": {"status": "failed"}}])
    assert run.status == "failed"
    assert run.summary(now=5000.0, stall_after=300)["status"] == "failed"


def test_ring_is_bounded_in_characters_as_well_as_events():
    hub = Hub(replay_size=1000, replay_bytes=2000)
    publish(hub, "p", [ev("a", i, pad="x" * 300) for i in range(1, 31)])
    run = hub.runs["a"]
    assert 0 < len(run.ring) < 30
    assert run.ring_chars == sum(len(item.body) for item in run.ring) <= 2000
    assert run.ring[-1].seq == 30  # the newest are kept
    # A subscriber from before the ring pages the store first, then goes live.
    joined = hub.subscribe(Subscription(handle="s"), "a", 0)
    assert joined.from_store


def test_idle_runs_give_their_ring_back_unless_someone_follows_them():
    now = [1000.0]
    hub = Hub(clock=lambda: now[0])
    publish(hub, "p", [ev("done", 1, kind="training_end"), ev("crashed", 2), ev("followed", 3)])
    hub.subscribe(Subscription(handle="s"), "followed", 0)
    now[0] += 300
    publish(hub, "p", [ev("recent", 4)])
    now[0] += 400
    assert hub.forget_idle_rings(now[0], idle_after=600) == 2
    assert not hub.runs["done"].ring and hub.runs["done"].ring_chars == 0
    assert not hub.runs["crashed"].ring  # a run that never ended ("stalled") too
    assert len(hub.runs["followed"].ring) == 1  # a live subscriber: kept
    assert len(hub.runs["recent"].ring) == 1  # not idle long enough
    # A freed ring only means catch-up comes from the store.
    joined = hub.subscribe(Subscription(handle="late"), "done", 0)
    assert joined.from_store and joined.backlog == []


def test_an_event_that_grows_past_the_limit_once_encoded_is_refused_without_a_seq():
    hub = Hub()
    small = ev("a", 1)
    grows = ev("a", 2, value=1e15)  # 4 characters sent, 18 once re-encoded
    grows["data"]["pad"] = "x" * 60
    limit = len(hub.accept("probe", [ev("z", 1)]).new[0].body) + 80
    accepted = hub.accept("p", [small, grows, ev("a", 3)], max_body=limit)
    assert [(i.seq, i.producer_id) for i in accepted.new] == [(1, 1), (2, 3)]
    assert [(pos, exc.code) for pos, exc in accepted.too_large] == [(1, "too_large")]
    assert accepted.upto == 3  # covered by the ack: refused, not pending


def test_hello_position_is_what_is_committed_not_what_is_accepted():
    hub = Hub()
    pending = hub.accept("p", [ev("a", 1), ev("a", 2)])
    assert hub.producers["p"] == 2 and "p" not in hub.stored_positions
    hub.committed(pending.new[:1])
    assert hub.stored_positions["p"] == 1
    hub.committed(pending.new[1:])
    assert hub.stored_positions["p"] == 2
