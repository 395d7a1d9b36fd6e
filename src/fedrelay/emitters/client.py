"""The Emitter: ``emit()`` in microseconds, delivery in a background thread.

``emit()`` runs in the training loop, so it only checks what is cheap to
check, stamps an id and a time, and appends to a deque. Everything slow
(JSON, NaN mapping, sockets, disk) happens in one daemon sender thread that
keeps one WebSocket to ``/publish``, sends frames of up to ``batch_size``
events, and keeps every event until a cumulative ack covers it.

Where events live, oldest first: the spool (segments on disk), ``_inflight``
(sent on this connection, not yet acked), ``_unsent``, then the ``_queue`` of
raw emits. Ids only grow along that line, which is what the relay needs to
drop resent duplicates (it drops any id <= the highest it has seen).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .. import __version__
from ..schemas.events import EVENT_TYPES, RUN_ID_RE
from .config import (
    new_name,
    new_run_id,
    publish_url,
    resolve_spool_dir,
    resolve_token,
    resolve_url,
)
from .encode import Unencodable, encode_event, too_large_stand_in
from .spool import DamagedSegment, Entry, Segment, Spool, producer_dirs

log = logging.getLogger("fedrelay.emitter")

_ROLES = frozenset(("server", "client", "trainer"))
_FRAME_LEVEL = frozenset(("too_large", "too_many_events"))
_TRANSIENT = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN))
"""Read errors that say nothing about the segment: retried, not quarantined."""
_NESTED = ("metrics", "fit_metrics", "eval_metrics", "server_metrics", "config", "participating_clients")
"""The protocol's nested ``data`` fields, copied by ``emit()``: trainers reuse and mutate them
(Lightning's ``callback_metrics``). Other nested values are not copied (a loop over every key
would double emit()'s cost); the encoder retries if one changes size while it is encoded."""
_STORED_SLACK = 2048
"""Bytes of an event's frame limit it may not use: the relay refuses an event whose stored form
(with the seq and producer it adds) comes within 1 KiB of its ``max_frame_bytes``."""
_SPOOL_RETRY = 1.0
"""Seconds between attempts at a spool that could not be opened or written."""


class _Reconnect(Exception):
    """Leave the current session and connect again at once (no backoff)."""


class _ReplyReader:
    """Reads the relay's replies on its own thread and wakes the sender for each.

    The sender then waits on one event for everything (emit batches, flush,
    acks) instead of blocking in ``recv()`` for a whole linger while a flush
    waits for an event that has not been sent yet.
    """

    def __init__(self, ws: ClientConnection, wake: threading.Event, producer: str) -> None:
        self.inbox: deque[str | bytes] = deque()
        self.ended: Exception | None = None
        self._ws, self._wake = ws, wake
        threading.Thread(target=self._read, name=f"fedrelay-replies-{producer}", daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self._ws:
                self.inbox.append(message)
                self._wake.set()
            self.ended = ConnectionError("the relay closed the connection")
        except Exception as exc:  # ConnectionClosedError, OSError: the sender reconnects
            self.ended = exc
        self._wake.set()


class Emitter:
    """Publish training events to a fedrelay relay without slowing training down.

    ``emit()`` never raises and never blocks; ``flush()`` waits for acks;
    ``close()`` flushes within ``timeout`` and spools what is left. See
    ``docs``/the module docstring for the delivery guarantees.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        run_id: str | int | None = None,
        producer: str | None = None,
        token: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        max_buffer: int = 10_000,
        role: str | None = None,
        client_id: str | int | None = None,
        batch_size: int = 1000,
        max_frame_bytes: int = 1_000_000,
        max_queue: int = 200_000,
        linger: float = 0.01,
        max_backoff: float = 5.0,
        connect_timeout: float = 5.0,
        close_timeout: float = 5.0,
        resume: bool = True,
        give_up_after: int | None = None,
    ) -> None:
        self.url = resolve_url(url)
        self._token = resolve_token(token)
        self._spool_root = resolve_spool_dir(spool_dir)
        self._max_buffer = max(1, int(max_buffer))
        self._batch = self._own_batch = max(1, min(int(batch_size), 1000))
        self._frame_bytes = self._own_frame_bytes = max(1024, int(max_frame_bytes))
        self._max_queue = max(self._max_buffer, int(max_queue))
        self._linger = linger
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._resume = resume
        self._give_up_after = give_up_after
        self._warned: set[str] = set()
        self._config = {
            "url": url,
            "run_id": run_id,
            "token": token,
            "spool_dir": None if spool_dir is None else str(spool_dir),
            "max_buffer": max_buffer,
            "role": role,
            "client_id": client_id,
        }
        self.run_id = self._initial_run_id(run_id)
        self._base_name = producer if producer and RUN_ID_RE.fullmatch(producer) else None
        if producer and self._base_name is None:
            self._once("bad_producer", "producer name %r is not valid; using a generated one", producer)
        self._good_runs: dict[Any, str] = {}
        self._default_role: str | None = None
        self._default_client_id: str | int | None = None
        source = self._make_source(role, client_id) if role or client_id is not None else None
        self._source = source or None
        if source:
            self._default_role, self._default_client_id = source["role"], source["client_id"]
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._generated = True
        self._counts = dict.fromkeys(
            (
                "emitted",
                "invalid",
                "non_finite",
                "sent",
                "frames",
                "acked",
                "refused",
                "spooled",
                "reconnects",
                "errors",
                "dropped",
                "renamed",
                "resumed",
                "bad_segments",
            ),
            0,
        )
        self._reset(fresh_name=True)
        _registry.add(self)

    # -- state -----------------------------------------------------------

    def _reset(self, *, fresh_name: bool) -> None:
        """(Re)build everything tied to one sender thread and one producer name."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._queue: deque[tuple[Any, ...]] = deque()
        self._inflight: deque[Entry] = deque()
        self._unsent: deque[Entry] = deque()
        self._spool: Spool | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._closing = False
        self._closed = False
        self._release_on_exit = False
        self._deadline = float("inf")
        self._helpers: list[Emitter] = []
        self._persist_requests: list[threading.Event] = []
        self._resumer: threading.Thread | None = None
        if fresh_name:
            self._generated = self._base_name is None
            self.producer = self._base_name or new_name()
        self._guard = True
        self._adopted = False
        self._next_id = 1
        self._oversize_counted_upto = 0
        """Oversize events are counted once, though a spooled one is fitted at every read."""
        self._drained_upto = 0
        self._acked = 0
        self._sent_id = 0
        self._max_sent = 0
        self._sent_mark = 0
        self._spool_retry_at = 0.0
        self._persist_ok = False
        self._sender_exited = False
        self._settled = 0
        self._connected = False
        self._ever_connected = False
        self._gave_up = False
        self.last_error: str | None = None

    @classmethod
    def _adopt(cls, spool: Spool, url: str | None = None, token: str | None = None, **kwargs: Any) -> Emitter:
        """An emitter that only delivers a spool left behind by another process.

        It keeps the spool's producer name and ids, so the relay drops what
        it already stored. An explicit (not generated) name whose relay
        history is ahead of what was sent under it gets a fresh name instead.
        """
        emitter = cls(url, token=token, producer=spool.producer, resume=False, **kwargs)
        emitter._spool = spool
        emitter._adopted = True
        emitter._generated = bool(spool.meta.get("generated"))
        emitter._base_name = None if emitter._generated else str(spool.meta.get("base") or spool.producer)
        emitter._guard = not emitter._generated
        emitter._max_sent = emitter._sent_mark = int(spool.meta.get("max_sent") or 0)
        emitter._next_id = spool.last_id + 1
        emitter._drained_upto = spool.last_id
        with emitter._lock:
            emitter._start_locked()
        return emitter

    def _initial_run_id(self, run_id: str | int | None) -> str:
        value = run_id if run_id is not None else os.environ.get("FEDRELAY_RUN_ID")
        if value is None or value == "":
            return new_run_id()
        text = str(value)
        if RUN_ID_RE.fullmatch(text):
            return text
        generated = new_run_id()
        self._once("bad_run_id", "run_id %r is not valid; using %s", value, generated)
        return generated

    # -- the hot path ----------------------------------------------------

    def emit(
        self,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        role: str | None = None,
        client_id: str | int | None = None,
    ) -> None:
        """Queue one event. Never raises; never blocks on I/O (except behind a concurrent close())."""
        try:
            if type not in EVENT_TYPES:
                self._invalid("unknown_type", "unknown event type %r; event dropped", type)
                return
            if data is None:
                data = {}
            else:
                if data.__class__ is dict:
                    data = data.copy()  # the caller may reuse its dict
                elif isinstance(data, Mapping):
                    data = dict(data)
                else:
                    self._invalid(
                        "bad_data", "data must be a dict, not %s; event dropped", data.__class__.__name__
                    )
                    return
                for key in _NESTED:  # and the metrics dicts a trainer updates in place, one level
                    value = data.get(key)
                    if value is not None and (value.__class__ is dict or value.__class__ is list):
                        data[key] = value.copy()
            if run_id is None:
                rid = self.run_id
            else:
                rid = self._good_runs.get(run_id)
                if rid is None:
                    rid = self._check_run_id(run_id)
                    if rid is None:
                        return
            if role is None and client_id is None:
                source = self._source
            else:
                source = self._make_source(role, client_id)
                if source is False:
                    return
            ts = time.time()
            with self._lock:
                if not self._running:
                    self._start_locked()
                if len(self._queue) >= self._max_queue:
                    self._counts["dropped"] += 1
                    self._once(
                        "queue_full",
                        "sender is %d events behind; dropping events (counted in stats['dropped'])",
                        len(self._queue),
                        level=logging.ERROR,
                    )
                    return
                event_id = self._next_id
                self._next_id = event_id + 1
                self._counts["emitted"] += 1
                self._queue.append((event_id, ts, type, rid, source, data))
        except Exception as exc:
            self._counts["errors"] += 1
            self._once("emit_failed", "emit(%r) failed: %r", type, exc)

    def _check_run_id(self, run_id: Any) -> str | None:
        text = str(run_id) if isinstance(run_id, int) and not isinstance(run_id, bool) else run_id
        if not isinstance(text, str) or not RUN_ID_RE.fullmatch(text):
            self._invalid("bad_run_id", "run_id %r is not 1-128 of [A-Za-z0-9._:-]; event dropped", run_id)
            return None
        if len(self._good_runs) < 4096:
            self._good_runs[run_id] = text
        return text

    def _make_source(self, role: str | None, client_id: Any) -> dict[str, Any] | bool:
        """``{"role", "client_id"}``, or False when invalid; a client id alone means a client."""
        role = role or self._default_role or ("client" if client_id is not None else None)
        if client_id is None:
            client_id = self._default_client_id
        if role not in _ROLES:
            self._invalid("bad_role", "role must be server, client or trainer, not %r; event dropped", role)
            return False
        if client_id is not None and (isinstance(client_id, bool) or not isinstance(client_id, str | int)):
            client_id = str(client_id)
        return {"role": role, "client_id": client_id}

    def _invalid(self, kind: str, message: str, *args: Any) -> None:
        with self._lock:
            self._counts["invalid"] += 1
        self._once(kind, message, *args)

    def _once(self, kind: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        """Log each kind of problem once per emitter: a training loop repeats itself."""
        if kind in self._warned:
            return
        self._warned.add(kind)
        log.log(level, "fedrelay emitter %s: " + message, getattr(self, "producer", "?"), *args)

    # -- public control --------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Counters since this emitter started in this process."""
        out = dict(self._counts)
        out["queued"] = len(self._queue)
        out["pending"] = max(0, self._next_id - 1 - self._settled) if self._running or self._closed else 0
        out["connected"] = int(self._connected)
        return out

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing emitted so far is pending (True) or ``timeout`` passes.

        Not pending: acked by the relay (stored or refused), or given up on here and counted
        in ``stats`` (invalid, unencodable, dropped, in an unreadable spool segment).
        """
        if self._pid != os.getpid():
            return True
        target = self._next_id - 1
        deadline = time.monotonic() + max(0.0, timeout)
        if self._settled < target:
            self._wake.set()  # send now rather than after the linger
        with self._cond:
            while self._settled < target:
                if self._thread is None or self._done.is_set():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def persist(self, timeout: float = 2.0) -> bool:
        """Write every event not acked yet to the spool now; True when done within ``timeout``.

        For processes that may end without running atexit hooks, where ``close()`` would never
        spool the leftovers: Ray ends its actor processes at the end of a simulation. The sender
        goes on delivering, from the spool, and ``fedrelay sync`` finds what it could not.
        """
        if self._pid != os.getpid():
            return True
        done = threading.Event()
        with self._lock:
            if not self._running or self._thread is None or self._done.is_set():
                return self._settled >= self._next_id - 1
            self._persist_requests.append(done)
        self._wake.set()
        return done.wait(max(0.0, timeout)) and self._persist_ok

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for at most ``timeout`` seconds, stop the sender, spool the rest.

        Returns True when everything was acked. What was not is in the spool
        dir, under this emitter's producer name and ids, for ``fedrelay sync``
        or the next emitter. ``emit()`` after ``close()`` starts a new sender
        under a new producer name; an ``emit()`` from another thread while
        ``close()`` puts the leftovers away waits for that (milliseconds).
        """
        if self._pid != os.getpid():
            return True
        with self._close_lock:
            return self._close(timeout)

    def _close(self, timeout: float) -> bool:
        with self._lock:
            thread = self._thread
            if not self._running or thread is None:
                self._closed = True
                return self._settled >= self._next_id - 1
            self._closing = True
            self._deadline = time.monotonic() + max(0.0, timeout)
        self._wake.set()
        ok = self.flush(timeout)
        self._stop.set()
        self._wake.set()
        for helper in list(self._helpers):
            helper.close(max(0.0, self._deadline - time.monotonic()))
        thread.join(max(0.0, self._deadline - time.monotonic()) + 2.0)
        with self._lock:
            # Under the lock: an emit() from another thread waits here, then starts a new sender
            # under a new name, instead of restarting on state that is still being put away.
            if not self._sender_exited:
                self._release_on_exit = True  # the sender spools and releases when it ends
            else:
                self._spool_leftovers()
                self._release_spool()
            self._running = False
            self._closed = True
        if self._release_on_exit:
            self._once("close_stuck", "sender did not stop in time; leftovers spooled when it does")
            return False
        return ok and self._settled >= self._next_id - 1

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self.close_timeout)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled into a Ray task or a subprocess: become that process's shared emitter."""
        from .shared import _rebuild

        return (_rebuild, (dict(self._config),))

    def __repr__(self) -> str:
        return f"Emitter(url={self.url!r}, run_id={self.run_id!r}, producer={self.producer!r})"

    # -- lifecycle -------------------------------------------------------

    def _start_locked(self) -> None:
        """Start (or, after close, restart under a new name) the sender thread."""
        if self._closed:
            if self._thread is not None and self._sender_exited:
                self._thread.join(1.0)  # past its last use of our state: only returning
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("emit() after close() while the old sender is still stopping")
            self._once("reopened", "emit() after close(): starting again under a new producer name")
            self._reset(fresh_name=False)
            self.producer = self._fresh_name()
        self._running = True
        self._thread = threading.Thread(
            target=self._run, name=f"fedrelay-sender-{self.producer}", daemon=True
        )
        self._thread.start()

    def _fresh_name(self) -> str:
        """A name the relay has never seen: a UUID, or the given name plus a random suffix."""
        return new_name() if self._generated else f"{self._base_name}-{os.urandom(6).hex()}"

    def _after_fork(self) -> None:
        """In a forked child: the parent keeps its name, queue and spool; start clean."""
        if self._spool is not None:
            self._spool.forget_lock()
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._reset(fresh_name=False)
        self.producer = self._fresh_name()
        self._counts = dict.fromkeys(self._counts, 0)
        self._warned = set()

    # -- the sender thread -----------------------------------------------

    def _run(self) -> None:
        try:
            if self._spool is None:
                self._open_spool()
            failures = session_failures = 0
            while not self._stop.is_set():
                ws = self._connect()
                if ws is None:
                    failures += 1
                    if self._closing:
                        break
                    if self._give_up_after and failures >= self._give_up_after:
                        self._gave_up = True
                        break
                    self._backoff(failures)
                    continue
                failures = 0
                acked_before = self._acked
                failed = False
                try:
                    self._session(ws)
                except _Reconnect:
                    pass
                except (ConnectionClosed, OSError, TimeoutError, ValueError) as exc:
                    failed = True
                    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 1009:
                        self._halve_limits()  # a frame over 4x the relay's limit: smaller ones
                    self.last_error = f"connection lost: {exc!r}"
                    self._once("disconnected", "connection to %s lost (%r); reconnecting", self.url, exc)
                except Exception as exc:  # a bug must cost a reconnect, not the sender
                    failed = True
                    self._counts["errors"] += 1
                    self.last_error = f"sender error: {exc!r}"
                    log.exception("fedrelay emitter %s: sender error; reconnecting", self.producer)
                finally:
                    self._connected = False
                    with contextlib.suppress(Exception):
                        ws.close()
                if failed:  # back off here too: a session that keeps failing must not spin
                    session_failures = 1 if self._acked > acked_before else session_failures + 1
                    self._backoff(session_failures)
        except Exception as exc:  # a bug here must not take the training process down
            self._counts["errors"] += 1
            log.exception("fedrelay emitter %s: sender failed: %r", self.producer, exc)
        finally:
            self._spool_leftovers()
            self._persist_ok = self._all_on_disk()
            self._answer_persist()
            with self._lock:
                self._sender_exited = True
                release = self._release_on_exit
            if release:
                self._release_spool()
            self._done.set()
            with self._cond:
                self._cond.notify_all()

    def _connect(self) -> ClientConnection | None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        timeout = self._connect_timeout
        if self._closing:
            timeout = max(0.5, min(timeout, self._deadline - time.monotonic()))
        try:
            # connect() is a context manager; entering it by hand (the connection is closed by
            # _run) avoids the deprecated direct use on websockets >= 17.1 without needing its
            # ``legacy`` flag, which older supported versions (>= 14) do not accept.
            return connect(
                publish_url(self.url, self.producer),
                additional_headers=headers,
                open_timeout=timeout,
                close_timeout=1,
                compression=None,
                proxy=None,
                max_size=2**24,
                user_agent_header=f"fedrelay-emitter/{__version__}",
            ).__enter__()
        except InvalidStatus as exc:
            code = exc.response.status_code
            self.last_error = f"relay answered HTTP {code}"
            hint = " (check the publish token)" if code in (401, 403) else ""
            self._once(f"http_{code}", "relay at %s answered HTTP %s%s; retrying", self.url, code, hint)
        except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, ValueError) as exc:
            self.last_error = f"cannot connect to {self.url}: {exc!r}"
            self._once("connect", "cannot connect to %s (%s); retrying in the background", self.url, exc)
        return None

    def _backoff(self, failures: int) -> None:
        """Capped exponential backoff with jitter; keeps draining the queue meanwhile.

        While closing, it waits at most until the close deadline.
        """
        delay = min(self._max_backoff, 0.1 * 2 ** min(failures - 1, 16)) * random.uniform(0.5, 1.0)
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            if self._closing:
                deadline = min(deadline, self._deadline)
            self._drain()
            self._serve_persist()
            self._update_settled()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, 0.05))
            self._wake.clear()

    def _session(self, ws: ClientConnection) -> None:
        hello = json.loads(ws.recv(timeout=self._connect_timeout))
        if not isinstance(hello, dict) or hello.get("op") != "hello":
            raise ValueError(f"expected hello, got {str(hello)[:200]}")
        last_id = hello.get("last_id")
        if isinstance(last_id, int) and last_id > self._sent_mark and self._guard:
            self._take_fresh_name(last_id)
            raise _Reconnect
        if self._ever_connected:
            self._counts["reconnects"] += 1
        self._ever_connected = self._connected = True
        self.last_error = None
        self._adopt_limits(hello)
        self._rewind()
        if isinstance(last_id, int):
            self._apply_ack(last_id)
        self._maybe_resume_orphans()
        replies = _ReplyReader(ws, self._wake, self.producer)
        try:
            while True:
                while replies.inbox:
                    self._handle(replies.inbox.popleft())
                self._drain()
                self._serve_persist()
                self._send_ready(ws)
                self._update_settled()
                if self._stop.is_set():
                    return
                if replies.ended is not None and not replies.inbox:
                    raise replies.ended
                # Emitted events wait up to one linger so that they leave in batches; a flush,
                # a persist request, close() or a reply from the relay ends the wait at once.
                self._wake.wait(self._linger)
                self._wake.clear()
        finally:
            ws.close()  # ends the reader thread too

    def _take_fresh_name(self, last_id: int) -> None:
        """The relay knows this name with ids we never sent: our ids would be dropped."""
        old = self.producer
        self.producer = self._fresh_name()
        self._max_sent = self._sent_mark = 0
        if self._spool is not None:
            if not self._spool.rename(self.producer):
                self._once("spool_rename", "could not rename spool dir %s", self._spool.path)
            with contextlib.suppress(OSError):
                self._spool.write_meta(max_sent=0)
        self._guard = True
        self._counts["renamed"] += 1
        self._rewind()
        log.warning(
            "fedrelay emitter: the relay already has ids up to %s from producer %r; "
            "publishing as %r instead so that no event is dropped as a duplicate",
            last_id,
            old,
            self.producer,
        )

    def _rewind(self) -> None:
        """A new connection: resend everything not acked, from the oldest."""
        if self._inflight:
            self._unsent.extendleft(reversed(self._inflight))
            self._inflight.clear()
        self._sent_id = self._acked

    def _handle(self, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            self._once("bad_reply", "relay sent something that is not JSON: %.100r", message)
            return
        if not isinstance(frame, dict):
            return
        op = frame.get("op")
        if op == "ack":
            upto = frame.get("upto")
            if isinstance(upto, int):
                self._apply_ack(upto)
        elif op == "error":
            code = str(frame.get("code"))
            self._counts["refused"] += 1
            self._once(
                f"refused_{code}",
                "relay refused event id=%s: %s (%s)",
                frame.get("id"),
                code,
                frame.get("detail"),
            )
            if frame.get("id") is None and code in _FRAME_LEVEL:
                self._shrink_frames()

    def _adopt_limits(self, hello: dict[str, Any]) -> None:
        """Frames no larger than the relay takes (its ``hello`` says): a frame past its
        limit is refused whole, and past 4x the limit the connection is closed. Each
        hello sets them anew, so a relay restarted with larger limits gets larger frames."""
        frame_bytes, per_frame = hello.get("max_frame_bytes"), hello.get("max_events_per_frame")
        if isinstance(frame_bytes, int) and not isinstance(frame_bytes, bool) and frame_bytes >= 1024:
            self._frame_bytes = min(self._own_frame_bytes, frame_bytes)
        if isinstance(per_frame, int) and not isinstance(per_frame, bool) and per_frame >= 1:
            self._batch = min(self._own_batch, per_frame)

    def _fitted(self, entry: Entry) -> Entry:
        """An event the relay would refuse for its size becomes an ``error`` event with the
        same id: sent as it is, it would be refused on every reconnect; dropped, nobody
        watching would know, and a spooled one would wait for an ack that never comes."""
        event_id, line = entry
        limit = max(self._frame_bytes - _STORED_SLACK, self._frame_bytes // 4)
        if len(line) <= limit:
            return entry
        if event_id > self._oversize_counted_upto:
            self._oversize_counted_upto = event_id
            with self._lock:
                self._counts["invalid"] += 1
        self._once(
            "too_large",
            "an event of %d bytes is over the limit of %d per event; an error event is sent in its place",
            len(line),
            limit,
        )
        return event_id, too_large_stand_in(line, limit)

    def _shrink_frames(self) -> None:
        """The relay's frame limits are below ours: halve them and resend."""
        if self._halve_limits():
            raise _Reconnect

    def _halve_limits(self) -> bool:
        """For a relay that refuses our frames though its hello named no limit; False at the floor."""
        if self._batch == 1 and self._frame_bytes <= 4096:
            self._once("frame_floor", "relay refuses even single small frames; giving up shrinking")
            return False
        self._batch = max(1, self._batch // 2)
        self._frame_bytes = max(min(4096, self._frame_bytes), self._frame_bytes // 2)
        return True

    def _apply_ack(self, upto: int) -> None:
        if upto <= self._acked:
            return
        self._acked = upto
        acked = 0
        for pending in (self._inflight, self._unsent):
            while pending and pending[0][0] <= upto:
                pending.popleft()
                acked += 1
        if self._spool is not None:
            acked += self._spool.trim(upto)
        self._counts["acked"] += acked
        self._sent_id = max(self._sent_id, upto)

    def _update_settled(self) -> None:
        """Publish, for flush(), the id up to which nothing is pending."""
        first = self._spool.first_id if self._spool is not None else None
        if first is None and self._inflight:
            first = self._inflight[0][0]
        if first is None and self._unsent:
            first = self._unsent[0][0]
        settled = self._drained_upto
        if first is not None:  # a partly acked spool segment may start at or below the ack
            settled = first - 1 if first > self._acked else self._acked
        if settled != self._settled:
            with self._cond:
                self._settled = settled
                self._cond.notify_all()

    # -- encoding, spilling ----------------------------------------------

    def _drain(self) -> None:
        """Encode what emit() queued; spill the oldest to disk past max_buffer."""
        queue, unsent, counts = self._queue, self._unsent, self._counts
        while queue:
            try:
                event_id, ts, type_, run_id, source, data = queue.popleft()
            except IndexError:
                break
            self._drained_upto = event_id
            try:
                line, non_finite = encode_event(event_id, ts, type_, run_id, source, data)
            except Unencodable as exc:
                counts["errors"] += 1
                self._once("unencodable", "a %s event cannot be encoded (%s); dropped", type_, exc)
                continue
            if non_finite:
                counts["non_finite"] += non_finite
                self._once("non_finite", "NaN/Infinity in a %s event sent as null", type_)
            unsent.append(self._fitted((event_id, line)))
            if len(unsent) + len(self._inflight) > self._max_buffer:
                self._spill(len(unsent) + len(self._inflight) - self._max_buffer // 2)

    def _spill(self, count: int, *, force: bool = False) -> None:
        """Move the ``count`` oldest in-memory events to the spool, in order.

        When the spool cannot be opened (no usable spool dir) or written (disk full), the
        events stay in memory, the spool is tried again at most every ``_SPOOL_RETRY`` seconds
        (``force``: now, for ``close()`` and ``persist()``), and past ``max_buffer`` events in
        memory the oldest are dropped: counted in ``stats["dropped"]`` and logged once as an
        error. Memory stays bounded and the cost per event constant, whatever the disk does.
        """
        now = time.monotonic()
        if force or now >= self._spool_retry_at:
            if self._spool is None:
                self._open_spool()
            if self._spool is not None:
                self._write_spool(min(count, len(self._inflight) + len(self._unsent)), now)
        excess = len(self._inflight) + len(self._unsent) - self._max_buffer
        if excess > 0:
            for _ in range(excess):
                (self._inflight or self._unsent).popleft()
            self._counts["dropped"] += excess
            self._once(
                "spool_drop",
                "buffer full and the spool unusable: dropping the oldest events (counted in "
                "stats['dropped'])",
                level=logging.ERROR,
            )

    def _write_spool(self, count: int, now: float) -> None:
        assert self._spool is not None
        from_inflight = min(count, len(self._inflight))
        moved = [(self._inflight or self._unsent).popleft() for _ in range(count)]
        written = 0
        try:
            for chunk in self._chunks(moved):
                self._spool.append(chunk)
                written += len(chunk)
            self._spool.write_meta(max_sent=self._sent_mark)
        except OSError as exc:
            self._counts["errors"] += 1
            self._spool_retry_at = now + _SPOOL_RETRY
            self._once(
                "spool_write",
                "cannot write spool %s (%s); keeping at most %d events in memory",
                self._spool.path,
                exc,
                self._max_buffer,
                level=logging.ERROR,
            )
            back = moved[written:]  # where they came from: ids stay in order along the line
            to_inflight = max(0, from_inflight - written)
            self._unsent.extendleft(reversed(back[to_inflight:]))
            self._inflight.extendleft(reversed(back[:to_inflight]))
        self._counts["spooled"] += written

    def _chunks(self, entries: list[Entry]) -> list[list[Entry]]:
        """Split into frame-sized runs: one spool segment is one frame."""
        chunks: list[list[Entry]] = []
        current: list[Entry] = []
        size = 2
        for entry in entries:
            if current and (len(current) >= self._batch or size + len(entry[1]) + 1 > self._frame_bytes):
                chunks.append(current)
                current, size = [], 2
            current.append(entry)
            size += len(entry[1]) + 1
        if current:
            chunks.append(current)
        return chunks

    def _open_spool(self) -> None:
        meta = {
            "generated": self._generated,
            "base": self._base_name,
            "max_sent": self._sent_mark,
            "url": self.url,
            "run_id": self.run_id,
            "pid": os.getpid(),
            "created": time.time(),
        }
        try:
            spool = Spool.create(self._spool_root, self.producer, meta)
            if spool is None:  # an explicit name already has a spool dir: not ours to extend
                self.producer = self._fresh_name()
                spool = Spool.create(self._spool_root, self.producer, meta)
        except OSError as exc:
            self._counts["errors"] += 1
            self._spool_retry_at = time.monotonic() + _SPOOL_RETRY
            self._once("spool_dir", "spool dir %s unusable (%s)", self._spool_root, exc, level=logging.ERROR)
            return
        self._spool = spool

    def _spool_leftovers(self) -> None:
        """Everything not acked goes to disk: the queue, then memory, after the spool."""
        try:
            self._drain()
            leftovers = len(self._inflight) + len(self._unsent)
            if leftovers:
                self._spill(leftovers, force=True)
            elif self._spool is not None:
                self._spool.write_meta(max_sent=self._sent_mark)
        except Exception as exc:
            self._counts["errors"] += 1
            log.error("fedrelay emitter %s: could not spool leftovers: %r", self.producer, exc)
        self._update_settled()

    def _all_on_disk(self) -> bool:
        """Nothing unacked left only in memory (what is not acked is in the spool)."""
        return not self._inflight and not self._unsent

    def _serve_persist(self) -> None:
        """In the sender: answer ``persist()`` calls by spooling everything not acked."""
        if not self._persist_requests:
            return
        self._spool_leftovers()  # without a usable spool, the events stay in memory (bounded)
        self._persist_ok = self._all_on_disk()
        self._answer_persist()

    def _answer_persist(self) -> None:
        with self._lock:
            requests, self._persist_requests = self._persist_requests, []
        for done in requests:
            done.set()

    def _release_spool(self) -> None:
        if self._spool is not None:
            self._spool.release()

    # -- sending ---------------------------------------------------------

    def _send_ready(self, ws: ClientConnection) -> None:
        window = max(self._max_buffer, self._batch)
        while self._sent_id - self._acked < window:
            entries = self._next_frame()
            if not entries:
                return
            if entries[-1][0] > self._sent_mark:
                self._raise_mark(entries[-1][0])
            ws.send("[" + ",".join(line for _, line in entries) + "]")
            self._sent_id = entries[-1][0]
            self._max_sent = max(self._max_sent, self._sent_id)
            self._counts["frames"] += 1
            self._counts["sent"] += len(entries)

    def _raise_mark(self, upto: int) -> None:
        """Before ids past the recorded mark go out, record a higher one (one window ahead).

        ``meta.json``'s ``max_sent`` is then never below what the relay may have from this
        name, even after a kill -9, so whoever adopts the spool keeps the name (and the
        relay's deduplication) unless another process really used it: no event twice.
        """
        mark = upto + max(self._max_buffer, self._batch)
        if self._spool is not None:
            try:
                self._spool.write_meta(max_sent=mark)
            except OSError as exc:  # delivery goes on; only a crash right now could duplicate
                self._counts["errors"] += 1
                self._once("spool_meta", "cannot write %s/meta.json (%s)", self._spool.path, exc)
        self._sent_mark = mark

    def _next_frame(self) -> list[Entry]:
        """The oldest events not yet sent on this connection, at most one frame."""
        if self._spool is not None:
            for segment in list(self._spool.segments):
                if segment.last > self._sent_id:
                    try:
                        entries = Spool.read(segment)
                    except (OSError, DamagedSegment) as exc:
                        if isinstance(exc, OSError) and exc.errno in _TRANSIENT:
                            raise  # a reconnect, after a backoff, reads it again
                        self._quarantine(segment, exc)
                        continue
                    return self._chunks([self._fitted(e) for e in entries if e[0] > self._sent_id])[0]
        if not self._unsent:
            return []
        frame: list[Entry] = []
        size = 2
        unsent = self._unsent
        while unsent and len(frame) < self._batch:
            entry = unsent[0] = self._fitted(unsent[0])
            if frame and size + len(entry[1]) + 1 > self._frame_bytes:
                break
            frame.append(unsent.popleft())
            size += len(entry[1]) + 1
        self._inflight.extend(frame)
        return frame

    def _quarantine(self, segment: Segment, exc: Exception) -> None:
        """A segment that cannot be read must not stop the rest: set it aside, say so once."""
        assert self._spool is not None
        where = self._spool.quarantine(segment)
        self._counts["bad_segments"] += 1
        self._once(
            "bad_segment",
            "spool segment %s unreadable (%s): %d events skipped, file kept as %s "
            "(counted in stats['bad_segments'])",
            segment.path,
            exc,
            segment.count,
            where or "nothing (it is gone)",
            level=logging.ERROR,
        )

    # -- orphans -------------------------------------------------------------

    def _maybe_resume_orphans(self) -> None:
        if not self._resume or self._resumer is not None or self._adopted:
            return
        self._resumer = threading.Thread(target=self._resume_orphans, name="fedrelay-resume", daemon=True)
        self._resumer.start()

    def _resume_orphans(self) -> None:
        """Deliver spools that dead processes left in our spool dir (same relay only)."""
        target = publish_url(self.url, "_")
        for path in producer_dirs(self._spool_root, exclude=self.producer):
            if self._closing or self._stop.is_set():
                return
            spool = Spool.adopt(path)
            if spool is None:
                continue
            if not spool.segments or publish_url(str(spool.meta.get("url") or self.url), "_") != target:
                spool.release()
                continue
            helper = Emitter._adopt(spool, self.url, self._token, spool_dir=self._spool_root, give_up_after=3)
            self._helpers.append(helper)
            if helper.flush(timeout=60):
                self._counts["resumed"] += helper._counts["acked"]
            helper.close(timeout=1)
            self._helpers.remove(helper)


_registry: weakref.WeakSet[Emitter] = weakref.WeakSet()
"""Every emitter of this process: closed at exit, reset in a forked child."""


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + max((e.close_timeout for e in list(_registry)), default=0.0)
    for emitter in list(_registry):
        if emitter._pid == os.getpid() and emitter._running:
            try:
                emitter.close(max(0.2, deadline - time.monotonic()))
            except Exception:  # pragma: no cover - exit must go on
                log.exception("fedrelay emitter: close at exit failed")


def _reset_after_fork() -> None:
    for emitter in list(_registry):
        emitter._after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
