"""The alert shell: committed events in, webhook deliveries out, state in the outbox.

The relay calls :meth:`AlertService.committed` after each store commit (synchronously,
on the loop: it parses only the few event types the engine reads, and queues what fires),
and a task checks for stalled runs. Alerts are claimed in the :class:`AlertLog` (one
transaction with the runs' evaluation cursors, at most ``FLUSH_EVERY`` after the commit,
at once when something fired) and only claimed deliveries are handed to the couriers.

After a restart, each run's events past its cursor are evaluated again from the store
before the relay listens (claims keep them from being sent twice); runs whose events
arrived while no alerting relay ran (alerts were off) are not: they start at their
last seq, so switching alerts on never alerts the past.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from ..hub import Run, Sequenced
from ..metrics import RelayMetrics
from .delivery import Courier
from .engine import INTERESTING, Alert, AlertEngine, RunFacts
from .message import body
from .outbox import AlertLog, Pending
from .settings import AlertSettings

log = logging.getLogger("fedrelay.alerts")

FLUSH_EVERY = 2.0
"""Seconds between saves of the evaluation cursors (and of the heartbeat ``alive_at``)."""
ALIVE_SLACK = 3 * FLUSH_EVERY
"""A run last updated this long after the heartbeat got its events while alerts were off."""
MAX_CLAIMS_WAITING = 10_000
"""Alerts fired and not yet claimed (the outbox is failing): past this they are dropped."""
KEEP_SETTLED = 30 * 86400.0
"""Seconds delivered and dropped alerts are kept: what keeps a resent event from alerting again."""
PRUNE_EVERY = 3600.0
REPLAY_PAGE = 5000
REPLAY_PAGE_CHARS = 2 << 20

Reader = Callable[[str, int, int, int, int], Awaitable[list[tuple[int, str]]]]


class AlertService:
    def __init__(
        self,
        settings: AlertSettings,
        *,
        alert_log: AlertLog,
        metrics: RelayMetrics,
        stall_after: float,
        dashboard: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.log = alert_log
        self.metrics = metrics
        self.stall_after = stall_after
        self.dashboard = (lambda: settings.dashboard_url) if settings.dashboard_url else dashboard  # type: ignore[assignment]
        self.engine = AlertEngine(settings.rules, conditions=settings.conditions)
        self.couriers = {
            hook.id: Courier(hook, settings, metrics, self._settle) for hook in settings.webhooks
        }
        self._claims: list[Alert] = []
        self._dirty: dict[str, int] = {}
        """Run id -> last seq evaluated, not saved yet."""
        self._held: dict[str, tuple[Run, Alert, asyncio.TimerHandle]] = {}
        """Run id -> its ``ended`` alert, waiting ``end_grace`` (see :meth:`_hold`)."""
        self._cursor_caps: dict[str, int] = {}
        """Run id -> the highest seq its saved cursor may take while its end alert waits."""
        self._restored: list[Pending] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._saving_failed = False
        self._backlog_dropped = 0

    # -- lifecycle ---------------------------------------------------------------

    async def open(self, runs: Mapping[str, Run], read: Reader) -> None:
        """Read the outbox back and evaluate what the last relay had not (before listening)."""
        restored = await self.log.open()
        self._restored = restored.pending
        replayed = 0
        for run in list(runs.values()):
            seq, state = restored.cursors.get(run.run_id, (0, ""))
            if state:
                self.engine.restore(run.run_id, state)
            if run.committed_seq <= seq:
                continue
            if restored.alive_at is None or run.updated_at > restored.alive_at + ALIVE_SLACK:
                self._dirty[run.run_id] = run.committed_seq  # arrived while alerts were off
                continue
            replayed += await self._replay(run, seq, read)
        if replayed:
            log.info("alerts: evaluated %d events stored after the last alert save", replayed)

    async def _replay(self, run: Run, after: int, read: Reader) -> int:
        count = 0
        upto = run.committed_seq
        while after < upto:
            rows = await read(run.run_id, after, upto, REPLAY_PAGE, REPLAY_PAGE_CHARS)
            if not rows:
                break
            for seq, text in rows:
                self._evaluate(run, seq, text, None)
                count += 1
            after = rows[-1][0]
        self._dirty[run.run_id] = upto
        return count

    def start(self, runs: Mapping[str, Run]) -> None:
        """Start sending (the relay listens now: the dashboard URL is known)."""
        removed = 0
        for pending in self._restored:
            courier = self.couriers.get(pending.target)
            if courier is None:
                removed += 1
                continue
            courier.offer(pending)
        if removed:
            log.warning("alerts: %d undelivered alerts were for webhooks no longer configured", removed)
        self._restored = []
        self._tasks = [
            asyncio.create_task(courier.run(), name=f"fedrelay-alerts-{courier.hook.label}")
            for courier in self.couriers.values()
        ]
        if self.stall_after > 0 and "stalled" in self.settings.conditions:
            self._tasks.append(asyncio.create_task(self._watch_silence(runs), name="fedrelay-alerts-stalls"))
        self._flusher = asyncio.create_task(self._flush_loop(), name="fedrelay-alerts-outbox")

    async def stop(self) -> None:
        """Stop sending (a send in flight stays pending: it goes again after a restart), then
        save what fired and how far evaluation got; ends waiting for their grace fire now."""
        await asyncio.sleep(0)  # the last commits' evaluations (scheduled with call_soon) run
        for run, _, timer in list(self._held.values()):
            timer.cancel()
            self._release(run)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopping = True
        self._wake.set()
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        else:
            await self._flush()
        await self.log.close()

    # -- evaluation (on the loop, after each commit) --------------------------------

    def committed(self, batch: list[Sequenced], runs: Mapping[str, Run]) -> None:
        """A commit's events, evaluated just after the commit's own callbacks (acks settle
        producers' ``holding`` reports there: a run is not ``incomplete`` for events that
        this very commit stored). Batches keep their order."""
        asyncio.get_running_loop().call_soon(self._evaluate_batch, batch, runs)

    def _evaluate_batch(self, batch: list[Sequenced], runs: Mapping[str, Run]) -> None:
        try:
            for item in batch:
                self._dirty[item.run_id] = item.seq
                if item.type in INTERESTING:
                    run = runs.get(item.run_id)
                    if run is not None:
                        self._evaluate(run, item.seq, item.body, item.type)
        except Exception:  # alerts must never cost the relay its deliveries
            log.exception("alerts: evaluating a commit failed")

    def _evaluate(self, run: Run, seq: int, text: str, kind: str | None) -> None:
        if kind is not None and kind not in INTERESTING:
            return
        if kind in ("round_end", "epoch_end") and not self.engine.rules:
            return
        try:
            event = json.loads(text)
        except ValueError:
            return
        if not isinstance(event, dict) or event.get("type") not in INTERESTING:
            return
        alerts = self.engine.observe(run.run_id, seq, event, self._facts(run))
        if event["type"] == "training_end":
            self.engine.forget(run.run_id)  # the run is over; a late resend is stopped by the claims
        ready = []
        for alert in alerts:
            if alert.alert == "ended" and alert.status == "incomplete" and self.settings.end_grace > 0:
                self._hold(run, alert)
            else:
                ready.append(alert)
        self._fire(ready)

    def _hold(self, run: Run, alert: Alert) -> None:
        """An end the relay shows ``incomplete``: wait ``end_grace`` for the missing events
        (client reports of the last round often arrive just after the server's end), then
        alert with the status of that moment. Until then the run's cursor stays before the
        end, so a crash meanwhile evaluates it again at restart."""
        if run.run_id in self._held:
            return
        timer = asyncio.get_running_loop().call_later(self.settings.end_grace, self._release, run)
        self._held[run.run_id] = (run, alert, timer)
        self._cursor_caps[run.run_id] = (alert.seq or 1) - 1

    def _release(self, run: Run) -> None:
        held = self._held.pop(run.run_id, None)
        self._cursor_caps.pop(run.run_id, None)
        if held is None:
            return
        alert = held[1]
        facts = self._facts(run)
        self._fire([replace(alert, status=facts.status, detail=facts.incomplete)])

    def _facts(self, run: Run) -> RunFacts:
        summary = run.summary(time.time(), self.stall_after)
        incomplete = summary.get("incomplete")
        experiment = run.info.get("experiment_name")
        last_error = run.info.get("last_error")
        return RunFacts(
            status=summary["status"],
            experiment=experiment if isinstance(experiment, str) else None,
            incomplete=incomplete.get("detail") if isinstance(incomplete, dict) else None,
            last_error=last_error if isinstance(last_error, str) else None,
        )

    def _fire(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if len(self._claims) >= MAX_CLAIMS_WAITING:
                self._backlog_dropped += 1
                self.metrics.alerts_dropped.labels("*", "backlog").inc()
                if self._backlog_dropped == 1:
                    log.error("alerts: %d alerts wait to be saved; newer ones are dropped", len(self._claims))
                continue
            self._claims.append(alert)
        if alerts:
            self._wake.set()

    async def _watch_silence(self, runs: Mapping[str, Run]) -> None:
        """The relay's ``stalled`` status, checked a few times per ``stall_after`` (at least
        every 15 s): a running run streamed by a server or trainer, silent that long."""
        every = max(0.05, min(15.0, self.stall_after / 4))
        horizon = self.stall_after + self.settings.stall_horizon
        while True:
            await asyncio.sleep(every)
            now = time.time()
            stalled = []
            for run in list(runs.values()):
                silent = now - run.updated_at
                if run.status != "running" or not self.stall_after < silent <= horizon or not run.driven:
                    continue
                alert = self.engine.stalled(run.run_id, run.committed_seq, silent, self._facts(run))
                if alert is not None:
                    stalled.append(alert)
            self._fire(stalled)

    # -- the outbox ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        last_prune = time.monotonic()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY)
            self._wake.clear()
            if not await self._flush() and not self._stopping:
                await asyncio.sleep(FLUSH_EVERY)
            if time.monotonic() - last_prune > PRUNE_EVERY:
                last_prune = time.monotonic()
                try:
                    await self.log.prune(time.time() - KEEP_SETTLED)
                except Exception as exc:
                    log.warning("alerts: pruning old alerts failed: %s", exc)
        await self._flush()

    async def _flush(self) -> bool:
        """Claim what fired and save the cursors, in one transaction; hand new claims on."""
        claims, self._claims = self._claims, []
        dirty, self._dirty = self._dirty, {}
        cursors = {}
        for run_id, seq in dirty.items():
            cap = self._cursor_caps.get(run_id)
            if cap is not None and seq > cap:
                self._dirty[run_id] = seq  # saved once the end alert is out
                seq = cap
            cursors[run_id] = (seq, self.engine.snapshot(run_id))
        self.engine.clear_evicted()
        dashboard = self.dashboard()
        now = time.time()
        payloads = [(alert.id, json.dumps(body(alert, dashboard=dashboard, now=now))) for alert in claims]
        kinds = {alert.id: alert.alert for alert in claims}
        try:
            claimed = await self.log.save(payloads, list(self.couriers), cursors, now)
        except Exception as exc:
            self._claims[:0] = claims
            for run_id, seq in dirty.items():
                self._dirty[run_id] = max(seq, self._dirty.get(run_id, 0))
            if not self._saving_failed:
                log.error("alerts: saving alert state failed, will retry: %s", exc)
            self._saving_failed = True
            return False
        if self._saving_failed:
            log.warning("alerts: saving alert state works again")
            self._saving_failed = False
        self._backlog_dropped = 0
        counted: set[str] = set()
        repeated = len({alert.id for alert in claims} - {pending.key for pending in claimed})
        if repeated:
            self.metrics.alerts_repeated.inc(repeated)
        for pending in claimed:
            kind = kinds.get(pending.key)  # None: another relay's claim, handed to this one
            if kind is not None and pending.key not in counted:
                counted.add(pending.key)
                self.metrics.alerts_fired.labels(kind).inc()
            self.couriers[pending.target].offer(pending)
        return True

    async def _settle(self, pending: Pending, state: str) -> None:
        try:
            await self.log.settle(pending.key, pending.target, state, time.time())
        except Exception as exc:  # stays pending: sent once more after a restart
            log.warning("alerts: recording alert %s as %s failed: %s", pending.key, state, exc)
