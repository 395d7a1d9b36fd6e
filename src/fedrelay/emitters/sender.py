"""The thread shell around one :class:`~fedrelay.emitters.core.EmitterCore`: socket, spool files,
the reachability mark, and the clock.

One daemon thread per producer generation connects to ``/publish``, feeds the core what
happens, and carries out what it answers. The core is touched only under ``lock``, which the
thread holds for core steps and spool writes (bounded: CPU and local disk) and releases for
everything that waits on the network (connecting, the relay's hello, sending, lingering). So
``close()`` and ``persist()`` can always take the core within milliseconds, also while the
thread is stuck connecting to a relay that drops packets: ``close()`` then puts what is left
on disk itself and leaves the thread to die with the process (``taken_over``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import select
import socket
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .. import __version__
from ..tls import certificate_problem, explain_ca_file, explain_certificate
from .config import publish_url
from .core import (
    SILENT,
    SPOOL_RETRY,
    Action,
    DeleteSegments,
    EmitterCore,
    GiveUp,
    MarkReach,
    ReadSegment,
    Send,
    SendControl,
    TakeName,
    Wait,
    WriteSegments,
)
from .reach import ReachMark
from .spool import DamagedSegment, Segment, Spool

TRANSIENT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN))
"""Read errors that say nothing about the segment: retried, not quarantined."""
_CONNECT_SLICE = 0.05
"""Seconds between checks of the stop flag while a TCP connect is pending."""


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


class Sender:
    """One producer generation: its core, its spool directory, its thread and connection.

    ``owner`` is the :class:`~fedrelay.emitters.client.Emitter`: it logs (``_once``), hears about
    the first session (``_session_started``) and holds the settings read here.
    """

    def __init__(
        self,
        owner: Any,
        core: EmitterCore,
        queue: deque[tuple[Any, ...]],
        *,
        spool: Spool | None = None,
        meta: dict[str, Any],
        mark: ReachMark | None,
    ) -> None:
        self.owner = owner
        self.core = core
        self.queue = queue
        self.spool = spool
        self.meta = meta
        self.mark = mark
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.done = threading.Event()
        self.cond = threading.Condition()
        self.settled = core.settled
        self.taken_over = False
        self.hand_back = False
        """close() could not take the core in time: the thread puts things away when it stops."""
        self.connected = False
        self.last_error: str | None = None
        self._dial: socket.socket | None = None
        """The socket of the TCP connect in progress, for waiters (:meth:`_answered`)."""
        self.stopped_waiting: str | None = None
        """Why the latest bounded wait (settle, close) stopped before its acks: the core's
        ``UNREACHABLE``, ``SILENT`` or ``OVERDUE`` (None: it got them, or timed out)."""
        self.thread = threading.Thread(target=self._run, name=f"fedrelay-sender-{core.producer}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- called from other threads ----------------------------------------------------------

    def wait_settled(self, target: int, deadline: float, *, bounded: bool) -> bool:
        """Wait until nothing up to ``target`` is pending (True) or ``deadline``; with ``bounded``,
        also stop as soon as waiting cannot pay off (the relay known unreachable, or silent)."""
        self.stopped_waiting = None
        if self.settled >= target:
            return True
        self.wake.set()  # send now rather than after the linger
        with self.cond:
            while self.settled < target:
                if self.done.is_set() or self.taken_over:
                    return False
                now = time.monotonic()
                if now >= deadline:
                    return False
                step = deadline - now
                if bounded:
                    why = self.core.not_worth_waiting(now, answered=self._answered())
                    if why is not None:
                        self.stopped_waiting = why
                        return False
                    until = self.core.reach_deadline()
                    if until is not None:
                        step = min(step, max(0.001, until - now))
                self.cond.wait(min(step, 0.05))
        return True

    def _answered(self) -> bool:
        """Whether the pending TCP connect has an answer (connected or refused) that this sender's
        thread has not reported to the core yet: a relay that answered in time is not called
        silent because the thread that connects was not scheduled. Only looks: reading the
        socket's error would take it from the connecting thread."""
        sock = self._dial
        if sock is None:
            return False
        try:
            _, writable, _ = select.select([], [sock], [], 0)
        except (OSError, ValueError):  # closed meanwhile: the thread has reported (or will)
            return False
        return bool(writable)

    def first_contact_overdue(self) -> None:
        """A bounded wait stopped before the first connection's outcome was known: tell the next
        processes, so that they do not wait at all. After ``reach_timeout`` (as before), or as
        soon as a TCP connect went unanswered for ``connect_budget`` (``SILENT``) when there is
        one address: a process given several is never told the relay is down because one
        address is silent (the mark is the list's)."""
        if self.mark is None or self.core.reach != "unknown":
            return
        if self.stopped_waiting == SILENT and self.core.relays.several:
            return
        self.mark.set(up=False)

    def persist(self, timeout: float, *, durable: bool = True) -> bool:
        """Spool everything not acked, now; True once all of it is on disk.

        ``durable=False`` (for ``settle``, where training waits): renamed into place without
        fsyncs, which survives the process; the thread syncs it next time round.
        """
        if not self.lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            if not self.taken_over:
                self._drain()
                self._put_leftovers(durable=durable)
                self._publish()
            on_disk = self.core.all_on_disk()
        finally:
            self.lock.release()
        if not durable:
            self.wake.set()  # the thread syncs it on its next round
        return on_disk

    def take_over(self, timeout: float) -> bool:
        """For close(): stop the thread, spool what is left, unlock the spool; False (and the
        thread does it when it stops) if the core could not be taken within ``timeout``."""
        self.stop.set()
        self.wake.set()
        if not self.lock.acquire(timeout=max(0.0, timeout)):
            self.hand_back = True
            return False
        try:
            if not self.taken_over:
                self.taken_over = True
                self._put_away(release=True)
        finally:
            self.lock.release()
        return True

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with self.lock:
                if self.taken_over:
                    return
                if self.spool is None and not self.meta.get("generated"):
                    # An explicit name must learn now whether a spool directory already has it
                    # (another process's, not ours to extend): later, events would already have
                    # been sent under it. A generated name cannot collide: its directory is made
                    # when something is first spooled, off the path of a first connection.
                    self._open_spool(time.monotonic())
            while not self.stop.is_set():
                with self.lock:
                    if self.taken_over:
                        return
                    self.core.connecting(time.monotonic())
                ws = self._connect()
                if ws is None:
                    with self.lock:
                        if self.taken_over:
                            return
                        outcome = self._apply(self.core.connect_failed(time.monotonic()))
                    self._publish(force=True)
                    if isinstance(outcome, GiveUp):
                        return
                    self._pause(outcome.seconds if isinstance(outcome, Wait) else 0.0)
                    continue
                self._pause(self._session(ws))
        except Exception as exc:  # a bug here must not take the training process down
            self.core.counts["errors"] += 1
            self.owner.log.exception("fedrelay emitter %s: sender failed: %r", self.core.producer, exc)
        finally:
            with self.lock:
                if not self.taken_over:
                    self._put_away(release=self.hand_back)
            self.done.set()
            self._publish(force=True)

    def _put_away(self, *, release: bool) -> None:
        """Everything not acked to disk; with ``release``, unlock the spool (and remove it if empty)."""
        try:
            self._drain()
            self._put_leftovers()
        except Exception as exc:
            self.core.counts["errors"] += 1
            self.owner.log.error(
                "fedrelay emitter %s: could not spool leftovers: %r", self.core.producer, exc
            )
        self._sync_spool()
        if release and self.spool is not None:
            self.spool.release()
        self._publish(force=True)  # waiters see the stop at once

    def _put_leftovers(self, *, durable: bool = True) -> None:
        write = self.core.leftovers(time.monotonic())
        if write is not None:
            self._write(write, durable=durable)
        elif self.spool is not None and self.spool.meta.get("max_sent") != self.core.sent_mark:
            self._write_meta(max_sent=self.core.sent_mark)

    def _sync_spool(self) -> None:
        """fsync what a ``settle`` wrote in a hurry (lock held; the training thread goes on)."""
        if self.spool is None or not self.spool.unsynced:
            return
        try:
            self.spool.sync()
        except OSError as exc:
            self.core.counts["errors"] += 1
            self.owner._once("spool_sync", "cannot sync spool %s (%s)", self.spool.path, exc)

    def _publish(self, *, force: bool = False) -> None:
        """Tell waiters (flush, settle) where things stand."""
        settled = self.core.settled
        if force or settled != self.settled:
            with self.cond:
                self.settled = settled
                self.cond.notify_all()

    def _pause(self, seconds: float) -> None:
        """Back off (or just return, for 0), draining the queue meanwhile so that memory stays
        bounded and waiters see given-up events settle."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            with self.lock:
                if self.taken_over:
                    return
                self._drain()
                self._sync_spool()
                self._publish()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.wake.wait(min(remaining, 0.05))
            self.wake.clear()

    # -- connecting -----------------------------------------------------------------------------

    def _connect(self) -> ClientConnection | None:
        """A connection to the address the core says (only this thread moves it on)."""
        owner = self.owner
        base = self.core.url
        url = publish_url(base, self.core.producer)
        headers = {"Authorization": f"Bearer {owner._token}"} if owner._token else None
        started = time.monotonic()
        try:
            context = owner._tls_context(base)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.last_error = explain_ca_file(owner._ca_file, exc)
            owner._once("ca_file", "%s", self.last_error, level=logging.ERROR)
            return None
        try:
            sock = self._open_socket(url, started + owner._connect_timeout)
            # connect() is a context manager; entering it by hand (the connection is closed by
            # _session) avoids the deprecated direct use on websockets >= 17.1 without needing
            # its ``legacy`` flag, which older supported versions (>= 15) do not accept.
            return connect(
                url,
                sock=sock,
                ssl=context,
                additional_headers=headers,
                open_timeout=max(0.5, started + owner._connect_timeout - time.monotonic()),
                close_timeout=1,
                compression=None,
                max_size=2**24,
                user_agent_header=f"fedrelay-emitter/{__version__}",
            ).__enter__()
        except InvalidStatus as exc:
            code = exc.response.status_code
            self.last_error = f"relay answered HTTP {code}"
            hint = " (check the publish token)" if code in (401, 403) else ""
            owner._once(f"http_{code}", "relay at %s answered HTTP %s%s; retrying", base, code, hint)
        except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, ValueError) as exc:
            problem = certificate_problem(exc)
            if problem is not None:
                self.last_error = explain_certificate(base, problem, owner._ca_file)
                owner._once("certificate", "%s", self.last_error, level=logging.ERROR)
            else:
                self.last_error = f"cannot connect to {base}: {exc!r}"
                owner._once(
                    f"connect {base}",
                    "cannot connect to %s (%s); %s",
                    base,
                    exc,
                    "trying the next address" if self.core.relays.several else "retrying in the background",
                )
        return None

    def _open_socket(self, url: str, deadline: float) -> socket.socket:
        """A TCP connection, attempted without blocking for more than ``_CONNECT_SLICE`` at a
        time, so that a stop (close() at exit) ends an attempt to a host that drops packets."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        infos = socket.getaddrinfo(parts.hostname or "localhost", port, type=socket.SOCK_STREAM)
        failure: OSError = OSError(f"no address for {parts.hostname}")
        self._tell_core(self.core.dialing)
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                code = sock.connect_ex(address)
                if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OSError(code, f"{errno.errorcode.get(code, code)} connecting to {address}")
                self._dial = sock
                while code != 0:
                    if self.stop.is_set():
                        raise ConnectionAbortedError("the emitter is closing")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"timed out connecting to {address}")
                    _, writable, _ = select.select([], [sock], [], min(_CONNECT_SLICE, remaining))
                    if writable:
                        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if code:
                            raise OSError(code, f"{errno.errorcode.get(code, code)} connecting to {address}")
                        break
                self._tell_core(self.core.transport_connected)
                self._dial = None
                sock.setblocking(True)
                return sock
            except OSError as exc:
                self._dial = None
                sock.close()
                failure = exc
        raise failure

    def _tell_core(self, step: Any) -> None:
        """A connect's progress to the core (``dialing``, ``transport_connected``), then to the
        waiters: their wait's end moves with it (the connect budget starts, or no longer
        applies)."""
        with self.lock:
            if self.taken_over:
                return
            step(time.monotonic())
        self._publish(force=True)

    # -- a session ----------------------------------------------------------------------------

    def _session(self, ws: ClientConnection) -> float:
        """Run one connection until it ends; the seconds to wait before the next one."""
        failed, close_code, delay = False, None, 0.0
        try:
            delay = self._converse(ws)
        except (ConnectionClosed, OSError, TimeoutError, ValueError) as exc:
            failed = True
            if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                close_code = exc.rcvd.code
            self.last_error = f"connection lost: {exc!r}"
            self.owner._once(
                f"disconnected {self.core.url}",
                "connection to %s lost (%r); %s",
                self.core.url,
                exc,
                "moving to the next address" if self.core.relays.several else "reconnecting",
            )
        except Exception as exc:  # a bug must cost a reconnect, not the sender
            failed = True
            self.core.counts["errors"] += 1
            self.last_error = f"sender error: {exc!r}"
            self.owner.log.exception("fedrelay emitter %s: sender error; reconnecting", self.core.producer)
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                ws.close()
        with self.lock:
            if self.taken_over:
                return 0.0
            outcome = self._apply(
                self.core.session_ended(time.monotonic(), failed=failed, close_code=close_code)
            )
        self._publish(force=True)
        return outcome.seconds if isinstance(outcome, Wait) else delay

    def _converse(self, ws: ClientConnection) -> float:
        """The hello, the holding report, then frames out and replies in until the session ends
        (an exception) or the core says to leave it (the seconds to wait)."""
        frame = json.loads(ws.recv(timeout=self.owner._connect_timeout))
        if not isinstance(frame, dict) or frame.get("op") not in ("hello", "error"):
            raise ValueError(f"expected hello, got {str(frame)[:200]}")
        outgoing: list[str] = []
        with self.lock:
            if self.taken_over:
                return 0.0
            outcome = self._apply(self.core.hello(frame, time.monotonic()))
            if outcome is not None:
                return outcome.seconds if isinstance(outcome, Wait) else 0.0
            self.connected = True
            self.last_error = None
            self._drain()
            self._holding(outgoing)
        self._publish(force=True)
        for text in outgoing:
            ws.send(text)
        self.owner._session_started()
        replies = _ReplyReader(ws, self.wake, self.core.producer)
        while True:
            outgoing = []
            with self.lock:
                if self.taken_over:
                    return 0.0
                while replies.inbox:
                    outcome = self._apply(self.core.received(self._parse(replies.inbox.popleft())))
                    if outcome is not None:
                        return outcome.seconds if isinstance(outcome, Wait) else 0.0
                self._drain()
                self._collect(outgoing)
                self._sync_spool()
                self._publish()
                stopping = self.stop.is_set()
            for text in outgoing:
                ws.send(text)
            if stopping:
                return 0.0
            if replies.ended is not None and not replies.inbox:
                raise replies.ended
            # Emitted events wait up to one linger so that they leave in batches; a flush,
            # close() or a reply from the relay ends the wait at once.
            self.wake.wait(self.owner._linger)
            self.wake.clear()

    def _parse(self, message: str | bytes) -> Any:
        try:
            return json.loads(message)
        except ValueError:
            self.owner._once("bad_reply", "relay sent something that is not JSON: %.100r", message)
            return None

    def _holding(self, outgoing: list[str]) -> None:
        while (action := self.core.holding()) is not None:
            if isinstance(action, ReadSegment):
                self._load(action.segment)
                continue
            outgoing.append(action.frame)
            return

    def _collect(self, outgoing: list[str]) -> None:
        """Frames for the window the core allows, with their marks recorded first."""
        while (action := self.core.next_send()) is not None:
            if isinstance(action, ReadSegment):
                self._load(action.segment)
                continue
            if action.mark is not None:
                self._write_meta(max_sent=action.mark)
            outgoing.append(action.frame)

    # -- carrying out the core's actions (lock held) ---------------------------------------

    def _apply(self, actions: list[Action]) -> Wait | GiveUp | None:
        """Do what does not need the connection; return the instruction to leave the session."""
        outcome: Wait | GiveUp | None = None
        for action in actions:
            if isinstance(action, DeleteSegments):
                if self.spool is not None:
                    self.spool.remove(action.segments)
            elif isinstance(action, MarkReach):
                if self.mark is not None:
                    self.mark.set(up=action.up)
            elif isinstance(action, TakeName):
                self._take_name(action)
            elif isinstance(action, WriteSegments):
                self._write(action)
            elif isinstance(action, Wait | GiveUp):
                outcome = action
            elif isinstance(action, Send | SendControl):  # pragma: no cover - not produced here
                raise AssertionError(f"{action!r} outside a session")
        return outcome

    def _drain(self) -> None:
        """Hand what emit() queued to the core; spill to disk as it says."""
        queue, take = self.queue, self.core.take
        now = time.monotonic()
        while queue:
            try:
                item = queue.popleft()
            except IndexError:
                break
            write = take(*item, now)
            if write is not None:
                self._write(write)

    def _write(self, action: WriteSegments, *, durable: bool = True) -> None:
        """Write what the core moved out of memory (it only asks when the spool may be tried)."""
        now = time.monotonic()
        if self.spool is None:
            self._open_spool(now, counted=False, sync=durable)  # a failure is counted once, by the core
        written: list[Segment] = []
        failed = self.spool is None
        if self.spool is not None:
            try:
                for chunk in action.chunks:
                    written.append(self.spool.append(chunk, sync=durable))
                self.spool.write_meta(max_sent=self.core.sent_mark, sync=durable)
            except OSError as exc:
                failed = True
                self.owner._once(
                    "spool_write",
                    "cannot write spool %s (%s); keeping at most %d events in memory",
                    self.spool.path,
                    exc,
                    self.core.max_buffer,
                    level=logging.ERROR,
                )
        self.core.spooled(written, failed, now)

    def _write_meta(self, **changes: Any) -> None:
        if self.spool is None:
            return
        try:
            self.spool.write_meta(**changes)
        except OSError as exc:  # delivery goes on; only a crash right now could duplicate
            self.core.counts["errors"] += 1
            self.owner._once("spool_meta", "cannot write %s/meta.json (%s)", self.spool.path, exc)

    def _open_spool(self, now: float, *, counted: bool = True, sync: bool = True) -> None:
        meta = {**self.meta, "max_sent": self.core.sent_mark, "created": time.time()}
        root = self.owner._spool_root
        try:
            spool = Spool.create(root, self.core.producer, meta, sync=sync)
            if spool is None:  # an explicit name already has a spool dir: not ours to extend
                spool = Spool.create(root, self.core.name_taken_by_spool(), meta, sync=sync)
        except OSError as exc:
            if counted:
                self.core.counts["errors"] += 1
            self.core.spool_retry_at = now + SPOOL_RETRY
            self.owner._once("spool_dir", "spool dir %s unusable (%s)", root, exc, level=logging.ERROR)
            return
        self.spool = spool

    def _load(self, segment: Segment) -> None:
        """Read a segment for the core; one that cannot be read is set aside, not retried."""
        assert self.spool is not None
        try:
            entries = self.spool.read(segment)
        except (OSError, DamagedSegment) as exc:
            if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
                raise  # a reconnect, after a backoff, reads it again
            where = self.spool.quarantine(segment)
            self.core.segment_unreadable(segment)
            self.owner._once(
                "bad_segment",
                "spool segment %s unreadable (%s): %d events skipped, file kept as %s "
                "(counted in stats['bad_segments'])",
                self.spool.path / segment.name,
                exc,
                segment.count,
                where or "nothing (it is gone)",
                level=logging.ERROR,
            )
            return
        self.core.segment_loaded(segment, entries)

    def _take_name(self, action: TakeName) -> None:
        if self.spool is not None:
            if not self.spool.rename(action.new):
                self.owner._once("spool_rename", "could not rename spool dir %s", self.spool.path)
            self._write_meta(max_sent=0)
        self.owner.log.warning(
            "fedrelay emitter: %s; publishing as %r instead so that no event is lost or stored twice",
            action.reason,
            action.new,
        )
