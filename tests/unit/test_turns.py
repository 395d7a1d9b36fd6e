"""Catch-up turns and bounded reads: a holder that is cancelled or times out gives its turn
back, so a read that failed never starves its address (issue 15)."""

from __future__ import annotations

import asyncio

import pytest

from fedrelay.relay.eventlog import StoreError
from fedrelay.relay.store_reads import bounded
from fedrelay.relay.turns import TurnsPerKey


async def hold(turns: TurnsPerKey, key: str, held: list[str], name: str, until: asyncio.Event) -> None:
    async with turns.turn(key):
        held.append(name)
        await until.wait()


async def test_cancelled_holders_and_waiters_give_their_turns_back():
    turns = TurnsPerKey(2)
    held: list[str] = []
    never = asyncio.Event()
    holders = [asyncio.create_task(hold(turns, "a", held, f"h{i}", never)) for i in range(2)]
    waiters = [asyncio.create_task(hold(turns, "a", held, f"w{i}", never)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert held == ["h0", "h1"]
    waiters[0].cancel()  # a waiter that leaves the line
    holders[0].cancel()  # a holder whose subscriber left
    await asyncio.sleep(0.01)
    assert held == ["h0", "h1", "w1"]
    holders[1].cancel()
    await asyncio.sleep(0.01)
    assert held == ["h0", "h1", "w1", "w2"]
    for task in [*holders, *waiters]:
        task.cancel()
    await asyncio.gather(*holders, *waiters, return_exceptions=True)
    assert len(turns) == 0


async def test_a_read_that_times_out_in_its_turn_gives_it_back():
    turns = TurnsPerKey(1)
    never = asyncio.Event()

    async def stuck_read() -> None:
        async with turns.turn("a"):
            await bounded(never.wait(), "stuck read", seconds=0.05)

    with pytest.raises(StoreError, match=r"stuck read: no answer within 0\.05 s"):
        await asyncio.wait_for(stuck_read(), 5)
    async with asyncio.timeout(1):
        async with turns.turn("a"):
            pass
    assert len(turns) == 0


async def failing(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    "exc",
    [ConnectionRefusedError(111, "refused"), TimeoutError(), OSError(5, "I/O error"), RuntimeError("x")],
)
async def test_store_failures_are_store_errors_not_socket_errors(exc):
    with pytest.raises(StoreError) as raised:
        await bounded(failing(exc), "reading run r")
    assert not isinstance(raised.value, OSError)
    assert str(raised.value).startswith("reading run r")


async def test_cancellation_passes_through():
    task = asyncio.create_task(bounded(asyncio.Event().wait(), "reading run r"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
