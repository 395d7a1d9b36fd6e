"""A stream of padded events sized from the kernel's socket buffers: big enough that a client
that does not read is certainly cut in the middle of it."""

from __future__ import annotations

import json

from tests.support.clients import event
from tests.support.sockets import kernel_send_buffer_max

PAD = 4000
"""Bytes of padding per event: about 4.1 KB each on the wire."""
BATCH = 10
"""Events per producer frame: about 41 KB, well under the 64 KiB --max-queue-bytes the
slow-consumer tests give the relay."""


def stream_size() -> int:
    """Events whose total is twice what the kernel can hold for one socket, plus some."""
    return (2 * kernel_send_buffer_max() + (1 << 20)) // (PAD + 100)


def padded(run: str, i: int) -> dict:
    return event(run, i, pad="p" * PAD)


def seqs_in(frame: str | bytes) -> list[int]:
    msg = json.loads(frame)
    if isinstance(msg, list):
        return [e["seq"] for e in msg]
    return [msg["seq"]] if "seq" in msg else []
