"""The Emitter: ``emit()`` in microseconds, delivery in a background thread.

``emit()`` runs in the training loop, so it only checks what is cheap to check, stamps an id
and a time, and appends to a deque. Everything slow (JSON, sockets, disk) happens in the
sender thread (``sender.py``) around an I/O-free core (``core.py``) that decides what to send,
spool, and wait for. This module is the public face: settings, the queue, waiting
(``flush``/``settle``), ``persist``, ``close``, and what happens across fork, pickling, exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..names import EVENT_TYPES, RUN_ID_RE
from ..tls import client_context, is_secure
from .config import (
    new_name,
    new_run_id,
    orphan_roots,
    resolve_ca_file,
    resolve_spool_dir,
    resolve_token,
    resolve_urls_setting,
    share_a_node,
    spool_urls,
)
from .core import DEFAULT_CONNECT_BUDGET, EmitterCore
from .reach import ReachMark
from .sender import Sender
from .spool import Spool, producer_dirs

_ROLES = frozenset(("server", "client", "trainer"))
_NESTED = ("metrics", "fit_metrics", "eval_metrics", "server_metrics", "config", "participating_clients")
"""The protocol's nested ``data`` fields, copied by ``emit()``: trainers reuse and mutate them
(Lightning's ``callback_metrics``). Other nested values are not copied (a loop over every key
would double emit()'s cost); the encoder retries if one changes size while it is encoded."""
_SHELL_COUNTS = ("emitted", "invalid", "dropped", "errors", "resumed")
_STATS_ORDER = (
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
)

log = logging.getLogger("fedrelay.emitter")


class Emitter:
    """Publish training events to a fedrelay relay without slowing training down.

    ``emit()`` never raises and never blocks; ``flush()`` waits for acks; ``settle()`` waits
    only while that can pay off and puts the rest on disk; ``close()`` settles within
    ``timeout`` and spools what is left. See docs/emitters.md for the guarantees.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
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
        reach_timeout: float = 1.0,
        connect_budget: float = DEFAULT_CONNECT_BUDGET,
        resume: bool = True,
        give_up_after: int | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        url_source: str = "argument",
        logger: logging.Logger | None = None,
    ) -> None:
        setting = resolve_urls_setting(url, url_source)
        self.urls: tuple[str, ...] = setting.urls
        """The relay's addresses, tried in this order (see docs/emitters.md, several relays)."""
        self.url_source = setting.source
        """Where ``urls`` came from: the caller's ``url_source`` (``argument``, ``run config``, ...),
        ``FEDRELAY_URL`` or ``default``. Logged once when the first event is emitted."""
        self.log = logger or log
        self._token = resolve_token(token)
        self._ca_file = resolve_ca_file(ca_file)
        self._ssl: ssl.SSLContext | None = None
        self._spool_dir_arg = spool_dir
        self._spool_root = resolve_spool_dir(spool_dir, self.urls[0])
        self._mark = ReachMark(self._spool_root, self.urls)
        self._max_buffer = max(1, int(max_buffer))
        self._batch_size = batch_size
        self._frame_bytes = max_frame_bytes
        self._max_queue = max(self._max_buffer, int(max_queue))
        self._linger = linger
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._reach_timeout = reach_timeout
        self._connect_budget = max(0.0, float(connect_budget))
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
            "ca_file": None if ca_file is None else os.fspath(ca_file),
            "url_source": url_source,
        }
        self.run_id = self._initial_run_id(run_id)
        self._base_name = producer if producer and RUN_ID_RE.fullmatch(producer) else None
        if producer and self._base_name is None:
            self._once("bad_producer", "producer name %r is not valid; using a generated one", producer)
        self._generated = self._base_name is None
        self._good_runs: dict[Any, str] = {}
        self._default_role: str | None = None
        self._default_client_id: str | int | None = None
        source = self._make_source(role, client_id) if role or client_id is not None else None
        self._source = source or None
        if source:
            self._default_role, self._default_client_id = source["role"], source["client_id"]
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._counts = dict.fromkeys(_SHELL_COUNTS, 0)
        self._past: dict[str, int] = {}
        """Counters of earlier senders (before a close() and a new emit, or a reopen)."""
        self._announced = False
        self._adopting: Spool | None = None
        self._new_generation(self._base_name or new_name())
        _registry.add(self)

    # -- state -----------------------------------------------------------

    def _new_generation(self, name: str) -> None:
        """Everything tied to one sender thread and one producer name (ids start at 1)."""
        self._pid = os.getpid()
        self._name = name
        self._queue: deque[tuple[Any, ...]] = deque()
        self._sender: Sender | None = None
        self._next_id = 1
        self._running = False
        self._closed = False
        self._helpers: list[Emitter] = []
        self._resumer: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The relay address in use: the one connected to, or tried next (the first at start)."""
        sender = self._sender
        return sender.core.url if sender is not None else self.urls[0]

    @property
    def producer(self) -> str:
        """The producer name events are published under (it may change: see docs)."""
        sender = self._sender
        return sender.core.producer if sender is not None else self._name

    @property
    def last_error(self) -> str | None:
        sender = self._sender
        return sender.last_error if sender is not None else None

    @property
    def _ever_connected(self) -> bool:
        sender = self._sender
        return sender is not None and sender.core.ever_connected

    @property
    def _settled(self) -> int:
        sender = self._sender
        return sender.settled if sender is not None else 0

    @classmethod
    def _adopt(
        cls, spool: Spool, url: str | Sequence[str] | None = None, token: str | None = None, **kwargs: Any
    ) -> Emitter:
        """An emitter that only delivers a spool left behind by another process.

        It keeps the spool's producer name and ids, so the relay drops what
        it already stored. An explicit (not generated) name whose relay
        history is ahead of what was sent under it gets a fresh name instead.
        """
        emitter = cls(url, token=token, producer=spool.producer, resume=False, **kwargs)
        emitter._generated = bool(spool.meta.get("generated"))
        emitter._base_name = None if emitter._generated else str(spool.meta.get("base") or spool.producer)
        emitter._adopting = spool
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
        self.log.log(level, "fedrelay emitter %s: " + message, getattr(self, "producer", "?"), *args)

    def _report(self, kind: str, level: int, message: str, *args: Any) -> None:
        """What the core reports (it has no logger of its own)."""
        self._once(kind, message, *args, level=level)

    # -- public control --------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Counters since this emitter started in this process."""
        merged = dict(self._past)
        sender = self._sender
        if sender is not None:
            for key, value in dict(sender.core.counts).items():
                merged[key] = merged.get(key, 0) + value
        merged["invalid"] = merged.get("invalid", 0) + merged.pop("oversize", 0)
        out = {key: self._counts.get(key, 0) + merged.get(key, 0) for key in _STATS_ORDER}
        out["queued"] = len(self._queue)
        out["pending"] = max(0, self._next_id - 1 - self._settled) if self._running or self._closed else 0
        out["connected"] = int(sender is not None and sender.connected)
        return out

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing emitted so far is pending (True) or ``timeout`` passes.

        Not pending: acked by the relay (stored or refused), or given up on here and counted
        in ``stats`` (invalid, unencodable, dropped, in an unreadable spool segment). This waits
        the whole ``timeout`` while the relay is down, in case it comes back; code that must not
        be slowed down by an outage uses :meth:`settle`.
        """
        if self._pid != os.getpid():
            return True
        sender = self._sender
        target = self._next_id - 1
        if sender is None:
            return target <= 0
        return sender.wait_settled(target, time.monotonic() + max(0.0, timeout), bounded=False)

    def settle(self, timeout: float = 2.0) -> bool:
        """Wait for acks only while that can pay off, then put what is left on disk; True when
        everything was acked.

        For points where training waits (a Flower reply, the end of a fit, process exit): with
        the relay known unreachable (a connect failed, or another process marked it so, see
        docs/emitters.md) it does not wait at all; before the first connection's outcome is
        known it waits at most ``reach_timeout``, and at most ``connect_budget`` while a TCP
        connect goes unanswered (a host that drops packets). What is not acked is spooled (``persist``),
        so that a process ended without atexit hooks (Ray actors) loses nothing.
        """
        if self._pid != os.getpid():
            return True
        sender = self._sender
        target = self._next_id - 1
        if sender is None or target <= 0:
            return target <= 0
        deadline = time.monotonic() + max(0.0, timeout)
        if sender.wait_settled(target, deadline, bounded=True):
            return True
        sender.first_contact_overdue()
        sender.persist(max(deadline - time.monotonic(), 0.5), durable=False)
        return False

    def persist(self, timeout: float = 2.0) -> bool:
        """Write every event not acked yet to the spool now; True when done within ``timeout``.

        For processes that may end without running atexit hooks, where ``close()`` would never
        spool the leftovers: Ray ends its actor processes at the end of a simulation. The sender
        goes on delivering, from the spool, and ``fedrelay sync`` finds what it could not.
        """
        if self._pid != os.getpid():
            return True
        with self._lock:
            sender = self._sender
            if not self._running or sender is None or sender.done.is_set():
                return self._settled >= self._next_id - 1
        return sender.persist(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Settle for at most ``timeout`` seconds, stop the sender, spool the rest.

        Returns True when everything was acked. What was not is in the spool
        dir, under this emitter's producer name and ids, for ``fedrelay sync``
        or the next emitter. With the relay known unreachable it does not wait.
        ``emit()`` after ``close()`` starts a new sender under a new producer name;
        an ``emit()`` from another thread while ``close()`` puts the leftovers away
        waits for that (milliseconds).
        """
        if self._pid != os.getpid():
            return True
        with self._close_lock:
            return self._close(timeout)

    def _close(self, timeout: float) -> bool:
        with self._lock:
            sender = self._sender
            if not self._running or sender is None:
                self._closed = True
                return self._settled >= self._next_id - 1
        target = self._next_id - 1
        deadline = time.monotonic() + max(0.0, timeout)
        ok = sender.wait_settled(target, deadline, bounded=True)
        if not ok:
            sender.first_contact_overdue()
        connected = sender.connected
        resuming = self._resumer is not None and self._resumer.is_alive()
        if ok and connected and self._resume and not resuming:
            # A last pass while the relay is reachable: processes that ended since this emitter's
            # last session (Ray ends a simulation's actors before the driver exits) left spools.
            self._resume_orphans(deadline)
        sender.stop.set()
        sender.wake.set()
        for helper in list(self._helpers):
            helper.close(max(0.0, deadline - time.monotonic()))
        with self._lock:
            # Under the lock: an emit() from another thread waits here, then starts a new sender
            # under a new name, instead of restarting on state that is still being put away.
            taken = sender.take_over(max(1.0, deadline - time.monotonic()))
            self._running = False
            self._closed = True
        if not taken:
            self._once("close_stuck", "sender did not stop in time; leftovers spooled when it does")
            return False
        if connected:  # a clean close handshake; nothing to wait for with the relay away
            sender.thread.join(max(0.0, min(1.0, deadline - time.monotonic())))
        return ok and sender.settled >= target

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self.close_timeout)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled into a Ray task or a subprocess: become that process's shared emitter."""
        from .shared import _rebuild

        return (_rebuild, (dict(self._config),))

    def __repr__(self) -> str:
        url = self.urls[0] if len(self.urls) == 1 else list(self.urls)
        return f"Emitter(url={url!r}, run_id={self.run_id!r}, producer={self.producer!r})"

    # -- lifecycle -------------------------------------------------------

    def _start_locked(self) -> None:
        """Start (or, after close, restart under a new name) the sender thread."""
        if self._closed:
            self._once("reopened", "emit() after close(): starting again under a new producer name")
            self._retire_sender()
            self._new_generation(self._fresh_name())
        spool = self._adopting
        self._adopting = None
        now = time.monotonic()
        core = EmitterCore(
            self._name,
            fresh_name=self._fresh_name,
            urls=self.urls,
            max_buffer=self._max_buffer,
            batch_size=self._batch_size,
            frame_bytes=self._frame_bytes,
            max_backoff=self._max_backoff,
            give_up_after=self._give_up_after,
            reach_timeout=self._reach_timeout,
            connect_budget=self._connect_budget,
            report=self._report,
            now=now,
        )
        if spool is not None:
            core.adopt(spool.found, int(spool.meta.get("max_sent") or 0))
            core.guard = not self._generated
            self._next_id = core.drained_upto + 1
        core.shared_mark(self._mark.down_recently())
        meta = {
            "generated": self._generated,
            "base": self._base_name,
            "url": self.urls[0],
            "urls": list(self.urls),
            "run_id": self.run_id,
            "pid": os.getpid(),
        }
        self._sender = Sender(self, core, self._queue, spool=spool, meta=meta, mark=self._mark)
        self._running = True
        if not self._announced and spool is None:
            self._announced = True
            several = len(self.urls) > 1
            self.log.info(
                "fedrelay: publishing to %s (%s from %s) as producer %s; spool %s",
                ", ".join(self.urls) + (", in this order, moving on when one fails" if several else ""),
                "urls" if several else "url",
                self.url_source,
                self._name,
                self._spool_root,
            )
        self._sender.start()

    def _retire_sender(self) -> None:
        sender = self._sender
        if sender is None:
            return
        for key, value in dict(sender.core.counts).items():
            self._past[key] = self._past.get(key, 0) + value

    def _fresh_name(self) -> str:
        """A name the relay has never seen: a UUID, or the given name plus a random suffix."""
        return new_name() if self._generated else f"{self._base_name}-{os.urandom(6).hex()}"

    def _tls_context(self, url: str) -> ssl.SSLContext | None:
        """The verifying context for a ``wss://`` address, made once (loading CAs takes milliseconds)."""
        if not is_secure(url):
            return None
        if self._ssl is None:
            self._ssl = client_context(self._ca_file)
        return self._ssl

    def _after_fork(self) -> None:
        """In a forked child: the parent keeps its name, queue and spool; start clean."""
        sender = self._sender
        if sender is not None and sender.spool is not None:
            sender.spool.forget_lock()
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._counts = dict.fromkeys(_SHELL_COUNTS, 0)
        self._past = {}
        self._warned = set()
        self._adopting = None
        self._new_generation(self._fresh_name())

    # -- orphans -------------------------------------------------------------

    def _session_started(self) -> None:
        """Each session: deliver what dead processes left, in the background, one pass at a time.

        Every session, not only the first: processes that died while the relay was away (Ray's
        actors at the end of a simulation, a Deployment Engine's ClientApps) leave spools
        behind after this emitter's first pass.
        """
        if not self._resume or (self._resumer is not None and self._resumer.is_alive()):
            return
        self._resumer = threading.Thread(target=self._resume_orphans, name="fedrelay-resume", daemon=True)
        self._resumer.start()

    def _resume_orphans(self, deadline: float | None = None) -> None:
        """Deliver spools that dead processes left for this relay: in this emitter's spool dir,
        and, when the default is in use, in the other addresses' directories and the shared
        directory of the old layout. ``deadline`` (monotonic): give up on what is not delivered by
        then (``close()``'s budget)."""
        roots: list[Path] = orphan_roots(self._spool_dir_arg, self.urls)
        sender = self._sender
        for root in roots:
            for path in producer_dirs(root, exclude=self.producer):
                if sender is None or sender.stop.is_set():
                    return
                spool = Spool.adopt(path)
                if spool is None:
                    continue
                if not spool.found or not share_a_node(spool_urls(spool.meta, self.urls), self.urls):
                    spool.release()
                    continue
                helper = Emitter._adopt(
                    spool,
                    list(self.urls),
                    self._token,
                    spool_dir=root,
                    give_up_after=3,
                    ca_file=self._ca_file,
                    logger=self.log,
                )
                self._helpers.append(helper)
                budget = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
                if helper.flush(timeout=budget):
                    self._counts["resumed"] += helper.stats["acked"]
                helper.close(timeout=min(1.0, budget))
                self._helpers.remove(helper)
                if deadline is not None and time.monotonic() >= deadline:
                    return


_registry: weakref.WeakSet[Emitter] = weakref.WeakSet()
"""Every emitter of this process: closed at exit, reset in a forked child."""


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + max((e.close_timeout for e in list(_registry)), default=0.0)
    for emitter in list(_registry):
        if emitter._pid == os.getpid() and emitter._running:
            try:
                emitter.close(max(0.2, deadline - time.monotonic()))
            except Exception:  # pragma: no cover - exit must go on
                emitter.log.exception("fedrelay emitter: close at exit failed")


def _reset_after_fork() -> None:
    for emitter in list(_registry):
        emitter._after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
