"""Python ``logging`` records as ``log`` events: ``forward_logs()``, one line, removable.

Flower's ``flwr log`` shows the ServerApp's output only; a ClientApp's logs stay on its SuperNode.
A handler in every training process sends each record to the relay instead, where the run's
other events already are. It runs inside the training loop, so it is bounded in every way:

- a level threshold (INFO by default; the loggers' own levels still apply first);
- a rate limit per process: two token buckets of ``rate`` records/s with bursts of ``burst``
  (20/s and 200 by default), one for records below ERROR and one for ERROR and above, so a flood
  of chatter cannot hide an exception; what is dropped is counted (``stats["dropped"]``) and
  reported in the ``dropped`` field of the next ``log`` event, or in one last event at removal;
- a size cap per record: ``message`` keeps its first ``max_message`` characters, ``exception``
  its last ``max_exception`` (where the error is), and ``truncated`` says what was cut;
- it never blocks (``Emitter.emit`` only queues) and never recurses: records of the emitter's own
  loggers (``fedrelay.*``) and of ``websockets.*`` are never forwarded, nor anything logged
  while the handler itself runs (a thread-local guard).

Where a record comes from (run, role, client id, round, epoch) is a :class:`LogSource`: the
Flower wrapper and mod and the Lightning callback set one around the work they observe
(:func:`log_source`, a context variable, so other threads are not mislabelled); records logged
elsewhere in the process go to the run of the last source seen, or the emitter's run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .client import Emitter
from .shared import get_emitter

QUIET_LOGGERS = frozenset(("fedrelay", "websockets"))
"""Top-level logger names never forwarded: the emitter's own and its WebSocket library's."""
QUIET_CHILD_LOGGERS = ("flwr.fedrelay",)
"""Loggers under another library's name that are ours: the Flower integration logs through
``flwr.fedrelay`` so that Flower's handlers show its lines."""


def _ours(name: str) -> bool:
    """Whether a logger is the emitter's own (never forwarded: it would feed itself)."""
    if name.partition(".")[0] in QUIET_LOGGERS:
        return True
    return any(name == quiet or name.startswith(quiet + ".") for quiet in QUIET_CHILD_LOGGERS)


DEFAULT_RATE = 20.0
DEFAULT_BURST = 200
DEFAULT_MAX_MESSAGE = 8192
DEFAULT_MAX_EXCEPTION = 16384
"""Characters; with UTF-8 a record stays under 100 KB, far below the relay's 1 MiB frame."""


@dataclass(slots=True)
class LogSource:
    """Who a record belongs to. Mutable: the strategy wrapper moves ``round`` on as rounds pass."""

    run_id: str | None = None
    role: str | None = None
    client_id: str | int | None = None
    round: int | None = None
    epoch: int | None = None


_current: contextvars.ContextVar[LogSource | None] = contextvars.ContextVar("fedrelay_log_src", default=None)
_inside = threading.local()


@contextlib.contextmanager
def log_source(source: LogSource) -> Iterator[LogSource]:
    """Records logged in this context (thread, task) carry ``source``.

    The run and role also become the process forwarder's fallback, for records logged by other
    threads (Flower logs a ClientApp's exception from a worker thread of the simulation), and
    stay so after the context: they still belong to that run. The client id and round do not.
    """
    token = _current.set(source)
    forwarder = _installed.get(os.getpid())
    if forwarder is not None and forwarder.fallback.run_id is None and source.run_id is not None:
        forwarder.fallback = LogSource(run_id=source.run_id, role=source.role)
    try:
        yield source
    finally:
        try:
            _current.reset(token)
        except ValueError:  # left in another context (a callback's hooks): leave no source behind
            _current.set(None)
        forwarder = _installed.get(os.getpid())
        if forwarder is not None and source.run_id is not None:
            forwarder.fallback = LogSource(run_id=source.run_id, role=source.role)


def parse_level(level: int | str | bool) -> int:
    """``"INFO"``, ``"warning"``, ``20`` or ``True`` (= INFO) -> a logging level number."""
    if level is True:
        return logging.INFO
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown logging level {level!r}")
    return number


def check_level(setting: bool | int | str | None) -> bool | int | str | None:
    """An integration's ``forward_logs`` option, refused at construction if it names no level."""
    if setting is not None and setting is not False:
        parse_level(setting)
    return setting


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per record. No clock of its own."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimit:
    """The process's budget: one bucket below ERROR, one from ERROR up, and the count dropped.

    Shared by every forwarder of the process (the integrations install one per run or message),
    so the limit is per process whatever installs and removes handlers.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = float(rate), int(burst)
        now = time.monotonic()
        self.buckets = (TokenBucket(rate, burst, now), TokenBucket(rate, burst, now))
        self.dropped_since = 0
        """Dropped since the last ``log`` event that reported it."""
        self._lock = threading.Lock()

    def admit(self, levelno: int, now: float) -> bool:
        with self._lock:
            if self.buckets[levelno >= logging.ERROR].take(now):
                return True
            self.dropped_since += 1
            return False

    def take_dropped(self) -> int:
        with self._lock:
            dropped, self.dropped_since = self.dropped_since, 0
            return dropped


_limits: dict[int, RateLimit] = {}


def process_rate_limit(rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST) -> RateLimit:
    """This process's :class:`RateLimit`; a new one (full buckets) only when the settings change."""
    limit = _limits.get(os.getpid())
    if limit is None or (limit.rate, limit.burst) != (float(rate), int(burst)):
        limit = _limits[os.getpid()] = RateLimit(rate, burst)
    return limit


def cap_head(text: str, limit: int) -> tuple[str, bool]:
    """The first ``limit`` characters and a note of how many more there were."""
    if len(text) <= limit:
        return text, False
    return f"{text[:limit]}… [{len(text) - limit} more characters]", True


def cap_tail(text: str, limit: int) -> tuple[str, bool]:
    """The last ``limit`` characters (a traceback ends with the error) and a note of the cut."""
    if len(text) <= limit:
        return text, False
    return f"[{len(text) - limit} characters cut] …{text[-limit:]}", True


def exception_text(record: logging.LogRecord) -> str | None:
    """The traceback and stack info a Formatter would print, or None."""
    parts = []
    if record.exc_info and record.exc_info[0] is not None:
        parts.append(record.exc_text or "".join(traceback.format_exception(*record.exc_info)).rstrip())
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts) if parts else None


def record_data(
    record: logging.LogRecord, source: LogSource, *, max_message: int, max_exception: int
) -> dict[str, Any]:
    """The ``data`` of a ``log`` event for ``record`` (pure: no I/O, no emitter)."""
    try:
        message = record.getMessage()
    except Exception as exc:  # bad %-args: still say something
        message = f"{record.msg!r} (message could not be formatted: {type(exc).__name__})"
    truncated: dict[str, int] = {}
    full = len(message)
    message, cut = cap_head(message, max_message)
    if cut:
        truncated["message"] = full
    data: dict[str, Any] = {
        "level": record.levelname.lower(),
        "levelno": record.levelno,
        "logger": record.name,
        "message": message,
        "file": record.filename,
        "line": record.lineno,
        "function": record.funcName,
        "process": record.process,
    }
    text = exception_text(record)
    if text is not None:
        full = len(text)
        data["exception"], cut = cap_tail(text, max_exception)
        if cut:
            truncated["exception"] = full
    if truncated:
        data["truncated"] = truncated
    if source.client_id is not None:
        data["client_id"] = source.client_id
    if source.round is not None:
        data["round"] = source.round
    if source.epoch is not None:
        data["epoch"] = source.epoch
    return data


class LogForwarder(logging.Handler):
    """A ``logging.Handler`` that emits each record as a ``log`` event. Build it with :func:`forward_logs`."""

    def __init__(
        self,
        emitter: Emitter | None = None,
        level: int | str = logging.INFO,
        *,
        run_id: str | None = None,
        role: str | None = None,
        client_id: str | int | None = None,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_exception: int = DEFAULT_MAX_EXCEPTION,
    ) -> None:
        super().__init__(parse_level(level))
        self._emitter = emitter
        self.fallback = LogSource(run_id=run_id, role=role, client_id=client_id)
        """Used for records logged outside any :func:`log_source` context."""
        self.limit = process_rate_limit(rate, burst)
        self.max_message = max(64, int(max_message))
        self.max_exception = max(64, int(max_exception))
        self.stats = dict.fromkeys(("forwarded", "dropped", "truncated", "errors"), 0)
        self._loggers: list[logging.Logger] = []
        self._added_last_resort: list[logging.Logger] = []

    @property
    def emitter(self) -> Emitter:
        if self._emitter is None:
            self._emitter = get_emitter()
        return self._emitter

    # -- the hot path ----------------------------------------------------------------------------

    def handle(self, record: logging.LogRecord) -> bool:
        """Skip the lock and filters for what is never forwarded (cheaper than emit's checks)."""
        if getattr(_inside, "active", False) or _ours(record.name):
            return False
        if record.__dict__.get("_fedrelay_forwarded"):
            return False  # reached us twice: attached to a logger and to one of its ancestors
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        _inside.active = True
        try:
            record._fedrelay_forwarded = True
            if not record.exc_info and isinstance(record.msg, str) and not record.msg.strip():
                return  # Flower's blank spacer lines: nothing to read, not worth a token
            if not self.limit.admit(record.levelno, time.monotonic()):
                self.stats["dropped"] += 1
                return
            source = _current.get() or self.fallback
            data = record_data(record, source, max_message=self.max_message, max_exception=self.max_exception)
            if "truncated" in data:
                self.stats["truncated"] += 1
            dropped = self.limit.take_dropped() if self.limit.dropped_since else 0
            if dropped:
                data["dropped"] = dropped
            self._send(data, source)
            self.stats["forwarded"] += 1
        except Exception:
            self.stats["errors"] += 1  # never into the training loop, never back into logging
        finally:
            _inside.active = False

    def _send(self, data: dict[str, Any], source: LogSource) -> None:
        fallback = self.fallback
        run_id = source.run_id or fallback.run_id
        role = source.role or fallback.role
        client_id = source.client_id if source.client_id is not None else fallback.client_id
        if client_id is not None and role is None:
            role = "client"
        self.emitter.emit("log", data, run_id=run_id, role=role, client_id=client_id)

    def forward_exception(self, exc: BaseException, message: str, *, logger: str = "fedrelay") -> None:
        """Forward an exception an integration caught (a ClientApp's): Flower logs it elsewhere, if at all.

        Goes straight to :meth:`emit` (our own logger names are otherwise never forwarded), so it
        is rate limited and capped like any record, and printed nowhere.
        """
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code if tb is not None else None
        record = logging.LogRecord(
            logger,
            logging.ERROR,
            where.co_filename if where else "",
            tb.tb_lineno if tb is not None else 0,
            "%s",
            (message,),
            (type(exc), exc, exc.__traceback__),
            func=where.co_name if where else None,
        )
        self.emit(record)

    # -- attach, detach --------------------------------------------------------------------------

    def attach(self, loggers: Iterable[str | logging.Logger]) -> None:
        for item in loggers:
            logger = item if isinstance(item, logging.Logger) else logging.getLogger(item)
            if not logger.handlers and logger is logging.getLogger():
                # Without any handler, Python prints WARNING and above to stderr (lastResort);
                # ours would end that. Keep what the program printed before.
                lastResort = logging.lastResort
                if lastResort is not None:
                    logger.addHandler(lastResort)
                    self._added_last_resort.append(logger)
            logger.addHandler(self)
            self._loggers.append(logger)

    def remove(self) -> None:
        """Detach from every logger, report what the rate limit dropped, stop being the process's."""
        for logger in self._loggers:
            logger.removeHandler(self)
        for logger in self._added_last_resort:
            logger.removeHandler(logging.lastResort)
        self._loggers, self._added_last_resort = [], []
        if _installed.get(os.getpid()) is self:
            del _installed[os.getpid()]
        self.close()

    def close(self) -> None:
        """A last ``log`` event with the count dropped since the previous one (also at exit)."""
        dropped = self.limit.take_dropped()
        if dropped:
            data = {
                "level": "warning",
                "levelno": logging.WARNING,
                "logger": "fedrelay.logs",
                "message": f"{dropped} log records were dropped by the rate limit",
                "dropped": dropped,
            }
            with contextlib.suppress(Exception):
                self._send(data, self.fallback)
        super().close()


_installed: dict[int, LogForwarder] = {}
"""pid -> the process's forwarder (a forked child installs its own)."""
_install_lock = threading.Lock()


def forward_logs(
    emitter: Emitter | None = None,
    level: int | str = "INFO",
    *,
    loggers: Iterable[str | logging.Logger] = ("",),
    run_id: str | None = None,
    role: str | None = None,
    client_id: str | int | None = None,
    rate: float = DEFAULT_RATE,
    burst: int = DEFAULT_BURST,
    max_message: int = DEFAULT_MAX_MESSAGE,
    max_exception: int = DEFAULT_MAX_EXCEPTION,
) -> LogForwarder:
    """Forward this process's ``logging`` records of ``level`` and above to the relay.

    Attaches one :class:`LogForwarder` to ``loggers`` (the root logger by default; name others
    whose ``propagate`` is off). One per process: while one is installed, later calls return it
    unchanged, as :func:`get_emitter` does. ``handler.remove()`` detaches it. Records go to
    ``run_id``, else the run of the current :class:`LogSource`, else the emitter's run.
    """
    with _install_lock:
        existing = _installed.get(os.getpid())
        if existing is not None:
            return existing
        forwarder = LogForwarder(
            emitter,
            level,
            run_id=run_id,
            role=role,
            client_id=client_id,
            rate=rate,
            burst=burst,
            max_message=max_message,
            max_exception=max_exception,
        )
        forwarder.attach(loggers)
        _installed[os.getpid()] = forwarder
        return forwarder


def installed_forwarder() -> LogForwarder | None:
    """The forwarder of this process, if one is installed."""
    return _installed.get(os.getpid())


@contextlib.contextmanager
def forwarding(
    setting: bool | int | str | None, emitter: Emitter, source: LogSource
) -> Iterator[LogSource | None]:
    """For the integrations: forward logs per ``setting`` while the block runs, under ``source``.

    ``setting`` False/None does nothing. A forwarder installed here (none was) is removed at the
    end; one that was already installed (by the user, or by a previous message of a ClientApp
    process) is kept, as is its level.
    """
    if setting is None or setting is False:
        yield None
        return
    mine = installed_forwarder() is None
    forwarder = forward_logs(emitter, parse_level(setting))
    try:
        with log_source(source) as current:
            yield current
    finally:
        if mine and forwarder is installed_forwarder():
            forwarder.remove()


__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_RATE",
    "LogForwarder",
    "LogSource",
    "TokenBucket",
    "forward_logs",
    "installed_forwarder",
    "log_source",
    "parse_level",
    "record_data",
]
