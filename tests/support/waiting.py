"""Waiting on a condition with a timeout: the only way tests synchronise with processes,
sockets and threads (a bare sleep would pass or fail by the machine's speed).

A predicate returns a truthy value when the condition holds (that value is returned), or may
raise to fail at once (a connection that ended, a process that died); for :func:`until` it may
also be a coroutine function (an HTTP request run in a thread, say). At the deadline a
``TimeoutError`` names what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, *, interval: float = 0.02, what: str = "a condition"
) -> T:
    """Poll ``predicate`` from a thread (blocking) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 20.0,
    *,
    interval: float = 0.005,
    what: str = "a condition",
) -> T:
    """Poll ``predicate`` on the event loop until it returns a truthy value; the loop runs
    meanwhile (a predicate that blocks, such as an HTTP call, should be cheap or in a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
