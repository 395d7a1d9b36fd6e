"""Soak: a 1,000-subscriber run and 100 more runs at once, with slow consumers, for ~60 s.

Marked ``soak``: left out of ``make test`` (``-m soak`` runs it; bench/soak.py runs the same load
for longer, with a results table). The check of its per-subscriber stream test runs always.

A relay that passes every short test can still fail over time: memory that grows per event
or per connection, fds not closed, a slow consumer that holds up the others. This runs the
load of ``soakload.py`` against a real relay process (``FEDRELAY_RELIABILITY_SCALE``
multiplies the duration) and asserts what must hold however fast the machine is: every
normal subscriber gets every event of its run exactly once, in seq order; RSS is flat after
the warm-up; fds return to their idle count; every slow consumer is cut (1013) and no one
else. Latency is measured and recorded, never asserted: speed belongs in ``bench/``.
"""

from __future__ import annotations

import pytest
import uvloop

from tests.reliability.report import record, scale
from tests.reliability.soakload import (
    FD_MARGIN,
    SoakConfig,
    SoakSubscriber,
    raise_fd_limit,
    relay_args,
    run_soak,
)


@pytest.mark.soak
@pytest.mark.timeout(int(60 + 100 * scale()))
def test_soak_fanout_many_runs_and_slow_consumers(relay_factory) -> None:
    raise_fd_limit()  # the relay inherits it: 1,300 sockets
    duration = 60.0 * scale()
    cfg = SoakConfig(duration_s=duration, warmup_s=15.0, window_s=min(60.0, 10.0 * scale()))
    relay = relay_factory(*relay_args(cfg))
    assert relay.proc is not None and relay.log_path is not None
    result = uvloop.run(run_soak(cfg, relay.port, relay.proc.pid, relay.log_path))
    exit_code = relay.stop()
    record("soak", **result.figures(), rss_growth_mib=round(result.rss_growth_mib, 2))

    assert result.problems == [], result.problems
    assert result.events_delivered == result.events_expected > 0
    assert result.lost == 0 and result.duplicated == 0 and result.foreign == 0
    assert result.normal_closed == 0, "a subscriber that kept reading was closed"
    assert result.slow_cut == result.slow_consumers == cfg.never_readers + cfg.slow_readers
    assert result.rss_growth_mib <= result.rss_allowed_mib, "relay memory grew after warm-up"
    assert result.fds_end <= result.fds_idle + FD_MARGIN, (
        f"fds {result.fds_idle} idle -> {result.fds_end} after"
    )
    assert exit_code == 0, "the relay did not store everything it accepted"


def ws_text(payload: bytes) -> bytes:
    """An unmasked server text frame, as the relay sends them."""
    size = len(payload)
    header = bytes((0x81, size)) if size < 126 else bytes((0x81, 126)) + size.to_bytes(2, "big")
    return header + payload


async def test_stream_check_counts_gaps_duplicates_and_other_runs() -> None:
    """The soak's per-subscriber check must be able to fail: feed it a broken stream."""
    sub = SoakSubscriber(1, "r1", latency=True)
    sub._handshaking = False  # frames only: no socket behind this one
    frames = [
        b'{"op":"subscribed","run_id":"r1","since":0,"last_seq":0}',
        b'[{"run_id":"r1","data":{"sent_ns":5},"seq":1},{"run_id":"r1","data":{"sent_ns":0},"seq":2}]',
        b'{"run_id":"r1","seq":2}',  # duplicate
        b'{"run_id":"r1","seq":5}',  # 3 and 4 missing
        b'{"run_id":"r2","seq":6}',  # another run's event
    ]
    sub.data_received(b"".join(ws_text(f) for f in frames))
    assert (sub.count, sub.last_seq) == (5, 6)
    assert (sub.duplicates, sub.missing, sub.foreign) == (1, 2, 1)
    assert sub.subscribed.done() and sub.other_frames == 1
    assert sub.latencies is not None and list(sub.latencies[0::2]) == [5]  # sent_ns 0 = not sampled
