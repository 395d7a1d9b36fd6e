"""Follow runs on a relay for a bridge: every event once, in seq order, from a cursor kept elsewhere.

``fedrelay tail`` may skip ahead (it shows what is live); a bridge may not. Its cursor is the last
seq recorded in the target (MLflow), so a frame is only handed on when it starts right after that
cursor. ``--all`` listens to ``*`` (new runs, live) and catches runs up by name: when a run's
events arrive through ``*`` after a hole (the run started while the bridge was away, or before it
looked), the feed subscribes that run by name from its cursor, drops what ``*`` sends meanwhile,
and unsubscribes once the run has caught up, so ``*`` serves it again and no more than
``MAX_CATCHING_UP`` named subscriptions are open (the relay allows 1024 per connection). At each
(re)connection the relay's run list (``GET /api/runs``) says which runs are behind.

:class:`Feed` is the decision core (no I/O); :class:`FeedConnection` runs it over a WebSocket,
reconnecting with backoff; given several addresses of one relay, it moves to the next after a
connection that cannot be made or a session lost (:mod:`fedrelay.failover`) and resumes there
from the recorded seqs, which every node of one relay agrees on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ..failover import Failover, parse_urls
from ..follow import FIRST_DELAY, SLOW_CONSUMER, RelayRefused, events_of, http_base, ws_base

log = logging.getLogger("fedrelay.bridge")

MAX_CATCHING_UP = 256
RETRY_UNKNOWN_RUN = 1.0
"""Seconds before asking again for a named run the relay does not know yet."""

Frame = dict[str, Any]


class Feed:
    """What to subscribe to, and which incoming events are next, for ``runs`` or every run (None)."""

    def __init__(self, runs: list[str] | None, cursors: dict[str, int] | None = None) -> None:
        self.all = runs is None
        self.runs = list(runs or [])
        self.cursors: dict[str, int] = dict(cursors or {})
        """run id -> last seq recorded."""
        self.catching_up: dict[str, int | None] = {}
        """Runs subscribed by name to catch up (``--all``) -> the relay's last seq when subscribed."""
        self.waiting: deque[str] = deque()
        self.restarting: set[str] = set()
        """Named runs (RUN_ID mode) asked again from the cursor after a hole, until ``subscribed``."""
        self.abandoned: set[str] = set()
        """Runs the relay cannot serve from our cursor (it holds less than we recorded)."""

    def cursor(self, run_id: str) -> int:
        return self.cursors.get(run_id, 0)

    def on_connect(self) -> list[Frame]:
        """The subscriptions of a new connection (named catch-ups start over with it)."""
        self.catching_up.clear()
        self.waiting.clear()
        self.restarting.clear()
        if self.all:
            return [{"op": "subscribe", "run_id": "*"}]
        return [self._subscribe(run) for run in self.runs if run not in self.abandoned]

    def on_runs_listed(self, last_seqs: dict[str, int]) -> list[Frame]:
        """``--all``: catch up every run the relay holds more of than we recorded."""
        frames: list[Frame] = []
        for run_id, last_seq in last_seqs.items():
            if last_seq > self.cursor(run_id) and run_id not in self.abandoned:
                frames.extend(self._catch_up(run_id))
        return frames

    def on_events(self, run_id: str, events: list[Frame]) -> tuple[list[Frame], list[Frame]]:
        """(events to record now, frames to send): only what follows the cursor without a hole."""
        cursor = self.cursor(run_id)
        fresh = [e for e in events if isinstance(e.get("seq"), int) and e["seq"] > cursor]
        if not fresh or run_id in self.abandoned:
            return [], []
        if fresh[0]["seq"] != cursor + 1:
            # Sent through "*" past events we never got: get them by name from the cursor, drop
            # these meanwhile. (A named subscription never has a hole; should one appear, it is
            # restarted from the cursor the same way.)
            if self.all:
                return [], self._catch_up(run_id)
            if run_id in self.restarting:
                return [], []
            self.restarting.add(run_id)
            return [], [self._subscribe(run_id)]
        return fresh, []

    def on_recorded(self, run_id: str, seq: int) -> list[Frame]:
        self.cursors[run_id] = max(seq, self.cursor(run_id))
        return self._maybe_caught_up(run_id)

    def on_control(self, frame: Frame) -> list[Frame]:
        op, run_id = frame.get("op"), frame.get("run_id")
        if op == "subscribed":
            self.restarting.discard(run_id)
        if op == "subscribed" and run_id in self.catching_up:
            self.catching_up[run_id] = int(frame.get("last_seq") or 0)
            return self._maybe_caught_up(run_id)
        if op == "gap" and isinstance(run_id, str):
            resume = int(frame.get("resume_from") or 1)
            log.warning("run %s: the relay no longer holds seqs before %d (retention)", run_id, resume)
            self.cursors[run_id] = max(self.cursor(run_id), resume - 1)
        elif op == "error" and frame.get("code") == "bad_since" and isinstance(run_id, str):
            log.error(
                "run %s: the relay holds fewer events than were recorded (up to seq %d): not following it "
                "(a different relay, or one restored from an older backup?)",
                run_id,
                self.cursor(run_id),
            )
            self.abandoned.add(run_id)
            return self._release(run_id)
        elif op == "error" and frame.get("code") == "unknown_run" and run_id in self.catching_up:
            return self._release(run_id)
        elif op == "error":
            log.warning("relay: %s: %s", frame.get("code"), frame.get("detail"))
        return []

    def resubscribe(self, run_id: str) -> list[Frame]:
        """For a named run the relay did not know yet (RUN_ID mode), asked again later."""
        return [self._subscribe(run_id)] if run_id in self.runs and run_id not in self.abandoned else []

    def _subscribe(self, run_id: str) -> Frame:
        return {"op": "subscribe", "run_id": run_id, "since": self.cursor(run_id)}

    def _catch_up(self, run_id: str) -> list[Frame]:
        if run_id in self.catching_up or run_id in self.waiting:
            return []
        if len(self.catching_up) >= MAX_CATCHING_UP:
            self.waiting.append(run_id)
            return []
        self.catching_up[run_id] = None
        return [self._subscribe(run_id)]

    def _maybe_caught_up(self, run_id: str) -> list[Frame]:
        target = self.catching_up.get(run_id)
        if target is None or self.cursor(run_id) < target:
            return []
        return self._release(run_id)

    def _release(self, run_id: str) -> list[Frame]:
        """Back to "*" for this run; start the next waiting one."""
        frames: list[Frame] = []
        if self.catching_up.pop(run_id, False) is not False:
            frames.append({"op": "unsubscribe", "run_id": run_id})
        while self.waiting and len(self.catching_up) < MAX_CATCHING_UP:
            frames.extend(self._catch_up(self.waiting.popleft()))
        return frames


def client_ssl(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """A verifying TLS context with ``ca_file`` trusted, for wss:// and https:// URLs."""
    if ca_file is None or not url.startswith(("wss://", "https://")):
        return None
    return ssl.create_default_context(cafile=ca_file)


def list_runs(url: str, token: str | None, tls: ssl.SSLContext | None) -> dict[str, int]:
    """run id -> last seq, from ``GET /api/runs``."""
    request = urllib.request.Request(f"{http_base(url)}/api/runs")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30, context=tls) as response:
        runs = json.loads(response.read())["runs"]
    return {run["run_id"]: int(run.get("last_seq") or 0) for run in runs}


RecordFn = Callable[[str, list[Frame]], Awaitable[int | None]]
"""Records a run's fresh events; returns the last seq recorded (None: nothing)."""


class FeedConnection:
    """Runs a :class:`Feed` over ``/subscribe``: reconnects with capped backoff, reads a frame only
    once the previous one is recorded (so a slow MLflow slows the reading, and the relay, past its
    send queue, cuts the connection: it is resumed from the cursors)."""

    def __init__(
        self,
        url: str | Sequence[str],
        feed: Feed,
        record: RecordFn,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        max_backoff: float = 5.0,
        on_control: Callable[[Frame], None] = lambda frame: None,
    ) -> None:
        self.relays = Failover(parse_urls(url), first_delay=FIRST_DELAY, max_delay=max_backoff)
        self.on_control = on_control
        self.feed = feed
        self.record = record
        self.token = token
        self.tls = {u: client_ssl(ws_base(u), ca_file) for u in self.relays.urls}
        self.http_tls = {u: client_ssl(http_base(u), ca_file) for u in self.relays.urls}
        self.connects = 0
        self.stopped = False

    @property
    def url(self) -> str:
        """The relay address in use, or tried next."""
        return self.relays.current

    async def run(self) -> None:
        while not self.stopped:
            code = None
            conn = await self._connect()
            if conn is not None:
                self.connects += 1
                self.relays.connected()
                try:
                    await self._session(conn)
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else None
                except BaseException:
                    conn.transport.abort()
                    raise
                if not self.stopped:
                    log.warning("lost the relay connection at %s; resuming from the recorded seqs", self.url)
            if self.stopped:
                return
            if code == SLOW_CONSUMER:  # not the node's failure: back to it at once
                delay = 0.05 * (0.5 + random.random() / 2)
            else:
                left = self.url
                delay = self.relays.failed(progress=conn is not None)
                if self.url != left:
                    log.warning("relay at %s unavailable; trying %s in %.1fs", left, self.url, delay)
            await asyncio.sleep(delay)

    async def _connect(self) -> ClientConnection | None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            return await connect(
                ws_base(self.url) + "/subscribe",
                additional_headers=headers,
                open_timeout=5,
                close_timeout=2,
                max_size=None,
                compression=None,
                ssl=self.tls[self.url],
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (400, 401, 403):
                raise RelayRefused(f"the relay refused the connection: HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake):
            pass
        return None

    async def _session(self, conn: ClientConnection) -> None:
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Awaitable[None]) -> None:
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def send(frames: list[Frame]) -> None:
            for frame in frames:
                await conn.send(json.dumps(frame))

        async def discover() -> None:
            try:
                url = self.url
                runs = await asyncio.to_thread(list_runs, url, self.token, self.http_tls[url])
            except Exception as exc:  # the next connection lists again; "*" gaps catch up meanwhile
                log.warning("could not list the relay's runs: %s", exc)
                return
            with contextlib.suppress(ConnectionClosed):
                await send(self.feed.on_runs_listed(runs))

        async def ask_again(run_id: str) -> None:
            await asyncio.sleep(RETRY_UNKNOWN_RUN)
            with contextlib.suppress(ConnectionClosed):
                await send(self.feed.resubscribe(run_id))

        try:
            await send(self.feed.on_connect())
            async for raw in conn:
                msg = json.loads(raw)
                if isinstance(msg, dict) and "op" in msg:
                    await send(self.feed.on_control(msg))
                    self.on_control(msg)
                    if msg.get("op") == "subscribed" and msg.get("run_id") == "*":
                        spawn(discover())
                    elif msg.get("op") == "error" and msg.get("code") == "unknown_run" and not self.feed.all:
                        spawn(ask_again(str(msg.get("run_id"))))
                    continue
                events = events_of(msg)
                if not events:
                    continue
                run_id = str(events[0].get("run_id"))
                fresh, frames = self.feed.on_events(run_id, events)
                await send(frames)
                if fresh:
                    seq = await self.record(run_id, fresh)
                    if seq is not None:
                        await send(self.feed.on_recorded(run_id, seq))
                if self.stopped:
                    return
        finally:
            for task in tasks:
                task.cancel()
