"""One producer name, one emitter: telling a resend from another emitter's event.

A producer name stands for one ordered sequence of ids. Two emitters started with the same
explicit name (two hosts, two spool dirs) both count from 1; the relay used to drop whichever
copy of each id came second as a duplicate and ack it, so half their events were lost with
nobody told. The relay now refuses a second live connection under a name
(``producer_in_use``), and an id that arrives again with a different body than the one stored
(``producer_conflict``); the emitter then takes a fresh name (docs/protocol.md).

What is compared is what the producer sent, without the fields the relay adds. The stored
body is found through an index on ``(producer, producer_id)`` (store.py), so the check needs
no memory per producer and survives a restart; it runs only when an id comes again, which an
emitter does after a reconnect for what was not acked yet.
"""

from __future__ import annotations

import json
from typing import Any

from .hub import relay_timestamp, stored_form

IN_USE = "producer_in_use"
CONFLICT = "producer_conflict"
CLOSE_CODE = 4409
"""Close code for both refusals (4000-4999: the application's own)."""
PROBE_TIMEOUT = 5.0
"""Seconds the older connection under a name gets to answer a ping once a newer one asked for
the name; past it the older one is taken for dead (a cut the relay had not seen) and closed."""


def same_event(sent: dict[str, Any], stored: tuple[int, float, str], producer: str) -> bool:
    """Whether ``sent`` (a validated event as the producer sent it) is the event stored as
    ``(seq, received_at, body)``: an identical resend, not another emitter's event.

    First the cheap way, rebuilding the stored form the way the hub built it; a producer
    that re-encodes its events may order keys differently, so then field by field. A
    timestamp the relay added (the event came without one) is not the producer's.
    """
    seq, received_at, body = stored
    if stored_form(dict(sent), seq, producer, received_at) == body:
        return True
    kept: dict[str, Any] = json.loads(body)
    mine = {key: value for key, value in sent.items() if key not in ("seq", "producer")}
    kept.pop("seq", None)
    kept.pop("producer", None)
    if mine.get("timestamp") is None:
        mine.pop("timestamp", None)
        if kept.get("timestamp") == relay_timestamp(received_at):
            kept.pop("timestamp")
    return mine == kept
