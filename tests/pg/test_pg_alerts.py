"""Alerts with two relay processes on one PostgreSQL database: one webhook, the same rules on
both, a real HTTP receiver. Both nodes evaluate every commit and claim what fires; the
receiver gets each condition exactly once, a killed node's undelivered alert is sent once (by
whichever node takes it after the lease), and a stalled run is alerted once, not per node."""

from __future__ import annotations

import asyncio
import signal

import asyncpg

from tests.support.alerting import end, ids, one, publish, rnd, start
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.waiting import until, wait_until
from tests.support.webhook_receiver import WebhookReceiver

LEASE = 5


def counted(relays: list[RelayProcess], name: str) -> float:
    """A counter summed over its labels and over the nodes."""
    total = 0.0
    for relay in relays:
        total += sum(v for k, v in scrape(relay).items() if k == name or k.startswith(name + "{"))
    return total


def found(relays: list[RelayProcess]) -> float:
    """Conditions the nodes found: each either claimed it (fired) or found it claimed (repeated)."""
    return counted(relays, "fedrelay_alerts_fired_total") + counted(relays, "fedrelay_alerts_repeated_total")


def outbox(db: str) -> list[tuple[str, str]]:
    """(alert id, state) of every claim in the database."""

    async def read() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(db)
        try:
            return [(r[0], r[1]) for r in await conn.fetch("SELECT key, state FROM alert_outbox ORDER BY 1")]
        finally:
            await conn.close()

    return asyncio.run(read())


def delivered(db: str) -> int:
    return sum(state == "delivered" for _, state in outbox(db))


def two_nodes(db: str, tmp_path, args: list[str]) -> list[RelayProcess]:
    return [RelayProcess(db, log_dir=tmp_path, args=args).start() for _ in "ab"]


def alerts_file(tmp_path, receiver: WebhookReceiver, lease: float = LEASE) -> list[str]:
    path = tmp_path / "alerts.toml"
    path.write_text(
        f'webhooks = ["{receiver.url}"]\nrules = ["eval_metrics.val_loss > 2"]\n'
        f"retry_first = 0.2\nretry_cap = 0.5\nclaim_lease = {lease}\n"
    )
    return ["--alerts", str(path)]


def test_a_run_through_both_nodes_alerts_each_condition_once(pg_server, tmp_path, receiver, emitter):
    db = pg_server.fresh_db()
    nodes = a, b = two_nodes(db, tmp_path, alerts_file(tmp_path, receiver))
    try:
        em_a, em_b = emitter(a), emitter(b)
        publish(em_a, "mixed", start(3), rnd(1, val_loss=1.0))
        publish(em_b, "mixed", rnd(2, val_loss=2.5))  # the threshold holds, on an event B stored
        publish(em_a, "mixed", rnd(3, val_loss=3.0), end("completed"))  # holds again: once per run
        publish(em_b, "broken", start(), ("error", {"message": "boom"}))
        publish(em_a, "broken", end("failed"))
        # Three conditions, each found by both nodes: one claims it, the other finds it claimed.
        wait_until(lambda: found(nodes) >= 6, 30, what="every condition found on both nodes")
        wait_until(lambda: len(receiver.received) >= 3, 30, what="three alerts")
        wait_until(lambda: delivered(db) == 3, 30, what="the sends recorded")
        assert found(nodes) == 6
        assert counted(nodes, "fedrelay_alerts_fired_total") == 3
        assert counted(nodes, "fedrelay_alerts_sent_total") == 3
    finally:
        for relay in nodes:
            relay.stop()
    assert set(ids(receiver).values()) == {1} and len(receiver.received) == 3, ids(receiver)
    rule = one(receiver, "rule", "mixed")
    assert (rule["value"], rule["round"]) == (2.5, 2)
    assert one(receiver, "ended", "mixed")["experiment"] == "alerts"
    assert one(receiver, "failed", "broken")["seq"] == 3
    assert sorted(state for _, state in outbox(db)) == ["delivered"] * 3


def test_a_killed_nodes_pending_alert_is_sent_once_after_a_restart(pg_server, tmp_path, receiver, emitter):
    db = pg_server.fresh_db()
    nodes = two_nodes(db, tmp_path, alerts_file(tmp_path, receiver))
    try:
        receiver.stop()  # the claim stays pending: its node retries, refused
        publish(emitter(nodes[0]), "k", start(), end("failed"))
        wait_until(lambda: found(nodes) >= 2, 30, what="the condition found on both nodes")
        owner = next(n for n in nodes if counted([n], "fedrelay_alerts_fired_total") == 1)
        wait_until(
            lambda: counted([owner], "fedrelay_alert_attempts_failed_total") >= 1, 20, what="a refused try"
        )
        owner.kill(signal.SIGKILL)
        owner.start()  # a new process: its own node id; the old claim waits out the lease
        receiver.start()
        wait_until(lambda: receiver.bodies("failed"), 3 * LEASE + 20, what="the killed node's alert")
        wait_until(lambda: outbox(db) == [(one(receiver, "failed", "k")["id"], "delivered")], 20)

        publish(emitter(owner), "k2", start(), end("failed"))  # the restarted node alerts as before
        wait_until(lambda: len(receiver.received) >= 2, 30, what="the alert after the restart")
        wait_until(lambda: delivered(db) == 2, 30, what="the sends recorded")
    finally:
        for relay in nodes:
            relay.stop()
    assert set(ids(receiver).values()) == {1} and len(receiver.received) == 2, ids(receiver)
    assert {b["run_id"] for b in receiver.bodies("failed")} == {"k", "k2"}
    assert sorted(state for _, state in outbox(db)) == ["delivered"] * 2
    assert "undelivered alerts of a relay that stopped are sent from here" in nodes[0].log() + nodes[1].log()


def test_a_stalled_run_is_alerted_once_not_once_per_node(pg_server, tmp_path, receiver, emitter):
    db = pg_server.fresh_db()
    nodes = a, _ = two_nodes(db, tmp_path, [*alerts_file(tmp_path, receiver), "--stall-after", "1"])
    try:
        publish(emitter(a), "quiet", start(), rnd(1, val_loss=1.0))
        stall = 'fedrelay_alerts_fired_total{alert="stalled"}'
        # Both stall watches find it (every 0.25 s): one claims, the other finds it claimed.
        wait_until(
            lambda: counted(nodes, stall) == 1 and counted(nodes, "fedrelay_alerts_repeated_total") >= 1,
            30,
            what="the stall found on both nodes",
        )
        wait_until(lambda: receiver.bodies("stalled"), 20, what="the stall alert")
        wait_until(lambda: delivered(db) == 1, 20, what="its send recorded")
    finally:
        for relay in nodes:
            relay.stop()
    assert len(receiver.received) == 1, receiver.bodies()
    stalled = one(receiver, "stalled", "quiet")
    assert (stalled["seq"], stalled["status"]) == (2, "stalled")


def test_a_database_of_schema_1_gets_the_alert_tables_at_start(pg_server, tmp_path, receiver, emitter):
    """A database of schema 1 (before alerts on PostgreSQL) is migrated at start by a relay
    of this version; a run stored while no relay had alerts on is not alerted, a new one is."""
    from fedrelay.relay.pg.schema import MIGRATIONS

    db = pg_server.fresh_db()

    async def schema_1() -> None:
        conn = await asyncpg.connect(db)
        try:
            await conn.execute(MIGRATIONS[0])
            await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            await conn.execute("INSERT INTO schema_version VALUES (1)")
        finally:
            await conn.close()

    async def version() -> int:
        conn = await asyncpg.connect(db)
        try:
            return await conn.fetchval("SELECT max(version) FROM schema_version")
        finally:
            await conn.close()

    asyncio.run(schema_1())
    plain = RelayProcess(db, log_dir=tmp_path).start()
    try:
        publish(emitter(plain), "before", start(), end("failed"))  # stored while alerts were off
    finally:
        plain.stop()
    relay = RelayProcess(db, log_dir=tmp_path, args=alerts_file(tmp_path, receiver)).start()
    try:
        assert asyncio.run(version()) == 2
        publish(emitter(relay), "after", start(), end("failed"))
        wait_until(lambda: receiver.bodies("failed"), 20, what="the alert of the new run")
        wait_until(lambda: outbox(db) and outbox(db)[0][1] == "delivered", 20, what="its send recorded")
    finally:
        relay.stop()
    assert [b["run_id"] for b in receiver.bodies()] == ["after"]


def test_a_relay_stopped_with_sigterm_hands_its_pending_alert_over_at_once(
    pg_server, tmp_path, receiver, emitter
):
    """A clean stop deletes the relay's heartbeat: the other relay takes the claim at its next
    save (every 2 s), without waiting out the lease (60 s here, longer than the wait)."""
    db = pg_server.fresh_db()
    nodes = two_nodes(db, tmp_path, alerts_file(tmp_path, receiver, lease=60))
    try:
        receiver.stop()
        publish(emitter(nodes[0]), "t", start(), end("failed"))
        wait_until(lambda: found(nodes) >= 2, 30, what="the condition found on both nodes")
        owner = next(n for n in nodes if counted([n], "fedrelay_alerts_fired_total") == 1)
        other = nodes[1] if owner is nodes[0] else nodes[0]
        owner.stop()
        receiver.start()
        wait_until(lambda: receiver.bodies("failed"), 20, what="the alert, sent by the other relay")
        wait_until(lambda: delivered(db) == 1, 20, what="its send recorded")
        assert counted([other], "fedrelay_alerts_sent_total") == 1
    finally:
        for relay in nodes:
            relay.stop()
    assert len(receiver.received) == 1
    assert outbox(db) == [(one(receiver, "failed", "t")["id"], "delivered")]


async def test_claims_racing_from_two_logs_are_each_won_once(pg_server):
    """Two alert logs (two relays) claim overlapping alerts in opposite orders, many times at
    once: every (alert, webhook) is returned to exactly one of them."""
    from fedrelay.relay.pg.alerts import PgAlertLog

    db = pg_server.fresh_db()
    logs = [PgAlertLog(db, lease=30, targets=["hook-1", "hook-2"]) for _ in "ab"]
    for alert_log in logs:
        await alert_log.open()
    try:
        targets = ["hook-1", "hook-2"]
        keys = [f"alert-{i}" for i in range(200)]
        saves = []
        for start_at in range(0, 200, 20):
            chunk = [(key, "{}") for key in keys[start_at : start_at + 40]]
            cursors = {f"run-{i}": (start_at + i, "") for i in range(10)}
            saves.append(logs[0].save(chunk, targets, cursors, 1.0))
            saves.append(logs[1].save(chunk[::-1], targets[::-1], dict(reversed(cursors.items())), 1.0))
        results = await asyncio.gather(*saves)
        won = [(p.key, p.target) for claimed in results for p in claimed]
        assert sorted(won) == sorted((key, target) for key in keys for target in targets)
        assert len(set(won)) == len(won)
    finally:
        for alert_log in logs:
            await alert_log.close()


async def test_only_claims_of_a_silent_relay_for_a_known_webhook_are_taken_over(pg_server):
    """The lease, in the log alone: claims of a relay that still saves stay with it; once it
    stops saving, one other relay takes those for its own webhooks (once), not the others."""
    from fedrelay.relay.pg.alerts import PgAlertLog

    db = pg_server.fresh_db()
    silent = PgAlertLog(db, lease=2, targets=["hook-1", "hook-2"])
    heir = PgAlertLog(db, lease=2, targets=["hook-1"])
    late = PgAlertLog(db, lease=2, targets=["hook-1"])
    for alert_log in (silent, heir, late):
        await alert_log.open()
    try:
        claimed = await silent.save([("a1", "{}"), ("a2", "{}")], ["hook-1", "hook-2"], {}, 1.0)
        assert len(claimed) == 4
        assert await heir.save([], [], {}, 2.0) == []  # the claimer's heartbeat is fresh
        taken = await until(lambda: heir.save([], [], {}, 3.0), 10, interval=0.1, what="the takeover")
        assert sorted((p.key, p.target) for p in taken) == [("a1", "hook-1"), ("a2", "hook-1")]
        assert await late.save([], [], {}, 4.0) == []  # the heir saves: they stay with it
    finally:
        for alert_log in (silent, heir, late):
            await alert_log.close()
