"""A PostgreSQL restart and a SIGKILLed node: nothing acked is lost, nothing is doubled."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.clients import ResendingProducer, ResumingSubscriber, event
from tests.support.freezing_proxy import FreezingProxy
from tests.support.postgres import PgServer
from tests.support.relay_process import RelayProcess
from tests.support.stored import stored_events
from tests.support.waiting import until, wait_until


@pytest.fixture
def own_pg(tmp_path):
    """A server of the test's own: it is stopped mid-test."""
    server = PgServer(tmp_path / "pg").start()
    yield server
    server.remove()


def health(relay: RelayProcess) -> tuple[int, dict]:
    return relay.get_json("/healthz")


async def test_postgres_restart_mid_stream(own_pg, tmp_path):
    total = 3000
    db = own_pg.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path, args=["--max-store-lag", "200"]).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        producer = ResendingProducer(a.url, "trainer", pace=0.002)
        follower = ResumingSubscriber(b.url, "pgdown")
        publishing = asyncio.create_task(
            producer.publish_all([event("pgdown", i) for i in range(1, total + 1)], batch=10, timeout=120)
        )
        following = asyncio.create_task(follower.follow(total, timeout=120))
        await until(lambda: producer.acked >= total // 3, timeout=60)
        await asyncio.to_thread(own_pg.stop)
        # Both nodes say so; A queues what it reads, acks nothing, and pushes back past the lag.
        for relay in (a, b):
            await asyncio.to_thread(wait_until, lambda r=relay: health(r)[0] == 503, 20, what="503")
        lag = await asyncio.to_thread(wait_until, lambda: health(a)[1]["store"]["lag"], 20, what="a lag")
        acked = producer.acked
        await asyncio.to_thread(
            wait_until, lambda: health(a)[1]["store"]["lag"] >= min(lag + 50, 200), 20, what="more lag"
        )
        assert producer.acked == acked  # no ack while nothing commits
        assert health(a)[1]["store"]["lag"] <= 200 + 10  # backpressure: one frame past the limit
        assert health(a)[1]["status"] == "degraded"
        await asyncio.to_thread(own_pg.start)
        await asyncio.wait_for(publishing, 120)
        await asyncio.wait_for(following, 120)
        assert [e["seq"] for e in follower.events] == list(range(1, total + 1))
        assert [e["id"] for e in follower.events] == list(range(1, total + 1))
        for relay in (a, b):
            await asyncio.to_thread(wait_until, lambda r=relay: health(r)[0] == 200, 20, what="200 again")
            stored = stored_events(relay, "pgdown")
            assert [e["seq"] for e in stored] == list(range(1, total + 1))
            assert [e["id"] for e in stored] == list(range(1, total + 1))
    finally:
        a.stop()
        b.stop()


async def test_sigkill_of_a_node_loses_nothing_it_acked(pg_server, tmp_path):
    total = 3000
    db = pg_server.fresh_db()
    a = RelayProcess(db, log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        producer = ResendingProducer(a.url, "trainer", pace=0.002)
        follower = ResumingSubscriber(b.url, "killed")
        publishing = asyncio.create_task(
            producer.publish_all([event("killed", i) for i in range(1, total + 1)], batch=10, timeout=120)
        )
        following = asyncio.create_task(follower.follow(total, timeout=120))
        await until(lambda: producer.acked >= total // 3, timeout=60)
        a.kill()  # SIGKILL: no flush
        acked_before_kill = producer.acked
        producer.url = f"{b.url}/publish?producer=trainer"  # the emitter fails over to B
        await asyncio.wait_for(publishing, 120)
        await asyncio.wait_for(following, 120)
        assert acked_before_kill >= total // 3
        assert [e["seq"] for e in follower.events] == list(range(1, total + 1))
        assert [e["id"] for e in follower.events] == list(range(1, total + 1))
        await asyncio.to_thread(a.start)  # back: it agrees with B
        for relay in (a, b):
            stored = stored_events(relay, "killed")
            assert [e["seq"] for e in stored] == list(range(1, total + 1))
            assert [e["id"] for e in stored] == list(range(1, total + 1))
            assert relay.get_json("/api/runs/killed")[1]["last_seq"] == total
    finally:
        a.stop()
        b.stop()


async def test_a_cut_that_swallows_the_commit_answer_stores_nothing_twice(pg_server, tmp_path):
    """Node A's link to PostgreSQL passes requests but no answers: its commits happen while A
    cannot know it. /healthz says so, acks stop; once the link is back A retries the batch,
    which stores nothing (its ids are stored), and every subscriber gets each event once."""
    total = 1500
    db = pg_server.fresh_db()
    proxy = FreezingProxy(pg_server.port)
    a = RelayProcess(db.replace(f":{pg_server.port}/", f":{proxy.port}/"), log_dir=tmp_path).start()
    b = RelayProcess(db, log_dir=tmp_path).start()
    try:
        producer = ResendingProducer(a.url, "trainer", pace=0.005)
        on_a = ResumingSubscriber(a.url, "cut")
        on_b = ResumingSubscriber(b.url, "cut")
        publishing = asyncio.create_task(
            producer.publish_all([event("cut", i) for i in range(1, total + 1)], batch=10, timeout=150)
        )
        following = [asyncio.create_task(s.follow(total, timeout=150)) for s in (on_a, on_b)]
        await until(lambda: producer.acked >= total // 3, timeout=60)
        proxy.freeze()
        await asyncio.to_thread(wait_until, lambda: health(a)[0] == 503, 30, what="503 on A")
        acked = producer.acked
        assert health(b)[0] == 200  # B's own link is fine
        # What A sent before the freeze was committed: B delivers it though A never heard back.
        await until(lambda: len(on_b.events) > acked, timeout=30)
        assert producer.acked == acked
        proxy.thaw()
        await asyncio.wait_for(publishing, 150)
        await asyncio.gather(*following)
        for follower in (on_a, on_b):
            assert [e["seq"] for e in follower.events] == list(range(1, total + 1))
            assert [e["id"] for e in follower.events] == list(range(1, total + 1))
        for relay in (a, b):
            stored = stored_events(relay, "cut")
            assert [e["seq"] for e in stored] == list(range(1, total + 1))
            assert [e["id"] for e in stored] == list(range(1, total + 1))
    finally:
        a.stop()
        b.stop()
        proxy.close()
