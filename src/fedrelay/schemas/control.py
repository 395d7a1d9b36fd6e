"""Control frames: everything on the wire that is not an event.

The relay builds these as plain dicts on its hot path; the models exist to
document the contract and to generate JSON Schema for frontends.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hello(_Frame):
    """Sent to a producer on connect: where the relay's dedup stands for it, and the
    frame limits past which its frames are refused."""

    op: Literal["hello"]
    producer: str
    last_id: int | None
    max_frame_bytes: int
    max_events_per_frame: int
    accepts: list[str] = []
    """Optional control ops this relay takes on ``/publish`` (``holding``); an older relay sends
    none, and a producer sends only what is listed."""


class Ack(_Frame):
    """Every event of ``producer`` with id <= ``upto`` is stored or was refused."""

    op: Literal["ack"]
    producer: str
    upto: int


class Subscribed(_Frame):
    op: Literal["subscribed"]
    run_id: str
    since: int | None
    last_seq: int | None


class Unsubscribed(_Frame):
    op: Literal["unsubscribed"]
    run_id: str


class Gap(_Frame):
    """History no longer holds ``since + 1``: events resume at ``resume_from``."""

    op: Literal["gap"]
    run_id: str
    since: int
    resume_from: int


class ErrorFrame(_Frame):
    op: Literal["error"]
    code: str
    detail: str
    id: int | None = None
    index: int | None = None
    run_id: str | None = None
    stale_after: float | None = None
    """With ``producer_in_use``: seconds after which the other connection, if it is dead,
    has surely been noticed and closed by the relay."""


class Pong(_Frame):
    op: Literal["pong"]


class Subscribe(_Frame):
    """Subscriber -> relay: add a run (or ``*``) to this connection."""

    op: Literal["subscribe"]
    run_id: str
    since: int = 0


class Unsubscribe(_Frame):
    op: Literal["unsubscribe"]
    run_id: str


class Ping(_Frame):
    op: Literal["ping"]


class HeldRun(_Frame):
    count: Annotated[int, Field(ge=1)]
    """Events of the run the producer holds, not acked yet."""
    upto: Annotated[int, Field(ge=1)]
    """The highest producer id among them."""


class Holding(_Frame):
    """Producer -> relay, once per session right after ``hello`` when ``hello.accepts`` lists it:
    what the producer holds unacked (memory, spool, adopted spools), per run. The relay shows those
    runs as incomplete until the producer's acked position reaches ``upto``."""

    op: Literal["holding"]
    runs: dict[str, HeldRun]


RelayControl = Hello | Ack | Subscribed | Unsubscribed | Gap | ErrorFrame | Pong
SubscriberControl = Subscribe | Unsubscribe | Ping
ProducerControl = Holding
