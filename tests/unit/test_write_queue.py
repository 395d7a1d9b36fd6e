"""The write-behind queue both event logs share: batches, acks after commit, backpressure."""

from __future__ import annotations

import asyncio

from fedrelay.relay.hub import Sequenced
from fedrelay.relay.write_queue import MAX_BATCH_CHARS, WriteQueue


def event(seq: int, body: str = "{}", producer: str = "p") -> Sequenced:
    return Sequenced("r", seq, "log", producer, seq, 0.0, body)


def test_batches_are_bounded_by_count_and_characters_but_hold_one_event_at_least():
    queue = WriteQueue(max_batch=3)
    queue.append([event(i) for i in range(1, 6)])
    assert [item.seq for item in queue.next_batch()] == [1, 2, 3]
    big = "x" * (MAX_BATCH_CHARS // 2 + 1)
    queue = WriteQueue(max_batch=10)
    queue.append([event(1, big), event(2, big), event(3)])
    assert [item.seq for item in queue.next_batch()] == [1]
    huge = WriteQueue(max_batch=10)
    huge.append([event(1, "x" * (MAX_BATCH_CHARS + 1))])
    assert [item.seq for item in huge.next_batch()] == [1]


def test_committed_drops_the_oldest_and_their_characters():
    queue = WriteQueue(max_batch=10)
    queue.append([event(1, "ab", "a"), event(2, "cde", "b")])
    assert (queue.lag, queue.lag_chars, queue.queued_producers()) == (2, 5, {"a", "b"})
    assert queue.full(1, 100) and queue.full(10, 4) and not queue.full(2, 5)
    queue.committed(1)
    assert (queue.lag, queue.lag_chars, queue.queued_producers()) == (1, 3, {"b"})


async def test_callbacks_run_once_their_events_are_committed_and_notified():
    queue = WriteQueue(max_batch=10)
    calls: list[str] = []
    queue.append([event(1)])
    queue.after_commit(lambda: calls.append("first"))
    queue.append([event(2)])
    queue.after_commit(lambda: 1 / 0)  # a failing callback stops no other
    queue.after_commit(lambda: calls.append("second"))
    queue.committed(1)
    assert calls == []  # not before notify: the log delivers the batch first
    queue.notify()
    assert calls == ["first"]
    queue.committed(1)
    queue.notify()
    assert calls == ["first", "second"]
    queue.after_commit(lambda: calls.append("nothing pending"))
    assert calls == ["first", "second"]  # soon, on the loop, not inside after_commit
    await asyncio.wait_for(queue.all_committed(), 5)
    assert calls[-1] == "nothing pending"


async def test_wait_for_room_holds_until_a_commit_or_close_and_never_without_a_writer():
    queue = WriteQueue(max_batch=10)
    queue.append([event(1), event(2)])
    await asyncio.wait_for(queue.wait_for_room(1, 100, None), 5)  # no writer: nothing would make room
    writer = asyncio.create_task(asyncio.Event().wait())
    try:
        held = asyncio.create_task(queue.wait_for_room(1, 100, writer))
        await asyncio.sleep(0)
        assert not held.done()
        queue.committed(1)
        await asyncio.wait_for(held, 5)
        queue.append([event(3)])
        held = asyncio.create_task(queue.wait_for_room(1, 100, writer))
        await asyncio.sleep(0)
        assert not held.done()
        queue.begin_close()
        await asyncio.wait_for(held, 5)
        assert queue.closing and queue.wakeup.is_set()
    finally:
        writer.cancel()
