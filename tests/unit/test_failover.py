"""The failover state shared by every client: which of a relay's addresses to use, and when to move."""

from __future__ import annotations

import pytest

from fedrelay.failover import Failover, backoff_delay, parse_urls


def relays(*urls: str) -> Failover:
    return Failover(urls, first_delay=0.1, max_delay=5.0, jitter=lambda: 1.0)


def test_addresses_come_comma_separated_or_as_a_list_and_each_counts_once():
    assert parse_urls("ws://a:1, ws://b:2,,ws://a:1 ") == ("ws://a:1", "ws://b:2")
    assert parse_urls(["ws://a:1", "ws://b:2,ws://c:3", " "]) == ("ws://a:1", "ws://b:2", "ws://c:3")
    assert parse_urls("ws://a:1") == ("ws://a:1",)
    assert parse_urls(None) == parse_urls("") == parse_urls([]) == ()
    with pytest.raises(ValueError):
        Failover((), first_delay=0.1, max_delay=1.0)


def test_a_working_address_is_kept_and_a_failure_moves_to_the_next_round_robin():
    failover = relays("a", "b", "c")
    assert failover.current == "a"
    failover.connected()
    assert failover.current == "a", "no switch while it works"
    failover.failed(progress=True)
    assert failover.current == "b"
    failover.connected()
    failover.failed(progress=True)
    failover.failed()
    assert failover.current == "a", "after the last comes the first again"


def test_backoff_counts_rounds_of_the_list_so_one_address_behaves_as_before():
    single = relays("a")
    assert [single.failed() for _ in range(4)] == [pytest.approx(d) for d in (0.1, 0.2, 0.4, 0.8)]
    pair = relays("a", "b")
    assert [pair.failed() for _ in range(6)] == [pytest.approx(d) for d in (0.1, 0.1, 0.2, 0.2, 0.4, 0.4)]
    assert pair.failed(progress=True) == pytest.approx(0.1), "a session that made progress starts over"
    assert backoff_delay(40, 0.1, 5.0, 1.0) == 5.0 and backoff_delay(0, 0.1, 5.0, 1.0) == 0.0


def test_the_relay_is_unreachable_only_once_every_address_failed_since_the_last_connection():
    failover = relays("a", "b")
    failover.failed()
    assert not failover.all_failed and failover.rounds_failed == 0
    failover.failed()
    assert failover.all_failed and failover.rounds_failed == 1
    failover.connected()
    assert not failover.all_failed and failover.rounds_failed == 0
    failover.failed(), failover.failed(), failover.failed(), failover.failed()
    assert failover.rounds_failed == 2
