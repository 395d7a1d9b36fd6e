"""Deliver claimed alerts: one bounded queue and one sender task per webhook.

Nothing here runs on the path of an event: the engine's alerts are claimed in the
outbox first, and only claimed deliveries are offered here. A sender POSTs the oldest
alert of its queue, in order; a failed attempt is retried after an exponential backoff
with jitter, capped (``Retry-After`` is honoured up to ten minutes). A 3xx (never
followed) or a 4xx other than 408/425/429 will not get better by retrying: the alert is
dropped. So is one older than ``give_up_after``, and one offered to a full queue
(``queue_size`` per webhook). Drops are counted by reason and logged once per episode.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable

from ..metrics import RelayMetrics
from .outbox import Pending
from .settings import AlertSettings
from .webhook import Answer, Webhook, post_json

log = logging.getLogger("fedrelay.alerts")

RETRY_AFTER_AT_MOST = 600.0
_RETRYABLE = {408, 425, 429}

Settle = Callable[[Pending, str], Awaitable[None]]


def retry_delay(attempt: int, first: float, cap: float, rand: float) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): ``first`` doubled each time up
    to ``cap``, then scaled into its upper half by ``rand`` in [0, 1) (jitter: senders that
    failed together do not retry together)."""
    ceiling = min(cap, first * 2 ** min(attempt - 1, 60))
    return ceiling * (0.5 + rand / 2)


def outcome(answer: Answer) -> str:
    """``sent``, ``retry`` or ``refused`` for an HTTP answer."""
    if 200 <= answer.status < 300:
        return "sent"
    if answer.status in _RETRYABLE or answer.status >= 500:
        return "retry"
    return "refused"


class Courier:
    """One webhook: its queue, its sender task, its episode of failures."""

    def __init__(self, hook: Webhook, settings: AlertSettings, metrics: RelayMetrics, settle: Settle) -> None:
        self.hook = hook
        self.settings = settings
        self.metrics = metrics
        self.settle = settle
        self.queue: deque[Pending] = deque()
        self._ready = asyncio.Event()
        self._failing_since: float | None = None
        self._failed_attempts = 0
        self._dropping = 0
        self._tls: ssl.SSLContext | None = None
        self._settling: set[asyncio.Task[None]] = set()
        metrics.alerts_queued.labels(hook.label).set_function(lambda: len(self.queue))

    def offer(self, pending: Pending) -> bool:
        """Queue a claimed delivery; False when full: dropped (recorded so, counted, logged once
        per episode), never sent, not even after a restart."""
        if len(self.queue) >= self.settings.queue_size:
            task = asyncio.get_running_loop().create_task(self.settle(pending, "dropped"))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            self._dropping += 1
            self.metrics.alerts_dropped.labels(self.hook.label, "queue_full").inc()
            if self._dropping == 1:
                log.warning(
                    "alerts to %s: queue full (%d waiting); newer alerts are dropped until it drains",
                    self.hook.label,
                    len(self.queue),
                )
            return False
        if self._dropping:
            log.warning(
                "alerts to %s: queue has room again; %d alerts were dropped", self.hook.label, self._dropping
            )
            self._dropping = 0
        self.queue.append(pending)
        self._ready.set()
        return True

    async def run(self) -> None:
        attempt = 0
        while True:
            if not self.queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            pending = self.queue[0]
            if time.time() - pending.created_at > self.settings.give_up_after:
                await self._drop(pending, "expired")
                attempt = 0
                continue
            attempt += 1
            answer: Answer | None = None
            try:
                if self._tls is None and self.hook.scheme == "https":
                    self._tls = ssl.create_default_context()
                answer = await post_json(
                    self.hook,
                    pending.payload.encode(),
                    idempotency_key=pending.key,
                    timeout=self.settings.timeout,
                    tls=self._tls,
                )
                result = outcome(answer)
                reason = f"http_{answer.status}"
            except TimeoutError:
                result, reason = "retry", "timeout"
            except ConnectionRefusedError:
                result, reason = "retry", "refused"
            except (OSError, ValueError) as exc:
                result, reason = "retry", _reason(exc)
            if result == "sent":
                self.queue.popleft()
                self.metrics.alerts_sent.labels(self.hook.label).inc()
                attempt = 0
                self._recovered()
                await self.settle(pending, "delivered")
                continue
            self.metrics.alert_attempts_failed.labels(self.hook.label, reason).inc()
            if result == "refused":
                where = (
                    f" (a redirect to {answer.location_host}: not followed)"
                    if answer and answer.location_host
                    else ""
                )
                log.error(
                    "alerts to %s: answered %s%s; alert %s dropped (check the webhook URL)",
                    self.hook.label,
                    answer.status if answer else "?",
                    where,
                    pending.key,
                )
                await self._drop(pending, "rejected")
                attempt = 0
                continue
            self._failed(reason)
            delay = retry_delay(attempt, self.settings.retry_first, self.settings.retry_cap, random.random())
            if answer is not None and answer.retry_after is not None:
                delay = max(delay, min(answer.retry_after, RETRY_AFTER_AT_MOST))
            await asyncio.sleep(delay)

    async def _drop(self, pending: Pending, reason: str) -> None:
        self.queue.popleft()
        self.metrics.alerts_dropped.labels(self.hook.label, reason).inc()
        if reason == "expired":
            log.warning(
                "alerts to %s: alert %s undelivered after %g s, dropped", self.hook.label, pending.key,
                self.settings.give_up_after,
            )  # fmt: skip
        await self.settle(pending, "dropped")

    def _failed(self, reason: str) -> None:
        self._failed_attempts += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "alerts to %s: delivery failed (%s); retrying with backoff, %d alerts queued",
                self.hook.label,
                reason,
                len(self.queue),
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "alerts to %s: delivering again after %d failed attempts in %.0f s",
                self.hook.label,
                self._failed_attempts,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
            self._failed_attempts = 0


def _reason(exc: Exception) -> str:
    """A metric label for a failed attempt: never the URL."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "tls"
    if isinstance(exc, ConnectionError):
        return "connection"
    if isinstance(exc, ValueError):
        return "bad_answer"
    return "network"
