"""A real emitter given two nodes of one PostgreSQL-backed relay: one is SIGKILLed mid-stream.

With two SQLite relays (tests/emitters/test_several_relays.py) the second sees only what
reached it; here both are one relay, so the store ends with every event exactly once and
seqs 1..N, and both nodes say so."""

from __future__ import annotations

import threading

from fedrelay.emitters import Emitter
from tests.support.relay_process import RelayProcess
from tests.support.stored import stored_events
from tests.support.waiting import wait_until


def test_an_emitter_fails_over_between_nodes_and_the_run_stays_exactly_once(pg_server, tmp_path):
    db = pg_server.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    em = Emitter(
        [a.url, b.url], run_id="failover", batch_size=50, spool_dir=tmp_path / "spool", max_backoff=0.5
    )
    total = 6000
    try:

        def emit_paced() -> None:
            for i in range(total):
                em.emit("client_progress", {"round": 1, "client_id": "c1", "i": i})
                if i % 20 == 19:
                    threading.Event().wait(0.01)  # a training loop's pace, not a synchronisation

        emitting = threading.Thread(target=emit_paced, daemon=True)
        emitting.start()
        wait_until(lambda: len(stored_events(b, "failover")) >= 500, 30, what="B reading A's commits")
        a.kill()  # SIGKILL mid-stream: acks in flight are lost with it
        emitting.join(60)
        assert em.flush(60), em.last_error
        assert em.url == b.url and em.stats["acked"] == total and em.stats["dropped"] == 0
        a.start()
        for relay in (a, b):
            stored = stored_events(relay, "failover")
            assert [e["seq"] for e in stored] == list(range(1, total + 1))
            assert [e["id"] for e in stored] == list(range(1, total + 1))
            assert [e["data"]["i"] for e in stored] == list(range(total))
    finally:
        em.close(timeout=1)
        a.stop()
        b.stop()
