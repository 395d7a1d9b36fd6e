"""The root path's small helpers: run affinity per host, and bounded log throttling."""

from __future__ import annotations

from fedrelay.relay.root_runs import RootRuns
from fedrelay.relay.throttle import LogThrottle, OncePer


def test_unnamed_frames_follow_the_hosts_last_named_run_while_it_runs():
    runs = RootRuns(max_hosts=2)
    running = {"7": True, "8": True}
    assert runs.unnamed("h1", running.get) == "default"
    runs.named("h1", "7")
    assert runs.unnamed("h1", running.get) == "7"
    assert runs.unnamed("h2", running.get) == "default"  # another host's run is not taken
    running["7"] = False
    assert runs.unnamed("h1", running.get) == "default"
    runs.named("h2", "8")
    runs.named("h3", "8")  # past max_hosts: h1, the least recent, is forgotten
    assert len(runs) == 2 and runs.unnamed("h1", lambda run: True) == "default"


def test_log_throttle_allows_one_line_per_key_per_interval_and_counts_the_rest():
    throttle = LogThrottle(every=60.0, max_keys=2)
    assert throttle.allow("a", 0.0) == 0
    assert throttle.allow("a", 1.0) is None and throttle.allow("a", 2.0) is None
    assert throttle.allow("b", 2.0) == 0
    assert throttle.allow("a", 61.0) == 2  # two held back since the last line
    throttle.allow("c", 62.0)
    assert len(throttle) == 2  # bounded: "b" went


def test_once_per_names_each_key_once_up_to_a_limit_then_says_so_once():
    once = OncePer(limit=2)
    assert [once.first(k) for k in ("a", "a", "b")] == [True, False, True]
    assert not once.overflowed
    assert once.first("c") and once.overflowed  # one last line, saying more are not listed
    assert not once.first("d") and not once.first("a")
