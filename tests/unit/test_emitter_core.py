"""The emitter's I/O-free core, driven directly: no sockets, no threads, no disk.

Every test feeds events (emits, hello, acks, errors, failed connects, segments read back) and
checks the actions the core answers with, the way the thread shell would carry them out.
"""

from __future__ import annotations

import json
from itertools import count

import pytest

from fedrelay.emitters.core import (
    MAX_SPANS,
    OVERDUE,
    SILENT,
    SPOOL_RETRY,
    UNREACHABLE,
    DeleteSegments,
    EmitterCore,
    GiveUp,
    HeldRuns,
    MarkReach,
    ReadSegment,
    Send,
    SendControl,
    TakeName,
    Wait,
    WriteSegments,
    backoff_delay,
)
from fedrelay.emitters.spool import Segment

HELLO = {
    "op": "hello",
    "producer": "p",
    "last_id": None,
    "max_frame_bytes": 1_000_000,
    "max_events_per_frame": 1000,
}


def make_core(**kwargs) -> EmitterCore:
    names = count(1)
    kwargs.setdefault("jitter", lambda: 1.0)  # the upper end of the jitter: exact delays
    return EmitterCore("p", fresh_name=lambda: f"p-{next(names)}", **kwargs)


class Emits:
    """Events into a core, with ids as Emitter.emit() assigns them."""

    def __init__(self, core: EmitterCore) -> None:
        self.core = core
        self.next_id = 1
        self.writes: list[WriteSegments] = []

    def __call__(self, n: int = 1, run: str = "r", now: float = 0.0, **data) -> None:
        for _ in range(n):
            write = self.core.take(self.next_id, 1.0, "status", run, None, {"i": self.next_id, **data}, now)
            self.next_id += 1
            if write is not None:
                self.writes.append(write)


def connect(core: EmitterCore, now: float = 0.0, **hello) -> list:
    core.connecting(now)
    return core.hello({**HELLO, **hello}, now)


def sends(core: EmitterCore) -> list[Send]:
    """Every frame the core lets out now (no spool reads expected)."""
    out = []
    while (action := core.next_send()) is not None:
        assert isinstance(action, Send), action
        out.append(action)
    return out


def ids_of(send: Send) -> list[int]:
    return [e["id"] for e in json.loads(send.frame)]


def write(core: EmitterCore, action: WriteSegments, *, fail_after: int | None = None, now: float = 0.0):
    """What the shell does with a WriteSegments: segments named as the spool names them."""
    written = []
    for i, chunk in enumerate(action.chunks):
        if fail_after is not None and i >= fail_after:
            break
        written.append(Segment.named(chunk[0][0], chunk[-1][0], len(chunk)))
    core.spooled(written, fail_after is not None, now)
    return {seg.name: chunk for seg, chunk in zip(written, action.chunks, strict=False)}


# -- ids, acks, rewind ----------------------------------------------------------------------------


def test_frames_carry_ids_in_order_and_acks_settle_them():
    core = make_core()
    emit = Emits(core)
    emit(5)
    assert core.next_send() is None  # no session yet
    assert connect(core) == [MarkReach(True)]
    (frame,) = sends(core)
    assert ids_of(frame) == [1, 2, 3, 4, 5]
    assert (frame.last, frame.count) == (5, 5)
    assert core.settled == 0
    core.received({"op": "ack", "upto": 3})
    assert core.settled == 3 and [e[0] for e in core.inflight] == [4, 5]
    core.received({"op": "ack", "upto": 5})
    assert core.settled == 5 and not core.inflight
    assert core.counts["acked"] == 5 and core.counts["sent"] == 5 and core.counts["frames"] == 1


def test_a_lost_session_resends_everything_not_acked_from_the_oldest():
    core = make_core()
    emit = Emits(core)
    emit(4)
    connect(core)
    sends(core)
    core.received({"op": "ack", "upto": 2})
    emit(2)  # queued, not sent yet, when the connection drops
    assert core.session_ended(1.0, failed=True) == [MarkReach(False), Wait(0.1)]
    connect(core, now=2.0)
    assert [ids_of(s) for s in sends(core)] == [[3, 4, 5, 6]]  # in flight first, then the rest
    assert core.counts["reconnects"] == 1


def test_hello_last_id_counts_as_an_ack_when_the_name_is_ours():
    core = make_core()
    emit = Emits(core)
    emit(3)
    connect(core)
    sends(core)  # sent 1..3; the relay stored them, the ack was lost with the connection
    core.session_ended(1.0, failed=True)
    actions = connect(core, last_id=3)
    assert actions == [MarkReach(True)]
    assert core.settled == 3 and core.acked == 3 and sends(core) == []


def test_the_window_of_unacked_events_is_bounded():
    core = make_core(max_buffer=10, batch_size=4)
    emit = Emits(core)
    emit(10)
    connect(core)
    assert [s.count for s in sends(core)] == [4, 4, 2]
    emit(5)  # over the window of 10 unacked: wait for acks
    assert sends(core) == []
    core.received({"op": "ack", "upto": 4})
    assert [ids_of(s) for s in sends(core)] == [[11, 12, 13, 14]]


# -- the spool ------------------------------------------------------------------------------------


def test_past_max_buffer_the_oldest_half_goes_to_disk_and_is_sent_first():
    core = make_core(max_buffer=10, batch_size=3)
    emit = Emits(core)
    emit(11)
    (spill,) = emit.writes
    assert [[e[0] for e in chunk] for chunk in spill.chunks] == [[1, 2, 3], [4, 5, 6]]
    files = write(core, spill)
    assert [s.name for s in core.segments] == list(files)
    assert [e[0] for e in core.unsent] == [7, 8, 9, 10, 11]
    assert core.settled == 0 and core.counts["spooled"] == 6
    connect(core)
    read = core.next_send()
    assert read == ReadSegment(core.segments[0])
    core.segment_loaded(read.segment, files[read.segment.name])
    assert ids_of(core.next_send()) == [1, 2, 3]
    read = core.next_send()
    core.segment_loaded(read.segment, files[read.segment.name])
    assert ids_of(core.next_send()) == [4, 5, 6]
    assert [ids_of(s) for s in sends(core)] == [[7, 8, 9], [10, 11]]
    delete = core.received({"op": "ack", "upto": 5})
    assert delete == [DeleteSegments([Segment.named(1, 3, 3)])]
    assert core.settled == 5  # a partly acked segment: settled up to the ack
    assert core.received({"op": "ack", "upto": 11}) == [DeleteSegments([Segment.named(4, 6, 3)])]
    assert core.counts["acked"] == 11 and core.settled == 11


def test_a_failed_spool_write_keeps_order_retries_later_and_drops_the_oldest_past_the_bound():
    core = make_core(max_buffer=4, batch_size=2)
    emit = Emits(core)
    connect(core)
    emit(3)
    sends(core)  # 1..3 in flight
    emit(2, now=10.0)  # 5 in memory: spill 3 (1..3 from inflight), the disk takes one chunk
    (spill,) = emit.writes
    write(core, spill, fail_after=1, now=10.0)
    assert [s.name for s in core.segments] == [Segment.named(1, 2, 2).name]
    assert [e[0] for e in core.inflight] == [3] and [e[0] for e in core.unsent] == [4, 5]
    assert core.counts["errors"] == 1 and core.spool_retry_at == 10.0 + SPOOL_RETRY
    emit(1, now=10.5)  # max_buffer in memory: nothing to do
    assert len(emit.writes) == 1 and core.counts["dropped"] == 0
    emit(2, now=10.6)  # over it within the retry pause: no write, the oldest are dropped
    assert len(emit.writes) == 1 and core.counts["dropped"] == 2
    assert not core.inflight and [e[0] for e in core.unsent] == [5, 6, 7, 8]
    emit(1, now=11.5)  # the pause is over: spill again
    assert len(emit.writes) == 2


def test_leftovers_and_settled_account_for_a_write_in_progress():
    core = make_core()
    emit = Emits(core)
    emit(3)
    spill = core.leftovers(0.0)
    assert [e[0] for chunk in spill.chunks for e in chunk] == [1, 2, 3]
    assert core.settled == 0  # being written: still pending
    assert not core.all_on_disk()
    write(core, spill)
    assert core.all_on_disk() and core.settled == 0 and core.leftovers(0.0) is None


def test_an_unreadable_segment_is_given_up_on_and_the_rest_goes_on():
    core = make_core(max_buffer=4, batch_size=2)
    emit = Emits(core)
    emit(5)
    files = write(core, emit.writes[0])
    connect(core)
    bad = core.next_send().segment
    core.segment_unreadable(bad)
    assert core.counts["bad_segments"] == 1
    read = core.next_send()
    core.segment_loaded(read.segment, files[read.segment.name])
    assert [ids_of(s) for s in [core.next_send(), *sends(core)]] == [[3], [4, 5]]
    core.received({"op": "ack", "upto": 5})
    assert core.settled == 5


# -- frame limits ---------------------------------------------------------------------------------


def test_frames_follow_the_relays_limits_and_an_oversize_event_becomes_an_error_event():
    core = make_core()
    emit = Emits(core)
    emit(6, message="x" * 100)
    emit(1, message="y" * 5000)
    connect(core, max_frame_bytes=4096, max_events_per_frame=5)
    frames = sends(core)
    assert [ids_of(s) for s in frames] == [[1, 2, 3, 4, 5], [6, 7]]
    stand_in = json.loads(frames[1].frame)[1]
    assert (
        stand_in["type"] == "error"
        and stand_in["id"] == 7
        and "limit of 2048 bytes" in stand_in["data"]["message"]
    )
    assert core.counts["oversize"] == 1
    core.session_ended(1.0, failed=True)
    connect(core, max_frame_bytes=4096, max_events_per_frame=5)
    sends(core)
    assert core.counts["oversize"] == 1  # fitted again on resend, counted once


def test_a_frame_level_refusal_or_a_1009_close_halves_the_frames():
    core = make_core(batch_size=8)
    connect(core, max_frame_bytes=None, max_events_per_frame=None)
    assert core.received({"op": "error", "code": "too_many_events", "detail": "x"}) == [Wait(0.0)]
    assert core.batch == 4
    core.session_ended(1.0, failed=True, close_code=1009)
    assert core.batch == 2 and core.frame_bytes == 250_000
    assert core.received({"op": "error", "code": "invalid_event", "id": 3, "detail": "x"}) == []
    assert core.counts["refused"] == 2


# -- backoff --------------------------------------------------------------------------------------


def test_backoff_schedule_doubles_from_a_tenth_of_a_second_up_to_the_cap():
    schedule = [backoff_delay(n, 5.0, 1.0) for n in range(1, 10)]
    assert schedule == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert backoff_delay(0, 5.0, 1.0) == 0.0
    assert backoff_delay(3, 5.0, 0.0) == pytest.approx(0.2)  # jitter scales to [0.5, 1]
    assert backoff_delay(40, 30.0, 1.0) == 30.0  # no overflow for long outages


def test_failed_connects_back_off_and_give_up_after_the_limit():
    core = make_core(give_up_after=3)
    delays = []
    for now in (0.0, 1.0):
        core.connecting(now)
        actions = core.connect_failed(now)
        assert actions[0] == MarkReach(False)
        delays.append(actions[-1])
    assert delays == [Wait(pytest.approx(0.1)), Wait(pytest.approx(0.2))]
    assert core.connect_failed(2.0)[-1] == GiveUp()


def test_sessions_that_keep_failing_back_off_unless_they_made_progress():
    core = make_core()
    emit = Emits(core)
    waits = []
    for _ in range(3):
        connect(core)
        waits.append(core.session_ended(1.0, failed=True)[-1])
    assert waits == [Wait(pytest.approx(0.1)), Wait(pytest.approx(0.2)), Wait(pytest.approx(0.4))]
    emit(1)
    connect(core)
    sends(core)
    core.received({"op": "ack", "upto": 1})
    assert core.session_ended(2.0, failed=True)[-1] == Wait(pytest.approx(0.1))


# -- producer names -------------------------------------------------------------------------------


def test_hello_ahead_of_what_this_emitter_sent_takes_a_fresh_name():
    core = make_core()
    emit = Emits(core)
    emit(2)
    actions = connect(core, last_id=7)  # another process used "p" up to id 7
    assert actions[0] == TakeName("p", "p-1", actions[0].reason) and actions[1] == Wait(0.0)
    assert "ids up to 7" in actions[0].reason
    assert core.producer == "p-1" and core.counts["renamed"] == 1 and core.acked == 0
    assert connect(core, last_id=None) == [MarkReach(True)]
    assert ids_of(sends(core)[0]) == [1, 2]


def test_a_mark_is_recorded_before_ids_pass_it_and_covers_what_an_adopter_sees():
    core = make_core(max_buffer=10, batch_size=4)
    emit = Emits(core)
    emit(4)
    connect(core)
    (first,) = sends(core)
    assert first.mark == 14  # the last id plus one window
    emit(4)
    assert sends(core)[0].mark is None  # still under the mark
    core.session_ended(1.0, failed=True)
    assert connect(core, last_id=8) == [MarkReach(True)]  # 8 <= 14: our own events, kept
    assert core.producer == "p"


def test_an_adopted_spool_keeps_its_name_when_the_relay_is_within_its_mark():
    core = make_core()
    core.adopt([Segment.named(1, 3, 3)], max_sent=1003)
    assert core.drained_upto == 3 and core.settled == 0
    assert connect(core, last_id=3) == [MarkReach(True), DeleteSegments([Segment.named(1, 3, 3)])]
    assert core.producer == "p" and core.settled == 3


def test_producer_in_use_for_a_name_never_sent_under_takes_a_fresh_name_at_once():
    core = make_core()
    Emits(core)(3)
    actions = core.hello({"op": "error", "code": "producer_in_use", "stale_after": 40, "detail": "x"}, 0.0)
    assert isinstance(actions[0], TakeName) and actions[1] == Wait(0.0)
    assert core.producer == "p-1"


def test_producer_in_use_for_a_name_we_sent_under_is_retried_until_stale_after():
    core = make_core()
    emit = Emits(core)
    emit(3)
    connect(core)
    sends(core)  # sent under "p"; the connection is cut before the ack
    core.session_ended(1.0, failed=True)
    in_use = {"op": "error", "code": "producer_in_use", "stale_after": 10, "detail": "x"}
    assert core.hello(in_use, 2.0) == [Wait(pytest.approx(0.1))]
    assert core.hello(in_use, 5.0) == [Wait(pytest.approx(0.2))]
    assert core.hello(in_use, 11.9) == [Wait(pytest.approx(0.4))]
    assert core.producer == "p"
    actions = core.hello(in_use, 12.0)  # 10 s after the first refusal: someone else has it
    assert isinstance(actions[0], TakeName) and core.producer == "p-1"
    connect(core, now=12.1)
    assert ids_of(sends(core)[0]) == [1, 2, 3]  # everything not acked, under the new name


def test_producer_in_use_for_an_adopted_spool_that_was_sent_is_retried():
    core = make_core()
    core.adopt([Segment.named(1, 2, 2)], max_sent=1002)
    in_use = {"op": "error", "code": "producer_in_use", "detail": "x"}  # no stale_after: 40 s
    assert isinstance(core.hello(in_use, 0.0)[0], Wait)
    assert isinstance(core.hello(in_use, 39.0)[0], Wait)
    assert isinstance(core.hello(in_use, 40.0)[0], TakeName)


def test_producer_conflict_resends_the_rest_under_a_fresh_name():
    core = make_core()
    emit = Emits(core)
    emit(6)
    connect(core)
    sends(core)
    assert core.received({"op": "ack", "upto": 3}) == []
    actions = core.received({"op": "error", "code": "producer_conflict", "id": 4, "detail": "x"})
    assert isinstance(actions[0], TakeName) and actions[1] == Wait(0.0)
    assert "conflict at id 4" in actions[0].reason
    assert core.counts["refused"] == 0 and core.acked == 3
    connect(core)
    assert ids_of(sends(core)[0]) == [4, 5, 6]


# -- the holding report (decision B) ----------------------------------------------------------------


def test_holding_reports_per_run_what_is_not_acked_once_per_session_and_only_when_accepted():
    core = make_core()
    emit = Emits(core)
    emit(3, run="a")
    emit(2, run="b")
    emit(1, run="a")
    connect(core, last_id=None)
    assert core.holding() is None  # this relay does not take it
    core.session_ended(1.0, failed=True)
    connect(core, last_id=None, accepts=["holding"])
    report = core.holding()
    assert isinstance(report, SendControl)
    assert json.loads(report.frame) == {
        "op": "holding",
        "runs": {"a": {"count": 4, "upto": 6}, "b": {"count": 2, "upto": 5}},
    }
    assert core.holding() is None  # once per session
    sends(core)
    core.received({"op": "ack", "upto": 4})
    core.session_ended(2.0, failed=True)
    connect(core, accepts=["holding"])
    assert json.loads(core.holding().frame)["runs"] == {
        "a": {"count": 1, "upto": 6},
        "b": {"count": 1, "upto": 5},
    }
    core.received({"op": "ack", "upto": 6})
    core.session_ended(3.0, failed=True)
    connect(core, accepts=["holding"])
    assert core.holding() is None  # nothing held: nothing said


def test_holding_reads_an_adopted_spool_first_and_skips_what_hello_acked():
    core = make_core()
    segment = Segment.named(1, 4, 4)
    core.adopt([segment], max_sent=1004)
    connect(core, last_id=2, accepts=["holding"])
    assert core.holding() == ReadSegment(segment)
    lines = [(i, f'{{"type":"status","run_id":"r9","id":{i},"data":{{}}}}') for i in range(1, 5)]
    core.segment_loaded(segment, lines)
    assert json.loads(core.holding().frame)["runs"] == {"r9": {"count": 2, "upto": 4}}


def test_held_runs_forget_given_up_ids_and_stop_past_their_bound():
    held = HeldRuns()
    for i in range(1, 11):
        held.add(i, "a")
    held.discard(3, 4)
    assert held.summary() == {"a": {"count": 8, "upto": 10}} and len(held.spans) == 2
    held.insert([["z", -5, -1]])
    assert held.spans[0][0] == "z"
    held = HeldRuns()
    for i in range(MAX_SPANS + 1):
        held.add(i + 1, "a" if i % 2 else "b")
    assert not held.known and not held.spans


def test_dropped_events_leave_the_holding_report():
    core = make_core(max_buffer=2)
    emit = Emits(core)
    core.spool_retry_at = 100.0  # the spool is failing: no write now
    emit(5)
    assert core.counts["dropped"] == 3
    connect(core, accepts=["holding"])
    assert json.loads(core.holding().frame)["runs"] == {"r": {"count": 2, "upto": 5}}


# -- reachability -----------------------------------------------------------------------------------


def test_waiting_pays_off_only_while_the_relay_may_be_reached():
    core = make_core(reach_timeout=1.0, now=100.0)
    assert core.worth_waiting(100.5)  # the first connection's outcome is not known yet
    core.connecting(100.2)
    assert core.reach_deadline() == pytest.approx(101.2)
    assert not core.worth_waiting(101.3)  # past the budget: a host that drops packets
    assert core.connect_failed(101.5)[0] == MarkReach(False)
    assert not core.worth_waiting(101.6) and core.reach_deadline() is None
    assert connect(core, now=103.0) == [MarkReach(True)]
    assert core.worth_waiting(500.0)
    assert core.session_ended(600.0, failed=True)[0] == MarkReach(False)
    assert not core.worth_waiting(600.1)


def test_a_fresh_process_trusts_the_shared_mark_until_it_connects_itself():
    core = make_core(now=0.0)
    core.shared_mark(True)
    assert not core.worth_waiting(0.0)
    assert connect(core, now=0.5) == [MarkReach(True)]  # clears the mark for the next processes
    assert core.worth_waiting(0.6)
    fresh = make_core(now=0.0)
    fresh.shared_mark(False)
    assert fresh.worth_waiting(0.0)


def test_a_connect_nothing_answers_stops_waits_after_the_connect_budget_and_loses_nothing():
    core = make_core(reach_timeout=1.0, connect_budget=0.01, now=100.0)
    emit = Emits(core)
    emit(3, now=100.0)
    core.connecting(100.0)
    assert core.not_worth_waiting(100.05) is None, "no connect pending yet: the first attempt's budget"
    core.dialing(100.1)  # name resolved, TLS set up: the SYN leaves now
    assert core.reach_deadline() == pytest.approx(100.11), "the connect budget, not reach_timeout"
    assert core.not_worth_waiting(100.105) is None
    assert core.not_worth_waiting(100.11) == SILENT, "a host that drops packets: stop waiting"
    assert core.not_worth_waiting(100.11, answered=True) is None, "answered, not reported yet"
    assert core.settled == 0 and core.reach == "unknown", "nothing settled, nothing called down yet"
    leftovers = core.leftovers(100.12)
    assert isinstance(leftovers, WriteSegments)
    assert [e[0] for chunk in leftovers.chunks for e in chunk] == [1, 2, 3], "all of it to the spool"
    assert core.connect_failed(105.1)[0] == MarkReach(False), "the connect timed out: known down"
    assert core.not_worth_waiting(105.2) == UNREACHABLE


def test_once_the_tcp_connect_is_answered_waits_go_on_up_to_reach_timeout():
    """A relay that is there but slow (a TLS handshake, a busy relay's upgrade) is waited for."""
    core = make_core(reach_timeout=1.0, connect_budget=0.01, now=0.0)
    core.connecting(0.0)
    core.dialing(0.0)
    core.transport_connected(0.004)
    assert core.transport and core.reach_deadline() == pytest.approx(1.0)
    assert core.not_worth_waiting(0.5) is None, "past the connect budget, but something answered"
    assert core.not_worth_waiting(1.0) == OVERDUE
    assert connect(core, now=1.2) == [MarkReach(True)]
    assert core.not_worth_waiting(1.3) is None and core.reach_deadline() is None


def test_the_connect_budget_applies_to_each_address_and_not_between_them():
    core = make_core(urls=("ws://a", "ws://b"), reach_timeout=1.0, connect_budget=0.01, now=0.0)
    core.connecting(0.0)
    core.dialing(0.0)
    core.connect_failed(0.001)  # ws://a refused at once; ws://b is left
    assert not core.transport and core.dial_started is None
    assert core.not_worth_waiting(0.05) is None, "backing off before ws://b: reach_timeout runs"
    core.dialing(0.1)
    assert core.not_worth_waiting(0.2) == SILENT, "ws://b drops packets"
    core.connect_failed(5.1)
    assert core.not_worth_waiting(5.2) == UNREACHABLE
    core.dialing(5.3)
    core.transport_connected(5.3)
    connect(core, now=5.4)
    core.session_ended(9.0, failed=True)  # lost: moving on, and the budget applies to the next dial
    assert core.not_worth_waiting(9.0) is None and core.reach_deadline() == pytest.approx(10.0)
    core.dialing(9.1)
    assert core.reach_deadline() == pytest.approx(9.11)


# -- several addresses ------------------------------------------------------------------------------


def test_a_first_address_that_refuses_moves_on_without_calling_the_relay_unreachable():
    core = make_core(urls=("ws://a", "ws://b"), reach_timeout=1.0, now=0.0)
    assert core.url == "ws://a"
    core.connecting(0.0)
    assert core.connect_failed(0.1) == [Wait(pytest.approx(0.1))], "no mark: ws://b is left to try"
    assert core.url == "ws://b" and core.worth_waiting(0.5), "the first connection's budget still runs"
    core.connecting(0.2)
    assert core.reach_deadline() == pytest.approx(1.0), "counted from the first attempt, not this one"
    assert connect(core, now=0.3) == [MarkReach(True)]
    assert core.url == "ws://b"


def test_every_address_failing_marks_the_relay_unreachable_and_gives_up_in_rounds():
    core = make_core(urls=("ws://a", "ws://b"), give_up_after=2)
    outcomes = [core.connect_failed(float(i)) for i in range(4)]
    assert outcomes[0] == [Wait(pytest.approx(0.1))]
    assert outcomes[1] == [MarkReach(False), Wait(pytest.approx(0.1))], "a whole round failed"
    assert outcomes[2] == [MarkReach(False), Wait(pytest.approx(0.2))]
    assert outcomes[3] == [MarkReach(False), GiveUp()], "two rounds of the list"
    assert not core.worth_waiting(10.0)


def test_a_lost_session_moves_to_the_next_address_and_resends_from_the_last_ack():
    core = make_core(urls=("ws://a", "ws://b"), reach_timeout=1.0)
    emit = Emits(core)
    emit(6)
    connect(core, now=1.0)
    sends(core)
    core.received({"op": "ack", "upto": 2})
    assert core.session_ended(5.0, failed=True) == [Wait(pytest.approx(0.1))]
    assert core.url == "ws://b"
    assert core.worth_waiting(5.9) and not core.worth_waiting(6.1), "reach_timeout from the loss"
    connect(core, now=5.2, last_id=None)  # ws://b has nothing from us (another relay's store)
    assert [ids_of(s) for s in sends(core)] == [[3, 4, 5, 6]]
    core.received({"op": "ack", "upto": 6})
    assert core.settled == 6


def test_a_node_of_the_same_relay_that_stored_more_than_was_acked_drops_it_through_hello():
    core = make_core(urls=("ws://a", "ws://b"))
    emit = Emits(core)
    emit(5)
    connect(core)
    sends(core)
    core.received({"op": "ack", "upto": 2})
    core.session_ended(1.0, failed=True)  # ws://a stored 1..4 but died before acking 3, 4
    connect(core, now=2.0, last_id=4)
    assert [ids_of(s) for s in sends(core)] == [[5]] and core.settled == 4


def test_a_working_address_is_kept_and_sessions_left_on_purpose_do_not_switch():
    core = make_core(urls=("ws://a", "ws://b"))
    emit = Emits(core)
    core.connect_failed(0.0)
    connect(core, now=1.0)
    assert core.url == "ws://b"
    emit(1)
    sends(core)
    assert isinstance(core.received({"op": "error", "code": "producer_conflict", "id": 1})[0], TakeName)
    assert core.session_ended(2.0, failed=False) == [] and core.url == "ws://b"
    core.connecting(3.0)
    assert core.hello({"op": "error", "code": "producer_in_use"}, 3.0) and core.url == "ws://b"
    connect(core, now=4.0)
    core.session_ended(5.0, failed=True)
    assert core.url == "ws://a", "round robin: after the last address, the first again"
